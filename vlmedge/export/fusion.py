"""Export of the fusion contract (ViLT, BridgeTower): one graph, validated, written as a bundle.

    fusion(pixel_values[batch,3,height,width], pixel_mask[batch,height,width] (ViLT),
           input_ids[batch,text_len], attention_mask[batch,text_len]) -> logits

ViLT's graph takes images of any size the processor makes (height and width multiples of the patch,
up to the longest edge), padded within a batch; BridgeTower's takes the one centre-cropped size. The
bundle is written as every bundle is (vlmedge.outdir.OutputDir: a temp dir swapped in only when
validation passes), with its own schema (vlmedge.runtime.fusion). Validation, on scene images at
several sizes and aspect ratios (so ViLT batches are padded) and on texts that test the tokenizer:

1. the runtime tokenizer's ids and mask equal the model's own Hugging Face tokenizer's (truncation included);
2. end to end: the graph in ONNX Runtime, fed the runtime's preprocessing and tokenizer, against the
   unmodified PyTorch model's `logits` on the same inputs (max abs error, tolerance scaled by the output),
   and the same best answer (vqa) or score per pair (match).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from vlmedge.export.exporter import ExportOptions, _provenance, _refuse_failed, trace_plan
from vlmedge.export.graphs import GraphDecl, TensorDecl
from vlmedge.export.validate import _errors, judge
from vlmedge.outdir import OutputDir
from vlmedge.runtime.bundle import MANIFEST, AxisRange, Manifest, sha256_file
from vlmedge.runtime.fusion import CONTRACT, SCHEMA_VERSION

# texts the tokenizer must agree on: case, punctuation, spaces, digits, and one past the model's positions
VALIDATION_TEXTS = (
    "what colour is the circle?", "How Many BLUE Squares are there?!", "is there a triangle  left of   the square?",
    "it's 3 o'clock -- isn't it?", "x", "a large green square and " * 30,
)
# (height, width) of validation images: scenes resized to other aspect ratios, so a ViLT batch is padded
VALIDATION_SIZES = ((64, 64), (48, 112), (120, 40), (90, 90), (33, 57), (200, 150))


def graph_decl(info) -> GraphDecl:
    p = info.preprocessing
    if info.pixel_mask:
        images = (TensorDecl("pixel_values", "float32", ("batch", 3, "height", "width")),
                  TensorDecl("pixel_mask", "int64", ("batch", "height", "width")))
    else:
        images = (TensorDecl("pixel_values", "float32", ("batch", 3, p["crop_height"], p["crop_width"])),)
    text = (TensorDecl("input_ids", "int64", ("batch", "text_len")), TensorDecl("attention_mask", "int64", ("batch", "text_len")))
    return GraphDecl("fusion", images + text, (TensorDecl("logits", "float32", ("batch", *info.logits_shape)),))


def validation_images(n: int) -> list:
    from PIL import Image

    from vlmedge.data.scenes import scenes

    out = []
    for i, s in enumerate(scenes("test", 0, n)):
        h, w = VALIDATION_SIZES[i % len(VALIDATION_SIZES)]
        out.append(Image.fromarray(s.image).resize((w, h), Image.Resampling.BICUBIC))
    return out


def validation_texts(adapter, n: int) -> list[str]:
    from vlmedge.data.scenes import pick_questions, scenes

    texts = list(VALIDATION_TEXTS)
    for s in scenes("test", 0, n):
        texts.append(pick_questions(s)[0].text if adapter.info.task == "vqa" else s.caption)
    return texts


def hf_text_inputs(adapter, texts: list[str]) -> dict:
    """The model's own tokenizer on `texts`: truncated to the model's positions, padded to the longest."""
    return adapter.hf_tokenizer()(texts, padding=True, truncation=True, max_length=adapter.info.text_len, return_tensors="pt")


def export_fusion(adapter, out: Path, options: ExportOptions = ExportOptions(),
                  on_graph: Callable[[str, str], None] | None = None) -> Manifest:
    """Trace, validate and write a fusion bundle; returns its manifest."""
    import torch
    from torch.export import Dim

    from vlmedge.runtime.fusion import image_inputs

    info = adapter.info
    p = info.preprocessing
    with OutputDir(out, options.force) as writer:
        tmp = writer.path
        # two images of different sizes (no dynamic dimension of size 1 in the example: it would be specialised)
        px = {k: torch.from_numpy(v) for k, v in image_inputs(validation_images(3)[1:3], p, info.pixel_mask).items()}
        enc = hf_text_inputs(adapter, ["what colour is the large circle?", "a blue square"])
        B = Dim("batch", min=1, max=options.max_batch)
        T = Dim("text_len", min=1, max=info.text_len)
        text_dyn = {0: B, 1: T}
        if info.pixel_mask:  # sides are whole patches: pixels = patch * patches
            side = p["longest_edge"] // p["size_divisor"] * p["size_divisor"]
            rows = Dim("patch_rows", min=1, max=side // info.patch_size)
            cols = Dim("patch_cols", min=1, max=side // info.patch_size)
            image_dyn = {"pixel_values": {0: B, 2: info.patch_size * rows, 3: info.patch_size * cols},
                         "pixel_mask": {0: B, 1: info.patch_size * rows, 2: info.patch_size * cols}}
        else:
            image_dyn = {"pixel_values": {0: B}}
        plan = [("fusion", adapter.fusion, (*px.values(), enc["input_ids"], enc["attention_mask"]),
                 {**image_dyn, "input_ids": text_dyn, "attention_mask": text_dyn})]
        graphs, timings = trace_plan(plan, {"fusion": graph_decl(info)}, tmp, options.opset, on_graph)
        (tmp / "tokenizer.json").write_text(adapter.tokenizer_json())
        axes = {"batch": AxisRange(1, min(8, options.max_batch), options.max_batch),
                "text_len": AxisRange(1, min(16, info.text_len), info.text_len)}
        if info.pixel_mask:
            side = p["longest_edge"] // p["size_divisor"] * p["size_divisor"]
            opt = p["shortest_edge"] // p["size_divisor"] * p["size_divisor"]
            axes["height"] = axes["width"] = AxisRange(info.patch_size, max(info.patch_size, opt), side)
        manifest = Manifest(
            family=info.family, architecture=info.architecture, tasks={info.task: dict(info.head)},
            dims={"vocab_size": info.vocab_size, "text_len": info.text_len, "patch_size": info.patch_size},
            graphs=graphs, axes=axes, preprocessing=dict(p),
            tokenizer={"file": "tokenizer.json", "sha256": sha256_file(tmp / "tokenizer.json"), "max_length": info.text_len,
                       "pad_id": info.pad_id},
            precision={"dtype": "float32", "method": "export"},
            provenance=_provenance(adapter, options.opset, timings),
            schema_version=SCHEMA_VERSION, contract=CONTRACT,
        )
        (tmp / MANIFEST).write_text(manifest.to_json())
        if on_graph:
            on_graph("validation", "running")
        validation = validate(adapter, tmp, options)
        manifest = Manifest(**{**manifest.__dict__, "validation": validation})
        (tmp / MANIFEST).write_text(manifest.to_json())
        _refuse_failed(adapter, manifest)
        writer.commit()
    return manifest


def validate(adapter, path: Path, options: ExportOptions, n_images: int | None = None) -> dict:
    """The bundle at `path` against the PyTorch model: tokenizer, end-to-end logits (module docstring)."""
    import torch

    from vlmedge.runtime.bundle import load_bundle
    from vlmedge.runtime.fusion import FusionPipeline

    t0 = time.perf_counter()
    pipe = FusionPipeline(load_bundle(path), "cpu", batch_size=4)
    n = max(2, n_images or options.validate_images)
    images = validation_images(n)
    texts = validation_texts(adapter, n)
    texts = (texts * (n // len(texts) + 1))[:n] if len(texts) < n else texts[:n]
    failures: list[str] = []
    enc = hf_text_inputs(adapter, list(VALIDATION_TEXTS) + texts)
    ids, mask = pipe.text_ids(list(VALIDATION_TEXTS) + texts)
    same_ids = ids.shape == tuple(enc["input_ids"].shape) and bool((ids == enc["input_ids"].numpy()).all()) \
        and bool((mask == enc["attention_mask"].numpy()).all())
    if not same_ids:
        failures.append("tokenizer: the runtime's ids differ from the model's tokenizer")
    ref, got = [], []
    for s in range(0, n, 4):  # batches of 4: ViLT's images padded to the largest of each
        feeds = pipe.image_inputs(images[s: s + 4])
        t = hf_text_inputs(adapter, texts[s: s + 4])
        with torch.no_grad():
            ref.append(adapter.model(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                                     **{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy())
        got.append(pipe.logits(images[s: s + 4], texts[s: s + 4]))
    ref_logits, logits = np.concatenate(ref), np.concatenate(got)
    graphs = {"fusion": {"logits": _errors(ref_logits, logits)}}
    failures += judge(graphs, options.atol)
    ref_scores, scores = pipe.scores(ref_logits), pipe.scores(logits)
    end_to_end = {"scores": _errors(ref_scores, scores)}
    if pipe.task == "vqa" and (ref_scores.argmax(-1) != scores.argmax(-1)).any():
        failures.append("end to end: the best answer differs from the PyTorch model's on an image")
    return {"passed": not failures, "failures": failures, "atol": options.atol, "graphs": graphs,
            "tokenizer": {"texts": len(VALIDATION_TEXTS) + len(texts), "equal": same_ids}, "end_to_end": end_to_end,
            "images": len(images), "seconds": round(time.perf_counter() - t0, 2)}


# -- what `vlmedge export` and `vlmedge inspect` print for this contract ------------------------------

def print_bundle(bundle, console) -> None:
    """`vlmedge inspect` of a fusion bundle: the graph, axes, the head, preprocessing, validation."""
    from rich.markup import escape
    from rich.table import Table

    from vlmedge.export.dual_encoder import print_validation
    from vlmedge.export.inspect import _shape, _size, print_weights, weight_report

    m = bundle.manifest
    console.print(f"[b]{escape(str(bundle.path))}[/b]: {escape(f'{m.family} ({m.architecture})')}, contract fusion, "
                  f"precision {escape(str(m.precision.get('dtype')))}, schema {m.schema_version}, opset {m.provenance.get('opset')}")
    t = Table(title="graph")
    for col in ("graph", "file", "size", "tensor", "dtype", "shape"):
        t.add_column(col)
    g = m.graphs["fusion"]
    for i, (kind, x) in enumerate([("in", x) for x in g.inputs] + [("out", x) for x in g.outputs]):
        t.add_row("fusion" if i == 0 else "", escape(g.file) if i == 0 else "", _size(bundle.graph_bytes("fusion")) if i == 0 else "",
                  escape(f"{kind} {x.name}"), escape(x.dtype), _shape(x.shape))
    console.print(t)
    a = Table(title="dynamic axes (TensorRT profiles)")
    for col in ("axis", "min", "opt", "max"):
        a.add_column(col, justify="right" if col != "axis" else "left")
    for name, r in m.axes.items():
        a.add_row(escape(name), str(r.min), str(r.opt), str(r.max))
    console.print(a)
    task, head = next(iter(m.tasks.items()))
    if task == "vqa":
        console.print(escape(f"vqa: a sigmoid score for each of {len(head['labels'])} answers ({', '.join(head['labels'][:5])}, ...)"))
    elif head["score"] == "logit":
        console.print(escape(f"match: the score is logits[:, {head['index']}]"))
    else:
        console.print(escape(f"match: the score is {head['logit_scale']:.4g} * text . image (normalised embeddings)"))
    p = m.preprocessing
    size = f"shortest edge {p['shortest_edge']}, longest {p['longest_edge']}, multiples of {p['size_divisor']}" + (
        f", centre crop {p['crop_height']}x{p['crop_width']}" if "crop_height" in p else ", a batch padded with a pixel mask")
    console.print(escape(f"preprocessing: {size}, {p['resample']}, mean {p['mean']}, std {p['std']}"))
    console.print(escape(f"text: truncated to {m.tokenizer['max_length']} tokens, padded to the longest with id {m.tokenizer['pad_id']}"))
    print_weights(weight_report(bundle), console)
    if m.validation:
        print_validation(m.validation, console)
