"""Image preprocessing in numpy: what every backend feeds the vision encoder."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(B, H, W, 3) uint8 RGB -> (B, 3, H, W) float32, rescaled to [0, 1] then standardised."""
    x = images.astype(np.float32) * np.float32(1.0 / 255.0)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
