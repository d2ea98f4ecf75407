"""Image preprocessing in numpy + Pillow, as each family's Hugging Face image processor does it:
resize with the processor's Pillow filter, rescale by 1/255, standardise, channels first."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from vlmedge.runtime.bundle import RESAMPLE_FILTERS
from vlmedge.runtime.images import to_rgb

_RESAMPLE = {name: Image.Resampling[name.upper()] for name in RESAMPLE_FILTERS}  # the names a manifest may use


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float], rescale: float = 1.0 / 255.0) -> np.ndarray:
    """(B, H, W, 3) uint8 RGB -> (B, 3, H, W) float32, rescaled then standardised."""
    x = images.astype(np.float32) * np.float32(rescale)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def pixel_values(images: Sequence[Image.Image | np.ndarray], prep: Mapping[str, Any]) -> np.ndarray:
    """RGB images of any size -> the vision encoder's (B, 3, H, W) input, per a bundle's preprocessing."""
    size = (int(prep["width"]), int(prep["height"]))
    arrays = []
    for img in images:
        pil = to_rgb(img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img, dtype=np.uint8)))
        if pil.size != size:
            pil = pil.resize(size, _RESAMPLE[prep["resample"]])
        arrays.append(np.asarray(pil, dtype=np.uint8))
    return normalize(np.stack(arrays), prep["mean"], prep["std"], prep.get("rescale", 1.0 / 255.0))
