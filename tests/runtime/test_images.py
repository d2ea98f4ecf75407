"""Preprocessing matches Hugging Face's image processors, and bad images are refused clearly."""

import numpy as np
import pytest
from PIL import Image

from vlmedge.errors import InputError
from vlmedge.runtime.images import expand_paths, load_image
from vlmedge.runtime.preprocess import pixel_values

BLIP = dict(width=384, height=384, resample="bicubic", mean=(0.48145466, 0.4578275, 0.40821073),
            std=(0.26862954, 0.26130258, 0.27577711))
VIT = dict(width=224, height=224, resample="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _processors():
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    return [(BlipImageProcessorPil(), BLIP), (ViTImageProcessorPil(do_convert_rgb=True), VIT)]


def _image(mode, seed=0, size=(131, 97)):
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    if mode == "RGBA":
        return Image.fromarray(np.concatenate([rgb, rng.integers(0, 256, (*rgb.shape[:2], 1), dtype=np.uint8)], -1))
    if mode == "P":
        return Image.fromarray(rgb).quantize(64)
    return Image.fromarray(rgb).convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "LA", "CMYK"])
def test_matches_hf_image_processors(mode):
    img = _image(mode)
    for proc, prep in _processors():
        ref = proc(img, return_tensors="np")["pixel_values"]
        got = pixel_values([load_image(img)], prep)
        assert got.shape == ref.shape and got.dtype == np.float32
        assert np.abs(got - ref).max() <= 1e-5, (type(proc).__name__, mode)


def test_paths_follow_exif_orientation_like_hf_load_image(tmp_path):
    from transformers.image_utils import load_image as hf_load_image

    img = _image("RGB", size=(80, 48))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=95)
    ours = load_image(path)
    assert ours.size == (48, 80)
    for proc, prep in _processors():
        ref = proc(hf_load_image(str(path)), return_tensors="np")["pixel_values"]
        assert np.abs(pixel_values([ours], prep) - ref).max() <= 1e-5


def test_sixteen_bit_images_scale_to_eight_bits(tmp_path):
    gray8 = np.random.default_rng(1).integers(0, 256, (40, 50), dtype=np.uint8)
    path = tmp_path / "deep.png"
    Image.fromarray(gray8.astype(np.uint16) * 257).save(path)  # a 16-bit grayscale PNG
    assert Image.open(path).mode.startswith("I")
    expected = np.asarray(Image.fromarray(gray8).convert("RGB"))
    assert np.array_equal(np.asarray(load_image(path)), expected)
    assert np.array_equal(np.asarray(load_image(gray8.astype(np.uint16) * 257)), expected)


def test_arrays_of_every_layout():
    rgb = np.random.default_rng(2).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(load_image(rgb)), rgb)
    assert np.array_equal(np.asarray(load_image(rgb.astype(np.float32) / 255.0)), rgb)
    assert load_image(rgb[..., 0]).mode == "RGB" and load_image(rgb[..., :1]).size == (30, 20)
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 255, np.uint8)], -1)
    assert np.array_equal(np.asarray(load_image(rgba)), rgb)  # opaque alpha changes nothing
    transparent = rgba.copy()
    transparent[..., 3] = 0
    assert (np.asarray(load_image(transparent)) == 255).all()  # composited onto white


def _bad_files(tmp_path):
    good = tmp_path / "good.png"
    _image("RGB").save(good)
    data = good.read_bytes()
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    _image("RGB").save(tmp_path / "full.jpg", quality=90)
    jpg = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (tmp_path / "notes.png").write_text("not an image\n")
    return {
        "missing.png": "no such file", "empty.png": "empty file", "truncated.png": "truncated or corrupt",
        "truncated.jpg": "truncated or corrupt", "notes.png": "not an image",
    }


def test_bad_files_raise_one_line_errors_naming_the_file(tmp_path):
    for name, words in _bad_files(tmp_path).items():
        with pytest.raises(InputError) as e:
            load_image(tmp_path / name)
        msg = str(e.value)
        assert str(tmp_path / name) in msg and words in msg and "\n" not in msg


def test_pixel_limit_refuses_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (3000, 2000)).save(path)
    with pytest.raises(InputError, match=r"3000x2000 = 6,000,000 pixels, over the limit of 1,000,000"):
        load_image(path, max_pixels=1_000_000)
    assert load_image(path, max_pixels=6_000_000).size == (3000, 2000)
    with pytest.raises(InputError, match="over the limit"):
        load_image(np.zeros((2000, 3000, 3), np.uint8), max_pixels=1_000_000)


def test_bad_arrays_and_types():
    with pytest.raises(InputError, match="shape"):
        load_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        load_image(np.full((4, 4, 3), 2.0, np.float32))
    with pytest.raises(InputError, match="expected a path, PIL image or numpy array"):
        load_image(42)


def test_expand_paths_directories_and_globs(tmp_path):
    for n in ("b.png", "a.jpg", "c.txt"):
        (tmp_path / n).write_bytes(b"x")
    assert [p.name for p in expand_paths([str(tmp_path)])] == ["a.jpg", "b.png"]
    assert [p.name for p in expand_paths([str(tmp_path / "*.png")])] == ["b.png"]
    assert [p.name for p in expand_paths([str(tmp_path / "none-*.png")])] == ["none-*.png"]
