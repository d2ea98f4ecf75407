import json
import shutil

import pytest

from vlmedge.errors import BundleError
from vlmedge.runtime.bundle import load_bundle


@pytest.fixture(scope="module")
def bundle_dir(bundles):
    return bundles["shapes-vlm"][2]


@pytest.fixture
def copy(bundle_dir, tmp_path):
    d = tmp_path / "b"
    shutil.copytree(bundle_dir, d)
    return d


def _edit(d, fn):
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(json.dumps(m))


def _err(d) -> str:
    with pytest.raises(BundleError) as e:
        load_bundle(d)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_loads(bundle_dir):
    b = load_bundle(bundle_dir)
    assert set(b.manifest.graphs) == {"vision_encoder", "text_encoder", "cross_kv", "decoder"}
    assert b.manifest.precision["dtype"] == "float32"


def test_unknown_schema_version(copy):
    _edit(copy, lambda m: m.update(schema_version=99))
    assert "schema_version 99" in _err(copy)


def test_missing_graph_file(copy):
    (copy / "decoder.onnx").unlink()
    assert "decoder.onnx" in _err(copy)


def test_hash_mismatch(copy):
    with open(copy / "vision_encoder.onnx", "ab") as f:
        f.write(b"\0")
    assert "sha256" in _err(copy) and "vision_encoder.onnx" in _err(copy)


def test_bad_field_is_named(copy):
    _edit(copy, lambda m: m["axes"]["batch"].update(min=0))
    assert "axes.batch" in _err(copy)


def test_not_a_bundle(tmp_path):
    assert "manifest.json" in _err(tmp_path)
