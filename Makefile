# Set-up and entry points. `make demo` and `make test` work on a fresh machine with Python >= 3.10.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip

.PHONY: demo test venv clean doctor gpu-check

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[cpu,train,export,test]'
	touch $@

demo: venv
	$(BIN)/vlmedge demo

test: venv
	$(BIN)/python -m pytest -q

# What this machine has for the GPU path, and what each --device would use.
doctor: venv
	$(BIN)/vlmedge doctor

# On a GPU machine (under 8 minutes): FP32/FP16/INT8 of shapes-vlm through native TensorRT (with and
# without CUDA graphs) and ONNX Runtime's CUDA and TensorRT providers, checked against CPU FP32;
# writes gpu-check.json. It runs in its own venv that sees the system's packages (JetPack's TensorRT
# and onnxruntime-gpu) with the GPU extras: x86 gets onnxruntime-gpu, cuda-python and tensorrt from
# the index; Jetson numpy<2 and cuda-python (onnxruntime-gpu as docs/jetson.md says). Without a GPU
# it runs in .venv, says why each GPU part did not run, and exits 0.
GPU_VENV   ?= .venv-gpu
GPU_EXTRAS ?= $(if $(filter aarch64,$(shell uname -m)),jetson,gpu$(comma)tensorrt),train,export
comma      := ,
HAS_GPU    := $(shell (nvidia-smi -L >/dev/null 2>&1 || test -e /dev/nvhost-ctrl-gpu) && echo yes)
CHECK_BIN  := $(if $(HAS_GPU),$(GPU_VENV)/bin,$(BIN))

$(GPU_VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv --system-site-packages $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q --upgrade pip
	$(GPU_VENV)/bin/python -m pip install -q -c constraints.txt -e '.[$(GPU_EXTRAS)]'
	touch $@

gpu-check: $(if $(HAS_GPU),$(GPU_VENV)/.installed,venv)
	$(CHECK_BIN)/python -m vlmedge.gpucheck --out gpu-check.json

clean:
	rm -rf $(VENV) $(GPU_VENV) demo-out .pytest_cache gpu-check.json
