"""Export and validation of the prefix contract (decoder-only VLMs: vlmedge.models.prefix).

Three graphs are traced: `vision_encoder` (tower + connector), `embed`, and one `decoder` that
serves the prompt and every later token. Validation runs the runtime itself (PrefixPipeline over
the freshly written bundle) against the model's own `generate`: the same images of several sizes
and aspect ratios, the same prompt ids, greedy as one left-padded batch and one by one, and beam
search; plus each graph's outputs against PyTorch.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from vlmedge.errors import InputError
from vlmedge.export.graphs import DEFAULT_MAX_BATCH, GraphDecl, TensorDecl, kv, share_weights
from vlmedge.models.base import FamilyInfo
from vlmedge.runtime.bundle import PREFIX_SCHEMA_VERSION

TEXT_ROOM = 160  # prompt text and generated tokens the graphs declare beside the largest image's tokens


def frames_per_image(info: FamilyInfo) -> int:
    """The most frames the processor makes of one image."""
    p = info.preprocessing.processor
    if p["kind"] == "idefics3" and p.get("split", True):
        side = -(-int(p["longest_edge"]) // int(p["tile"]))
        return side * side + 1
    if p["kind"] == "anyres":
        tile = info.preprocessing.height
        return max((h // tile) * (w // tile) for h, w in p["grid_pinpoints"]) + 1
    if p.get("pan_and_scan"):  # Gemma 3: the image and its crops
        return 1 + int(p["pan_and_scan"]["max_crops"])
    return 1


def tokens_per_image(info: FamilyInfo) -> int:
    """The most placeholder tokens one image takes."""
    p = info.preprocessing.processor
    if p["kind"] == "anyres":
        from vlmedge.runtime.processors import anyres_tokens

        return max(anyres_tokens((h, w), p, info.preprocessing.height) for h, w in p["grid_pinpoints"])
    return frames_per_image(info) * info.dims.image_tokens


def vision_text_inputs(info: FamilyInfo) -> tuple[str, ...]:
    """The vision graph's text inputs (ids, mask) where its family's vision side reads the prompt's text
    (InstructBLIP's Q-Former: `prompt.vision_text`), else ()."""
    spec = info.prompt.get("vision_text")
    return tuple(spec["inputs"]) if spec else ()


def cross_decls(info: FamilyInfo, image_width: int, cross_layers: int) -> tuple[GraphDecl, tuple[TensorDecl, ...]]:
    """A cross-attention decoder's (IDEFICS): the cross_kv graph, and the decoder's inputs after its cache."""
    d = info.dims
    cross = kv("cross", cross_layers, d.decoder_heads, d.decoder_head_dim, "image_len")
    graph = GraphDecl("cross_kv", (TensorDecl("image_embeds", "float32", ("batch", "image_len", image_width)),), cross)
    return graph, cross


def prefix_decls(info: FamilyInfo, newline: bool = False, blocks: bool = False, position_rows: int = 1,
                 cross: tuple[int, int] | None = None) -> list[GraphDecl]:
    """`newline`: the vision graph also outputs the model's row-separator embedding (LLaVA-OneVision);
    `blocks`: the decoder also takes block_ids (PaliGemma, Gemma 3: parts of the prompt attend both ways);
    `position_rows` 3: M-RoPE positions, position_ids[3, batch, seq_len]; `cross` (image width, gated layers):
    the images reach the decoder through cross_kv and cross_mask (IDEFICS). A qwen2_vl processor's vision graph
    takes patches of any grid (with their rotary rows and columns and the segment, image or window, each
    attends within) and gives one row per image token."""
    d, p = info.dims, info.preprocessing
    L, H, dh, D = d.decoder_layers, d.decoder_heads, d.decoder_head_dim, d.encoder_hidden
    extra = (TensorDecl("image_newline", "float32", (D,)),) if newline else ()
    block = (TensorDecl("block_ids", "int64", ("batch", "total_len")),) if blocks else ()
    pos = ("batch", "seq_len") if position_rows == 1 else (position_rows, "batch", "seq_len")
    if p.processor and p.processor["kind"] == "qwen2_vl":
        q = p.processor
        vision = GraphDecl("vision_encoder", (
            TensorDecl("pixel_values", "float32", ("patches", 3 * q["temporal_patch_size"] * q["patch_size"] ** 2)),
            TensorDecl("vision_position_ids", "int64", ("patches", 2)),
            TensorDecl("vision_segment_ids", "int64", ("patches",)),
            *((TensorDecl("vision_window_ids", "int64", ("patches",)),) if q.get("window") else ())),
            (TensorDecl("image_embeds", "float32", ("image_rows", D)),))
    else:
        text = tuple(TensorDecl(n, "int64", ("frames", "vision_text_len")) for n in vision_text_inputs(info))
        vision = GraphDecl("vision_encoder", (TensorDecl("pixel_values", "float32", ("frames", 3, p.height, p.width)), *text),
                           (TensorDecl("image_embeds", "float32", ("frames", d.image_tokens, cross[0] if cross else D)), *extra))
    cross_graph, cross_inputs = cross_decls(info, *cross) if cross else (None, ())
    cross_mask = (TensorDecl("cross_mask", "int64", ("batch", "seq_len", "image_len")),) if cross else ()
    return [
        vision, *((cross_graph,) if cross_graph else ()),
        GraphDecl("embed", (TensorDecl("input_ids", "int64", ("batch", "seq_len")),),
                  (TensorDecl("inputs_embeds", "float32", ("batch", "seq_len", D)),)),
        GraphDecl("decoder",
                  (TensorDecl("inputs_embeds", "float32", ("batch", "seq_len", D)),
                   TensorDecl("attention_mask", "int64", ("batch", "total_len")),
                   TensorDecl("position_ids", "int64", pos), *block, *cross_mask,
                   *kv("past", L, H, dh, "past_len"), *cross_inputs),
                  (TensorDecl("logits", "float32", ("batch", d.vocab_size)), *kv("present", L, H, dh, "total_len"))),
    ]


def prefix_axes(info: FamilyInfo, max_batch: int = DEFAULT_MAX_BATCH, max_length: int | None = None) -> dict:
    """min/opt/max of the prefix contract's axes. `max_length` bounds the prompt (image tokens
    included) plus generated tokens; by default one image at its most frames plus TEXT_ROOM."""
    frames = frames_per_image(info)
    image = tokens_per_image(info)
    if max_length is not None and max_length < image + 16:
        raise InputError(f"--max-length {max_length}: one image of this model takes up to {image} tokens; "
                         f"use at least {image + 16} (its tokens, the prompt's text and the answer)")
    total = min(info.dims.max_target_len, max_length or image + TEXT_ROOM) + 1  # + the hidden slot
    p = info.preprocessing.processor
    patches = {}
    if p["kind"] == "qwen2_vl":  # one image's patches at most per vision call; image rows: its tokens
        merge = int(p["merge_size"]) ** 2
        patches = {"patches": (merge, min(16 * merge, image * merge), image * merge), "image_rows": (1, min(16, image), image)}
    if vision_text_inputs(info):  # the vision graph's text: one row per frame
        longest = int(info.prompt["vision_text"]["max_length"])
        patches["vision_text_len"] = (1, min(16, longest), longest)
    cross = info.prompt.get("cross_attention")
    if cross:  # IDEFICS: a prompt's images one after another, `image_tokens` rows each
        n = info.dims.image_tokens
        patches["image_len"] = (n, n, n * int(cross["max_images"]))
    return {
        **patches,
        "batch": (1, 1, max_batch),
        "frames": (1, frames, max(frames, 2)),
        "seq_len": (1, min(image + 16, total - 2), total - 2),
        "past_len": (1, min(image + 32, total - 1), total - 1),
        "total_len": (2, min(image + 33, total), total),
    }


def export_prefix(adapter, tasks: list[str], tmp: Path, options, on_graph: Callable | None):
    """Trace, write and validate a prefix bundle into `tmp` (the OutputDir's directory); returns the manifest."""
    import torch
    from torch.export import Dim

    from vlmedge.export.exporter import _provenance, trace_plan

    from vlmedge.runtime.bundle import MANIFEST, AxisRange, Manifest, sha256_file

    info = adapter.info
    d = info.dims
    p = info.preprocessing
    if p.processor["kind"] == "qwen2_vl":  # two images of 2x4 and 4x2 patches, kept apart by the mask
        from vlmedge.runtime.processors import ImageInput, vision_feeds

        q = p.processor
        dim = 3 * q["temporal_patch_size"] * q["patch_size"] ** 2
        grids = [ImageInput(np.random.default_rng(i).standard_normal((8, dim), dtype=np.float32), "", grid=grid)
                 for i, grid in enumerate([(1, 2, 4), (1, 4, 2)])]
        feeds, _ = vision_feeds(grids, int(q["merge_size"]), int(q.get("window", 0)))
        names = [t.name for t in prefix_decls(info)[0].inputs]
        vision_args = tuple(torch.from_numpy(feeds[n]) for n in names)
        vision_dyn = {n: {0: Dim.DYNAMIC} for n in names}
    else:
        vision_args, vision_dyn = (torch.randn(2, 3, p.height, p.width),), {"pixel_values": {0: Dim.DYNAMIC}}
        if vision_text_inputs(info):  # ids and mask of two frames' texts of 5 tokens, the second's last one padding
            vision_args += (torch.tensor([[2, 3, 4, 5, 6], [2, 4, 6, 3, 0]]), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]))
            vision_dyn.update({n: {0: Dim.DYNAMIC, 1: Dim.DYNAMIC} for n in vision_text_inputs(info)})
    with torch.no_grad():
        newline = isinstance(adapter.vision_encoder()(*vision_args), tuple)
    decoder = adapter.decoder()
    blocks = "block_ids" in decoder.inputs
    rows = getattr(decoder, "position_rows", 1)
    cross_layers = getattr(decoder, "cross_layers", 0)
    cross = (adapter.image_width, cross_layers) if adapter.cross_attention else None
    decls = {g.name: g for g in prefix_decls(info, newline, blocks, rows, cross)}
    ranges = prefix_axes(info, options.max_batch, options.max_length)
    ids = torch.tensor([[1, 2, 3], [3, 2, 1]]) % d.vocab_size
    L, H, dh = d.decoder_layers, d.decoder_heads, d.decoder_head_dim
    embeds = torch.randn(2, 3, d.encoder_hidden) * 0.02
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[:, 0] = 0
    pos = torch.arange(3)[None].repeat(2, 1) if rows == 1 else torch.arange(3)[None, None].repeat(rows, 2, 1)
    past = [torch.zeros(2, H, 2, dh) for _ in range(2 * L)]
    auto = Dim.DYNAMIC  # the attention mask's length is past + seq: the tracer keeps the relation
    block_args, block_dyn = ((torch.tensor([[-1, -1, 0, 0, -1], [-1, 0, 0, 1, 1]]),), {"block_ids": {0: auto, 1: auto}}) \
        if blocks else ((), {})
    cross_plan, cross_args, cross_dyn = [], (), {}
    if cross:  # two images' rows (of a 2-row batch) for the decoder's 3 queries; cross_kv over 2 rows of 3 images
        image_len = 2 * d.image_tokens
        states = torch.randn(2, 3 * d.image_tokens, adapter.image_width)
        cross_plan = [("cross_kv", adapter.cross_kv, (states,), {"image_embeds": {0: auto, 1: auto}})]
        cross_args = (torch.randint(0, 2, (2, 3, image_len)), *[torch.randn(2, H, image_len, dh) * 0.1 for _ in range(2 * cross_layers)])
        cross_dyn = {"cross_mask": {0: auto, 1: auto, 2: auto}, "cross": tuple([{0: auto, 2: auto}] * (2 * cross_layers))}
    plan = [
        ("vision_encoder", adapter.vision_encoder, vision_args, vision_dyn),
        *cross_plan,
        ("embed", adapter.embed, (ids,), {"input_ids": {0: auto, 1: auto}}),
        ("decoder", adapter.decoder, (embeds, mask, pos, *block_args, *cross_args[:1], *past, *cross_args[1:]),
         {"inputs_embeds": {0: auto, 1: auto}, "attention_mask": {0: auto, 1: auto},
          "position_ids": {0: auto, 1: auto} if rows == 1 else {1: auto, 2: auto}, **block_dyn,
          **({"cross_mask": cross_dyn["cross_mask"]} if cross else {}),
          "past": tuple([{0: auto, 2: auto}] * (2 * L)) + cross_dyn.get("cross", ())}),  # the cache, then cross K/V
    ]
    graphs, timings = trace_plan(plan, decls, tmp, options.opset, on_graph)
    graphs = share_weights(tmp, graphs)  # a tied token table: `embed`'s and the decoder's LM head
    (tmp / "tokenizer.json").write_text(adapter.tokenizer_json())
    prompt = dict(info.prompt)
    if vision_text_inputs(info):  # the vision graph's own tokenizer, beside the LM's
        name = prompt["vision_text"]["tokenizer"]
        (tmp / name).write_text(adapter.vision_text_tokenizer_json())
        prompt["vision_text"] = {**prompt["vision_text"], "sha256": sha256_file(tmp / name)}
    prep = {k: v for k, v in asdict(info.preprocessing).items() if v is not None}
    max_new = min(info.tasks[t].max_new_tokens for t in tasks)
    manifest = Manifest(
        family=info.family, architecture=info.architecture,
        tasks={t: {"eos_id": info.tasks[t].eos_id, "pad_id": info.tasks[t].pad_id, "max_new_tokens": max_new,
                   "generation": info.tasks[t].generation} for t in tasks},
        dims=asdict(d), graphs=graphs, axes={k: AxisRange(*v) for k, v in ranges.items()}, preprocessing=prep,
        tokenizer={"file": "tokenizer.json", "sha256": sha256_file(tmp / "tokenizer.json")},
        precision={"dtype": "float32", "method": "export"}, provenance=_provenance(adapter, options.opset, timings),
        schema_version=PREFIX_SCHEMA_VERSION, contract="prefix", prompt=prompt,
    )
    (tmp / MANIFEST).write_text(manifest.to_json())
    if on_graph:
        on_graph("validation", "running")
    validation = validate_prefix(adapter, tmp, tasks, options)
    manifest = Manifest(**{**manifest.__dict__, "validation": validation})
    (tmp / MANIFEST).write_text(manifest.to_json())
    return manifest


# -- validation ------------------------------------------------------------------------------------

SIZES = ((64, 64), (96, 48), (40, 72), (64, 64), (80, 80), (48, 100), (64, 64), (72, 40))  # (w, h): grids differ


def sample_items(n: int, tasks: list[str]) -> list[tuple]:
    """n (image, task, question) of the scene world at several sizes and aspect ratios."""
    from PIL import Image

    from vlmedge.data.scenes import pick_questions, scenes

    items = []
    for i, s in enumerate(scenes("test", 0, n)):
        img = Image.fromarray(s.image).resize(SIZES[i % len(SIZES)], Image.Resampling.BICUBIC)
        task = tasks[i % len(tasks)]
        qs = pick_questions(s)
        items.append((img, task, qs[i % len(qs)].text if task == "vqa" else None))
    return items


def validate_prefix(adapter, bundle_dir: Path, tasks: list[str], options) -> dict:
    import torch

    from vlmedge.export.validate import _errors, judge
    from vlmedge.runtime.bundle import load_bundle
    from vlmedge.runtime.decoding import GenerationConfig
    from vlmedge.runtime.prefix import PrefixPipeline, user_turn

    pipe = PrefixPipeline(load_bundle(bundle_dir), max_pixels=1 << 26)
    m = pipe.manifest
    items = sample_items(max(2, options.validate_images), tasks)
    failures: list[str] = []
    graphs: dict = {}

    def conv(task, q):
        return [user_turn(q if task == "vqa" else m.prompt["caption_instruction"])]

    inputs, rows = pipe.prompt_inputs([[img] for img, _, _ in items], [conv(t, q) for _, t, q in items])

    # each graph against PyTorch on real inputs
    with torch.no_grad():
        if pipe.patch_vision:  # the first two images in one call
            from vlmedge.runtime.processors import vision_feeds

            proc = m.preprocessing["processor"]
            feeds, _ = vision_feeds([inputs[0][0], inputs[1][0]], int(proc["merge_size"]), int(proc.get("window", 0)))
        else:
            feeds = {"pixel_values": inputs[0][0].frames[: m.axes["frames"].max]}
            if pipe.vision_text is not None:
                feeds.update({k: v[: m.axes["frames"].max] for k, v in pipe.vision_text.feeds(inputs[0][:1]).items()})
        ref = adapter.vision_encoder()(*(torch.from_numpy(feeds[t.name]) for t in m.graphs["vision_encoder"].inputs))
        got = pipe.backend.run("vision_encoder", feeds)
        ref = ref if isinstance(ref, tuple) else (ref,)
        graphs["vision_encoder"] = {t.name: _errors(r.numpy(), got[t.name]) for t, r in zip(m.graphs["vision_encoder"].outputs, ref)}
        ids = np.asarray([rows[0]], dtype=np.int64)
        ref = adapter.embed()(torch.from_numpy(ids)).numpy()
        graphs["embed"] = {"inputs_embeds": _errors(ref, pipe.backend.run("embed", {"input_ids": ids})["inputs_embeds"])}
        embeds = pipe.embeddings(ids, inputs[:1])
        mask = np.ones((1, ids.shape[1] + 1), dtype=np.int64)
        mask[:, 0] = 0
        L = m.dims["decoder_layers"]
        past = [np.zeros((1, m.dims["decoder_heads"], 1, m.dims["decoder_head_dim"]), np.float32) for _ in range(2 * L)]
        contract = pipe.decoder(embeds, mask[:, 1:], ids, inputs[:1])
        feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": contract.prompt_positions}
        blocks = contract.prompt_blocks
        if blocks is not None:
            feeds["block_ids"] = np.concatenate([np.full((1, 1), -1, np.int64), blocks], 1)
        cross = contract._cross_feeds(slice(None), True)  # IDEFICS: cross_mask and the cross K/V
        feeds.update(cross)
        cross_kv = [cross[t.name] for t in m.graphs["cross_kv"].outputs] if "cross_kv" in m.graphs else []
        if cross_kv:  # the cross K/V of the first image's features, against PyTorch's
            states = pipe.backend.to_host(pipe.backend.run("vision_encoder", {"pixel_values": inputs[0][0].frames})["image_embeds"])
            states = np.ascontiguousarray(states.reshape(1, -1, states.shape[-1]))
            ref = adapter.cross_kv()(torch.from_numpy(states))
            got = pipe.backend.run("cross_kv", {"image_embeds": states})
            graphs["cross_kv"] = {t.name: _errors(r.numpy(), got[t.name]) for t, r in zip(m.graphs["cross_kv"].outputs, ref)}
        decoder = adapter.decoder()
        ref = decoder(*(torch.from_numpy(feeds[n]) for n in decoder.inputs), *map(torch.from_numpy, past + cross_kv))
        feeds.update(zip((t.name for t in m.graphs["decoder"].inputs if t.name.startswith("past.")), past))
        got = pipe.backend.run("decoder", feeds)
        graphs["decoder"] = {t.name: _errors(r.numpy(), got[t.name]) for t, r in zip(m.graphs["decoder"].outputs, ref)}
    failures += judge(graphs, options.atol)

    # tokens: the runtime's decoding loop against HF generate, batched and one by one, greedy and beam
    tokens = {}
    for task in tasks:
        sel = [i for i, it in enumerate(items) if it[1] == task]
        spec = m.tasks[task]
        gen = spec.get("generation") or {}
        beams = gen.get("num_beams", 1) if gen.get("num_beams", 1) > 1 else 3
        max_new = min(spec["max_new_tokens"], pipe.max_new_tokens(task, max(len(rows[i]) for i in sel)))

        def ours(idx, k):
            from vlmedge.runtime.decoding import decode

            sub_rows = [rows[i] for i in idx]
            width = max(map(len, sub_rows))
            ids = np.full((len(idx), width), spec["pad_id"], dtype=np.int64)
            mask = np.zeros_like(ids)
            for j, r in enumerate(sub_rows):
                ids[j, width - len(r):], mask[j, width - len(r):] = r, 1
            settings = pipe.settings(task, GenerationConfig(num_beams=k, max_new_tokens=max_new), width)
            embeds = pipe.embeddings(ids, [inputs[i] for i in idx])
            return decode(pipe.decoder(embeds, mask, ids, [inputs[i] for i in idx]), ids, settings)

        def theirs(idx, k):
            return adapter.reference_generate_prefix([inputs[i] for i in idx], [rows[i] for i in idx],
                                                     max_new_tokens=max_new, num_beams=k)

        batched, batched_ref = ours(sel, 1), theirs(sel, 1)
        single = [ours([i], 1)[0] for i in sel]
        single_ref = [theirs([i], 1)[0] for i in sel]
        beam, beam_ref = ours(sel, beams), theirs(sel, beams)
        n = len(sel)
        mism = [j for j in range(n) if batched[j] != batched_ref[j] or single[j] != single_ref[j] or single[j] != batched[j]]
        mism_beam = [j for j in range(n) if beam[j] != beam_ref[j]]
        tokens[task] = {
            "images": n, "agree_batched": sum(batched[j] == batched_ref[j] for j in range(n)),
            "agree_batch1": sum(single[j] == single_ref[j] for j in range(n)),
            "mean_new_tokens": float(np.mean([len(r) for r in batched_ref])) if n else 0.0,
            "prompt_tokens": [len(rows[i]) for i in sel],
            "first_mismatch": None if not mism else {"image": sel[mism[0]], "pytorch": batched_ref[mism[0]],
                                                     "onnx": batched[mism[0]], "onnx_batch1": single[mism[0]]},
            "beam": {"num_beams": beams, "agree": n - len(mism_beam), "first_mismatch": None if not mism_beam else {
                "image": sel[mism_beam[0]], "pytorch": beam_ref[mism_beam[0]], "onnx": beam[mism_beam[0]]}},
        }
        if mism:
            failures.append(f"{task}: ONNX greedy tokens differ from PyTorch on image {sel[mism[0]]}")
        if mism_beam:
            failures.append(f"{task}: ONNX beam-search tokens (num_beams={beams}) differ from PyTorch on image {sel[mism_beam[0]]}")
    return {"passed": not failures, "failures": failures, "atol": options.atol, "graphs": graphs, "tokens": tokens}
