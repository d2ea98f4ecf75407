"""`vlmedge quantize` for fusion bundles (ViLT, BridgeTower): FP16 and calibrated INT8, checked on what this
contract returns: answers and their scores, or image-text matching scores.

The conversions are the dual encoders' (calibration.dual_encoder): FP16, every float tensor in float16 except
the nodes ONNX Runtime's CPU provider has no float16 kernel for and the nodes whose FP32 outputs leave
float16's range on the calibration inputs (calibration.fp16); INT8, explicit Q/DQ on the MatMul / Gemm / Conv
weights with activation ranges from the calibration pairs (calibration.int8). The calibration pairs are the
images with their questions (vqa) or with captions (match), fed through the FP32 pipeline's own preprocessing.

The check, on held-out images the calibration never saw, the variant against the FP32 bundle:
- vqa: each (image, question) pair's top answer agrees with FP32's, and its answer scores (sigmoids) differ
  by at most SCORE_ATOL;
- match: for each image, the best of a set of candidate texts (captions of several scenes) agrees with
  FP32's, and its scores differ by at most SCORE_ATOL times max(1, |score|).
SCORE_ATOL is per precision (FP16 0.02, INT8 0.05).
A pick that differs from FP32's but scores, under FP32, within that tolerance of FP32's best is a tie and
counts as agreeing (`top1_exact` reports strict agreement).
The variant is refused (nothing written) when top-1 agreement is under 1 - budget or a score is off by more.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from vlmedge.errors import InputError, ValidationError

SCORE_ATOL = {"fp16": 0.02, "int8": 0.05}  # largest difference of a variant's score from FP32's (x max(1, |score|) for match)
QUESTIONS = ("what colour is the circle?", "how many squares are there?", "is there a triangle?",
             "what shape is left of the red object?", "what is the colour of the large square?")
CANDIDATES = 6  # texts matched against each held-out image


def _pairs(pipe, images: list, questions: list[tuple[int, str]], captions: list) -> tuple[list, list[str]]:
    """The (image, text) pairs a bundle is calibrated or checked on: questions about the images (vqa), or each
    image with the captions of its neighbours and its own (match)."""
    if pipe.task == "vqa":
        asked = questions or [(i, QUESTIONS[i % len(QUESTIONS)]) for i in range(len(images))]
        return [images[i] for i, _ in asked], [q for _, q in asked]
    texts = [c if isinstance(c, str) and c.strip() else QUESTIONS[i % len(QUESTIONS)] for i, c in enumerate(captions)] \
        or list(QUESTIONS)
    imgs, txts = [], []
    for i, img in enumerate(images):
        for j in range(min(CANDIDATES, len(texts))):
            imgs.append(img)
            txts.append(texts[(i + j) % len(texts)])
    return imgs, txts


def evaluate(fp32, variant, images: list, texts: list[str], tol: float = SCORE_ATOL["fp16"]) -> dict:
    """Scores of FP32 and of the variant on the same pairs, compared (module docstring); `tol`: a near tie."""
    s32, sv = fp32.scores(fp32.logits(images, texts)), variant.scores(variant.logits(images, texts))
    out: dict = {"pairs": len(texts)}
    if fp32.task == "vqa":
        a, b, scale = s32, sv, np.ones_like(s32)
    else:
        per = min(CANDIDATES, len(texts))
        a, b = s32.reshape(-1, per), sv.reshape(-1, per)
        scale = np.maximum(1.0, np.abs(a))
    rows = np.arange(len(a))
    pick, best = b.argmax(-1), a.argmax(-1)
    # the variant's pick agrees where it is FP32's best, or scores (under FP32) within the tolerance of it: a tie
    tie = a[rows, best] - a[rows, pick] <= tol * scale[rows, best]
    out["top1_agreement"] = float(((pick == best) | tie).mean())
    out["top1_exact"] = float((pick == best).mean())
    out["score_max_abs"] = float((np.abs(a - b) / scale).max())
    return out


def judge(report: dict, budget: float, tol: float) -> list[str]:
    failures = []
    if report["top1_agreement"] < 1 - budget:
        thing = "answer" if report.get("task") == "vqa" else "text per image"
        failures.append(f"the best {thing} agrees with FP32 on {report['top1_agreement']:.1%}, under {1 - budget:.1%}")
    if report["score_max_abs"] > tol:
        failures.append(f"a score differs from FP32's by {report['score_max_abs']:.3g} > {tol}")
    return failures


def quantize_fusion(bundle: Path, out: Path, precision: str, calib: str = "synthetic:128", held_out: int = 200,
                    method: str | None = None, budget: float = 0.01, force: bool = False,
                    log: Callable[[str], None] = lambda s: None):
    """Write the FP16 or INT8 variant of a fusion bundle to `out`, checked against FP32 on held-out images (module
    docstring); returns its manifest."""
    from vlmedge.calibration.data import load_calibration
    from vlmedge.calibration.dual_encoder import _convert
    from vlmedge.outdir import OutputDir
    from vlmedge.runtime.bundle import MANIFEST, GraphSpec, Manifest, graph_hashes, load_bundle
    from vlmedge.runtime.fusion import FusionPipeline

    if precision not in SCORE_ATOL:
        raise InputError(f"--precision {precision}: a fusion bundle (ViLT, BridgeTower) has fp16 and int8 variants")
    method = method or ("entropy" if precision == "int8" else None)
    if precision == "fp16" and method is not None:
        raise InputError("--method: applies to int8; fp16 has no activation ranges")
    tol = SCORE_ATOL[precision]
    if not 0 <= budget <= 1:
        raise InputError(f"--budget: {budget * 100:g} points; expected 0 to 100")
    src = load_bundle(bundle)
    if src.manifest.precision.get("dtype") != "float32":
        raise InputError(f"{bundle}: a {src.manifest.precision.get('dtype')} bundle; quantize the FP32 bundle")
    _, cal, held = load_calibration(calib, None, False, held_out)
    fp32 = FusionPipeline(src, "cpu", batch_size=8)
    cal_images, cal_texts = _pairs(fp32, cal.images, cal.questions, list(cal.captions))
    feeds = []
    for s in range(0, len(cal_texts), 8):
        ids, mask = fp32.text_ids(cal_texts[s: s + 8])
        feeds.append({**fp32.image_inputs(cal_images[s: s + 8]), "input_ids": ids, "attention_mask": mask})
    log(f"calibration: {calib}, {len(cal.images)} images, {len(cal_texts)} image-text pairs; {len(held.images)} images held out")
    m = src.manifest
    with OutputDir(out, force) as writer, tempfile.TemporaryDirectory() as work:
        tmp = writer.path
        g = m.graphs["fusion"]
        log(f"fusion: {precision}")
        dst = tmp / g.file
        notes = {"fusion": _convert(src.graph_path("fusion"), dst, "fusion", precision, feeds, method, Path(work))}
        graphs = {"fusion": GraphSpec(g.file, inputs=g.inputs, outputs=g.outputs, **graph_hashes(dst))}
        shutil.copy2(src.tokenizer_path, tmp / src.tokenizer_path.name)
        entry = {"dtype": "float16" if precision == "fp16" else "int8", "method": method or "fp16", "calibration": {**cal.describe(), "held_out_images": len(held.images)},
                 "graphs": notes, "source_bundle": str(bundle)}
        (tmp / MANIFEST).write_text(Manifest(**{**m.__dict__, "graphs": graphs, "precision": entry}).to_json())
        variant = FusionPipeline(load_bundle(tmp), "cpu", batch_size=8)
        log("checking the variant against FP32 on the held-out images")
        report = {"task": fp32.task, **evaluate(fp32, variant, *_pairs(fp32, held.images, held.questions, list(held.captions)), tol)}
        failures = judge(report, budget, tol)
        entry["accuracy"] = {**report, "budget": budget, "score_atol": tol, "passed": not failures, "failures": failures}
        manifest = Manifest(**{**m.__dict__, "graphs": graphs, "precision": entry})
        (tmp / MANIFEST).write_text(manifest.to_json())
        if failures:
            raise ValidationError(f"{precision} variant of {bundle} fails its check: {failures[0]}")
        writer.commit()
    return manifest


def print_check(manifest, precision: str, console) -> None:
    acc = manifest.precision["accuracy"]
    what = "answer" if acc["task"] == "vqa" else "text per image"
    console.print(f"{precision} variant, held-out check ({acc['pairs']} image-text pairs): the best {what} agrees with "
                  f"FP32 on {acc['top1_agreement']:.1%}; scores within {acc['score_max_abs']:.2g} of FP32's", highlight=False)
