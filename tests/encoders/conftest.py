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
