"""Qwen2-VL and Qwen2.5-VL: dynamic resolution and M-RoPE on the prefix contract.

Each family in tests/families.py MROPE_FAMILIES, a tiny random model built to a published checkpoint's
classes and config choices, is exported once per session; then, through the public API and the CLI:
- the patches, their grid (image_grid_thw) and the prompt ids equal what the HF processor makes on images
  of six sizes (grids of 2x16 to 10x4 patches), and the M-RoPE positions equal the model's get_rope_index;
- the vision graph over two images in one call (kept apart by the segment ids the runtime writes from
  their grids, HF's cu_seqlens; Qwen2.5-VL's patches in window order with their window ids, HF's
  window_index and cu_window_seqlens) equals HF's vision tower;
- prefill logits equal HF's within 1e-4, and the same graph with 1-D positions (the text positions on
  all three rows) equals HF run with those positions and is measurably off the real ones;
- greedy and beam-3 tokens equal HF `generate` (three images, three grids) on the processor's left-padded
  batch, a batch equals one by one, and so does a chat with two images in one prompt: every decode step's
  position is HF's (rope_deltas);
- quantize (weight-only INT4 on the decoder) and export + caption through the CLI.

HF's Qwen2VLProcessor needs torchvision for its video half, which this machine's CPU torch cannot load; its
image half is HF's own Qwen2VLImageProcessorPil, and the prompt expansion and mm_token_type_ids are
written as Qwen2VLProcessor.__call__ writes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from families import MROPE_FAMILIES
from vlmedge.data.scenes import pick_questions, scenes
from vlmedge.models.hf import strip_prompt

NAMES = list(MROPE_FAMILIES)
SIZES = [(64, 64), (70, 50), (45, 83), (20, 20), (130, 31), (300, 200)]  # (w, h): grids 8x8, 6x8, 10x4, 4x4, 2x16, 6x8
MAX_NEW = 12
START = 90  # test scenes the export's own validation does not use


def _images(n: int, start: int = START) -> list[Image.Image]:
    return [Image.fromarray(s.image).resize(SIZES[i % len(SIZES)], Image.Resampling.BICUBIC)
            for i, s in enumerate(scenes("test", start, n))]


def _questions(n: int, start: int = START) -> list[str]:
    return [pick_questions(s)[i % 3].text for i, s in enumerate(scenes("test", start, n))]


def _msgs(question: str, images: int = 1) -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image"} for _ in range(images)), {"type": "text", "text": question}]}]


def _hf_inputs(source, images: list[list], conversations: list[list[dict]]) -> dict:
    """Qwen2VLProcessor.__call__ on apply_chat_template's text, left-padded: pixel_values, image_grid_thw, ids,
    mask and mm_token_type_ids (1 at the image's placeholders)."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    ip = Qwen2VLImageProcessorPil.from_pretrained(source)
    tok = AutoTokenizer.from_pretrained(source)
    tok.padding_side = "left"
    template = (Path(source) / "chat_template.jinja").read_text()
    px = ip([img for item in images for img in item], return_tensors="pt")
    grids = iter(px["image_grid_thw"])
    texts = []
    for conv in conversations:
        parts = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False, chat_template=template).split("<|image_pad|>")
        texts.append(parts[0] + "".join("<|image_pad|>" * int(next(grids).prod() // ip.merge_size ** 2) + p for p in parts[1:]))
    enc = tok(texts, padding=True, return_tensors="pt")
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    return {**enc, **px, "mm_token_type_ids": (enc["input_ids"] == image_id).int()}


@torch.no_grad()
def _hf_generate(model, inputs: dict, beams: int, eos) -> list[list[int]]:
    out = model.generate(**inputs, max_new_tokens=MAX_NEW, num_beams=beams, do_sample=False)
    return strip_prompt(out, inputs["input_ids"].shape[1], eos)


def _model(adapter):
    import transformers

    return getattr(transformers, adapter.architecture).from_pretrained(adapter.source, attn_implementation="eager").eval()


@pytest.mark.parametrize("name", NAMES)
def test_export_validates_and_the_manifest_declares_patches_and_three_position_rows(mrope_bundles, name):
    _, manifest, _, _ = mrope_bundles(name)
    v = manifest.validation
    assert v["passed"], v["failures"]
    for r in v["tokens"].values():
        assert r["agree_batched"] == r["agree_batch1"] == r["images"] and r["beam"]["agree"] == r["images"]
    vision = {t.name: t.shape for t in manifest.graphs["vision_encoder"].inputs}
    windows = name == "qwen2.5-vl"  # its window layers attend within windows, its patches go window by window
    assert set(vision) == {"pixel_values", "vision_position_ids", "vision_segment_ids", *(["vision_window_ids"] if windows else [])}
    assert manifest.preprocessing["processor"].get("window", 0) == (2 if windows else 0)
    assert vision["vision_segment_ids"] == ("patches",)  # cu_seqlens as one id per patch: no patches x patches input
    assert manifest.graphs["vision_encoder"].outputs[0].shape[0] == "image_rows"
    decoder = {t.name: t.shape for t in manifest.graphs["decoder"].inputs}
    assert decoder["position_ids"] == (3, "batch", "seq_len") and "block_ids" not in decoder
    assert manifest.preprocessing["processor"]["kind"] == "qwen2_vl"


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_patches_grid_ids_and_positions_equal_the_processor_and_get_rope_index(mrope_bundles, name):
    import vlmedge
    from vlmedge.runtime.prefix import mrope_positions

    adapter, manifest, path, _ = mrope_bundles(name)
    model = _model(adapter)
    pipe = vlmedge.load(path)
    rng = np.random.default_rng(0)
    grids = set()
    for w, h in SIZES:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ref = _hf_inputs(adapter.source, [[img]], [_msgs("what color is the circle ?")])
        inputs, rows = pipe.prompt_inputs([[img]], [_msgs("what color is the circle ?")])
        got = inputs[0][0]
        assert rows[0] == ref["input_ids"][0].tolist(), (w, h)
        assert list(got.grid) == ref["image_grid_thw"][0].tolist(), (w, h)
        assert got.frames.shape == ref["pixel_values"].shape and np.abs(got.frames - ref["pixel_values"].numpy()).max() < 1e-5
        ids = np.asarray(rows, dtype=np.int64)
        ours = mrope_positions(ids, np.ones_like(ids), [[got.grid]], manifest.prompt["image_token_id"], 2)
        theirs, _ = model.model.get_rope_index(ref["input_ids"], ref["mm_token_type_ids"], ref["image_grid_thw"],
                                               attention_mask=ref["attention_mask"])
        assert (ours == theirs.numpy()).all(), (w, h)
        grids.add(got.grid)
    assert len(grids) >= 5


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_two_images_in_one_vision_call_equal_hf_vision_tower(mrope_bundles, name):
    import vlmedge
    from vlmedge.runtime.processors import process, vision_feeds

    adapter, manifest, path, _ = mrope_bundles(name)
    model = _model(adapter)
    pipe = vlmedge.load(path)
    # 4x4 and 6x8 patches: small images share a call (up to axes.patches.max, one large image's patches)
    images = _images(4)
    a, b = (process(img.convert("RGB"), manifest.preprocessing) for img in (images[3], images[1]))
    window = manifest.preprocessing["processor"].get("window", 0)
    feeds, restore = vision_feeds([a, b], 2, window)
    assert len(feeds["pixel_values"]) <= manifest.axes["patches"].max and a.grid != b.grid
    got = pipe.backend.run("vision_encoder", feeds)["image_embeds"]
    got = got if restore is None else got[restore]
    px = np.concatenate([a.frames, b.frames])  # HF's tower takes them in the processor's order
    ref = model.model.get_image_features(torch.from_numpy(px), torch.tensor([a.grid, b.grid])).pooler_output
    assert np.abs(got - torch.cat(ref).numpy()).max() < 1e-4
    if window:  # the 6x8 image spans several windows: the window layers see less than the whole image
        assert len(set(feeds["vision_window_ids"])) > len(set(feeds["vision_segment_ids"])) and restore is not None
        assert (restore != np.arange(len(restore))).any()  # and the rows come back from window order
    feeds, restore = vision_feeds([a], 2, window)
    alone = pipe.backend.run("vision_encoder", feeds)["image_embeds"]
    alone = alone if restore is None else alone[restore]
    assert np.abs(alone - got[: len(alone)]).max() < 1e-4  # the segments keep the second image out of the first's rows


def _prefill(pipe, images, questions, flat: bool = False) -> np.ndarray:
    """The decoder graph's logits after the prompt, through the runtime's own path (M-RoPE positions, or the
    text positions on all three rows)."""
    from vlmedge.runtime.prefix import positions

    inputs, rows = pipe.prompt_inputs([[img] for img in images], [_msgs(q) for q in questions])
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    contract = pipe.decoder(pipe.embeddings(ids, inputs), mask, ids, inputs)
    if flat:
        contract.prompt_positions = np.ascontiguousarray(np.broadcast_to(positions(mask)[None], (3, *ids.shape)))
    return contract.start(ids)


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_prefill_logits_equal_hf_and_1d_positions_do_not(mrope_bundles, name):
    import vlmedge

    adapter, _, path, _ = mrope_bundles(name)
    model = _model(adapter)
    pipe = vlmedge.load(path)
    images, questions = _images(3), _questions(3)
    inputs = _hf_inputs(adapter.source, [[img] for img in images], [_msgs(q) for q in questions])
    assert len(set(inputs["attention_mask"].sum(1).tolist())) > 1  # left padding exercised
    ref = model(**inputs).logits[:, -1].numpy()
    assert np.abs(_prefill(pipe, images, questions) - ref).max() < 1e-4
    flat = _prefill(pipe, images, questions, flat=True)
    mask = inputs["attention_mask"]
    text = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[None].expand(3, -1, -1)
    hf_flat = model(**inputs, position_ids=text).logits[:, -1].numpy()  # HF given 1-D positions too
    assert np.abs(flat - hf_flat).max() < 1e-4
    assert np.abs(flat - ref).max() > 1e-2  # measured on the tiny model: about 0.1


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("beams", [1, 3])
def test_tokens_equal_hf_generate(mrope_bundles, name, beams):
    import vlmedge

    adapter, manifest, path, _ = mrope_bundles(name)
    model = _model(adapter)
    eos = manifest.tasks["vqa"]["generation"].get("eos_token_id", manifest.tasks["vqa"]["eos_id"])
    pipe = vlmedge.load(path)
    images, questions = _images(3), _questions(3)
    inputs = _hf_inputs(adapter.source, [[img] for img in images], [_msgs(q) for q in questions])
    assert len({tuple(g) for g in inputs["image_grid_thw"].tolist()}) == 3  # three grids
    ours = [list(g.ids) for g in pipe.vqa(images, questions, return_ids=True, num_beams=beams, max_new_tokens=MAX_NEW)]
    one_by_one = [list(pipe.vqa(img, q, return_ids=True, num_beams=beams, max_new_tokens=MAX_NEW).ids)
                  for img, q in zip(images, questions)]
    assert ours == _hf_generate(model, inputs, beams, eos)
    assert ours == one_by_one
    assert len({tuple(r) for r in ours}) > 1 and max(map(len, ours)) > 3  # steps past the prompt: rope_deltas at work
    caption = [list(g.ids) for g in pipe.caption(images[:2], return_ids=True, num_beams=beams, max_new_tokens=MAX_NEW)]
    instruction = manifest.prompt["caption_instruction"]
    ref = _hf_generate(model, _hf_inputs(adapter.source, [[img] for img in images[:2]], [_msgs(instruction)] * 2), beams, eos)
    assert caption == ref


@pytest.mark.parametrize("name", NAMES)
def test_chat_with_two_images_in_one_prompt_equals_hf_generate(mrope_bundles, name):
    import vlmedge

    adapter, manifest, path, _ = mrope_bundles(name)
    model = _model(adapter)
    a, b = _images(5, start=START + 5)[3:]  # 4x4 and 2x16 patches: one vision call, two grids in the positions
    messages = [{"role": "user", "content": [{"type": "image", "image": a}, {"type": "image_url", "image_url": {"url": b}},
                                             {"type": "text", "text": "which one has the circle ?"}]}]
    got = vlmedge.load(path).chat(messages, return_ids=True, max_new_tokens=MAX_NEW)
    inputs = _hf_inputs(adapter.source, [[a, b]], [_msgs("which one has the circle ?", images=2)])
    eos = manifest.tasks["vqa"]["generation"]["eos_token_id"]
    assert list(got.ids) == _hf_generate(model, inputs, 1, eos)[0]


@pytest.mark.parametrize("name", NAMES)
def test_int4_weight_only_variant_runs(mrope_bundles, tmp_path, name):
    import onnx

    import vlmedge
    from vlmedge.calibration.quantize import QuantizeOptions, quantize_bundle

    path = mrope_bundles(name)[2]
    quantize_bundle(path, tmp_path / "int4", QuantizeOptions("int4-wo", calib="synthetic:6", held_out=2))
    pipe = vlmedge.load(tmp_path / "int4")
    p = pipe.manifest.precision
    assert p["graphs"] == ["decoder"] and p["nodes"]["decoder"] > 10
    model = onnx.load(str(tmp_path / "int4" / "decoder.onnx"))
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) == p["nodes"]["decoder"]
    assert all(pipe.vqa(_images(3), _questions(3), max_new_tokens=MAX_NEW))


@pytest.mark.parametrize("name", ["qwen2.5-vl"])  # the CLI's path: one family
def test_export_inspect_and_caption_through_the_cli(mrope_bundles, tmp_path, capsys, name):
    from vlmedge.cli import main

    adapter, manifest, _, model_dir = mrope_bundles(name)
    out = tmp_path / "bundle"
    assert main(["export", str(model_dir), "--out", str(out), "--task", "caption"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "vision_segment_ids" in shown and "[3, batch, seq_len]" in shown
    for i, img in enumerate(_images(2)):
        img.save(tmp_path / f"{i}.png")
    assert main(["caption", str(out), str(tmp_path / "0.png"), str(tmp_path / "1.png"), "--json", "--max-new-tokens",
                 str(MAX_NEW)]) == 0
    got = json.loads(capsys.readouterr().out)["results"]
    reloaded = [[Image.open(tmp_path / f"{i}.png").convert("RGB")] for i in range(2)]
    instruction = manifest.prompt["caption_instruction"]
    eos = manifest.tasks["vqa"]["generation"]["eos_token_id"]
    ref = _hf_generate(_model(adapter), _hf_inputs(adapter.source, reloaded, [_msgs(instruction)] * 2), 1, eos)
    assert [r["ids"] for r in got] == ref


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_the_onnxruntime_target_fuses_m_rope_attention_and_keeps_hf_tokens(mrope_bundles, tmp_path, name):
    """`--target onnxruntime`: each layer's attention as RotaryEmbedding (fed each call's M-RoPE cos/sin rows)
    and GroupQueryAttention; prefill logits and tokens stay HF's."""
    import onnx

    import vlmedge
    from vlmedge.export.ort_target import fused_counts, retarget

    adapter, manifest, path, _ = mrope_bundles(name)
    portable = onnx.load(str(path / "decoder.onnx"), load_external_data=False)
    # the portable graph reads each grouped-query cache where it lies (no copy per query head)
    assert not [n for n in portable.graph.node if "present.0.self.key" in n.input and n.op_type == "Expand"]
    entry = retarget(path, tmp_path / "ort", validate_images=2)
    layers = manifest.dims["decoder_layers"]
    assert fused_counts(tmp_path / "ort" / "decoder.onnx") == {"GroupQueryAttention": layers, "RotaryEmbedding": 2 * layers,
                                                              "SkipSimplifiedLayerNormalization": 2 * layers}
    assert entry["token_agreement"] == {"caption": "2/2", "vqa": "2/2"}
    model = _model(adapter)
    pipe = vlmedge.load(tmp_path / "ort")
    images, questions = _images(3), _questions(3)
    inputs = _hf_inputs(adapter.source, [[img] for img in images], [_msgs(q) for q in questions])
    assert np.abs(_prefill(pipe, images, questions) - model(**inputs).logits[:, -1].numpy()).max() < 1e-4
    eos = manifest.tasks["vqa"]["generation"]["eos_token_id"]
    for beams in (1, 3):  # three grids, left-padded
        ours = [list(g.ids) for g in pipe.vqa(images, questions, return_ids=True, num_beams=beams, max_new_tokens=MAX_NEW)]
        assert ours == _hf_generate(model, inputs, beams, eos)
        assert max(map(len, ours)) > 3  # decode steps past the prompt: their positions carry rope_deltas
