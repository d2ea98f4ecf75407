"""Evaluation on a split of the scene world: any model that captions and answers can be scored.

`evaluation_set` fixes what is asked (one caption and one question of every available type per
scene, deterministic by seed); `score` turns predictions into the report: caption exact match,
BLEU-4 and CIDEr, VQA accuracy overall, per type and per template, and the relational questions on
scenes of 3+ objects that elimination cannot answer, next to the accuracy of a blind guess.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from vlmedge.data.scenes import QUESTION_TYPES, Question, Scene, pick_questions, scenes
from vlmedge.evaluation.metrics import caption_scores, vqa_accuracy


@dataclass(frozen=True)
class EvalSet:
    split: str
    scenes: tuple[Scene, ...]
    questions: tuple[tuple[int, Question], ...]  # (scene index, question)

    @property
    def images(self) -> np.ndarray:
        return np.stack([s.image for s in self.scenes])


def evaluation_set(split: str = "test", n_scenes: int = 1000, start: int = 0) -> EvalSet:
    scs = tuple(scenes(split, start, n_scenes))
    qs = tuple((i, q) for i, s in enumerate(scs) for q in pick_questions(s))
    return EvalSet(split, scs, qs)


def _acc(xs: Sequence[float]) -> dict:
    return {"accuracy": float(np.mean(xs)) if xs else float("nan"), "n": len(xs)}


def score(es: EvalSet, captions: Sequence[str], answers: Sequence[str]) -> dict:
    """The report for predicted captions (one per scene) and answers (one per question)."""
    cap = caption_scores(captions, [[s.caption] for s in es.scenes])
    qs = [q for _, q in es.questions]
    acc = vqa_accuracy(answers, [[q.answer] for q in qs])
    by_type: dict[str, list[float]] = defaultdict(list)
    by_sub: dict[str, list[float]] = defaultdict(list)
    for q, a in zip(qs, acc):
        by_type[q.qtype].append(a)
        by_sub[f"{q.qtype}/{q.subtype}"].append(a)
    rel = [(q, a) for q, a in zip(qs, acc) if q.qtype == "relational"]
    hard = [(q, a) for q, a in rel if q.n_objects >= 3 and q.chance < 1.0]
    by_n = {
        n: {**_acc([a for q, a in hard if q.n_objects == n]), "chance": float(np.mean([q.chance for q, _ in hard if q.n_objects == n] or [np.nan]))}
        for n in sorted({q.n_objects for q, _ in hard})
    }
    non_rel = [a for q, a in zip(qs, acc) if q.qtype != "relational"]
    return {
        "split": es.split,
        "scenes": len(es.scenes),
        "caption": {**cap, "n": len(captions)},
        "vqa": {
            "accuracy": float(np.mean(acc)),
            "n": len(acc),
            "non_relational": _acc(non_rel),
            "by_type": {t: _acc(by_type[t]) for t in QUESTION_TYPES if t in by_type},
            "by_template": {k: _acc(v) for k, v in sorted(by_sub.items())},
            "relational_hard": {
                **_acc([a for _, a in hard]),
                "chance": float(np.mean([q.chance for q, _ in hard])) if hard else float("nan"),
                "by_objects": by_n,
            },
        },
    }


def evaluate_torch_model(model, tokenizer, es: EvalSet, batch_size: int = 128, progress: Callable[[int], None] | None = None) -> dict:
    """Greedy captions and answers of a PyTorch reference model on `es`, scored."""
    import torch

    from vlmedge.runtime.preprocess import normalize

    cfg = model.config
    pad = cfg.pad_id
    decode = lambda ids: tokenizer.decode([t for t in ids if t not in (pad, cfg.eos_id)])  # noqa: E731
    captions: list[str] = []
    all_px = normalize(es.images, cfg.image_mean, cfg.image_std)
    with torch.inference_mode():
        for i in range(0, len(es.scenes), batch_size):
            px = torch.from_numpy(all_px[i : i + batch_size])
            captions += [decode(r) for r in model.caption(px).tolist()]
            if progress:
                progress(len(px))
        answers: list[str] = []
        for i in range(0, len(es.questions), batch_size):
            chunk = es.questions[i : i + batch_size]
            enc = [tokenizer.encode(q.text).ids for _, q in chunk]
            width = max(map(len, enc))
            ids = torch.tensor([e + [pad] * (width - len(e)) for e in enc])
            px = torch.from_numpy(all_px[[j for j, _ in chunk]])
            answers += [decode(r) for r in model.answer(px, ids, (ids != pad).long()).tolist()]
            if progress:
                progress(len(chunk))
    return score(es, captions, answers)


def evaluate_pipeline(pipe, es: EvalSet, batch_size: int = 16, progress: Callable[[int], None] | None = None,
                      **generation) -> dict:
    """Captions and answers of a runtime pipeline (any bundle, any backend) on `es`, scored."""
    images = es.images
    captions: list[str] = []
    for i in range(0, len(es.scenes), batch_size):
        captions += pipe.caption(list(images[i : i + batch_size]), batch_size=batch_size, **generation)
        if progress:
            progress(min(batch_size, len(es.scenes) - i))
    answers: list[str] = []
    for i in range(0, len(es.questions), batch_size):
        chunk = es.questions[i : i + batch_size]
        answers += pipe.vqa([images[j] for j, _ in chunk], [q.text for _, q in chunk], batch_size=batch_size, **generation)
        if progress:
            progress(len(chunk))
    return score(es, captions, answers)
