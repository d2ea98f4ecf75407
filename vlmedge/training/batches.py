"""Turning scenes into training tensors: one image, its caption and a few questions per scene."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

from vlmedge.data.scenes import QUESTION_TYPES, Scene, questions_for
from vlmedge.models.shapes_vlm import ShapesVLMConfig
from vlmedge.runtime.preprocess import normalize


@dataclass(frozen=True)
class Batch:
    pixel_values: torch.Tensor  # (B, 3, H, W)
    caption_ids: torch.Tensor  # (B, Tc): [CAP] words [EOS] [PAD]...
    question_image: torch.Tensor  # (Bq,) index of each question's image in the batch
    question_ids: torch.Tensor  # (Bq, Q)
    question_mask: torch.Tensor  # (Bq, Q)
    answer_ids: torch.Tensor  # (Bq, Ta): [ANS] word [EOS]
    ref_word: torch.Tensor  # (Bq,) token index of the word naming the question's object, -1 if none
    ref_patches: torch.Tensor  # (Bq, N) 1 on the image patches the named object covers
    relation_word: torch.Tensor  # (Bq,) relational: token index of "closest"/"furthest"/"left", -1 otherwise
    target_patches: torch.Tensor  # (Bq, N) relational: the patches of the object the answer describes


def pad(rows: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def make_batch(
    scenes: Sequence[Scene],
    tokenizer: Tokenizer,
    cfg: ShapesVLMConfig,
    rng: np.random.Generator,
    type_weights: Mapping[str, float],
    questions_per_scene: int,
) -> Batch:
    pixels = normalize(np.stack([s.image for s in scenes]), cfg.image_mean, cfg.image_std)
    enc = lambda text: tokenizer.encode(text).ids  # noqa: E731
    captions = [[cfg.caption_start_id, *enc(s.caption), cfg.eos_id] for s in scenes]
    types = list(QUESTION_TYPES)
    p = np.array([type_weights.get(t, 0.0) for t in types], dtype=np.float64)
    q_img, q_ids, a_ids, ref_word, ref_patches, rel_word, tgt_patches = [], [], [], [], [], [], []
    grid = cfg.image_size // cfg.patch_size
    centres = (np.arange(grid) + 0.5) * cfg.patch_size  # scene coordinates are pixels of the model's input
    for i, s in enumerate(scenes):
        if not questions_per_scene:
            break
        by_type = questions_for(s)
        avail = np.array([len(by_type[t]) > 0 for t in types])
        w = p * avail
        if not w.any():
            continue
        for _ in range(questions_per_scene):
            t = types[rng.choice(len(types), p=w / w.sum())]
            q = by_type[t][rng.integers(len(by_type[t]))]
            q_img.append(i)
            q_ids.append(enc(q.text))
            a_ids.append([cfg.answer_start_id, *enc(q.answer), cfg.eos_id])
            ref_word.append(q.ref_word)
            none = np.zeros(grid * grid, np.float32)
            ref_patches.append(_patches_of(s.objects[q.ref], centres) if q.ref >= 0 else none)
            rel_word.append(q.relation_word)
            tgt_patches.append(_patches_of(s.objects[q.target], centres) if q.target >= 0 else none)
    qi = pad(q_ids, cfg.pad_id)
    return Batch(
        pixel_values=torch.from_numpy(pixels),
        caption_ids=pad(captions, cfg.pad_id),
        question_image=torch.tensor(q_img, dtype=torch.long),
        question_ids=qi,
        question_mask=(qi != cfg.pad_id).long(),
        answer_ids=pad(a_ids, cfg.pad_id),
        ref_word=torch.tensor(ref_word, dtype=torch.long),
        ref_patches=_stack(ref_patches, grid * grid),
        relation_word=torch.tensor(rel_word, dtype=torch.long),
        target_patches=_stack(tgt_patches, grid * grid),
    )


def _stack(rows: list, n: int) -> torch.Tensor:
    return torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, n)


def _patches_of(obj, centres: np.ndarray) -> np.ndarray:
    """(N,) 1 on the patches whose centre lies on the object (at least the patch holding its centre)."""
    from vlmedge.data.scenes import SIZES

    cy, cx = np.meshgrid(centres, centres, indexing="ij")
    on = ((cx - obj.x) ** 2 + (cy - obj.y) ** 2 <= (SIZES[obj.size] + 2.0) ** 2).reshape(-1)
    if not on.any():
        on[np.argmin(((cx - obj.x) ** 2 + (cy - obj.y) ** 2).reshape(-1))] = True
    return on.astype(np.float32)
