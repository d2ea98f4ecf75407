"""Image processors of the decoder-only families, in numpy + Pillow, equal to Hugging Face's.

A decoder-only VLM's processor does two things the runtime must repeat exactly: it turns an image
of any size into the vision encoder's frames, and it writes the image's placeholder tokens into the
prompt (how many, and between which markers, depends on the image's size). `process(image, spec)`
does both from the bundle's `preprocessing.processor` settings, and returns the frames with the
text that stands for the image in the prompt.

- `clip` (LLaVA): resize the shortest edge, centre-crop, one frame; `image_tokens` placeholders.
- `idefics3` (Idefics3, SmolVLM, SmolVLM2): resize the longest edge, resize again to multiples of
  the tile size, split into rows x cols tiles plus a global image resized to one tile; each tile
  is written as `<fake_token_around_image><row_r_col_c><image>*n` and the global image as
  `<fake_token_around_image><global-img><image>*n<fake_token_around_image>`.

Every resize is Pillow's on 8-bit RGB (what HF's Pillow backend does), so pixels match HF's to
float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from PIL import Image

from vlmedge.runtime.preprocess import _RESAMPLE, normalize

KINDS = ("clip", "idefics3")
MAX_IMAGE_SIZE = 4096  # Idefics3's absolute cap on either side after its first resize


@dataclass(frozen=True)
class ImageInput:
    frames: np.ndarray  # (N, 3, H, W) float32: what vision_encoder reads, N frames of one image
    text: str  # the image's placeholder text in the prompt


def process(image: Image.Image, prep: Mapping[str, Any]) -> ImageInput:
    """One RGB image -> its frames and its placeholder text, per a bundle's preprocessing."""
    p = prep["processor"]
    if p["kind"] == "clip":
        return _clip(image, prep, p)
    return _idefics3(image, prep, p)


def _resize(img: Image.Image, height: int, width: int, resample: str) -> Image.Image:
    return img if img.size == (width, height) else img.resize((width, height), _RESAMPLE[resample])


def _frames(images: list[Image.Image], prep: Mapping[str, Any]) -> np.ndarray:
    arrays = np.stack([np.asarray(i, dtype=np.uint8) for i in images])
    return normalize(arrays, prep["mean"], prep["std"], prep.get("rescale", 1.0 / 255.0))


def _clip(img: Image.Image, prep: Mapping[str, Any], p: Mapping[str, Any]) -> ImageInput:
    """CLIPImageProcessor: shortest edge to `shortest_edge` (aspect kept, long side truncated as HF
    does), centre crop to height x width (zero padding where the image is smaller)."""
    w, h = img.size
    short = int(p["shortest_edge"])
    if w <= h:
        nw, nh = short, int(short * h / w)
    else:
        nw, nh = int(short * w / h), short
    img = _resize(img, nh, nw, prep["resample"])
    ch, cw = int(prep["height"]), int(prep["width"])
    if cw > nw or ch > nh:  # HF pads with zeros (before normalisation), then crops
        canvas = Image.new("RGB", (max(cw, nw), max(ch, nh)), (0, 0, 0))
        canvas.paste(img, ((cw - nw) // 2 if cw > nw else 0, (ch - nh) // 2 if ch > nh else 0))
        img, (nw, nh) = canvas, canvas.size
    top, left = int((nh - ch) / 2.0), int((nw - cw) / 2.0)
    img = img.crop((left, top, left + cw, top + ch))
    return ImageInput(_frames([img], prep), p["image_token"] * int(p["image_tokens"]))


def _rescale_to_max_len(h: int, w: int, max_len: int) -> tuple[int, int]:
    aspect = w / h
    if w >= h:
        w, h = max_len, int(max_len / aspect)
        h += h % 2
    else:
        h, w = max_len, int(max_len * aspect)
        w += w % 2
    return max(h, 1), max(w, 1)


def _below_upper_bound(h: int, w: int, max_len: int) -> tuple[int, int]:
    aspect = w / h
    if w >= h and w > max_len:
        w, h = max_len, int(max_len / aspect)
    elif h > w and h > max_len:
        h, w = max_len, int(max_len * aspect)
    return max(h, 1), max(w, 1)


def idefics3_grid(height: int, width: int, p: Mapping[str, Any]) -> tuple[int, int, tuple[int, int]]:
    """(rows, cols, resized (h, w)) the Idefics3 processor makes of an image of this size; (0, 0) when
    the image is one tile (no splitting)."""
    tile = int(p["tile"])
    h, w = _below_upper_bound(*_rescale_to_max_len(height, width, int(p["longest_edge"])), MAX_IMAGE_SIZE)
    if not p.get("split", True):
        return 0, 0, (h, w)
    aspect = w / h
    if w >= h:
        w = math.ceil(w / tile) * tile
        h = math.ceil(int(w / aspect) / tile) * tile
    else:
        h = math.ceil(h / tile) * tile
        w = math.ceil(int(h * aspect) / tile) * tile
    if h > tile or w > tile:
        return (h - tile) // tile + 1, (w - tile) // tile + 1, (h, w)
    return 0, 0, (h, w)


def _idefics3(img: Image.Image, prep: Mapping[str, Any], p: Mapping[str, Any]) -> ImageInput:
    tile, resample = int(p["tile"]), prep["resample"]
    w0, h0 = img.size
    h, w = _below_upper_bound(*_rescale_to_max_len(h0, w0, int(p["longest_edge"])), MAX_IMAGE_SIZE)
    img = _resize(img, h, w, resample)
    n = int(p["image_tokens"])
    fake, token, glob = p["fake_image_token"], p["image_token"], p["global_image_token"]
    single = f"{fake}{glob}{token * n}{fake}"
    if not p.get("split", True):  # one frame: the model's tile, aspect ratio not kept
        return ImageInput(_frames([_resize(img, tile, tile, resample)], prep), single)
    rows, cols, (h, w) = idefics3_grid(h0, w0, p)
    img = _resize(img, h, w, resample)
    if not rows:
        return ImageInput(_frames([img], prep), single)
    tiles = [img.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)]
    tiles.append(_resize(img, tile, tile, resample))
    text = "".join("".join(f"{fake}<row_{r + 1}_col_{c + 1}>{token * n}" for c in range(cols)) + "\n" for r in range(rows))
    return ImageInput(_frames(tiles, prep), text + "\n" + single)
