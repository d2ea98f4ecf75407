"""Which onnxruntime runs, with which providers, and what happens when a provider is missing or
refuses: checked on the CPU with onnxruntime's provider list and session constructor replaced at the
GPU boundary (never counted as GPU evidence); the GPU runs are in test_gpu_paths.py."""

import json
import sys

import pytest

import vlmedge
from vlmedge.cli import main
from vlmedge.errors import DependencyError
from vlmedge.runtime.backends.onnxruntime import clash
from vlmedge.tensorrt.profiles import graph_profile, ort_tensorrt_options


@pytest.fixture(scope="module")
def world():
    from vlmedge.data.scenes import scenes

    return (list(scenes("test", 0, 3)),)


def test_tensorrt_provider_gets_the_bundles_precision(ort_pipe, tmp_path):
    profile = graph_profile(ort_pipe.manifest, "decoder")
    fp32 = ort_tensorrt_options(profile, str(tmp_path))
    assert "trt_fp16_enable" not in fp32 and "trt_int8_enable" not in fp32
    assert ort_tensorrt_options(profile, str(tmp_path), "float16")["trt_fp16_enable"] == "True"
    int8 = ort_tensorrt_options(profile, str(tmp_path), "int8")
    assert int8["trt_int8_enable"] == "True" and "trt_int8_calibration_table_name" not in int8  # Q/DQ: no table
    bare = ort_tensorrt_options(None, str(tmp_path))
    assert not any(k.startswith("trt_profile_") for k in bare) and bare["trt_engine_cache_enable"] == "True"


@pytest.fixture
def gpu_onnxruntime(monkeypatch):
    """onnxruntime claiming the TensorRT and CUDA providers; sessions asked for them record the
    options and run on the CPU, unless `refuse(profiles=..., bare=...)` says the TensorRT one fails."""
    import onnxruntime

    real = onnxruntime.InferenceSession
    seen, rules = [], {"profiles": False, "bare": False}

    def session(path, opts=None, providers=None, **kw):
        trt = next((p[1] for p in providers or [] if isinstance(p, tuple) and p[0] == "TensorrtExecutionProvider"), None)
        seen.append(trt)
        if trt is not None and "trt_profile_min_shapes" in trt and rules["profiles"]:
            raise RuntimeError("[TensorRT EP] input 'onnx::MatMul_12' of a TensorRT subgraph has no explicit profile")
        if trt is not None and "trt_profile_min_shapes" not in trt and rules["bare"]:
            raise RuntimeError("[TensorRT EP] could not build an engine")
        return real(path, opts, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    return seen, rules


def test_refused_profiles_fall_back_with_one_line(shapes, ort_pipe, world, gpu_onnxruntime):
    seen, rules = gpu_onnxruntime
    rules["profiles"] = True
    messages = []
    pipe = vlmedge.load(shapes, device="tensorrt", warn=messages.append)
    assert len(messages) == 1, messages
    assert "refused the manifest's profiles for vision_encoder, text_encoder, cross_kv, decoder" in messages[0]
    assert "has no explicit profile" in messages[0]
    assert [("trt_profile_min_shapes" in o) for o in seen] == [True, False] * 4  # then without profiles
    images = [s.image for s in world[0][:2]]
    assert pipe.caption(images) == ort_pipe.caption(images)


def test_a_tensorrt_provider_that_fails_outright_leaves_the_next_provider(shapes, gpu_onnxruntime):
    seen, rules = gpu_onnxruntime
    rules["profiles"] = rules["bare"] = True
    messages = []
    vlmedge.load(shapes, device="tensorrt", warn=messages.append)
    assert len(messages) == 1 and seen[2] is None  # third try: the providers after TensorRT's


def test_accepted_profiles_are_tried_once_per_graph(shapes, gpu_onnxruntime):
    seen, _ = gpu_onnxruntime
    messages = []
    vlmedge.load(shapes, device="tensorrt", warn=messages.append)
    assert len(seen) == 4 and all("trt_profile_max_shapes" in o for o in seen)
    assert not any("refused" in m for m in messages)  # (the fake's sessions run on the CPU, which is said)


def test_without_onnxruntime_one_line_says_what_to_install(shapes, monkeypatch, tmp_path, capsys, world):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    with pytest.raises(DependencyError) as e:
        vlmedge.load(shapes)
    assert "pip install 'vlmedge[cpu]'" in str(e.value) and "'vlmedge[gpu]'" in str(e.value)
    img = tmp_path / "x.png"
    world[0][0].pil().save(img)
    assert main(["caption", str(shapes), str(img)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "vlmedge[cpu]" in err


def test_two_onnxruntime_packages_are_a_clash_with_the_fix():
    assert clash({"onnxruntime": "1.20.1"}) is None
    msg = clash({"onnxruntime": "1.20.1", "onnxruntime-gpu": "1.20.1"})
    assert "share one module" in msg and "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in msg


def test_the_cli_names_the_onnxruntime_and_providers_in_one_line(shapes, tmp_path, capsys, world):
    import onnxruntime

    img = tmp_path / "x.png"
    world[0][0].pil().save(img)
    assert main(["caption", str(shapes), str(img), "--device", "cuda"]) == 0
    err = capsys.readouterr().err
    line = next(l for l in err.splitlines() if l.startswith("onnxruntime:"))
    assert f"onnxruntime {onnxruntime.__version__}" in line and "providers" in line and "CPUExecutionProvider" in line


def test_doctor_reports_packages_and_devices(capsys):
    import onnxruntime

    assert main(["doctor", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["onnxruntime"]["version"] == onnxruntime.__version__
    assert r["onnxruntime"]["providers"] == onnxruntime.get_available_providers()
    assert set(r["devices"]) == {"cpu", "cuda", "tensorrt", "engine directory"}
    assert r["devices"]["cpu"] == "onnxruntime CPUExecutionProvider"
    for key in ("python", "numpy", "tensorrt", "cuda", "dla_cores", "problems"):
        assert key in r
    assert main(["doctor"]) == 0
    assert "what runs a bundle on each --device" in capsys.readouterr().out


def test_doctor_without_onnxruntime_or_tensorrt(monkeypatch):
    from vlmedge.doctor import diagnose

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    r = diagnose()
    assert not r["onnxruntime"]["installed"] and "vlmedge[cpu]" in r["onnxruntime"]["reason"]
    assert r["devices"]["cuda"].startswith("nothing: onnxruntime is not installed")
    assert r["devices"]["engine directory"].startswith("nothing: TensorRT's Python package is not installed")
