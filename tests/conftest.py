import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/families.py


GATES = ("gpu", "tensorrt", "ort_cuda", "ort_tensorrt")  # markers, each skipped unless what it needs is here


def pytest_collection_modifyitems(config, items):
    """Skip each GPU test unless exactly what it needs is here (vlmedge.doctor.gpu_gates says why not).
    Markers, not keywords: a keyword match would also hit a directory named gpu."""
    marked = [(item, [g for g in GATES if item.get_closest_marker(g)]) for item in items]
    if not any(gates for _, gates in marked):
        return
    from vlmedge.doctor import gpu_gates

    why = gpu_gates()
    for item, gates in marked:
        reasons = [f"{g}: {why[g]}" for g in gates if why[g]]
        if reasons:
            item.add_marker(pytest.mark.skip(reason="; ".join(reasons)))


@pytest.fixture(scope="session")
def shipped():
    """The shipped reference model and its tokenizer, loaded once."""
    import torch

    from vlmedge.models.checkpoint import load_pretrained

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    return load_pretrained("shapes-vlm")

@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Directory of every tiny family, built once per session."""
    from families import FAMILIES

    root = tmp_path_factory.mktemp("models")
    return {name: build(root / name) for name, (_, build, _) in FAMILIES.items()}


@pytest.fixture(scope="session")
def bundles(tiny_models, tmp_path_factory):
    """Exported (and validated) bundle of every tiny family and of the shipped model."""
    from families import FAMILIES

    from vlmedge.export.exporter import export_bundle
    from vlmedge.models.registry import load_adapter

    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for name, (_, _, task) in FAMILIES.items():
        out[name] = (load_adapter(str(tiny_models[name])), export_bundle(load_adapter(str(tiny_models[name])), task, root / name), root / name)
    adapter = load_adapter("shapes-vlm")
    out["shapes-vlm"] = (adapter, export_bundle(adapter, "all", root / "shapes-vlm"), root / "shapes-vlm")
    return out


def exported(tmp_path_factory, label: str, families: dict, validate_images: int):
    """name -> (adapter, manifest, bundle path, model path) of each tiny family of `families` (name -> (architecture,
    builder, task), as tests/families.py has them), built and exported once per session, on first use."""
    from vlmedge.export.exporter import ExportOptions, export_bundle
    from vlmedge.models.registry import load_adapter

    root = tmp_path_factory.mktemp(label)
    cache = {}

    def get(name):
        if name not in cache:
            model = families[name][1](root / "models" / name)
            adapter = load_adapter(str(model))
            manifest = export_bundle(adapter, families[name][2], root / "bundles" / name,
                                     ExportOptions(validate_images=validate_images))
            cache[name] = (adapter, manifest, root / "bundles" / name, model)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def prefix_bundles(tmp_path_factory):
    """name -> (adapter, manifest, bundle path) of each decoder-only family (and IDEFICS), exported once, on first use."""
    from families import IDEFICS_FAMILIES, PREFIX_FAMILIES

    get = exported(tmp_path_factory, "prefix", {**PREFIX_FAMILIES, **IDEFICS_FAMILIES}, 4)
    return lambda name: get(name)[:3]


@pytest.fixture(scope="session")
def block_bundles(tmp_path_factory):
    """PaliGemma, PaliGemma 2, Gemma 3: name -> (adapter, manifest, bundle path, model path)."""
    from families import BLOCK_FAMILIES

    return exported(tmp_path_factory, "block-families", BLOCK_FAMILIES, 4)


@pytest.fixture(scope="session")
def mrope_bundles(tmp_path_factory):
    """Qwen2-VL, Qwen2.5-VL: name -> (adapter, manifest, bundle path, model path)."""
    from families import MROPE_FAMILIES

    return exported(tmp_path_factory, "mrope-families", MROPE_FAMILIES, 4)


@pytest.fixture(scope="session")
def blip2_bundles(tmp_path_factory):
    """BLIP-2 and InstructBLIP with a decoder-only LM: name -> (adapter, manifest, bundle path, model path)."""
    from families import BLIP2_FAMILIES

    return exported(tmp_path_factory, "blip2-families", BLIP2_FAMILIES, 2)


@pytest.fixture(scope="session")
def blip2_t5_bundles(tmp_path_factory):
    """BLIP-2 and InstructBLIP with Flan-T5: name -> (adapter, manifest, bundle path)."""
    from families import BLIP2_T5_FAMILIES

    get = exported(tmp_path_factory, "blip2-t5-families", BLIP2_T5_FAMILIES, 2)
    return lambda name: get(name)[:3]


@pytest.fixture(autouse=True, scope="session")
def _per_session_onnxruntime_threads():
    """ONNX Runtime's process-wide thread pool, once on, refuses every later session that asks for its
    own threads (ONNX Runtime's own calibrator's, the tests' plain sessions), so a test that ran the CLI
    in this process would break the tests after it, in whatever order they run. In the test process
    pipelines keep per-session pools; the CLI's shared pool runs in the subprocess tests."""
    from vlmedge.runtime.backends import onnxruntime as backend

    backend._shared_pool.setdefault("size", None)  # "unavailable": _use_shared_pool never turns it on
    yield
