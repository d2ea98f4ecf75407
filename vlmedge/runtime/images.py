"""Images in, RGB out: paths, PIL images and numpy arrays, checked before they are decoded.

- Paths are opened with Pillow, checked against a pixel limit from the header alone (a
  decompression bomb is refused before it is decoded), fully decoded (a truncated file is an
  error, not a grey band) and turned upright by their EXIF orientation, as Hugging Face's
  `load_image` does.
- Every mode becomes RGB as Hugging Face's `convert_to_rgb` does: transparency is composited
  onto white; grayscale, palette and CMYK are converted; 16-bit images are scaled to 8 bits
  (65535 -> 255) rather than clipped.
- numpy arrays: (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); uint8, uint16, or float in [0, 1] (NaN and
  infinite pixels are refused, not captioned).
- PIL images are loaded first: a closed or truncated one is one InputError, not Pillow's own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlmedge.errors import InputError, first_line

DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000; a decoded RGB image of this size is 192 MB
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _check_pixels(size: tuple[int, int], max_pixels: int, where: str) -> None:
    w, h = size
    if w * h > max_pixels:
        raise InputError(f"{where}: image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} (max_pixels)")
    if w < 1 or h < 1:
        raise InputError(f"{where}: image has no pixels ({w}x{h})")


def _open(path: Path, max_pixels: int) -> Image.Image:
    where = str(path)
    if not path.exists():
        raise InputError(f"{where}: no such file")
    if path.is_dir():
        raise InputError(f"{where}: is a directory, expected an image file")
    if path.stat().st_size == 0:
        raise InputError(f"{where}: empty file (0 bytes)")
    return open_checked(path, max_pixels, where)


def open_checked(source, max_pixels: int, where: str) -> Image.Image:
    """A path or file object -> decoded, upright image: the pixel limit checked from the header
    before decoding; not an image, truncated or corrupt -> one InputError naming `where`."""
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # our own limit applies, before decoding
        img = Image.open(source)
        _check_pixels(img.size, max_pixels, where)
        img.load()
    except UnidentifiedImageError:
        raise InputError(f"{where}: not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"{where}: truncated or corrupt image ({first_line(e)})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return ImageOps.exif_transpose(img)


def _from_array(a: np.ndarray, where: str) -> Image.Image:
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise InputError(f"{where}: expected an (H, W), (H, W, 3) or (H, W, 4) array, got shape {a.shape}")
    if a.dtype == np.uint16:
        a = np.round(a.astype(np.float32) / 257.0).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            bad = np.count_nonzero(~np.isfinite(a))
            raise InputError(f"{where}: {bad:,} pixels are NaN or infinite; expected floats in [0, 1]")
        if a.size and (a.min() < 0.0 or a.max() > 1.0):
            raise InputError(f"{where}: float images must be in [0, 1], got [{a.min():.3g}, {a.max():.3g}]")
        a = np.round(a * 255.0).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise InputError(f"{where}: expected uint8, uint16 or float pixels, got {a.dtype}")
    if a.ndim == 3 and a.shape[-1] == 4:  # as HF's convert_to_rgb does for arrays: blend onto white
        alpha = a[..., 3:4].astype(np.float64) / 255.0
        a = np.round(alpha * a[..., :3] + (1.0 - alpha) * 255.0).astype(np.uint8)
    return to_rgb(Image.fromarray(np.ascontiguousarray(a)))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB, transparency composited onto white."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT:
        a = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.round(np.clip(a, 0, 65535) / 257.0).astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        return Image.fromarray(np.clip(np.round(np.asarray(img)), 0, 255).astype(np.uint8)).convert("RGB")
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(src: Any, max_pixels: int = DEFAULT_MAX_PIXELS, where: str | None = None) -> Image.Image:
    """A path, PIL image or numpy array as an RGB PIL image; bad input raises InputError naming it."""
    if isinstance(src, (str, os.PathLike)):
        return to_rgb(_open(Path(src), max_pixels))
    where = where or "image"
    if isinstance(src, Image.Image):
        _check_pixels(src.size, max_pixels, where)
        try:
            src.load()  # a lazily opened image is decoded here; a closed one says so
        except ValueError as e:  # Pillow: "Operation on closed image"
            raise InputError(f"{where}: cannot read this PIL image ({first_line(e)}); pass it before closing it") from None
        except (OSError, SyntaxError) as e:
            raise InputError(f"{where}: truncated or corrupt image ({first_line(e)})") from None
        return to_rgb(src)
    if isinstance(src, np.ndarray):
        _check_pixels((src.shape[1], src.shape[0]) if src.ndim >= 2 else (0, 0), max_pixels, where)
        return _from_array(src, where)
    raise InputError(f"{where}: expected a path, PIL image or numpy array, got {type(src).__name__}")


def expand_paths(items: list[str]) -> list[Path]:
    """Files, directories (their images, sorted) and glob patterns -> image paths, in order.
    Names that match nothing are kept, so that loading them reports the missing file."""
    import glob

    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        elif any(c in item for c in "*?[") and not p.exists():
            matches = sorted(glob.glob(item, recursive=True))
            out += [Path(m) for m in matches] if matches else [p]
        else:
            out.append(p)
    return out
