"""Fixtures of the serving tests: the shipped model's bundle, in process and as PNG scenes."""

import io

import pytest

import vlmedge
from vlmedge.data.scenes import scenes


@pytest.fixture(scope="module")
def shapes(bundles):
    """The session's bundle of the shipped model."""
    return bundles["shapes-vlm"][2]


@pytest.fixture(scope="module")
def pipe(shapes):
    """That bundle in this process: what the server's answers must equal."""
    return vlmedge.load(shapes)


@pytest.fixture(scope="module")
def scene_pngs():
    """Test scenes and their PNG bytes."""
    out = []
    for s in scenes("test", 300, 8):
        buf = io.BytesIO()
        s.pil().save(buf, "PNG")
        out.append((s, buf.getvalue()))
    return out
