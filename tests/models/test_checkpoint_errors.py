import json
import shutil
import subprocess
import sys

import pytest

from vlmedge.errors import ModelLoadError
from vlmedge.models.checkpoint import BUILTIN_MODELS, load_pretrained


@pytest.fixture
def model_copy(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(BUILTIN_MODELS["shapes-vlm"], d)
    return d


def _err(path) -> str:
    with pytest.raises(ModelLoadError) as e:
        load_pretrained(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unknown_name_lists_the_builtin_ones():
    msg = _err("no-such-model")
    assert "no-such-model" in msg and "shapes-vlm" in msg


def test_missing_weights(model_copy):
    (model_copy / "model.safetensors").unlink()
    assert "model.safetensors" in _err(model_copy)


def test_corrupt_weights(model_copy):
    (model_copy / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage")
    assert "model.safetensors" in _err(model_copy)


def test_truncated_weights(model_copy):
    data = (model_copy / "model.safetensors").read_bytes()
    (model_copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "model.safetensors" in _err(model_copy)


def test_corrupt_config(model_copy):
    (model_copy / "config.json").write_text("{not json")
    assert "config.json" in _err(model_copy)


def test_config_that_does_not_match_the_weights(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["d_model"] = 96
    (model_copy / "config.json").write_text(json.dumps(cfg))
    msg = _err(model_copy)
    assert "model.safetensors" in msg and "config.json" in msg


def test_config_with_unknown_field(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["n_experts"] = 4
    (model_copy / "config.json").write_text(json.dumps(cfg))
    assert "n_experts" in _err(model_copy)


def test_cli_reports_a_bad_checkpoint_in_one_line(model_copy):
    (model_copy / "model.safetensors").write_bytes(b"nope")
    r = subprocess.run([sys.executable, "-m", "vlmedge.cli", "evaluate", str(model_copy), "--scenes", "1"],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "model.safetensors" in lines[0], r.stderr
