import os

import pytest


def _has_gpu() -> bool:
    try:
        import onnxruntime as ort

        return "CUDAExecutionProvider" in ort.get_available_providers()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shipped():
    """The shipped reference model and its tokenizer, loaded once."""
    import torch

    from vlmedge.models.checkpoint import load_pretrained

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    return load_pretrained("shapes-vlm")
