import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/families.py

from families import FAMILIES  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Directory of every tiny family, built once per session."""
    root = tmp_path_factory.mktemp("models")
    return {name: build(root / name) for name, (_, build, _) in FAMILIES.items()}


@pytest.fixture(scope="session")
def bundles(tiny_models, tmp_path_factory):
    """Exported (and validated) bundle of every tiny family and of the shipped model."""
    from vlmedge.export.exporter import export_bundle
    from vlmedge.models.registry import load_adapter

    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for name, (_, _, task) in FAMILIES.items():
        out[name] = (load_adapter(str(tiny_models[name])), export_bundle(load_adapter(str(tiny_models[name])), task, root / name), root / name)
    adapter = load_adapter("shapes-vlm")
    out["shapes-vlm"] = (adapter, export_bundle(adapter, "all", root / "shapes-vlm"), root / "shapes-vlm")
    return out
