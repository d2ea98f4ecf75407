"""What `vlmedge compare` asks of every bundle: images with reference captions, questions with answers.

`--eval synthetic:N`: the first N scenes of the scene world's test split, one caption and one
question of every type per scene (`evaluation_set("test", N)`, as `vlmedge evaluate` and the demo).

`--eval FILE.jsonl`: one JSON object per line, e.g.

    {"image": "images/0001.png", "captions": ["a red circle", "a red disc"],
     "questions": [{"question": "what color is the circle ?", "answers": ["red"], "type": "attribute"}]}

- "image": the image's path, relative to the JSONL file's folder (or absolute).
- "captions": reference captions of the image (optional). Caption metrics are computed over the
  images that have some.
- "questions": questions about the image (optional), each with "question" and its reference
  "answers" (a list; one string as "answer" is also accepted, as `vlmedge scenes` writes it) and
  optionally a "type", which groups VQA accuracy by type.
- Other keys are ignored; blank lines are skipped. A malformed line or a missing image is an
  error naming the file and the line.

Scoring is the scene evaluation's: caption exact match, BLEU-4 and CIDEr (COCO scorers) and VQA
accuracy (VQA answer normalisation), so `synthetic:N` numbers equal `evaluate_pipeline`'s.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vlmedge.errors import InputError

SYNTHETIC = "synthetic:"


@dataclass(frozen=True)
class Question:
    image: int  # index into EvalData.images
    text: str
    answers: tuple[str, ...]
    qtype: str | None  # groups accuracy by type; None: untyped
    where: str  # "FILE:LINE: questions[j]" or "test scene i", for error messages


@dataclass(frozen=True)
class EvalData:
    spec: str  # as given: "synthetic:N" or the JSONL path
    images: tuple[Any, ...]  # uint8 (H, W, 3) arrays or image paths
    captions: tuple[tuple[str, ...], ...]  # reference captions per image; () where there are none
    questions: tuple[Question, ...]

    @property
    def captioned(self) -> list[int]:
        """Indices of the images that have reference captions."""
        return [i for i, refs in enumerate(self.captions) if refs]

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks this set has references for."""
        return tuple(t for t, has in (("caption", self.captioned), ("vqa", self.questions)) if has)

    def describe(self) -> dict:
        return {"spec": self.spec, "images": len(self.images), "captioned_images": len(self.captioned),
                "questions": len(self.questions), "tasks": list(self.tasks)}


def load_eval(spec: str) -> EvalData:
    """`synthetic:N` or a JSONL file (format in the module docstring)."""
    if spec.startswith(SYNTHETIC):
        n = spec[len(SYNTHETIC):]
        if not n.isdigit() or int(n) < 1:
            raise InputError(f"--eval {spec}: expected synthetic:N with N a positive number of scenes")
        return synthetic(int(n))
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"--eval {spec}: no such file (expected synthetic:N or a JSONL file)")
    return read_jsonl(path)


def synthetic(n: int) -> EvalData:
    from vlmedge.evaluation.scene_eval import evaluation_set

    es = evaluation_set("test", n)
    questions = tuple(Question(i, q.text, (q.answer,), q.qtype, f"test scene {i}") for i, q in es.questions)
    return EvalData(f"{SYNTHETIC}{n}", tuple(s.image for s in es.scenes), tuple((s.caption,) for s in es.scenes),
                    questions)


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(s, str) and s.strip() for s in value):
        raise InputError(f"{where}: expected a list of non-empty strings")
    return tuple(value)


def _question(q: Any, image: int, where: str) -> Question:
    if not isinstance(q, dict):
        raise InputError(f'{where}: expected an object {{"question": "...", "answers": ["..."]}}')
    text = q.get("question")
    if not isinstance(text, str) or not text.strip():
        raise InputError(f'{where}: "question" must be a non-empty string')
    if "answers" in q:
        answers = _strings(q["answers"], f"{where}.answers")
    elif isinstance(q.get("answer"), str):
        answers = (q["answer"],)
    else:
        raise InputError(f'{where}: needs "answers" (a list of strings) or "answer"')
    if not answers:
        raise InputError(f"{where}.answers: empty; give at least one reference answer")
    qtype = q.get("type")
    if qtype is not None and not isinstance(qtype, str):
        raise InputError(f'{where}.type: expected a string, got {type(qtype).__name__}')
    return Question(image, text, answers, qtype, where)


def read_jsonl(path: Path) -> EvalData:
    images: list[Path] = []
    captions: list[tuple[str, ...]] = []
    questions: list[Question] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not row["image"]:
            raise InputError(f'{where}: expected an object with "image" (a path) and "captions" and/or "questions"')
        image = path.parent / row["image"]
        if not image.is_file():
            raise InputError(f"{where}: image {image} does not exist")
        caps = _strings(row["captions"], f"{where}: captions") if "captions" in row else ()
        qs = row.get("questions", [])
        if not isinstance(qs, list):
            raise InputError(f"{where}: questions: expected a list")
        index = len(images)
        images.append(image)
        captions.append(caps)
        questions += [_question(q, index, f"{where}: questions[{j}]") for j, q in enumerate(qs)]
    data = EvalData(str(path), tuple(images), tuple(captions), tuple(questions))
    if not data.tasks:
        raise InputError(f"{path}: no reference captions or questions; nothing to evaluate")
    return data


def score_captions(data: EvalData, predictions: Sequence[str]) -> dict:
    """Exact match, BLEU-4 and CIDEr of one caption per captioned image."""
    from vlmedge.evaluation.metrics import caption_scores

    refs = [data.captions[i] for i in data.captioned]
    return {**caption_scores(predictions, refs), "n": len(predictions)}


def score_answers(data: EvalData, predictions: Sequence[str]) -> dict:
    """VQA accuracy overall and per question type (types in first-seen order)."""
    from vlmedge.evaluation.metrics import vqa_accuracy

    acc = vqa_accuracy(predictions, [q.answers for q in data.questions])
    by_type: dict[str, list[float]] = defaultdict(list)
    for q, a in zip(data.questions, acc):
        if q.qtype is not None:
            by_type[q.qtype].append(a)
    return {"accuracy": float(np.mean(acc)), "n": len(acc),
            "by_type": {t: {"accuracy": float(np.mean(v)), "n": len(v)} for t, v in by_type.items()}}
