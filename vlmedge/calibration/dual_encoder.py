"""`vlmedge quantize` for dual-encoder bundles (CLIP, SigLIP): FP16 and calibrated INT8, checked on what
matters for this contract.

FP16: every float tensor in float16 except the nodes ONNX Runtime's CPU provider has no float16 kernel
for and the nodes whose FP32 outputs leave float16's range on the calibration inputs (both found, not
guessed: calibration.fp16). INT8: explicit Q/DQ on the MatMul / Gemm / Conv weights (calibration.int8),
activation ranges from the calibration images (image_encoder) and texts (text_encoder: the set's
captions, else a fixed list of prompts).

The check, on held-out images the calibration never saw, the variant against the FP32 bundle:
- cosine of image and text embeddings (mean and minimum);
- zero-shot classification: agreement of the top label with FP32's over the scene world's colour x shape
  labels, and accuracy against the truth where the images are scenes (the top label names an object
  in the scene);
- text-to-image retrieval recall@1 and recall@5 where the images have captions (each caption's own image).
The variant is refused (nothing written) when the mean cosine is under the floor of its precision
(FP16 0.999, INT8 0.98) or zero-shot agreement, accuracy or recall@5 drop by more than the budget.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from vlmedge.errors import InputError, ValidationError

FLOORS = {"fp16": 0.999, "int8": 0.98}  # least mean cosine of a variant's embeddings to FP32's
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink")
SHAPES = ("circle", "square", "triangle")
PROMPTS = tuple(f"a photo of a {w}." for w in ("person", "car", "dog", "cat", "forklift", "truck", "box", "tree", "street",
                                                "room", "red circle", "blue square", "green triangle", "crowd", "bicycle"))


def _feeds(pipe, images: list, texts: list[str], batch: int = 8) -> dict[str, list[dict]]:
    img = [pipe.image_inputs(images[s: s + batch]) for s in range(0, len(images), batch)]
    txt = []
    for s in range(0, len(texts), batch):
        ids, mask = pipe.text_ids(texts[s: s + batch])
        txt.append({"input_ids": ids, "attention_mask": mask})
    return {"image_encoder": img, "text_encoder": txt}


def _convert(src: Path, dst: Path, graph: str, precision: str, feeds: list[dict], method: str, work: Path) -> dict:
    """One graph's variant written to dst; returns {node: why it stays float} (FP16) or the quantized nodes (INT8)."""
    import onnx

    if precision == "fp16":
        from vlmedge.calibration.fp16 import FP16_MAX, convert_for_cpu, overflow_nodes

        from vlmedge.export.graphs import save_graph

        model = onnx.load(str(src))  # (with its weights file, if it has one)
        hot = overflow_nodes(model, feeds, FP16_MAX)
        converted, kept = convert_for_cpu(model, set(hot))
        save_graph(converted, dst)
        return {"kept_fp32": {n: (f"overflows float16 ({v:.3g})" if n in hot else why) for n, (v, why) in
                              ((n, (hot.get(n, 0.0), w)) for n, w in kept.items())}}
    import logging

    from vlmedge.calibration.int8 import quantize_graph

    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization logs advice through the root logger
    nodes = quantize_graph(src, dst, method, work / f"{graph}.ranges", feeds)
    return {"quantized_nodes": len(nodes)}


def evaluate(fp32, variant, images: list, captions: list) -> dict:
    """The check of the module docstring: metrics of FP32 and of the variant, and their cosines."""
    labels = [f"{c} {s}" for c in COLORS for s in SHAPES]
    out: dict = {"images": len(images)}
    e32, ev = fp32.embed_images(images), variant.embed_images(images)
    prompts = fp32.prompts(labels)
    t32, tv = fp32.embed_texts(prompts), variant.embed_texts(prompts)
    cos_img, cos_txt = (e32 * ev).sum(-1) / np.linalg.norm(ev, axis=-1), (t32 * tv).sum(-1) / np.linalg.norm(tv, axis=-1)
    out["cosine"] = {"image_mean": float(cos_img.mean()), "image_min": float(cos_img.min()),
                     "text_mean": float(cos_txt.mean()), "text_min": float(cos_txt.min())}
    top32, topv = fp32.logits(e32, t32).argmax(-1), variant.logits(ev, tv).argmax(-1)
    out["zero_shot_agreement"] = float((top32 == topv).mean())
    truth = [_present(c) for c in captions]
    if all(t is not None for t in truth) and truth:
        out["fp32"] = {"zero_shot_accuracy": float(np.mean([labels[i] in t for i, t in zip(top32, truth)]))}
        out["variant"] = {"zero_shot_accuracy": float(np.mean([labels[i] in t for i, t in zip(topv, truth)]))}
    if all(isinstance(c, str) for c in captions) and captions:
        q32, qv = fp32.embed_texts(captions), variant.embed_texts(captions)
        for key, q, e in (("fp32", q32, e32), ("variant", qv, ev)):
            ranks = _ranks(q @ e.T)
            out.setdefault(key, {}).update({"recall@1": float((ranks < 1).mean()), "recall@5": float((ranks < 5).mean())})
    return out


def _present(caption) -> set[str] | None:
    """The colour-shape labels a scene caption names ("a small red circle , a large blue square" -> {red circle, ...})."""
    if not isinstance(caption, str):
        return None
    words = caption.replace(",", " ").split()
    found = {f"{a} {b}" for a, b in zip(words, words[1:]) if a in COLORS and b in SHAPES}
    return found or None


def _ranks(scores: np.ndarray) -> np.ndarray:
    """The rank of each query's own item (the diagonal) among all items, 0 = first."""
    own = np.diag(scores)[:, None]
    return (scores > own).sum(-1)


def judge(report: dict, precision: str, budget: float) -> list[str]:
    failures = []
    floor = FLOORS[precision]
    for kind in ("image", "text"):
        if report["cosine"][f"{kind}_mean"] < floor:
            failures.append(f"{kind} embeddings: mean cosine to FP32 {report['cosine'][f'{kind}_mean']:.4f} < {floor}")
    if report["zero_shot_agreement"] < 1 - budget:
        failures.append(f"zero-shot top label agrees with FP32 on {report['zero_shot_agreement']:.1%} of the images, "
                        f"under {1 - budget:.1%}")
    for key in ("zero_shot_accuracy", "recall@5"):
        if key in report.get("fp32", {}):
            drop = report["fp32"][key] - report["variant"][key]
            if drop > budget:
                failures.append(f"{key} drops by {drop:.3f} (FP32 {report['fp32'][key]:.3f}), over the budget {budget:.3f}")
    return failures


def quantize_dual_encoder(bundle: Path, out: Path, precision: str, calib: str = "synthetic:128", held_out: int = 200,
                          method: str | None = None, budget: float = 0.01, force: bool = False,
                          log: Callable[[str], None] = lambda s: None):
    """Write the FP16 or INT8 variant of a dual-encoder bundle to `out`, checked against FP32 on held-out
    images (module docstring); returns its manifest."""
    from vlmedge.calibration.data import load_calibration
    from vlmedge.outdir import OutputDir
    from vlmedge.runtime.bundle import MANIFEST, GraphSpec, Manifest, graph_hashes, load_bundle
    from vlmedge.runtime.embedding import EmbeddingPipeline

    if precision not in FLOORS:
        raise InputError(f"--precision {precision}: a dual-encoder bundle has fp16 and int8 variants")
    if not 0 <= budget <= 1:
        raise InputError(f"--budget: {budget * 100:g} points; expected 0 to 100")
    method = method or ("entropy" if precision == "int8" else None)
    if precision == "fp16" and method is not None:
        raise InputError("--method: applies to int8; fp16 has no activation ranges")
    src = load_bundle(bundle)
    if src.manifest.precision.get("dtype") != "float32":
        raise InputError(f"{bundle}: a {src.manifest.precision.get('dtype')} bundle; quantize the FP32 bundle")
    _, cal, held = load_calibration(calib, None, False, held_out)
    fp32 = EmbeddingPipeline(src, "cpu")
    texts = [c for c in cal.captions if isinstance(c, str)] or list(PROMPTS)
    feeds = _feeds(fp32, cal.images, texts)
    log(f"calibration: {calib}, {len(cal.images)} images and {len(texts)} texts; {len(held.images)} images held out")
    m = src.manifest
    with OutputDir(out, force) as writer, tempfile.TemporaryDirectory() as work:
        tmp = writer.path
        graphs, notes = {}, {}
        for name, g in m.graphs.items():
            log(f"{name}: {precision}")
            dst = tmp / g.file
            notes[name] = _convert(src.graph_path(name), dst, name, precision, feeds[name], method, Path(work))
            graphs[name] = GraphSpec(g.file, inputs=g.inputs, outputs=g.outputs, **graph_hashes(dst))
        shutil.copy2(src.tokenizer_path, tmp / src.tokenizer_path.name)
        precision_entry = {"dtype": "float16" if precision == "fp16" else "int8", "method": method or "fp16",
                           "calibration": {**cal.describe(), "held_out_images": len(held.images)}, "graphs": notes,
                           "source_bundle": str(bundle)}
        manifest = Manifest(**{**m.__dict__, "graphs": graphs, "precision": precision_entry})
        (tmp / MANIFEST).write_text(manifest.to_json())
        variant = EmbeddingPipeline(load_bundle(tmp), "cpu")
        log("checking the variant against FP32 on the held-out images")
        report = evaluate(fp32, variant, held.images, list(held.captions))
        failures = judge(report, precision, budget)
        precision_entry["accuracy"] = {**report, "budget": budget, "floor_cosine": FLOORS[precision], "passed": not failures,
                                       "failures": failures}
        manifest = Manifest(**{**m.__dict__, "graphs": graphs, "precision": precision_entry})
        (tmp / MANIFEST).write_text(manifest.to_json())
        if failures:
            raise ValidationError(f"{precision} variant of {bundle} fails its check: {failures[0]}")
        writer.commit()
    return manifest


def print_check(manifest, precision: str, console) -> None:
    from rich.table import Table

    acc = manifest.precision["accuracy"]
    t = Table(title=f"{precision} variant, held-out check ({acc['images']} images)")
    for col in ("", "FP32", precision):
        t.add_column(col)
    for key in ("zero_shot_accuracy", "recall@1", "recall@5"):
        if key in acc.get("fp32", {}):
            t.add_row(key, f"{acc['fp32'][key]:.4f}", f"{acc['variant'][key]:.4f}")
    t.add_row("zero-shot agreement with FP32", "1", f"{acc['zero_shot_agreement']:.4f}")
    c = acc["cosine"]
    t.add_row("cosine to FP32, images (mean / min)", "1", f"{c['image_mean']:.5f} / {c['image_min']:.5f}")
    t.add_row("cosine to FP32, texts (mean / min)", "1", f"{c['text_mean']:.5f} / {c['text_min']:.5f}")
    console.print(t)
