"""On a GPU (skipped elsewhere, each test gated on exactly what it needs): ONNX Runtime's CUDA and
TensorRT providers, timing-cache reuse, the pycuda device layer from several threads, and the older
`cuda.cudart` layout of cuda-python. The CPU reference is the shipped bundle on ONNX Runtime CPU."""

import shutil
import threading

import pytest

import vlmedge
from vlmedge.data.scenes import scenes
from vlmedge.runtime.backends import cuda


@pytest.fixture(scope="module")
def images():
    return [s.image for s in scenes("test", 0, 16)]


def _agree(a, b) -> int:
    return sum(x == y for x, y in zip(a, b))


@pytest.mark.gpu
@pytest.mark.ort_cuda
def test_onnxruntime_cuda_provider_captions_like_the_cpu(shapes, ort_pipe, images):
    pipe = vlmedge.load(shapes, device="cuda")
    assert pipe.backend.name == "onnxruntime/CUDAExecutionProvider"
    assert _agree(pipe.caption(images, return_ids=True), ort_pipe.caption(images, return_ids=True)) >= 15
    assert _agree(pipe.caption(images[:4], num_beams=3), ort_pipe.caption(images[:4], num_beams=3)) >= 3


@pytest.mark.gpu
@pytest.mark.ort_tensorrt
def test_onnxruntime_tensorrt_provider_captions_like_the_cpu(shapes, ort_pipe, images, tmp_path):
    bundle = tmp_path / "bundle"  # the provider's engine cache is written beside the bundle
    shutil.copytree(shapes, bundle)
    messages = []
    pipe = vlmedge.load(bundle, device="tensorrt", warn=messages.append)
    assert pipe.backend.name == "onnxruntime/TensorrtExecutionProvider", messages
    assert _agree(pipe.caption(images, return_ids=True), ort_pipe.caption(images, return_ids=True)) >= 15
    assert any((bundle / ".trt-cache").iterdir())  # engines cached for the next session


@pytest.fixture(scope="module")
def engines(shapes, tmp_path_factory):
    from vlmedge.tensorrt.builder import BuildOptions, build_engines

    root = tmp_path_factory.mktemp("gpu-engines")
    cache = root / "timing.cache"
    build_engines(shapes, root / "engines", BuildOptions(timing_cache=cache))
    return root / "engines", cache


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_a_timing_cache_is_reused_and_a_foreign_one_replaced(shapes, engines, tmp_path):
    from vlmedge.tensorrt.builder import BuildOptions, build_engines

    _, cache = engines
    assert cache.stat().st_size > 0
    messages = []
    build_engines(shapes, tmp_path / "again", BuildOptions(timing_cache=cache), warn=messages.append)
    assert messages == []  # this GPU's cache attaches
    foreign = tmp_path / "foreign.cache"
    foreign.write_bytes(b"not a timing cache of this GPU" * 10)
    build_engines(shapes, tmp_path / "fresh", BuildOptions(timing_cache=foreign), warn=messages.append)
    assert len(messages) == 1 and "another GPU or TensorRT version" in messages[0]
    assert foreign.read_bytes() != b"not a timing cache of this GPU" * 10


def _captions_from_threads(pipe, images):
    out, errors = {}, []

    def work(i):
        try:
            out[i] = pipe.caption(images[i::2])
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return out


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_pycuda_layer_runs_engines_from_several_threads(engines, ort_pipe, images, monkeypatch):
    drv = pytest.importorskip("pycuda.driver")
    primary = pytest.importorskip("pycuda.autoprimaryctx")
    monkeypatch.setattr(cuda, "_API", cuda._PyCuda(drv, primary.context))
    pipe = vlmedge.load(engines[0], device="tensorrt")
    out = _captions_from_threads(pipe, images)
    want = ort_pipe.caption(images)
    assert _agree(out[0] + out[1], want[0::2] + want[1::2]) >= 15


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_the_older_cuda_cudart_layout_runs_engines(engines, ort_pipe, images, monkeypatch):
    cudart = pytest.importorskip("cuda.cudart")  # cuda-python before 13 (deprecated alias from 12.6)
    monkeypatch.setattr(cuda, "_API", cuda._CudaPython(cudart))
    pipe = vlmedge.load(engines[0], device="tensorrt")
    assert _agree(pipe.caption(images), ort_pipe.caption(images)) >= 15
    out = _captions_from_threads(pipe, images)  # runtime API: the primary context on every thread
    assert len(out[0]) + len(out[1]) == len(images)
