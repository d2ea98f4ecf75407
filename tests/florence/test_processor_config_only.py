"""Florence-2 saved as transformers 5 saves it: the image processor only inside processor_config.json
(no preprocessor_config.json). The input size comes from there, never a guessed 768: a tower whose
positions cover only the tiny model's 56x56 exports, and a model without processor settings is refused."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_florence2 import IMAGE, florence2  # noqa: E402


def _processor_config_only(src: Path) -> Path:
    """processor_config.json as transformers 5 writes it: {"processor_class", "image_processor": {...}, ...}."""
    image = json.loads((src / "preprocessor_config.json").read_text())
    proc = json.loads((src / "processor_config.json").read_text())
    proc = {"processor_class": "Florence2Processor", **proc, "image_processor": proc.get("image_processor") or image}
    (src / "processor_config.json").write_text(json.dumps(proc, indent=2))
    (src / "preprocessor_config.json").unlink()
    return src


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return _processor_config_only(florence2(tmp_path_factory.mktemp("florence2-pc") / "model"))


def test_exports_at_the_processors_size(src, tmp_path):
    import torch

    from vlmedge.export.exporter import ExportOptions, export_bundle
    from vlmedge.models.registry import load_adapter

    assert IMAGE < 768 and not (src / "preprocessor_config.json").exists()
    nested = json.loads((src / "processor_config.json").read_text())["image_processor"]
    assert nested["size"] == {"height": IMAGE, "width": IMAGE}
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    manifest = export_bundle(load_adapter(str(src)), "<CAPTION>", tmp_path / "bundle", ExportOptions(validate_images=1))
    p = manifest.preprocessing
    assert (p["height"], p["width"], p["resample"]) == (IMAGE, IMAGE, "bicubic")
    assert manifest.validation["passed"], manifest.validation["failures"]


def _refused(src: Path, tmp_path: Path, edit) -> str:
    import shutil

    from vlmedge.errors import ModelLoadError
    from vlmedge.models.registry import load_adapter

    d = tmp_path / "edited"
    shutil.copytree(src, d)
    cfg = json.loads((d / "processor_config.json").read_text())
    edit(cfg)
    (d / "processor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as e:
        load_adapter(str(d))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_no_processor_settings_is_refused_in_one_line(src, tmp_path):
    msg = _refused(src, tmp_path, lambda cfg: cfg.pop("image_processor"))
    assert "no image-processor settings" in msg and "preprocessor_config.json" in msg


def test_no_size_is_refused_in_one_line(src, tmp_path):
    msg = _refused(src, tmp_path, lambda cfg: cfg["image_processor"].pop("size"))
    assert "processor_config.json" in msg and "no size" in msg
