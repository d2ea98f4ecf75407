"""What a caption's or an answer's words looked at: cross-attention from the deployed graphs.

    out = pipe.caption("scene.png", return_attention=True)
    out.text, out.ids           # as with return_ids=True
    out.attention               # float32 [new_tokens, layers, heads, encoder positions]
    out.heatmaps()              # float32 [new_tokens, rows, cols]: each token's attention over the image grid

`attention[t]` is the last query row of the decoder pass that produced token t (HF's
`cross_attentions[t][layer][0, :, -1, :]`), over every position the decoder attends to: the image's
tokens (special tokens included), or, for Florence-2, the image's tokens and then the task prompt's.
VQA bundles whose answer decoder reads the question encoder's states (shapes-vlm, BLIP VQA) give the
attention over question positions, and `image_attention` [layers, heads, question_len, image tokens]
is the question encoder's cross-attention to the image; an answer token's heatmap composes the two:
its attention over question positions times their attention over patches.

The manifest's `explain.image_grid` says how image positions map to the image: `leading` tokens that
are not patches (ViT's CLS, DeiT's CLS and distillation token, Florence-2's pooled token), then a
row-major grid of `rows` x `cols` patches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlmedge.errors import InputError

REDUCTIONS = ("mean", "last", "max")


def reduce_heads(attention: np.ndarray, reduce: str = "mean") -> np.ndarray:
    """[..., layers, heads, positions] -> [..., positions]: the mean over layers and heads, the last
    layer's mean over heads, or the max over layers and heads."""
    if reduce == "mean":
        return attention.mean(axis=(-3, -2))
    if reduce == "last":
        return attention[..., -1, :, :].mean(axis=-2)
    if reduce == "max":
        return attention.max(axis=(-3, -2))
    raise InputError(f"reduce: {reduce!r:.40} is not one of {', '.join(REDUCTIONS)}")


@dataclass(frozen=True)
class Explanation:
    text: str
    ids: tuple[int, ...]  # generated ids, EOS included where it was produced
    attention: np.ndarray  # float32 [new_tokens, layers, heads, encoder positions]
    grid: dict[str, int] | None = None  # {leading, rows, cols}: image positions on the image (manifest explain.image_grid)
    image_attention: np.ndarray | None = None  # VQA: [layers, heads, question_len, image tokens]
    tokens: tuple[str, ...] = field(default=())  # each generated id's text

    def image_weights(self, reduce: str = "mean") -> np.ndarray:
        """[new_tokens, image tokens]: each token's attention over the image's positions (composed through
        the question's positions where the answer decoder reads the question encoder)."""
        per_token = reduce_heads(self.attention, reduce)
        if self.image_attention is None:
            return per_token
        over_image = reduce_heads(np.moveaxis(self.image_attention, 2, 0), reduce)  # [question_len, image tokens]
        return per_token @ over_image

    def heatmaps(self, reduce: str = "mean") -> np.ndarray:
        """float32 [new_tokens, rows, cols]: each token's attention on the image's patch grid, layers and
        heads aggregated (`reduce`: mean, last layer, or max); leading non-patch tokens dropped."""
        if self.grid is None:
            raise InputError("this bundle's manifest has no explain.image_grid: its image positions are not a patch grid")
        lead, rows, cols = self.grid["leading"], self.grid["rows"], self.grid["cols"]
        weights = self.image_weights(reduce)
        if weights.shape[-1] < lead + rows * cols:
            raise InputError(f"attention covers {weights.shape[-1]} positions, fewer than the grid's {lead} + {rows} x {cols}")
        return np.ascontiguousarray(weights[:, lead : lead + rows * cols].reshape(-1, rows, cols), dtype=np.float32)


def explained(text: str, ids: Any, attention: np.ndarray, grid: dict | None, image_attention: np.ndarray | None,
              tokens: list[str]) -> Explanation:
    return Explanation(text, tuple(int(i) for i in ids), attention.astype(np.float32, copy=False), grid,
                       None if image_attention is None else image_attention.astype(np.float32, copy=False), tuple(tokens))
