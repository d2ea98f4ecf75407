import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/encoders/tiny.py
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/test_docs.py, tests/families.py


@pytest.fixture(scope="session")
def encoder_models(tmp_path_factory):
    """The tiny CLIP and SigLIP directories, built once per session."""
    from tiny import BUILDERS

    root = tmp_path_factory.mktemp("encoder-models")
    return {name: build(root / name) for name, build in BUILDERS.items()}


@pytest.fixture(scope="session")
def encoder_bundles(encoder_models, tmp_path_factory):
    """Each tiny dual encoder exported (and validated) once per session: name -> (adapter, manifest, path)."""
    from vlmedge.export.exporter import export_bundle
    from vlmedge.models.registry import load_adapter

    root = tmp_path_factory.mktemp("encoder-bundles")
    out = {}
    for name, src in encoder_models.items():
        adapter = load_adapter(str(src))
        out[name] = (adapter, export_bundle(adapter, "all", root / name), root / name)
    return out


@pytest.fixture(scope="session")
def encoder_pipes(encoder_bundles):
    import vlmedge

    return {name: vlmedge.load(path) for name, (_, _, path) in encoder_bundles.items()}


@pytest.fixture(scope="session")
def scene_images():
    from vlmedge.data.scenes import scenes

    return [s.image for s in scenes("test", 100, 6)]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Ten test scenes saved as PNG files in a folder: what `vlmedge index` reads (test_milvus.py,
    test_milvus_server.py; test_vilt_bridgetower.py has photos of its own)."""
    from PIL import Image

    from vlmedge.data.scenes import scenes

    d = tmp_path_factory.mktemp("photos")
    for i, s in enumerate(scenes("test", 300, 10)):
        Image.fromarray(s.image).save(d / f"scene-{i:02d}.png")
    return d
