"""Families whose prompt holds blocks that attend both ways: PaliGemma and PaliGemma 2 (a prefix-LM: the
image and the text prefix one block, the generated suffix causal; no chat template) and Gemma 3 (each
image's soft tokens a block; sliding-window layers).

Each family in tests/families.py BLOCK_FAMILIES, a tiny random model built to a published checkpoint's
classes and config choices, is exported once per session; then, through the public API and the CLI:
- frames, prompt ids and the decoder's block_ids equal what the HF processor makes (its token_type_ids)
  on images of five sizes and aspect ratios;
- prefill logits equal HF's within 1e-4, and the same graph run with every block_id -1 (a causal
  prompt) equals HF's causal run and is measurably off the real one: the test fails if the prompt is
  run causally;
- greedy and beam-3 tokens equal HF `generate` on the processor's own left-padded batch (three image
  sizes), a batch equals one by one; sliding windows shorter than every prompt (and than an image's
  run in Gemma 3), so each step reads a cache past the window;
- quantize (weight-only INT4 and INT8 on the decoder), inspect, and export + caption + vqa through the CLI.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from families import BLOCK_FAMILIES, PREFIX_LM_FAMILIES
from vlmedge.data.scenes import pick_questions, scenes
from vlmedge.models.hf import strip_prompt

NAMES = list(BLOCK_FAMILIES)
SIZES = [(64, 64), (70, 50), (45, 83), (20, 20), (130, 31)]  # (w, h)
MAX_NEW = 12
START = 90  # test scenes the export's own validation does not use


def _images(n: int, start: int = START) -> list[Image.Image]:
    return [Image.fromarray(s.image).resize(SIZES[i % len(SIZES)], Image.Resampling.BICUBIC)
            for i, s in enumerate(scenes("test", start, n))]


def _questions(name: str, n: int, start: int = START) -> list[str]:
    """PaliGemma's prompts say the task ("answer en ..."); Gemma 3's are plain questions."""
    task = "answer en " if name in PREFIX_LM_FAMILIES else ""
    return [task + pick_questions(s)[i % 3].text for i, s in enumerate(scenes("test", start, n))]


def _processor(source):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(source)
    proc.tokenizer.padding_side = "left"
    return proc


def _hf_inputs(name: str, source, images: list, texts: list[str]) -> dict:
    """The HF processor's left-padded batch as generate takes it (ids, mask, token_type_ids, pixels), one
    image and one text per item: PaliGemmaProcessor on the text as given; Gemma 3's processor through its
    chat template (apply_chat_template, tokenize=True, as its model card does)."""
    proc = _processor(source)
    if name in PREFIX_LM_FAMILIES:
        out = dict(proc(images=images, text=texts, padding=True, return_tensors="pt"))
    else:
        msgs = [[{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": t}]}]
                for img, t in zip(images, texts)]
        out = dict(proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                            return_tensors="pt", processor_kwargs={"padding": True}))
    out.pop("labels", None)
    return out


def _hf_blocks(name: str, token_type_ids: torch.Tensor) -> np.ndarray:
    """HF's block_sequence_ids from the processor's token_type_ids, as each model makes them."""
    if name in PREFIX_LM_FAMILIES:
        return torch.where(token_type_ids == 0, 0, -1).numpy()
    from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

    return get_block_sequence_ids_for_mask(token_type_ids).numpy()


@torch.no_grad()
def _hf_generate(model, inputs: dict, beams: int, eos) -> list[list[int]]:
    out = model.generate(**inputs, max_new_tokens=MAX_NEW, num_beams=beams, do_sample=False)
    return strip_prompt(out, inputs["input_ids"].shape[1], eos)


def _model(adapter):
    import transformers

    return getattr(transformers, adapter.architecture).from_pretrained(adapter.source, attn_implementation="eager").eval()


@pytest.mark.parametrize("name", NAMES)
def test_export_validates_and_the_manifest_says_how_the_prefix_attends(block_bundles, name):
    adapter, manifest, _, _ = block_bundles(name)
    v = manifest.validation
    assert v["passed"], v["failures"]
    for r in v["tokens"].values():
        assert r["agree_batched"] == r["agree_batch1"] == r["images"] and r["beam"]["agree"] == r["images"]
    assert manifest.contract == "prefix" and set(manifest.graphs) == {"vision_encoder", "embed", "decoder"}
    inputs = [t.name for t in manifest.graphs["decoder"].inputs]
    assert inputs[:4] == ["inputs_embeds", "attention_mask", "position_ids", "block_ids"]
    assert manifest.graphs["decoder"].inputs[3].shape == ("batch", "total_len")  # aligned with the attention mask
    prefix_lm = name in PREFIX_LM_FAMILIES
    assert manifest.prompt["blocks"] == ("prefix" if prefix_lm else "images")
    assert manifest.prompt.get("add_special_tokens", True) is not prefix_lm  # PaliGemma's template writes BOS
    assert manifest.prompt["caption_instruction"] == ("caption en" if prefix_lm else "Describe the image.")
    assert manifest.preprocessing["processor"]["kind"] == "fixed"
    text = adapter.model.config.get_text_config()
    if getattr(text, "sliding_window", None):  # the window is shorter than every prompt: it is exercised
        assert min(min(r["prompt_tokens"]) for r in v["tokens"].values()) > text.sliding_window
        assert "sliding_attention" in text.layer_types and "full_attention" in text.layer_types


@pytest.mark.parametrize("name", NAMES)
def test_frames_prompt_ids_and_blocks_equal_the_processor(block_bundles, name):
    import vlmedge
    from vlmedge.runtime.prefix import block_ids, user_turn

    adapter, manifest, path, _ = block_bundles(name)
    pipe = vlmedge.load(path)
    rng = np.random.default_rng(0)
    question = _questions(name, 1)[0]
    for w, h in SIZES:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ref = _hf_inputs(name, adapter.source, [img], [question])
        inputs, rows = pipe.prompt_inputs([[img]], [[user_turn(question)]])
        frames = inputs[0][0].frames
        assert rows[0] == ref["input_ids"][0].tolist(), (w, h)
        assert np.abs(ref["pixel_values"].numpy() - frames).max() < 1e-5, (w, h)
        ids = np.asarray(rows, dtype=np.int64)
        blocks = block_ids(manifest.prompt["blocks"], ids, np.ones_like(ids), manifest.prompt["image_token_id"])
        assert (blocks == _hf_blocks(name, ref["token_type_ids"])).all() and (blocks >= 0).any()


def _prefill(pipe, images, texts, causal: bool = False) -> np.ndarray:
    """The decoder graph's logits after the prompt, through the runtime's own path (its block_ids, or
    every token causal: block_ids all -1)."""
    from vlmedge.runtime.prefix import user_turn

    inputs, rows = pipe.prompt_inputs([[img] for img in images], [[user_turn(t)] for t in texts])
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    contract = pipe.decoder(pipe.embeddings(ids, inputs), mask, ids)
    if causal:
        contract.prompt_blocks = np.full_like(contract.prompt_blocks, -1)
    return contract.start(ids)


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_prefill_logits_equal_hf_and_a_causal_prefix_does_not(block_bundles, name):
    import vlmedge

    adapter, _, path, _ = block_bundles(name)
    model = _model(adapter)
    pipe = vlmedge.load(path)
    images, texts = _images(3), _questions(name, 3)
    inputs = _hf_inputs(name, adapter.source, images, texts)
    assert len(set(inputs["attention_mask"].sum(1).tolist())) > 1  # left padding exercised
    ref = model(**inputs).logits[:, -1].numpy()
    ours = _prefill(pipe, images, texts)
    assert np.abs(ours - ref).max() < 1e-4
    causal = _prefill(pipe, images, texts, causal=True)
    # without token_type_ids HF runs the prompt causally too: the graph's causal mode is right, and the
    # difference is the blocks' attention alone
    hf_causal = model(**{k: v for k, v in inputs.items() if k != "token_type_ids"}).logits[:, -1].numpy()
    assert np.abs(causal - hf_causal).max() < 1e-4
    assert np.abs(causal - ref).max() > 1e-2  # measured on the tiny models: 0.05 to 3


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("beams", [1, 3])
def test_tokens_equal_hf_generate(block_bundles, name, beams):
    import vlmedge

    adapter, manifest, path, _ = block_bundles(name)
    model = _model(adapter)
    eos = manifest.tasks["vqa"]["generation"].get("eos_token_id", manifest.tasks["vqa"]["eos_id"])
    pipe = vlmedge.load(path)
    images, questions = _images(3), _questions(name, 3)
    assert len({img.size for img in images}) == 3
    ours = [list(g.ids) for g in pipe.vqa(images, questions, return_ids=True, num_beams=beams, max_new_tokens=MAX_NEW)]
    one_by_one = [list(pipe.vqa(img, q, return_ids=True, num_beams=beams, max_new_tokens=MAX_NEW).ids)
                  for img, q in zip(images, questions)]
    assert ours == _hf_generate(model, _hf_inputs(name, adapter.source, images, questions), beams, eos)
    assert ours == one_by_one
    assert len({tuple(r) for r in ours}) > 1  # the answers depend on the image and question
    caption = [list(g.ids) for g in pipe.caption(images[:2], return_ids=True, num_beams=beams, max_new_tokens=MAX_NEW)]
    instruction = manifest.prompt["caption_instruction"]
    assert caption == _hf_generate(model, _hf_inputs(name, adapter.source, images[:2], [instruction] * 2), beams, eos)


@pytest.mark.parametrize("name", ["paligemma2"])  # the runtime's and tools' paths: one family
def test_a_conversation_is_refused_in_one_line(block_bundles, name):
    import vlmedge
    from vlmedge.errors import InputError

    pipe = vlmedge.load(block_bundles(name)[2])
    img = _images(1)[0]
    with pytest.raises(InputError) as e:
        pipe.chat([{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "caption en"}]},
                   {"role": "assistant", "content": "red"}, {"role": "user", "content": "and ?"}])
    assert "single user turn" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(InputError, match="image placeholders for 1 images"):
        pipe.vqa(img, "answer en what is <image> ?")
    assert pipe.chat([{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "caption en"}]}],
                     return_ids=True, max_new_tokens=MAX_NEW).ids == pipe.caption(img, return_ids=True, max_new_tokens=MAX_NEW).ids


@pytest.mark.parametrize("name", ["paligemma2"])  # the runtime's and tools' paths: one family
def test_a_bundle_with_an_unknown_block_rule_is_refused_in_one_line(block_bundles, tmp_path, name):
    import shutil

    import vlmedge
    from vlmedge.errors import BundleError

    copy = tmp_path / "b"
    shutil.copytree(block_bundles(name)[2], copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["prompt"]["blocks"] = "everything"
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError) as e:
        vlmedge.load(copy)
    assert "prompt.blocks" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["paligemma2", "gemma3"])
def test_weight_only_variants_run_with_the_block_ids(block_bundles, tmp_path, name):
    """INT4 and INT8 weight-only quantize the decoder (GPTQ; calibration recorded from the pipeline, so with
    its block_ids); both run, and INT8 follows FP32 (a 48-wide random model is too fragile to ask INT4 to)."""
    import onnx

    import vlmedge
    from vlmedge.calibration import weight_only as wo
    from vlmedge.calibration.quantize import QuantizeOptions, quantize_bundle

    path = block_bundles(name)[2]
    ref = vlmedge.load(path)
    images, questions = _images(4), _questions(name, 4)
    fp32 = [g.ids for g in ref.vqa(images, questions, return_ids=True, max_new_tokens=MAX_NEW)]
    agree = {}
    for precision in ("int4-wo", "int8-wo"):
        quantize_bundle(path, tmp_path / precision, QuantizeOptions(precision, calib="synthetic:6", held_out=2))
        pipe = vlmedge.load(tmp_path / precision)
        p = pipe.manifest.precision
        assert p["graphs"] == ["decoder"] and p["nodes"]["decoder"] > 10
        model = onnx.load(str(tmp_path / precision / "decoder.onnx"))
        assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) == p["nodes"]["decoder"]
        assert "block_ids" in [i.name for i in model.graph.input] and pipe.manifest.prompt == ref.manifest.prompt
        ours = [g.ids for g in pipe.vqa(images, questions, return_ids=True, max_new_tokens=MAX_NEW)]
        assert all(ours)
        agree[precision] = wo.token_agreement(fp32, ours)
    assert agree["int8-wo"] >= 0.75, agree


@pytest.mark.parametrize("name", ["paligemma2"])  # the runtime's and tools' paths: one family
def test_export_inspect_caption_and_vqa_through_the_cli(block_bundles, tmp_path, capsys, name):
    from vlmedge.cli import main

    adapter, manifest, _, model_dir = block_bundles(name)
    out = tmp_path / "bundle"
    assert main(["export", str(model_dir), "--out", str(out), "--prompt", "caption es"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "block_ids" in shown and "[batch, total_len]" in shown
    images = _images(2)
    for i, img in enumerate(images):
        img.save(tmp_path / f"{i}.png")
    eos = manifest.tasks["vqa"]["generation"].get("eos_token_id", manifest.tasks["vqa"]["eos_id"])
    model = _model(adapter)
    assert main(["caption", str(out), str(tmp_path / "0.png"), str(tmp_path / "1.png"), "--json", "--max-new-tokens",
                 str(MAX_NEW)]) == 0
    got = json.loads(capsys.readouterr().out)["results"]
    reloaded = [Image.open(tmp_path / f"{i}.png").convert("RGB") for i in range(2)]
    ref = _hf_generate(model, _hf_inputs(name, adapter.source, reloaded, ["caption es"] * 2), 1, eos)
    assert [r["ids"] for r in got] == ref
    assert main(["vqa", str(out), str(tmp_path / "0.png"), "answer en what color is the circle ?", "--json",
                 "--max-new-tokens", str(MAX_NEW)]) == 0
    got = json.loads(capsys.readouterr().out)["results"]
    ref = _hf_generate(model, _hf_inputs(name, adapter.source, reloaded[:1], ["answer en what color is the circle ?"]), 1, eos)
    assert [r["ids"] for r in got] == ref


@pytest.mark.parametrize("name", ["gemma3"])
def test_chat_of_two_turns_and_two_images_equals_hf_generate(block_bundles, name):
    """Two images in one prompt: two blocks (ids 0 and 1), each seeing itself both ways and the other causally."""
    import vlmedge
    from vlmedge.runtime.prefix import block_ids

    adapter, manifest, path, _ = block_bundles(name)
    model = _model(adapter)
    a, b = _images(2, start=START + 5)
    messages = [
        {"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "what color is the circle ?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": b}}, {"type": "text", "text": "and here ?"}]},
    ]
    pipe = vlmedge.load(path)
    got = pipe.chat(messages, return_ids=True, max_new_tokens=MAX_NEW)
    hf_msgs = [{"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "what color is the circle ?"}]},
               {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
               {"role": "user", "content": [{"type": "image", "image": b}, {"type": "text", "text": "and here ?"}]}]
    inputs = dict(_processor(adapter.source).apply_chat_template(hf_msgs, add_generation_prompt=True, tokenize=True,
                                                                 return_dict=True, return_tensors="pt"))
    ids = inputs["input_ids"].numpy()
    blocks = block_ids(manifest.prompt["blocks"], ids, np.ones_like(ids), manifest.prompt["image_token_id"])
    assert (blocks == _hf_blocks(name, inputs["token_type_ids"])).all() and set(blocks.ravel()) == {-1, 0, 1}
    eos = manifest.tasks["vqa"]["generation"]["eos_token_id"]
    assert list(got.ids) == _hf_generate(model, inputs, 1, eos)[0]


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_the_onnxruntime_target_keeps_the_blocks_attention(block_bundles, tmp_path, name):
    """GroupQueryAttention masks every prompt causally, so the ONNX Runtime target leaves these layers'
    attention as it is (the rest is fused) and the prefill stays HF's; the portable graph reads each
    grouped-query cache where it lies."""
    import onnx

    import vlmedge
    from vlmedge.export.ort_target import fused_counts, retarget

    adapter, manifest, path, _ = block_bundles(name)
    portable = onnx.load(str(path / "decoder.onnx"), load_external_data=False)
    assert not [n for n in portable.graph.node if "present.0.self.key" in n.input and n.op_type == "Expand"]
    retarget(path, tmp_path / "ort", validate_images=2)
    fused = fused_counts(tmp_path / "ort" / "decoder.onnx")
    assert "GroupQueryAttention" not in fused and fused.get("SkipSimplifiedLayerNormalization", 0) > 0
    images, texts = _images(3), _questions(name, 3)
    ref = _model(adapter)(**_hf_inputs(name, adapter.source, images, texts)).logits[:, -1].numpy()
    assert np.abs(_prefill(vlmedge.load(tmp_path / "ort"), images, texts) - ref).max() < 1e-4
