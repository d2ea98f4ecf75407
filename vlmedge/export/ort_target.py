"""The ONNX Runtime target (`--target onnxruntime`): a bundle whose graphs carry ONNX Runtime's fused
transformer kernels, for users who run on ONNX Runtime and never build TensorRT engines.

Each graph goes through `onnxruntime.transformers.optimizer` (model type "bert": the fusions that
apply to every graph of the canonical interface, encoders and decoders alike). What fires on the
dynamo-exported graphs, measured on `shapes-vlm` and the base ViT-GPT2 (onnxruntime 1.32):

- SkipLayerNormalization (residual Add + LayerNormalization) and BiasGelu (MatMul bias + Gelu) in
  every graph; FastGelu where the model uses the tanh approximation (GPT-2);
- no Attention / MultiHeadAttention with any model type (bert, gpt2, vit): the optimizer's
  attention patterns are those of the TorchScript exporter's graphs. So attention is fused first by
  the project's own pass (`vlmedge.export.attention_fusion`), into MultiHeadAttention, with the KV
  cache left as the graph's own.

The decoder-only (prefix) contract's `decoder` gets its own pass (`vlmedge.export.decoder_fusion`):
each layer's rotary embedding and grouped-query attention become RotaryEmbedding and
GroupQueryAttention, and projections that read the same tensor (query/key/value, gate/up) one
product. GroupQueryAttention takes a prompt after a past one row at a time, so the manifest gets
`axes.prompt_batch` 1 and the runtime runs a batch's prompts row by row (steps stay batched), and
keeps the cache in buffers that GroupQueryAttention updates in place.

`vlmedge quantize --target onnxruntime` fuses the variant it has just written: a dynamic INT8
(MatMulInteger) or MatMulNBits variant is ONNX Runtime's already but not yet fused; a bundle whose
manifest records `validation.onnxruntime_target` is refused.

The fused graphs use com.microsoft contrib ops, which TensorRT does not parse: the manifest records
`target: "onnxruntime"` and `vlmedge build` refuses such a bundle. The graph inputs and outputs stay
those of the bundle contract (checked on load), and greedy tokens must equal the source bundle's on
validation images and questions, else nothing is written.
"""

from __future__ import annotations

import collections
import copy
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable

from vlmedge.errors import ExportError, InputError, ValidationError, first_line
from vlmedge.export.attention_fusion import FUSED_DOMAIN, fuse_attention
from vlmedge.export.decoder_fusion import fuse_prefix_decoder, merge_projections
from vlmedge.outdir import OutputDir
from vlmedge.export.graphs import save_graph, share_weights
from vlmedge.export.explain import explain_manifest
from vlmedge.runtime.bundle import MANIFEST, TARGETS, AxisRange, graph_hashes, load_bundle
from vlmedge.runtime.prefix import extra_files

ORT_TARGET = TARGETS[1]

VALIDATE_IMAGES = 4


def fuse_graph(src: Path, dst: Path, num_heads: int, hidden_size: int, attention: bool = True,
               prefix_decoder: tuple[int, int] | None = None, notes: list[str] | None = None) -> dict[str, int]:
    """Write `src` with ONNX Runtime's transformer fusions applied to `dst` (and attention fused into
    MultiHeadAttention unless `attention` is False); returns the fused (contrib) node count per op
    type. `prefix_decoder` (layers, positions): the graph is the prefix contract's decoder, whose
    attention becomes GroupQueryAttention (vlmedge.export.decoder_fusion) and whose projections that
    share an input are merged; what was left unfused is said in `notes`. num_heads and hidden_size
    0: the optimizer reads them from the graph."""
    import logging

    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    options = FusionOptions("bert")
    try:
        graph = onnx.load(str(src))
        inputs = [copy.deepcopy(i) for i in graph.graph.input]
        if prefix_decoder is not None:
            if attention:
                done = fuse_prefix_decoder(graph, *prefix_decoder)
                if done["left"] and notes is not None:
                    reasons = sorted(set(done["left"].values()))
                    notes.append(f"{len(done['left'])} layers left unfused ({'; '.join(reasons)})")
            merged = merge_projections(graph)
            if notes is not None and merged:
                notes.append(f"{merged} projections merged into the products beside them")
        elif attention:
            fuse_attention(graph)
        # opt_level 0: only the Python fusions, so the file stays independent of this machine's CPU
        # (ONNX Runtime applies its own graph optimizations again when it opens the graph)
        model = optimize_model(graph, model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                               opt_level=0, optimization_options=options)
    except Exception as e:  # the optimizer raises many types; the first line says what failed
        raise ExportError(f"{src}: ONNX Runtime's transformer optimizer failed ({first_line(e)})") from e
    if [i.name for i in model.model.graph.input] != [i.name for i in inputs]:
        # the optimizer drops inputs the graph does not read (BLIP's decoder ignores encoder_mask);
        # the bundle contract names them, so they stay
        del model.model.graph.input[:]
        model.model.graph.input.extend(inputs)
    save_graph(model.model, dst)
    return dict(collections.Counter(n.op_type for n in model.model.graph.node if n.domain == FUSED_DOMAIN))


def fused_counts(path: Path) -> dict[str, int]:
    """Contrib (com.microsoft) nodes of a graph file, by op type."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return dict(collections.Counter(n.op_type for n in m.graph.node if n.domain == FUSED_DOMAIN))


def _sample_requests(manifest, n: int) -> dict[str, tuple[list, list | None]]:
    """Validation images (and questions, for VQA) from the scene world's validation split."""
    from vlmedge.data.scenes import pick_questions, scenes

    picked = list(scenes("val", 0, n))
    images = [s.image for s in picked]
    out = {}
    if "caption" in manifest.tasks:
        out["caption"] = (images, None)
    if "vqa" in manifest.tasks:
        out["vqa"] = (images, [pick_questions(s)[i % 3].text for i, s in enumerate(picked)])
    return out


def _tokens(bundle_dir: Path, requests: dict) -> dict[str, list]:
    from vlmedge.runtime.pipeline import open_pipeline

    pipe = open_pipeline(load_bundle(bundle_dir), "cpu")
    got = {}
    for task, (images, questions) in requests.items():
        gens = pipe.caption(images, return_ids=True) if questions is None else pipe.vqa(images, questions, return_ids=True)
        got[task] = [list(g.ids) for g in gens]
    return got


def retarget(src: Path, out: Path, force: bool = False, log: Callable[[str], None] = lambda s: None,
             validate_images: int = VALIDATE_IMAGES, attention: bool = True) -> dict:
    """Write the ONNX Runtime target of the bundle `src` to `out` (which may be `src` itself, replaced
    only when validation passes); returns the manifest's `validation["onnxruntime_target"]` entry.
    `attention=False` leaves attention unfused (to measure what its fusion brings)."""
    bundle = load_bundle(src)
    m = bundle.manifest
    if "onnxruntime_target" in m.validation:  # (a quantized form alone, MatMulNBits or dynamic INT8, is not fused)
        raise InputError(f"{src}: already an ONNX Runtime-target bundle (manifest validation.onnxruntime_target)")
    if m.contract == "prefix":  # dims hold the cache's KV heads, not the attention's: the optimizer reads the graph
        heads = hidden = 0
    else:
        heads, hidden = int(m.dims["decoder_heads"]), int(m.dims["decoder_heads"] * m.dims["decoder_head_dim"])
    same_dir = Path(out).resolve() == Path(src).resolve()
    with OutputDir(out, force or same_dir) as writer:
        tmp = writer.path
        fused: dict[str, dict[str, int]] = {}
        graphs = {}
        for name, spec in m.graphs.items():
            log(f"{name}: fusing")
            path, notes = tmp / spec.file, []
            decoder = (int(m.dims["decoder_layers"]), m.axes["total_len"].max) if (m.contract, name) == ("prefix", "decoder") else None
            fused[name] = fuse_graph(bundle.graph_path(name), path, heads, hidden, attention, decoder, notes)
            graphs[name] = replace(spec, **graph_hashes(path))
            log(f"{name}: {', '.join(f'{k} {v}' for k, v in sorted(fused[name].items())) or 'nothing fused'}"
                + "".join(f"; {n}" for n in notes))
        shutil.copy2(bundle.tokenizer_path, tmp / bundle.tokenizer_path.name)
        for name in extra_files(bundle.manifest.prompt):  # InstructBLIP's vision-text tokenizer
            shutil.copy2(bundle.path / name, tmp / name)
        entry = {"source_sha256": {n: g.sha256 for n, g in m.graphs.items()}, "fused_nodes": fused}
        axes = dict(m.axes)
        if fused.get("decoder", {}).get("GroupQueryAttention") and m.contract == "prefix":
            # ONNX Runtime's GroupQueryAttention takes a prompt after a past one row at a time
            axes["prompt_batch"] = AxisRange(1, 1, 1)
        graphs = share_weights(tmp, graphs)
        explain = {}
        if m.contract == "cross-attention":  # fused attention has no probabilities: explain graphs only where unfused
            graphs, explain = explain_manifest(tmp, graphs, m.explain)
        draft = replace(m, graphs=graphs, target=ORT_TARGET, axes=axes, explain=explain)
        (tmp / MANIFEST).write_text(draft.to_json())
        log("validation: greedy tokens against the source bundle")
        requests = _sample_requests(m, validate_images)
        want, got = _tokens(bundle.path, requests), _tokens(tmp, requests)
        entry["token_agreement"] = {t: f"{sum(a == b for a, b in zip(want[t], got[t]))}/{len(want[t])}" for t in want}
        if want != got:
            task = next(t for t in want if want[t] != got[t])
            raise ValidationError(f"{src}: the ONNX Runtime target's greedy tokens differ from the source bundle's "
                                  f"({task}: {entry['token_agreement'][task]} equal); nothing written")
        validation = {**m.validation, "onnxruntime_target": entry}
        (tmp / MANIFEST).write_text(replace(draft, validation=validation).to_json())
        writer.commit()
    return entry

