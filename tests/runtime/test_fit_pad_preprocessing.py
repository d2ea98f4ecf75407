"""Donut's and Nougat's preprocessing: the runtime's pixel_values equal their Hugging Face image processors'
(the Pillow backends) on images of other aspect ratios than the model's, with the settings the
VisionEncoderDecoder adapter writes from the saved processor (either layout), and their published
configs' choices at a small size."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
from PIL import Image

from vlmedge.errors import ModelLoadError
from vlmedge.models.hf import preprocessing
from vlmedge.models.vision_encoder_decoder import fit_pad
from vlmedge.runtime.preprocess import pixel_values

SIZES = [(70, 50), (45, 83), (61, 61), (200, 40), (16, 90), (300, 410)]  # width x height
TOL = 1e-5


def _images():
    """Each size twice: noise, and a page (light margins around dark content) for Nougat's crop_margin."""
    rng = np.random.default_rng(0)
    out = []
    for w, h in SIZES:
        out.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
        page = rng.integers(225, 256, (h, w, 3), dtype=np.uint8)
        x0, y0, x1, y1 = w // 5, h // 4, max(w // 5 + 1, w - w // 7), max(h // 4 + 1, h - h // 6)
        page[y0:y1, x0:x1] = rng.integers(0, 256, (y1 - y0, x1 - x0, 3), dtype=np.uint8)
        out.append(Image.fromarray(page))
    return out


def _saved(tmp_path, processor, layout: str):
    """The processor saved as transformers 4 did (preprocessor_config.json) or as transformers 5 does
    (processor_config.json, image processor nested)."""
    d = tmp_path / layout
    d.mkdir()
    if layout == "preprocessor_config":
        processor.save_pretrained(d)
    else:
        (d / "processor_config.json").write_text(json.dumps({"processor_class": "DonutProcessor",
                                                            "image_processor": processor.to_dict()}))
    return str(d)


def _manifest_prep(source: str, size: tuple[int, int]) -> dict:
    """What the adapter writes into the manifest (None fields left out, as the exporter does)."""
    prep = fit_pad(source, preprocessing(source, size, (0.5,) * 3, (0.5,) * 3, "bilinear"))
    return {k: v for k, v in asdict(prep).items() if v is not None}


def _donut(**kw):
    from transformers import DonutImageProcessorPil

    # naver-clova-ix/donut-base's choices (size 2560x1920 there): bilinear, mean/std 0.5
    return DonutImageProcessorPil(**{"size": {"height": 96, "width": 72}, "do_align_long_axis": False, "do_thumbnail": True,
                                     "do_pad": True, "resample": 2, **kw})


def _nougat(**kw):
    from transformers import NougatImageProcessorPil

    # facebook/nougat-base's choices (size 896x672 there): bilinear, ImageNet mean/std, margins cropped
    return NougatImageProcessorPil(**{"size": {"height": 96, "width": 72}, "do_align_long_axis": False,
                                      "do_crop_margin": True, "do_thumbnail": True, "do_pad": True, "resample": 2, **kw})


CASES = {
    "donut-base": (_donut, {}),
    "nougat-base": (_nougat, {}),
    "donut-align-long-axis": (_donut, {"do_align_long_axis": True}),
    "nougat-align-long-axis": (_nougat, {"do_align_long_axis": True}),
    "donut-landscape": (_donut, {"size": {"height": 60, "width": 90}, "do_align_long_axis": True}),
    "donut-nearest": (_donut, {"resample": 0}),  # its thumbnail then shrinks with bicubic
    "nougat-no-crop": (_nougat, {"do_crop_margin": False}),
}


@pytest.mark.parametrize("layout", ["preprocessor_config", "processor_config"])
@pytest.mark.parametrize("case", list(CASES))
def test_pixel_values_equal_hf_processor(tmp_path, case, layout):
    make, kw = CASES[case]
    processor = make(**kw)
    size = (processor.size["height"], processor.size["width"])
    prep = _manifest_prep(_saved(tmp_path, processor, layout), size)
    assert prep["resize_mode"] == "fit_pad" and (prep["height"], prep["width"]) == size
    for img in _images():
        want = processor(img, return_tensors="np")["pixel_values"]
        got = pixel_values([img], prep)
        assert got.shape == want.shape == (1, 3, *size)
        assert np.abs(got - want).max() <= TOL, (case, img.size)
    # a batch of mixed sizes is each image's own
    batch = _images()
    assert np.abs(pixel_values(batch, prep) - processor(batch, return_tensors="np")["pixel_values"]).max() <= TOL


def test_old_stretch_differs_and_crop_margin_matters(tmp_path):
    """Without the new keys (an older bundle) the runtime stretches as before, which is not HF's Donut;
    without crop_margin the pixels are not Nougat's."""
    processor = _nougat()
    prep = _manifest_prep(_saved(tmp_path, processor, "processor_config"), (96, 72))
    img = _images()[3]  # a 70x50 page
    want = processor(img, return_tensors="np")["pixel_values"]
    stretch = {k: v for k, v in prep.items() if k not in ("resize_mode", "align_long_axis", "crop_margin",
                                                          "thumbnail_resample", "thumbnail_reducing_gap")}
    assert np.abs(pixel_values([img], stretch) - want).max() > 0.5
    resized = img.resize((72, 96), Image.Resampling.BILINEAR)
    assert np.array_equal(pixel_values([img], stretch), pixel_values([resized], stretch))
    assert np.abs(pixel_values([img], {**prep, "crop_margin": False}) - want).max() > 0.5


def test_settings_written_per_processor(tmp_path):
    donut = _manifest_prep(_saved(tmp_path, _donut(), "processor_config"), (96, 72))
    assert donut["align_long_axis"] is False and "crop_margin" not in donut and "thumbnail_resample" not in donut
    nougat = _manifest_prep(_saved(tmp_path, _nougat(), "preprocessor_config"), (96, 72))
    assert nougat["crop_margin"] is True and nougat["thumbnail_resample"] == "bicubic"
    assert nougat["thumbnail_reducing_gap"] == 2.0


def test_legacy_donut_feature_extractor_config(tmp_path):
    """donut-base as first published: a DonutFeatureExtractor with size [width, height]."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "feature_extractor_type": "DonutFeatureExtractor", "processor_class": "DonutProcessor", "size": [72, 96],
        "do_align_long_axis": False, "do_pad": True, "do_resize": True, "do_thumbnail": True, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2}))
    prep = _manifest_prep(str(tmp_path), (96, 72))
    assert prep["resize_mode"] == "fit_pad" and (prep["height"], prep["width"]) == (96, 72)
    img = _images()[0]
    assert np.abs(pixel_values([img], prep) - _donut()(img, return_tensors="np")["pixel_values"]).max() <= TOL


@pytest.mark.parametrize("setting", [{"do_pad": False}, {"do_thumbnail": False}, {"do_resize": False}])
def test_sizes_other_than_the_models_are_refused_in_one_line(tmp_path, setting):
    source = _saved(tmp_path, _donut(**setting), "processor_config")
    with pytest.raises(ModelLoadError) as e:
        _manifest_prep(source, (96, 72))
    msg = str(e.value)
    assert "\n" not in msg and "processor_config.json" in msg and f"{next(iter(setting))} false" in msg


def test_too_elongated_image_is_one_line_input_error(tmp_path):
    from vlmedge.errors import InputError

    prep = _manifest_prep(_saved(tmp_path, _donut(), "processor_config"), (96, 72))
    with pytest.raises(InputError) as e:
        pixel_values([Image.new("RGB", (400, 1))], prep)
    assert "\n" not in str(e.value) and "400x1" in str(e.value)
