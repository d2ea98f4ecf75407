import pytest

import vlmedge


@pytest.fixture(scope="module")
def shapes(bundles):
    """The session's bundle of the shipped model."""
    return bundles["shapes-vlm"][2]


@pytest.fixture(scope="module")
def ort_pipe(shapes):
    """That bundle on ONNX Runtime (CPU)."""
    return vlmedge.load(shapes)
