"""Image processors of the decoder-only families, in numpy + Pillow, equal to Hugging Face's.

A decoder-only VLM's processor does two things the runtime must repeat exactly: it turns an image
of any size into the vision encoder's frames, and it writes the image's placeholder tokens into the
prompt (how many, and between which markers, depends on the image's size). `process(image, spec)`
does both from the bundle's `preprocessing.processor` settings, and returns the frames with the
text that stands for the image in the prompt.

- `clip` (LLaVA): resize the shortest edge, centre-crop, one frame; `image_tokens` placeholders.
- `anyres` (LLaVA-OneVision): the best grid of `grid_pinpoints` for the image's size; the image
  resized to fit it (aspect kept) and zero-padded, cut into tiles, after a base image resized to one
  tile. The vision encoder's tile features are then packed as the model packs them (`pack`): the
  grid reassembled, the padding removed, bilinearly downsampled past `max_tiles` tiles' worth, a
  newline embedding after each row, the base image's features first. In a prompt of several images
  each image is padded to a square with the mean colour instead, one frame, plus one newline.
- `fixed` (PaliGemma, Gemma 3): resize to height x width (aspect not kept), one frame; `image_tokens`
  placeholders, between `image_start` and `image_end` where the processor writes them (Gemma 3's
  `\n\n<start_of_image>` ... `<end_of_image>\n\n`). With `pan_and_scan` (Gemma 3), an image far from
  square also gives a frame per crop along its long side, and its text names the image, then the crops.
- `qwen2_vl` (Qwen2-VL, Qwen2.5-VL): dynamic resolution. `smart_resize` to multiples of patch x merge
  pixels between `min_pixels` and `max_pixels` (aspect kept), then the image cut into patches, each patch
  repeated over the temporal patch and flattened, in merge-block order: the frames are
  `[patches, 3 * T * P * P]`, and the grid (1, rows, cols) of patches goes with them; (rows x cols) /
  merge^2 placeholders. `vision_feeds` writes what the vision graph takes for a group of images: the
  patches, each patch's rotary (row, col), each patch's segment (its image: HF's cu_seqlens, one id per
  patch), and for Qwen2.5-VL (`window` > 0) the patches in window order with each patch's window.
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

from vlmedge.errors import InputError
from vlmedge.runtime.preprocess import _RESAMPLE, normalize

KINDS = ("clip", "idefics3", "anyres", "fixed", "qwen2_vl")
MAX_IMAGE_SIZE = 4096  # Idefics3's absolute cap on either side after its first resize


@dataclass(frozen=True)
class ImageInput:
    frames: np.ndarray  # (N, 3, H, W) float32: what vision_encoder reads, N frames of one image
    text: str  # the image's placeholder text in the prompt
    size: tuple[int, int] = (0, 0)  # the original image's (height, width)
    multi: bool = False  # anyres: one of several images in its prompt (padded to a square, not tiled)
    grid: tuple[int, int, int] = (0, 0, 0)  # qwen2_vl: (temporal, rows, cols) of patches (HF's image_grid_thw)
    text_ids: tuple[int, ...] = ()  # ids of the text the vision graph reads with it (InstructBLIP's instruction)


def process(image: Image.Image, prep: Mapping[str, Any], multi: bool = False) -> ImageInput:
    """One RGB image -> its frames and its placeholder text, per a bundle's preprocessing. `multi`:
    the prompt holds several images (LLaVA-OneVision then neither tiles nor unpads)."""
    p = prep["processor"]
    if p["kind"] == "clip":
        return _clip(image, prep, p)
    if p["kind"] == "anyres":
        return _anyres(image, prep, p, multi)
    if p["kind"] == "fixed":
        return _fixed(image, prep, p)
    if p["kind"] == "qwen2_vl":
        return _qwen2_vl(image, prep, p)
    return _idefics3(image, prep, p)


def pack(features: np.ndarray, image: ImageInput, prep: Mapping[str, Any], newline: np.ndarray | None) -> np.ndarray:
    """The vision encoder's output for one image's frames ([frames, T, D]) -> the rows its
    placeholder tokens take ([tokens, D]), in the order the model puts them."""
    p = prep["processor"]
    if p["kind"] != "anyres":  # qwen2_vl: the vision graph's rows of this image, already [tokens, D]
        return features.reshape(-1, features.shape[-1])
    if image.multi or len(features) == 1:
        return np.concatenate([features[0], newline[None].astype(features.dtype)])
    base, tiles = features[0], features[1:]
    side = int(round(math.sqrt(features.shape[1])))
    (gh, gw), tile = _best_resolution(image.size, p["grid_pinpoints"]), int(prep["height"])
    rows, cols = gh // tile, gw // tile
    D = features.shape[-1]
    grid = tiles.reshape(rows, cols, side, side, D).transpose(4, 0, 2, 1, 3).reshape(D, rows * side, cols * side)
    grid = _unpad(grid, image.size)
    _, h, w = grid.shape
    ratio = math.sqrt(h * w / (int(p["max_tiles"]) * side**2))
    if ratio > 1.1:
        grid = _bilinear(grid, int(h // ratio), int(w // ratio))
    grid = np.concatenate([grid, np.broadcast_to(newline.astype(grid.dtype)[:, None, None], (D, grid.shape[1], 1))], 2)
    return np.concatenate([base, grid.reshape(D, -1).T])


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


def _fixed(img: Image.Image, prep: Mapping[str, Any], p: Mapping[str, Any]) -> ImageInput:
    """SigLIP's processor (PaliGemma) and Gemma 3's: one frame of height x width; with `pan_and_scan`
    (Gemma 3), then a frame of each crop (`pan_and_scan_crops`), the image's text naming them."""
    full = str(p.get("image_start", "")) + p["image_token"] * int(p["image_tokens"]) + str(p.get("image_end", ""))
    pas = p.get("pan_and_scan")
    boxes = pan_and_scan_crops(img.size[1], img.size[0], pas) if pas else []
    frames = [_resize(i, int(prep["height"]), int(prep["width"]), prep["resample"]) for i in [img, *map(img.crop, boxes)]]
    text = pas["intro"] + full + pas["crops_intro"] + " ".join([full] * len(boxes)) if boxes else full
    return ImageInput(_frames(frames, prep), text, size=(img.size[1], img.size[0]))


def pan_and_scan_crops(height: int, width: int, spec: Mapping[str, Any]) -> list[tuple[int, int, int, int]]:
    """Gemma 3's pan and scan (Hugging Face's `Gemma3ImageProcessor.pan_and_scan`): an image whose long side
    is at least `min_ratio` times its short side is cut along the long side into about long/short crops
    (half rounded up), at least 2 and at most `max_crops`, none narrower than `min_crop_size` (else no
    crops). Returns Pillow boxes (left, top, right, bottom), row by row, the last one cut at the image's edge
    as Hugging Face's slicing cuts it."""
    low, most, ratio = int(spec["min_crop_size"]), int(spec["max_crops"]), float(spec["min_ratio"])
    long_, short = (width, height) if width >= height else (height, width)
    if long_ / short < ratio:
        return []
    n = max(2, min(int(math.floor(long_ / low)), int(math.floor(long_ / short + 0.5))))
    n = min(most, n)
    cols, rows = (n, 1) if width >= height else (1, n)
    cw, ch = int(math.ceil(width / cols)), int(math.ceil(height / rows))
    if min(cw, ch) < low:
        return []
    return [(x, y, min(x + cw, width), min(y + ch, height)) for y in range(0, ch * rows, ch) for x in range(0, cw * cols, cw)]


# -- qwen2_vl (Qwen2-VL) ----------------------------------------------------------------------------


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize target: both sides multiples of `factor`, the area within [min_pixels, max_pixels],
    the aspect ratio kept as closely as that allows (HF's `smart_resize`)."""
    if max(height, width) / min(height, width) > 200:
        raise InputError(f"image: {width}x{height} px; Qwen2-VL takes aspect ratios up to 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h, w = max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def _qwen2_vl(img: Image.Image, prep: Mapping[str, Any], p: Mapping[str, Any]) -> ImageInput:
    patch, merge, temporal = int(p["patch_size"]), int(p["merge_size"]), int(p["temporal_patch_size"])
    w0, h0 = img.size
    h, w = smart_resize(h0, w0, patch * merge, int(p["min_pixels"]), int(p["max_pixels"]))
    frame = _frames([_resize(img, h, w, prep["resample"])], prep)[0]  # (3, h, w)
    gh, gw = h // patch, w // patch
    x = frame.reshape(3, gh // merge, merge, patch, gw // merge, merge, patch).transpose(1, 4, 2, 5, 0, 3, 6)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal, patch, patch))  # the image is its own next frame
    patches = np.ascontiguousarray(x.reshape(gh * gw, 3 * temporal * patch * patch), dtype=np.float32)
    return ImageInput(patches, p["image_token"] * (gh * gw // (merge * merge)), (h0, w0), grid=(1, gh, gw))


def _window_index(grid: tuple[int, int, int], merge: int, window: int) -> tuple[np.ndarray, list[int]]:
    """Qwen2.5-VL's window order of one image's merged tokens and its windows' lengths in patches (HF's
    `get_vision_window_index`): windows of `window` x `window` merged tokens, row by row, the last ones cut
    short at the grid's edge."""
    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    index = np.arange(t * h * w).reshape(t, h, w)
    ph, pw = window - h % window, window - w % window
    padded = np.pad(index, ((0, 0), (0, ph), (0, pw)), constant_values=-100)
    nh, nw = (h + ph) // window, (w + pw) // window
    padded = padded.reshape(t, nh, window, nw, window).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, window * window)
    lengths = [int(n) * merge * merge for n in (padded != -100).sum(-1).ravel() if n]
    flat = padded.ravel()
    return flat[flat != -100], lengths


def _segments(lengths: list[int]) -> np.ndarray:
    """One id per row for runs of `lengths` rows (cu_seqlens, written per row): 0, 0, ..., 1, 1, ..."""
    return np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)


def vision_feeds(images: list[ImageInput], merge: int, window: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The qwen2_vl vision graph's inputs for these images run in one call, and the order that puts its output
    rows back (None: already in order). `vision_position_ids`: each patch's (row, col) for the 2D rotary
    embedding, in merge-block order (HF's `get_vision_position_ids`); `vision_segment_ids`: each patch's image
    (frame), within which it attends (HF's cu_seqlens, one id per patch: the graph builds the mask from it).
    `window` > 0 (Qwen2.5-VL: merged tokens per window side): the patches go window by window (HF's
    window_index) and `vision_window_ids` gives each patch's window (HF's cu_window_seqlens), for the layers
    that attend within windows; the output comes back in window order."""
    px, pos, full, windows, order, base = [], [], [], [], [], 0
    unit = merge * merge
    for img in images:
        t, h, w = img.grid
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // merge, merge, w // merge, merge)
        hw = np.stack([hh.reshape(block).transpose(0, 2, 1, 3).ravel(), ww.reshape(block).transpose(0, 2, 1, 3).ravel()], -1)
        hw, frames = np.tile(hw, (t, 1)), img.frames
        full += [h * w] * t  # each frame its own attention segment
        if window:
            index, lengths = _window_index(img.grid, merge, window)
            rows = (index[:, None] * unit + np.arange(unit)).ravel()
            hw, frames = hw[rows], frames[rows]
            windows += lengths
            order.append(index + base)
            base += len(index)
        px.append(frames)
        pos.append(hw)
    feeds = {"pixel_values": np.ascontiguousarray(np.concatenate(px), dtype=np.float32),
             "vision_position_ids": np.concatenate(pos).astype(np.int64), "vision_segment_ids": _segments(full)}
    if not window:
        return feeds, None
    feeds["vision_window_ids"] = _segments(windows)
    return feeds, np.argsort(np.concatenate(order))


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


# -- anyres (LLaVA-OneVision) -----------------------------------------------------------------------


def _best_resolution(size: tuple[int, int], pinpoints) -> tuple[int, int]:
    """The grid resolution (height, width) that keeps the most of the image and wastes the least."""
    h0, w0 = size
    best, most, waste = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / w0, h / h0)
        kept = min(int(w0 * scale) * int(h0 * scale), w0 * h0)
        wasted = w * h - kept
        if kept > most or (kept == most and wasted < waste):
            best, most, waste = (int(h), int(w)), kept, wasted
    return best


def _fit(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    (h0, w0), (th, tw) = size, target
    if tw / w0 < th / h0:
        return min(math.ceil(h0 * tw / w0), th), tw
    return th, min(math.ceil(w0 * th / h0), tw)


def anyres_tokens(size: tuple[int, int], p: Mapping[str, Any], tile: int) -> int:
    """Placeholder tokens of one tiled image, as the LLaVA-OneVision processor counts them."""
    (gh, gw), side = _best_resolution(size, p["grid_pinpoints"]), int(round(math.sqrt(int(p["image_tokens"]))))
    h, w = side * (gh // tile), side * (gw // tile)
    h0, w0 = size
    if w0 / h0 > w / h:
        h -= 2 * ((h - int(round(h0 * (w / w0), 7))) // 2)
    else:
        w -= 2 * ((w - int(round(w0 * (h / h0), 7))) // 2)
    ratio = math.sqrt(h * w / (int(p["max_tiles"]) * side**2))
    if ratio > 1.1:
        h, w = int(h // ratio), int(w // ratio)
    return h * w + h + int(p["image_tokens"])


def _anyres(img: Image.Image, prep: Mapping[str, Any], p: Mapping[str, Any], multi: bool) -> ImageInput:
    tile, resample = int(prep["height"]), prep["resample"]
    w0, h0 = img.size
    token, n = p["image_token"], int(p["image_tokens"])
    if multi:  # padded to a square with the mean colour (in 0..255 as the processor writes it), one frame
        side = max(w0, h0)
        canvas = Image.new("RGB", (side, side), tuple(int(m * 255) for m in prep["mean"]))
        canvas.paste(img, ((side - w0) // 2, (side - h0) // 2) if w0 != h0 else (0, 0))
        return ImageInput(_frames([_resize(canvas, tile, tile, resample)], prep), token * (n + 1), (h0, w0), True)
    gh, gw = _best_resolution((h0, w0), p["grid_pinpoints"])
    nh, nw = _fit((h0, w0), (gh, gw))
    canvas = Image.new("RGB", (gw, gh), (0, 0, 0))
    canvas.paste(_resize(img, nh, nw, resample), ((gw - nw) // 2, (gh - nh) // 2))
    tiles = [canvas.crop((c, r, c + tile, r + tile)) for r in range(0, gh, tile) for c in range(0, gw, tile)]
    frames = [_resize(img, tile, tile, resample), *tiles]
    return ImageInput(_frames(frames, prep), token * anyres_tokens((h0, w0), p, tile), (h0, w0))


def _unpad(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The grid's features without the rows or columns that covered the padding."""
    h0, w0 = size
    _, h, w = grid.shape
    if w0 / h0 > w / h:
        pad = (h - int(round(h0 * (w / w0), 7))) // 2
        return grid[:, pad : h - pad, :]
    pad = (w - int(round(w0 * (h / h0), 7))) // 2
    return grid[:, :, pad : w - pad]


def _bilinear(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """torch.nn.functional.interpolate(mode="bilinear", align_corners=False) of a [C, H, W] array."""

    def weights(n_in: int, n_out: int):
        scale = np.float32(n_in / n_out)
        src = np.maximum((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
        i0 = np.minimum(src.astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        frac = (src - i0).astype(np.float32)
        return i0, i1, frac

    y0, y1, fy = weights(x.shape[1], h)
    x0, x1, fx = weights(x.shape[2], w)
    top = x[:, y0] * (1 - fy)[None, :, None] + x[:, y1] * fy[None, :, None]
    return (top[:, :, x0] * (1 - fx)[None, None, :] + top[:, :, x1] * fx[None, None, :]).astype(x.dtype)
