"""`vlmedge explain`: each generated token's cross-attention drawn over the image the model saw, and the
measures that compare attention maps (drift of a quantized variant, the pointing game)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from vlmedge.runtime.explain import Explanation


def model_view(pipe, image: Any) -> np.ndarray:
    """The image as the model saw it: its pixel values with the normalisation undone, uint8 [H, W, 3]."""
    px = pipe.images([image])[0].astype(np.float32)
    prep = pipe.manifest.preprocessing
    mean, std = np.asarray(prep["mean"], np.float32)[:, None, None], np.asarray(prep["std"], np.float32)[:, None, None]
    rgb = (px * std + mean) / float(prep.get("rescale", 1 / 255))
    if prep.get("channel_order", "rgb") == "bgr":
        rgb = rgb[::-1]
    return np.clip(rgb.transpose(1, 2, 0), 0, 255).round().astype(np.uint8)


def _file_word(token: str) -> str:
    word = re.sub(r"[^A-Za-z0-9_-]+", "", token.replace("Ġ", "").replace("▁", ""))[:24]
    return f"-{word}" if word else ""


def _overlay(ax, picture: np.ndarray, heat: np.ndarray, title: str) -> None:
    h, w = picture.shape[:2]
    ax.imshow(picture, extent=(0, w, h, 0))
    top = float(heat.max())
    ax.imshow(heat / top if top > 0 else heat, cmap="jet", alpha=0.45, extent=(0, w, h, 0), interpolation="bilinear",
              vmin=0.0, vmax=1.0)
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()


def draw(e: Explanation, picture: np.ndarray, out: Path, reduce: str = "mean", question: str | None = None) -> list[str]:
    """One PNG per generated token (its heatmap over `picture`, the word as title), `tokens.png` (every
    token in one strip), `attention.npz` (attention, image_attention where there is one, heatmaps) and
    `tokens.json` (text, ids, tokens, grid, reduce) in `out`; returns the names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heat = e.heatmaps(reduce)
    names = []
    for t, (token, h) in enumerate(zip(e.tokens, heat)):
        fig, ax = plt.subplots(figsize=(3.2, 3.4))
        _overlay(ax, picture, h, f"{t}: {token!s:.30}")
        name = f"token-{t:03d}{_file_word(token)}.png"
        fig.savefig(out / name, dpi=100, bbox_inches="tight")
        plt.close(fig)
        names.append(name)
    n = len(heat)
    cols = min(n, 8) or 1
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < n:
            _overlay(ax, picture, heat[i], f"{e.tokens[i]!s:.14}")
        else:
            ax.set_axis_off()
    fig.suptitle((f"Q: {question}\n" if question else "") + e.text, fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "tokens.png", dpi=100)
    plt.close(fig)
    arrays = {"attention": e.attention, "heatmaps": heat}
    if e.image_attention is not None:
        arrays["image_attention"] = e.image_attention
    np.savez_compressed(out / "attention.npz", **arrays)
    (out / "tokens.json").write_text(json.dumps({
        "text": e.text, "ids": list(e.ids), "tokens": list(e.tokens), "question": question, "grid": e.grid, "reduce": reduce,
        "attention": "attention.npz: attention [tokens, layers, heads, positions], heatmaps [tokens, rows, cols]"
                     + (", image_attention [layers, heads, question_len, image positions]" if e.image_attention is not None else ""),
    }, indent=2) + "\n")
    return names + ["tokens.png", "attention.npz", "tokens.json"]


# -- comparing maps ------------------------------------------------------------------------------

def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence (base 2, in [0, 1]) between distributions along the last axis."""
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-12)
    q = q / np.maximum(q.sum(-1, keepdims=True), 1e-12)
    m = 0.5 * (p + q)

    def kl(a, b):
        return np.where(a > 0, a * (np.log2(np.maximum(a, 1e-30)) - np.log2(np.maximum(b, 1e-30))), 0.0).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def topk_overlap(p: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Share of the k highest positions of p that are among the k highest of q, along the last axis."""
    k = min(k, p.shape[-1])
    a, b = np.argsort(-p, -1)[..., :k], np.argsort(-q, -1)[..., :k]
    return np.array([len(set(x) & set(y)) / k for x, y in zip(a.reshape(-1, k), b.reshape(-1, k))]).reshape(p.shape[:-1])
