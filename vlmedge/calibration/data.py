"""Calibration data: representative images (and questions, for VQA) and the graph inputs they produce.

A calibration set comes from a folder of images, with an optional JSONL of questions, or from the
built-in scene world (`synthetic:N`, drawn from the validation split, so the test split stays
unseen). A held-out part, disjoint from the calibration images, checks the accuracy of the quantized
bundle: `synthetic:N` draws N calibration scenes plus the held-out ones; a folder gives at most half
its images to the check.

Inputs for every graph are recorded from real FP32 generation over the calibration images: the
decoder graphs see real prompts, real KV caches and real cross-attention K/V, step by step, not
random tensors.

Questions file (JSONL), one object per line: {"image": "file name in the folder", "question": "...",
"answer": "..."}; "answer" is optional (without it, accuracy is checked against the FP32 bundle's
answers).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vlmedge.errors import InputError, VlmedgeError
from vlmedge.runtime.decoding import GenerationConfig, generate
from vlmedge.runtime.images import IMAGE_SUFFIXES, load_image
from vlmedge.runtime.recording import RecordingBackend

MIN_SAMPLES = 8
HELD_OUT = 200  # images kept aside for the accuracy check, by default


@dataclass
class CalibrationSet:
    source: str  # "synthetic:N" or the folder
    images: list[np.ndarray]  # RGB uint8 (H, W, 3)
    questions: list[tuple[int, str]] = field(default_factory=list)  # (image index, question)
    captions: list[str | None] = field(default_factory=list)  # reference caption per image, if known
    answers: list[str | None] = field(default_factory=list)  # reference answer per question, if known
    skipped: int = 0  # unreadable images left out

    def digest(self) -> str:
        h = hashlib.sha256()
        for img in self.images:
            h.update(np.ascontiguousarray(img).tobytes())
        for i, q in self.questions:
            h.update(f"{i}\t{q}\n".encode())
        return h.hexdigest()

    def describe(self) -> dict:
        return {"source": self.source, "images": len(self.images), "questions": len(self.questions),
                "skipped": self.skipped, "sha256": self.digest()}

    def split(self, held_out: int) -> tuple["CalibrationSet", "CalibrationSet"]:
        """(calibration, held-out): the last `held_out` images and their questions are held out."""
        n = len(self.images)
        cut = n - held_out
        return self._subset(range(0, cut)), self._subset(range(cut, n))

    def _subset(self, idx: range) -> "CalibrationSet":
        keep = {old: new for new, old in enumerate(idx)}
        qs = [(keep[i], q, a) for (i, q), a in zip(self.questions, self.answers) if i in keep]
        return CalibrationSet(self.source, [self.images[i] for i in idx], [(i, q) for i, q, _ in qs],
                              [self.captions[i] for i in idx], [a for _, _, a in qs], 0)


def synthetic(n: int) -> CalibrationSet:
    from vlmedge.data.scenes import pick_questions, scenes

    scs = list(scenes("val", 0, n))
    qs = [(i, q) for i, s in enumerate(scs) for q in pick_questions(s)]
    return CalibrationSet(f"synthetic:{n}", [s.image for s in scs], [(i, q.text) for i, q in qs],
                          [s.caption for s in scs], [q.answer for _, q in qs])


def _read_questions(path: Path, names: dict[str, int]) -> tuple[list[tuple[int, str]], list[str | None]]:
    if not path.is_file():
        raise InputError(f"--questions {path}: no such file")
    questions, answers = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(row.get("question"), str):
            raise InputError(f'{path}:{n}: expected {{"image": "...", "question": "...", "answer": "..."}}')
        if row["image"] not in names:
            raise InputError(f"{path}:{n}: image {row['image']!r} is not a readable image of the calibration folder")
        if "answer" in row and not isinstance(row["answer"], str):
            raise InputError(f"{path}:{n}: answer must be a string")
        questions.append((names[row["image"]], row["question"]))
        answers.append(row.get("answer"))
    return questions, answers


def from_folder(folder: Path, questions_file: Path | None = None, max_pixels: int = 64_000_000) -> CalibrationSet:
    if not folder.is_dir():
        raise InputError(f"--calib {folder}: not a directory (expected a folder of images or synthetic:N)")
    images, names, skipped = [], {}, 0
    for f in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        try:
            images.append(np.asarray(load_image(f, max_pixels)))
            names[f.name] = len(images) - 1
        except VlmedgeError:
            skipped += 1
    if not images:
        raise InputError(f"--calib {folder}: no readable images ({skipped} unreadable)")
    qs, ans = _read_questions(questions_file, names) if questions_file else ([], [])
    return CalibrationSet(str(folder), images, qs, [None] * len(images), ans, skipped)


def load_calibration(spec: str, questions_file: Path | None = None, need_questions: bool = False,
                     held_out: int = HELD_OUT) -> tuple[CalibrationSet, CalibrationSet, CalibrationSet]:
    """(whole set, calibration part, held-out part) from `synthetic:N` (N calibration scenes, then
    `held_out` more) or a folder (at most half of it held out); refuses sets too small to calibrate
    and check."""
    if held_out < 1:
        raise InputError(f"--held-out: {held_out} images; at least 1 is needed to check accuracy")
    if spec.startswith("synthetic:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            raise InputError(f"--calib {spec}: expected synthetic:N with N a number") from None
        if questions_file:
            raise InputError("--questions: applies to a calibration folder, not to synthetic:N")
        if n < 1:
            raise InputError(f"--calib {spec}: expected synthetic:N with N at least 1")
        cs = synthetic(n + held_out)
    else:
        cs = from_folder(Path(spec), questions_file)
    if len(cs.images) < MIN_SAMPLES:
        raise InputError(f"--calib {spec}: {len(cs.images)} readable images, need at least {MIN_SAMPLES} "
                         f"(some are kept aside to check accuracy)")
    if need_questions and not cs.questions:
        raise InputError(f"--calib {spec}: the bundle answers questions; pass --questions FILE.jsonl for its VQA graphs")
    held = held_out if spec.startswith("synthetic:") else min(held_out, len(cs.images) // 2)
    return (cs, *cs.split(held))


def record_inputs(pipe, cs: CalibrationSet, batch_size: int = 8, step_stride: int = 1,
                  progress: Callable[[int], None] | None = None) -> dict[str, list[dict[str, np.ndarray]]]:
    """Graph name -> the feeds it received while the FP32 pipeline captioned every calibration image
    and answered every calibration question (greedy)."""
    rec = RecordingBackend(pipe.backend, keep_step=lambda i: i % step_stride == 0)
    m = pipe.manifest
    if m.contract == "prefix":  # the pipeline itself, on the recording backend: prompts are built per call
        import copy

        recorder = copy.copy(pipe)
        recorder.backend = rec
        for s in range(0, len(cs.images) if "caption" in m.tasks else 0, batch_size):
            recorder.caption(list(cs.images[s : s + batch_size]))
            if progress:
                progress(len(cs.images[s : s + batch_size]))
        for s in range(0, len(cs.questions) if "vqa" in m.tasks else 0, batch_size):
            part = cs.questions[s : s + batch_size]
            recorder.vqa([cs.images[i] for i, _ in part], [q for _, q in part])
            if progress:
                progress(len(part))
        return rec.by_graph()
    layers = pipe.layers
    for task, spec in m.tasks.items():
        if task != "vqa":  # captions, and tasks that are their own prompt (Florence-2)
            items: list[Any] = [(i, None) for i in range(len(cs.images))]
        else:
            items = list(cs.questions)
        for s in range(0, len(items), batch_size):
            part = items[s : s + batch_size]
            px = pipe.images([cs.images[i] for i, _ in part])
            q = pipe.question_ids([q for _, q in part]) if task == "vqa" else None
            states, mask = pipe.encode(task, px, q, backend=rec)
            generate(rec, layers, states, mask, spec["prompt_ids"], spec["eos_id"], GenerationConfig(),
                     min(spec["max_new_tokens"], pipe.max_new_tokens(task)), split=m.split_decoder)
            if progress:
                progress(len(part))
    return rec.by_graph()
