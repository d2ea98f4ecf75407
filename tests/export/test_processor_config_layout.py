"""BLIP and ViT-GPT2 saved as transformers 5 saves a processor: the image processor's settings nested
under "image_processor" in processor_config.json, no preprocessor_config.json. Export reads them there
(size, filter, mean and std); the manifest's new preprocessing keys are typed and optional."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from families import ckpt_blip_caption_base, ckpt_vit_gpt2
from vlmedge.errors import BundleError, ModelLoadError
from vlmedge.export.exporter import ExportOptions, export_bundle
from vlmedge.models.registry import load_adapter
from vlmedge.runtime.bundle import parse_manifest

BUILDERS = {"blip": (ckpt_blip_caption_base, "BlipProcessor"), "vit-gpt2": (ckpt_vit_gpt2, "TrOCRProcessor")}
MEAN, STD = [0.4, 0.45, 0.5], [0.2, 0.25, 0.3]  # neither family's default: read from the file or not at all


def _nested(src: Path, processor_class: str, **settings) -> Path:
    image = {**json.loads((src / "preprocessor_config.json").read_text()), **settings}
    (src / "processor_config.json").write_text(json.dumps({"processor_class": processor_class, "image_processor": image}))
    (src / "preprocessor_config.json").unlink()
    return src


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("processor-config")
    torch.set_num_threads(2)
    out = {}
    for name, (build, cls) in BUILDERS.items():
        src = _nested(build(root / name), cls, image_mean=MEAN, image_std=STD, resample=1)
        out[name] = export_bundle(load_adapter(str(src)), "caption", root / f"{name}-bundle", ExportOptions(validate_images=1))
    return out


@pytest.mark.parametrize("name", list(BUILDERS))
def test_exports_with_the_nested_settings(exported, name):
    m = exported[name]
    p = m.preprocessing
    assert (p["height"], p["width"], p["resample"]) == (40, 40, "lanczos")
    assert (list(p["mean"]), list(p["std"])) == (MEAN, STD)
    assert "resize_mode" not in p  # not Donut's or Nougat's: stretched as before, written as before
    assert m.validation["passed"], m.validation["failures"]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_size_other_than_the_models_is_refused_in_one_line(tmp_path, name):
    build, cls = BUILDERS[name]
    src = _nested(build(tmp_path / name), cls, size={"height": 48, "width": 48})
    with pytest.raises(ModelLoadError) as e:
        load_adapter(str(src))
    assert "\n" not in str(e.value) and "processor_config.json" in str(e.value) and "48x48" in str(e.value)


def test_fit_pad_keys_are_typed_and_optional(exported):
    raw = json.loads(exported["vit-gpt2"].to_json())
    fit = {"resize_mode": "fit_pad", "align_long_axis": True, "crop_margin": True, "thumbnail_resample": "bicubic",
           "thumbnail_reducing_gap": 2.0}
    ok = json.loads(json.dumps(raw))
    ok["preprocessing"].update(fit)
    assert parse_manifest(ok).preprocessing["thumbnail_reducing_gap"] == 2.0
    ok["preprocessing"] = {**raw["preprocessing"], "resize_mode": "stretch"}
    parse_manifest(ok)

    def broken(**edit) -> str:
        m = json.loads(json.dumps(raw))
        m["preprocessing"].update(edit)
        with pytest.raises(BundleError) as e:
            parse_manifest(m, "m.json")
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "preprocessing.resize_mode" in broken(resize_mode="crop")
    assert "preprocessing.align_long_axis" in broken(**{**fit, "align_long_axis": "yes"})
    assert "preprocessing.thumbnail_resample" in broken(**{**fit, "thumbnail_resample": "cubic"})
    assert "preprocessing.thumbnail_reducing_gap" in broken(**{**fit, "thumbnail_reducing_gap": 0.5})
    assert "preprocessing.crop_margin" in broken(crop_margin=True)  # a fit_pad setting without fit_pad
