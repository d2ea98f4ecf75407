"""Real inputs for tracing and validation: scenes and questions of the built-in world.

Every family gets the same scenes, resized and normalised by its own preprocessing, and the same
questions, tokenised by its own tokenizer; validation therefore runs on real images and text
rather than on random tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vlmedge.data.scenes import pick_questions, scenes
from vlmedge.models.base import Adapter
from vlmedge.runtime.preprocess import pixel_values


@dataclass(frozen=True)
class Sample:
    pixel_values: "object"  # torch.Tensor (B, 3, H, W)
    question_ids: "object" = None  # torch.Tensor (B, Q), right-padded
    question_mask: "object" = None
    questions: tuple[str, ...] = field(default_factory=tuple)


def tokenizer_of(adapter: Adapter):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(adapter.tokenizer_json())


def sample_inputs(adapter: Adapter, n: int, tasks: list[str], start: int = 0) -> Sample:
    """n test scenes; with VQA, one question per scene, chosen so that lengths differ (padding)."""
    import torch

    scs = list(scenes("test", start, n))
    px = torch.from_numpy(pixel_values([s.image for s in scs], adapter.info.preprocessing.__dict__))
    prompts = [adapter.info.tasks[t].text_prompt_ids for t in tasks if adapter.info.tasks[t].text_prompt_ids]
    if prompts and "vqa" not in tasks:  # a family whose tasks are prompts (Florence-2): rotate through them, lengths differ
        return _padded(px, [list(prompts[i % len(prompts)]) for i in range(n)], adapter.info.tasks[tasks[0]].pad_id, ())
    if "vqa" not in tasks:
        return Sample(px)
    tok = tokenizer_of(adapter)
    pad = adapter.info.tasks["vqa"].pad_id
    texts = []
    for i, s in enumerate(scs):
        qs = pick_questions(s)
        texts.append(qs[i % len(qs)].text)  # rotate through types: lengths differ
    return _padded(px, [tok.encode(t).ids for t in texts], pad, tuple(texts))


def _padded(px, ids: list[list[int]], pad: int, texts: tuple[str, ...]) -> Sample:
    import torch

    n = len(ids)
    width = max(map(len, ids))
    qi = np.full((n, width), pad, dtype=np.int64)
    qm = np.zeros((n, width), dtype=np.int64)
    for i, row in enumerate(ids):
        qi[i, : len(row)] = row
        qm[i, : len(row)] = 1
    return Sample(px, torch.from_numpy(qi), torch.from_numpy(qm), texts)
