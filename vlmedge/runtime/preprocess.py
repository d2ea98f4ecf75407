"""Image preprocessing in numpy + Pillow, as each family's Hugging Face image processor does it (its
Pillow backend): resize with the processor's Pillow filter, rescale by 1/255, standardise, channels first.

Two ways to resize, per the manifest's `resize_mode`: "stretch" (absent in older bundles) goes straight
to height x width; "fit_pad" is Donut's and Nougat's processors step for step (fit_pad below), so an
image not of the model's aspect ratio gets the pixels HF gives it."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from vlmedge.errors import InputError
from vlmedge.runtime.bundle import RESAMPLE_FILTERS
from vlmedge.runtime.images import to_rgb

_RESAMPLE = {name: Image.Resampling[name.upper()] for name in RESAMPLE_FILTERS}  # the names a manifest may use


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float], rescale: float = 1.0 / 255.0) -> np.ndarray:
    """(B, H, W, 3) uint8 RGB -> (B, 3, H, W) float32, rescaled then standardised."""
    x = images.astype(np.float32) * np.float32(rescale)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def crop_margin(img: Image.Image) -> Image.Image:
    """Nougat's crop_margin: the bounding box of the pixels under 200 once the grey image is stretched to
    0..255 (the same numpy arithmetic as transformers'); a flat image is kept whole."""
    data = np.array(img.convert("L")).astype(np.uint8)
    lo, hi = data.min(), data.max()
    if lo == hi:
        return img
    ys, xs = np.nonzero((data - lo) / (hi - lo) * 255 < 200)
    return img.crop((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))


def fit_pad(img: Image.Image, prep: Mapping[str, Any]) -> np.ndarray:
    """Donut's and Nougat's image processors on one RGB image -> (height, width, 3) uint8: crop the margins
    (crop_margin), rotate a long axis across the target's (align_long_axis), resize the short side to the
    target's short side, shrink to fit keeping the aspect ratio (their thumbnail), pad with black, centred."""
    h, w = int(prep["height"]), int(prep["width"])
    given = img.size
    if prep.get("crop_margin"):
        img = crop_margin(img)
    if prep.get("align_long_axis") and ((w < h and img.width > img.height) or (w > h and img.width < img.height)):
        img = img.transpose(Image.Transpose.ROTATE_270)  # np.rot90(k=3): a quarter turn clockwise
    ih, iw = img.height, img.width
    short = min(h, w)
    if iw <= ih:  # transformers' get_resize_output_image_size(default_to_square=False)
        ih, iw = int(short * ih / iw), short
    else:
        ih, iw = short, int(short * iw / ih)
    th, tw = min(ih, h), min(iw, w)  # their thumbnail: no side over the target's, aspect ratio kept
    if (th, tw) != (ih, iw):
        if ih > iw:
            tw = int(iw * th / ih)
        elif iw > ih:
            th = int(ih * tw / iw)
    if th < 1 or tw < 1:
        raise InputError(f"a {given[0]}x{given[1]} image shrinks to nothing fitted into {w}x{h}; "
                         "its aspect ratio is too extreme (HF's processor fails on it too)")
    img = img.resize((iw, ih), _RESAMPLE[prep["resample"]])
    if (th, tw) != (ih, iw):
        img = img.resize((tw, th), _RESAMPLE[prep.get("thumbnail_resample") or prep["resample"]],
                         reducing_gap=prep.get("thumbnail_reducing_gap"))
    a = np.asarray(img, dtype=np.uint8)
    dh, dw = h - a.shape[0], w - a.shape[1]
    return np.pad(a, ((dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2), (0, 0)))


def pixel_values(images: Sequence[Image.Image | np.ndarray], prep: Mapping[str, Any]) -> np.ndarray:
    """RGB images of any size -> the vision encoder's (B, 3, H, W) input, per a bundle's preprocessing."""
    size = (int(prep["width"]), int(prep["height"]))
    fit = prep.get("resize_mode") == "fit_pad"
    arrays = []
    for img in images:
        pil = to_rgb(img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img, dtype=np.uint8)))
        if fit:
            arrays.append(fit_pad(pil, prep))
            continue
        if pil.size != size:
            pil = pil.resize(size, _RESAMPLE[prep["resample"]])
        arrays.append(np.asarray(pil, dtype=np.uint8))
    return normalize(np.stack(arrays), prep["mean"], prep["std"], prep.get("rescale", 1.0 / 255.0))
