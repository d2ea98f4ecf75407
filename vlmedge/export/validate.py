"""Validation of an exported bundle against the PyTorch model it came from.

1. Per graph and output: max abs error and mean relative error of ONNX Runtime (CPU) against
   PyTorch, on real scenes and questions.
2. End to end: greedy tokens of the runtime's decoding loop over the ONNX graphs equal the family's
   own PyTorch generation, for every image, at batch 1 and as one padded batch; beam-search tokens
   (the model's own num_beams, else 3) equal it too. Both sides decode with the model's own
   generation settings (the manifest's `tasks.<task>.generation`, HF's generation_config).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlmedge.models.base import Adapter
from vlmedge.runtime.backends.onnxruntime import OrtBackend
from vlmedge.runtime.bundle import load_bundle
from vlmedge.runtime.decoding import GenerationConfig, encode, generate


def _errors(ref: np.ndarray, got: np.ndarray) -> dict:
    ref = ref.astype(np.float64)
    got = got.astype(np.float64)
    diff = np.abs(ref - got)
    return {
        "max_abs": float(diff.max()) if diff.size else 0.0,
        "mean_rel": float((diff / (np.abs(ref) + 1e-6)).mean()) if diff.size else 0.0,
        "ref_max": float(np.abs(ref).max()) if ref.size else 0.0,
    }


def _graph_errors(adapter: Adapter, backend: OrtBackend, bundle, tasks, sample) -> dict:
    import torch

    m = bundle.manifest
    out: dict[str, dict] = {}

    def check(name, module, args, feeds):
        with torch.no_grad():
            ref = module(*args)
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = backend.run(name, feeds)
        names = [t.name for t in m.graphs[name].outputs]
        out[name] = {n: _errors(r.numpy(), got[n]) for n, r in zip(names, ref)}
        return ref

    px = sample.pixel_values
    args = _vision_args(adapter, m, px, sample.questions or None)
    names = [t.name for t in m.graphs["vision_encoder"].inputs]
    (img,) = check("vision_encoder", adapter.vision_encoder(), args, {n: a.numpy() for n, a in zip(names, args)})
    enc, mask = img, torch.ones(img.shape[:2], dtype=torch.long)
    texts = [t for t in tasks if m.tasks[t]["encoder"] == "text_encoder"]
    if texts:
        (enc,) = check("text_encoder", adapter.text_encoder(), (sample.question_ids, sample.question_mask, img),
                       {"question_ids": sample.question_ids.numpy(), "question_mask": sample.question_mask.numpy(),
                        "image_states": img.numpy()})
        mask = sample.question_mask
        if m.tasks[texts[0]].get("image_prefix"):
            mask = torch.cat([torch.ones(img.shape[:2], dtype=torch.long), mask], 1)
    spec = m.tasks[texts[0] if texts else tasks[0]]
    cross = check("cross_kv", adapter.cross_kv(), (enc,), {"encoder_states": enc.numpy()})
    B, n = px.shape[0], len(spec["prompt_ids"])
    L, H, dh = m.dims["decoder_layers"], m.dims["decoder_heads"], m.dims["decoder_head_dim"]
    kv_inputs = [t.name for t in m.graphs["decoder"].inputs[4:]]
    decoder = adapter.decoder()

    def run_decoder(ids, attention, pos, past):  # the prompt after the hidden slot, then a step: one graph, checked as one
        args = (ids, attention, pos, mask, *past, *cross)
        feeds = {"input_ids": ids.numpy(), "attention_mask": attention.numpy(), "position_ids": pos.numpy(),
                 "encoder_mask": mask.numpy(), **{k: v.numpy() for k, v in zip(kv_inputs, (*past, *cross))}}
        return check("decoder", decoder, args, feeds)

    attention = torch.tensor([[0] + [1] * n] * B)
    first = run_decoder(torch.tensor([list(spec["prompt_ids"])] * B), attention, torch.arange(n).repeat(B, 1),
                        [torch.zeros(B, H, 1, dh)] * (2 * L))
    prompt_errors = out.pop("decoder")
    run_decoder(first[0].argmax(-1, keepdim=True), torch.cat([attention, torch.ones(B, 1, dtype=torch.long)], 1),
                torch.full((B, 1), n), list(first[1:]))
    out["decoder"] = {k: max(e, prompt_errors[k], key=lambda x: x["max_abs"]) for k, e in out["decoder"].items()}
    return out


def _vision_args(adapter: Adapter, m, px, texts) -> tuple:
    """The vision graph's inputs: the pixels, and where the graph reads text (InstructBLIP-T5's Q-Former) each
    row's text (`texts`, the questions; None: the task's own, the caption instruction)."""
    if "vision_text" not in m.prompt:
        return (px,)
    return adapter.vision_args(px, texts or [m.prompt["vision_text"]["texts"]["caption"]] * px.shape[0])


def _tokens(adapter: Adapter, backend: OrtBackend, bundle, task: str, sample) -> dict:
    m = bundle.manifest
    spec = m.tasks[task]
    L = m.dims["decoder_layers"]
    max_new = spec["max_new_tokens"]
    vqa = task == "vqa"
    n = sample.pixel_values.shape[0]
    prompt = spec.get("text_prompt_ids")

    generation = spec.get("generation") or {}
    beams = generation.get("num_beams", 1) if generation.get("num_beams", 1) > 1 else 3

    def onnx_ids(sl, k=1):
        px = sample.pixel_values[sl].numpy()
        texts = list(sample.questions[sl]) if vqa and not prompt else None
        vision = {t.name: a.numpy() for t, a in zip(m.graphs["vision_encoder"].inputs[1:],
                                                    _vision_args(adapter, m, sample.pixel_values[sl], texts)[1:])}
        if prompt:  # the task's own prompt for every image
            ids = np.tile(np.asarray(prompt, dtype=np.int64), (px.shape[0], 1))
            states, mask = encode(backend, px, ids, np.ones_like(ids), spec.get("image_prefix", False), vision)
        elif vqa:
            qm = sample.question_mask[sl].numpy()
            width = int(qm.sum(1).max())  # a batch of one carries no padding
            states, mask = encode(backend, px, sample.question_ids[sl].numpy()[:, :width], qm[:, :width], vision_text=vision)
        else:
            states, mask = encode(backend, px, vision_text=vision)
        return generate(backend, L, states, mask, spec["prompt_ids"], spec["eos_id"], GenerationConfig(num_beams=k, max_new_tokens=max_new),
                        max_new, defaults=generation)

    def torch_ids(sl, k=1):
        if vqa and not prompt:
            qm = sample.question_mask[sl]
            width = int(qm.sum(1).max())
            texts = {"texts": list(sample.questions[sl])} if "vision_text" in m.prompt else {}
            return adapter.reference_generate(task, sample.pixel_values[sl], sample.question_ids[sl][:, :width],
                                              qm[:, :width], max_new_tokens=max_new, num_beams=k, **texts)
        return adapter.reference_generate(task, sample.pixel_values[sl], max_new_tokens=max_new, num_beams=k)

    batched_ref, batched = torch_ids(slice(0, n)), onnx_ids(slice(0, n))
    single_ref, single = [], []
    for i in range(n):
        single_ref += torch_ids(slice(i, i + 1))
        single += onnx_ids(slice(i, i + 1))
    # beam search at the model's own width (3 where it decodes greedily), in batches the bundle allows
    beam_ref, beam = [], []
    step = max(1, m.axes["batch"].max // beams)
    for s in range(0, n, step):
        beam_ref += torch_ids(slice(s, s + step), beams)
        beam += onnx_ids(slice(s, s + step), beams)
    mism = [i for i in range(n) if batched[i] != batched_ref[i]]
    mism1 = [i for i in range(n) if single[i] != single_ref[i]]
    mism_beam = [i for i in range(n) if beam[i] != beam_ref[i]]
    return {
        "images": n, "batch": n,
        "agree_batched": n - len(mism), "agree_batch1": n - len(mism1),
        "mean_new_tokens": float(np.mean([len(r) for r in batched_ref])),
        "first_mismatch": None if not (mism or mism1) else {
            "image": (mism or mism1)[0], "pytorch": (batched_ref if mism else single_ref)[(mism or mism1)[0]],
            "onnx": (batched if mism else single)[(mism or mism1)[0]],
        },
        "beam": {"num_beams": beams, "agree": n - len(mism_beam), "first_mismatch": None if not mism_beam else {
            "image": mism_beam[0], "pytorch": beam_ref[mism_beam[0]], "onnx": beam[mism_beam[0]]}},
    }


def judge(graphs: dict[str, dict[str, dict]], atol: float) -> list[str]:
    """Marks each output's error passed or not (tolerance `atol` scaled by max(1, |reference|)); the failures."""
    failures = []
    for g, outs in graphs.items():
        for name, e in outs.items():
            tol = atol * max(1.0, e["ref_max"])
            e["passed"] = e["max_abs"] <= tol
            if not e["passed"]:
                failures.append(f"graph {g} output {name}: max abs error {e['max_abs']:.3g} > {tol:.3g}")
    return failures


def validate_bundle(adapter: Adapter, bundle_dir: Path, tasks: list[str], options) -> dict:
    from vlmedge.export.samples import sample_inputs

    bundle = load_bundle(bundle_dir)
    backend = OrtBackend(bundle)
    failures: list[str] = []
    sample = sample_inputs(adapter, n=options.validate_images, tasks=tasks)
    graphs = _graph_errors(adapter, backend, bundle, tasks, sample)
    failures += judge(graphs, options.atol)
    tokens = {}
    for task in tasks:
        tokens[task] = r = _tokens(adapter, backend, bundle, task, sample)
        if r["first_mismatch"] is not None:
            failures.append(f"{task}: ONNX greedy tokens differ from PyTorch on image {r['first_mismatch']['image']}")
        if r["beam"]["first_mismatch"] is not None:
            failures.append(f"{task}: ONNX beam-search tokens (num_beams={r['beam']['num_beams']}) differ from PyTorch "
                            f"on image {r['beam']['first_mismatch']['image']}")
    return {"passed": not failures, "failures": failures, "atol": options.atol, "graphs": graphs, "tokens": tokens}
