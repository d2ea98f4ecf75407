"""How sure the held-out accuracy check is: paired bootstrap intervals for the VQA and BLEU-4 deltas.

The FP32 bundle and the variant answer the same held-out items, so the deltas are resampled in
pairs: one resample of the items, both scored on it. BLEU-4 is a corpus score, so each caption
contributes its sufficient statistics (lengths, clipped n-gram matches) and every resample is
scored from their sums, exactly as the COCO scorer (pycocoevalcap, "closest" reference length)
scores the whole set.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

RESAMPLES = 1000
_TINY, _SMALL = 1e-15, 1e-9  # pycocoevalcap's smoothing constants


def bleu_stats(hyps: Sequence[str], refs: Sequence[str]) -> np.ndarray:
    """(n, 10) per caption: hypothesis length, reference length, clipped matches and n-gram counts
    for n = 1..4. One reference per caption, tokenised as `caption_scores` does (lower, whitespace)."""
    out = np.zeros((len(hyps), 10))
    for row, (h, r) in enumerate(zip(hyps, refs, strict=True)):
        hw, rw = (h.lower().split() or ["<empty>"]), r.lower().split()
        out[row, 0], out[row, 1] = len(hw), len(rw)
        for k in range(1, 5):
            hc = Counter(tuple(hw[i : i + k]) for i in range(len(hw) - k + 1))
            rc = Counter(tuple(rw[i : i + k]) for i in range(len(rw) - k + 1))
            out[row, 1 + k] = sum(min(c, rc[g]) for g, c in hc.items())
            out[row, 5 + k] = max(0, len(hw) - k + 1)
    return out


def corpus_bleu4(sums: np.ndarray) -> np.ndarray:
    """BLEU-4 from summed statistics, (..., 10) -> (...)."""
    p = np.prod((sums[..., 2:6] + _TINY) / (sums[..., 6:10] + _SMALL), axis=-1) ** 0.25
    ratio = (sums[..., 0] + _TINY) / (sums[..., 1] + _SMALL)
    return p * np.where(ratio < 1, np.exp(1 - 1 / np.minimum(ratio, 1)), 1.0)


def _weights(n: int, seed: int) -> np.ndarray:
    """(RESAMPLES, n): how often each item is drawn in each bootstrap resample."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, (RESAMPLES, n))
    return np.stack([np.bincount(row, minlength=n) for row in idx]).astype(np.float64)


def paired_delta(fp32: dict, variant: dict) -> dict:
    """Variant minus FP32 for BLEU-4 and VQA accuracy, each with a 95% paired bootstrap interval and
    the number of held-out items it rests on. Inputs: `held_out_accuracy` results on the same items."""
    out: dict = {}
    if "captions" in fp32 and fp32["captions"]:
        refs = fp32["caption_refs"]
        a, b = bleu_stats(fp32["captions"], refs), bleu_stats(variant["captions"], refs)
        w = _weights(len(refs), 0)
        d = corpus_bleu4(w @ b) - corpus_bleu4(w @ a)
        out["bleu4"] = {"delta": variant["bleu4"] - fp32["bleu4"], "ci95": _ci(d), "items": len(refs)}
    if "vqa_scores" in fp32 and fp32["vqa_scores"]:
        a, b = np.asarray(fp32["vqa_scores"]), np.asarray(variant["vqa_scores"])
        w = _weights(len(a), 1)
        d = (w @ (b - a)) / len(a)
        out["vqa_accuracy"] = {"delta": variant["vqa_accuracy"] - fp32["vqa_accuracy"], "ci95": _ci(d),
                               "items": len(a)}
    return out


def _ci(d: np.ndarray) -> list[float]:
    lo, hi = np.percentile(d, [2.5, 97.5])
    return [float(lo), float(hi)]


def describe(conf: dict, budget: dict | None = None) -> str:
    """'VQA -1.8 points (budget 1.0, 95% CI -3.1 to -0.6, 240 questions), BLEU-4 ...'."""
    parts = []
    if "vqa_accuracy" in conf:
        c = conf["vqa_accuracy"]
        b = f"budget {100 * budget['vqa_accuracy']:.3g}, " if budget else ""
        parts.append(f"VQA {100 * c['delta']:+.1f} points ({b}95% CI {100 * c['ci95'][0]:+.1f} to "
                     f"{100 * c['ci95'][1]:+.1f}, {c['items']} questions)")
    if "bleu4" in conf:
        c = conf["bleu4"]
        b = f"budget {budget['bleu4']:.3g}, " if budget else ""
        parts.append(f"BLEU-4 {c['delta']:+.3f} ({b}95% CI {c['ci95'][0]:+.3f} to {c['ci95'][1]:+.3f}, "
                     f"{c['items']} captions)")
    return ", ".join(parts)
