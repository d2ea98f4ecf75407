"""Export of the dual-encoder contract (CLIP, SigLIP): two graphs, validated, written as a bundle.

    image_encoder(pixel_values[batch,3,H,W]) -> image_embeds[batch,D]
    text_encoder(input_ids[batch,text_len], attention_mask[batch,text_len]) -> text_embeds[batch,D]

The bundle is written as every bundle is (vlmedge.outdir.OutputDir: a temp dir swapped in only when
validation passes) with the same manifest rules (hashes, named axes with TensorRT ranges) and its own
schema (vlmedge.runtime.embedding). Validation, on scene images and on texts that test the tokenizer
(case, punctuation, a prompt past the context length):

1. each graph's output in ONNX Runtime against PyTorch (max abs error, tolerance scaled by the output);
2. the runtime tokenizer's ids and mask equal the model's own Hugging Face tokenizer's;
3. end to end: the runtime pipeline's logits and label probabilities (its preprocessing, tokenizer and
   graphs) equal the PyTorch model's `logits_per_image` on the same pixels and the HF tokenizer's ids.
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
from vlmedge.runtime.embedding import CONTRACT, SCHEMA_VERSION

# texts the tokenizer must agree on: case, punctuation, spaces, digits, and a prompt past the context length
VALIDATION_TEXTS = (
    "a photo of a red circle.", "A Photo Of A BLUE Square!", "two  small   triangles, left of a cat?",
    "it's 3 o'clock -- isn't it?", "", "x",
)


def long_text(words: int = 120) -> str:
    return " ".join(["a large green square and"] * (words // 5))


def graph_decls(info, text_axis: str | int) -> dict[str, GraphDecl]:
    p = info.preprocessing
    if "max_num_patches" in p:  # NaFlex (SigLIP 2)
        n = p["max_num_patches"]
        images = (TensorDecl("pixel_values", "float32", ("batch", n, 3 * p["patch_size"] ** 2)),
                  TensorDecl("pixel_attention_mask", "int64", ("batch", n)), TensorDecl("spatial_shapes", "int64", ("batch", 2)))
    else:
        images = (TensorDecl("pixel_values", "float32", ("batch", 3, p["height"], p["width"])),)
    return {
        "image_encoder": GraphDecl("image_encoder", images, (TensorDecl("image_embeds", "float32", ("batch", info.embed_dim)),)),
        "text_encoder": GraphDecl("text_encoder", (TensorDecl("input_ids", "int64", ("batch", text_axis)),
                                                   TensorDecl("attention_mask", "int64", ("batch", text_axis))),
                                  (TensorDecl("text_embeds", "float32", ("batch", info.embed_dim)),)),
    }


def hf_text_inputs(adapter, texts: list[str]) -> dict:
    """The model's own tokenizer on `texts`, as HF's zero-shot pipeline calls it (SigLIP: padded to its positions)."""
    info = adapter.info
    kw = dict(padding="max_length", max_length=info.text_len) if info.pad_to_max else dict(padding=True, max_length=info.text_len)
    enc = adapter.hf_tokenizer()(texts, truncation=True, return_tensors="pt", **kw)
    if "attention_mask" not in enc:
        import torch

        enc["attention_mask"] = torch.ones_like(enc["input_ids"])
    return enc


def export_dual_encoder(adapter, out: Path, options: ExportOptions = ExportOptions(),
                        on_graph: Callable[[str, str], None] | None = None) -> Manifest:
    """Trace, validate and write a dual-encoder bundle; returns its manifest."""
    import torch
    from torch.export import Dim

    from vlmedge.data.scenes import scenes
    from vlmedge.runtime.embedding import image_inputs

    info = adapter.info
    with OutputDir(out, options.force) as writer:
        tmp = writer.path
        images = [s.image for s in scenes("test", 0, 2)]
        px = {k: torch.from_numpy(v) for k, v in image_inputs(images, info.preprocessing).items()}
        B = Dim("batch", min=1, max=options.max_batch)
        text_axis: str | int = info.text_len if info.pad_to_max else "text_len"
        enc = hf_text_inputs(adapter, ["a photo of a red circle .", "a large blue square"])
        text_dyn = {0: B} if info.pad_to_max else {0: B, 1: Dim("text_len", min=1, max=info.text_len)}
        decls = graph_decls(info, text_axis)
        plan = [
            ("image_encoder", adapter.image_encoder, tuple(px.values()), {k: {0: B} for k in px}),
            ("text_encoder", adapter.text_encoder, (enc["input_ids"], enc["attention_mask"]),
             {"input_ids": text_dyn, "attention_mask": text_dyn}),
        ]
        # transformers' input checks (SigLIP 2: spatial_shapes positive, within max_num_patches) trace to an op ONNX
        # lacks (aten._is_all_true); the runtime's processor makes such shapes only, so they are left out of the graph
        import os

        before = os.environ.get("TRANSFORMERS_DISABLE_TORCH_CHECK")
        os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = "1"
        try:
            graphs, timings = trace_plan(plan, decls, tmp, options.opset, on_graph)
        finally:
            if before is None:
                os.environ.pop("TRANSFORMERS_DISABLE_TORCH_CHECK")
            else:
                os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = before
        (tmp / "tokenizer.json").write_text(adapter.tokenizer_json())
        axes = {"batch": AxisRange(1, min(8, options.max_batch), options.max_batch)}
        if not info.pad_to_max:
            axes["text_len"] = AxisRange(1, min(16, info.text_len), info.text_len)
        manifest = Manifest(
            family=info.family, architecture=info.architecture,
            tasks={"classify": {"activation": info.activation, "logit_scale": info.logit_scale,
                                "logit_bias": info.logit_bias, "template": info.template}},
            dims={"embed_dim": info.embed_dim, "vocab_size": info.vocab_size, "text_len": info.text_len},
            graphs=graphs, axes=axes, preprocessing=dict(info.preprocessing),
            tokenizer={"file": "tokenizer.json", "sha256": sha256_file(tmp / "tokenizer.json"), "max_length": info.text_len,
                       "padding": "max_length" if info.pad_to_max else "longest", "pad_id": info.pad_id,
                       **({"padding_side": "left"} if info.padding_side == "left" else {})},
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
    """The bundle at `path` against the PyTorch model: graphs, tokenizer, end-to-end logits (module docstring)."""
    import torch

    from vlmedge.data.scenes import scenes
    from vlmedge.runtime.bundle import load_bundle
    from vlmedge.runtime.embedding import EmbeddingPipeline

    t0 = time.perf_counter()
    pipe = EmbeddingPipeline(load_bundle(path), "cpu")
    images = [s.image for s in scenes("test", 0, n_images or options.validate_images)]
    texts = [*VALIDATION_TEXTS, long_text(), *(s.caption for s in scenes("test", 0, 4))]
    texts = [t for t in texts if adapter.hf_tokenizer()(t)["input_ids"]]  # SigLIP 2 adds no special tokens: "" has none
    feeds = pipe.image_inputs(images)
    px = {k: torch.from_numpy(v) for k, v in feeds.items()}
    enc = hf_text_inputs(adapter, texts)
    ids, mask = pipe.text_ids(texts)
    failures: list[str] = []
    same_ids = ids.shape == tuple(enc["input_ids"].shape) and (ids == enc["input_ids"].numpy()).all() \
        and (mask == enc["attention_mask"].numpy()).all()
    if not same_ids:
        rows = [i for i in range(len(texts)) if ids.shape[1:] != tuple(enc["input_ids"].shape[1:])
                or (ids[i] != enc["input_ids"][i].numpy()).any()]
        failures.append(f"tokenizer: the runtime's ids differ from the model's tokenizer on {texts[rows[0]]!r:.60}")
    with torch.no_grad():
        ref_img = adapter.image_encoder()(*px.values()).numpy()
        ref_txt = adapter.text_encoder()(enc["input_ids"], enc["attention_mask"]).numpy()
        ref_logits = adapter.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **px).logits_per_image.numpy()
    got_img = pipe.backend.run("image_encoder", feeds)["image_embeds"]
    got_txt = pipe.backend.run("text_encoder", {"input_ids": enc["input_ids"].numpy(),
                                                "attention_mask": enc["attention_mask"].numpy()})["text_embeds"]
    graphs = {"image_encoder": {"image_embeds": _errors(ref_img, got_img)},
              "text_encoder": {"text_embeds": _errors(ref_txt, got_txt)}}
    failures += judge(graphs, options.atol)
    logits = pipe.logits(pipe.embed_images(images), pipe.embed_texts(texts))
    end_to_end = {"logits": _errors(ref_logits, logits),
                  "probabilities": _errors(hf_probabilities(ref_logits, pipe.activation), pipe.probabilities(logits))}
    tol = options.atol * max(1.0, float(np.abs(ref_logits).max()))
    if end_to_end["logits"]["max_abs"] > tol:
        failures.append(f"end to end: logits differ from the PyTorch model's by {end_to_end['logits']['max_abs']:.3g} > {tol:.3g}")
    if (ref_logits.argmax(-1) != logits.argmax(-1)).any():
        failures.append("end to end: the best label differs from the PyTorch model's on an image")
    return {"passed": not failures, "failures": failures, "atol": options.atol, "graphs": graphs,
            "tokenizer": {"texts": len(texts), "equal": bool(same_ids)}, "end_to_end": end_to_end,
            "images": len(images), "seconds": round(time.perf_counter() - t0, 2)}


def hf_probabilities(logits: np.ndarray, activation: str) -> np.ndarray:
    """The label probabilities HF's zero-shot pipeline takes of logits_per_image (in float64, for reference)."""
    x = logits.astype(np.float64)
    if activation == "sigmoid":
        return 1 / (1 + np.exp(-x))
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


# -- what `vlmedge export` and `vlmedge inspect` print for this contract ------------------------------

def print_validation(v: dict, console) -> None:
    from rich.table import Table

    t = Table(title=f"validation: ONNX Runtime (CPU) vs PyTorch, {'[green]passed[/green]' if v['passed'] else '[red]FAILED[/red]'}")
    for col in ("check", "max abs error", "mean rel error"):
        t.add_column(col, justify="right" if col != "check" else "left")
    for g, outs in v["graphs"].items():
        for name, e in outs.items():
            t.add_row(f"{g}: {name}", f"{e['max_abs']:.2e}", f"{e['mean_rel']:.2e}")
    for name, e in v.get("end_to_end", {}).items():
        t.add_row(f"end to end: {name}", f"{e['max_abs']:.2e}", f"{e['mean_rel']:.2e}")
    console.print(t)
    tok = v.get("tokenizer", {})
    if tok:
        console.print(f"tokenizer: ids {'equal to' if tok['equal'] else '[red]differ from[/red]'} the model's own on {tok['texts']} texts; "
                      f"{v.get('images', 0)} images")
    for f in v.get("failures", []):
        console.print(f"[red]failure:[/red] {f}")


def print_bundle(bundle, console) -> None:
    """`vlmedge inspect` of a dual-encoder bundle: graphs, axes, how logits are made, preprocessing, validation."""
    from rich.markup import escape
    from rich.table import Table

    from vlmedge.export.inspect import _shape, _size, print_weights, weight_report

    m = bundle.manifest
    console.print(f"[b]{escape(str(bundle.path))}[/b]: {escape(f'{m.family} ({m.architecture})')}, contract dual-encoder, "
                  f"precision {m.precision.get('dtype')}, schema {m.schema_version}, opset {m.provenance.get('opset')}")
    t = Table(title="graphs")
    for col in ("graph", "file", "size", "tensor", "dtype", "shape"):
        t.add_column(col)
    for name, g in m.graphs.items():
        size = bundle.graph_path(name).stat().st_size
        for i, (kind, x) in enumerate([("in", x) for x in g.inputs] + [("out", x) for x in g.outputs]):
            t.add_row(escape(name) if i == 0 else "", escape(g.file) if i == 0 else "", _size(size) if i == 0 else "",
                      escape(f"{kind} {x.name}"), escape(x.dtype), _shape(x.shape))
        t.add_section()
    console.print(t)
    a = Table(title="dynamic axes (TensorRT profiles)")
    for col in ("axis", "min", "opt", "max"):
        a.add_column(col, justify="right" if col != "axis" else "left")
    for name, r in m.axes.items():
        a.add_row(name, str(r.min), str(r.opt), str(r.max))
    console.print(a)
    c, tok, p = m.tasks["classify"], m.tokenizer, m.preprocessing
    console.print(escape(f"classify: logits = {c['logit_scale']:.4g} * cosine + {c['logit_bias']:.4g}, {c['activation']} over labels, "
                         f"template {c['template']!r}; embeddings of {m.dims['embed_dim']}"))
    console.print(escape(f"text: truncated to {tok['max_length']} tokens, padded to the "
                         f"{'longest text' if tok['padding'] == 'longest' else 'maximum'} with id {tok['pad_id']}"))
    if "max_num_patches" in p:
        size = f"NaFlex: aspect ratio kept, up to {p['max_num_patches']} patches of {p['patch_size']} px"
    else:
        size = (f"shortest edge {p['shortest_edge']}, centre crop " if "shortest_edge" in p else "") + f"{p['height']}x{p['width']}"
    console.print(escape(f"preprocessing: {size}, {p['resample']}, mean {p['mean']}, std {p['std']}"))
    print_weights(weight_report(bundle), console)
    prov = m.provenance
    console.print(escape(f"source: {prov.get('source')} ({', '.join(f'{k} {v[:12]}' for k, v in prov.get('source_sha256', {}).items())}), "
                         f"{prov.get('exporter')}, torch {prov.get('torch')}"))
    if m.validation:
        print_validation(m.validation, console)
