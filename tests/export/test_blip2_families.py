"""BLIP-2 and InstructBLIP with a decoder-only language model on the prefix contract: the ViT + Q-Former +
projection as the vision graph (InstructBLIP's also takes the instruction's ids and mask: its Q-Former reads it),
OPT (learned positions offset by 2) or Vicuna's Llama as the decoder.

Each tiny random model of tests/families.py BLIP2_FAMILIES (Salesforce/blip2-opt-2.7b's and
Salesforce/instructblip-vicuna-7b's classes and config choices, the latter with OPT and with its own Llama) is exported once per session; then,
through the public API and the CLI:
- frames and prompt ids (and InstructBLIP's Q-Former ids) equal what the processor makes (one <image> per query
  token, then the text's own BOS), for captioning (BLIP-2: no prompt) and for VQA in BLIP-2's
  "Question: {q} Answer:" format, on five image sizes;
- prefill logits equal HF's within 1e-4 on the processor's own left-padded batch (whose padding sits between
  the image tokens and the text: the positions OPT computes from that mask are reproduced);
- greedy and beam-3 tokens equal HF `generate` (BLIP-2's captions: `generate(pixel_values)` alone; VQA: the
  processor's batch), a batch equals one by one;
- weight-only INT4 quantize runs; caption through the CLI.
InstructBLIP's bundle declares two more inputs of its vision graph and the tokenizer that fills them
(`prompt.vision_text`); a derived bundle (quantize) carries that tokenizer too.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from families import BLIP2_FAMILIES
from vlmedge.data.scenes import pick_questions, scenes
from vlmedge.models.hf import strip_prompt

NAMES = list(BLIP2_FAMILIES)
SIZES = [(64, 64), (70, 50), (45, 83), (20, 20), (130, 31)]  # (w, h)
MAX_NEW = 12
START = 90  # test scenes the export's own validation does not use


def _images(n: int, start: int = START) -> list[Image.Image]:
    return [Image.fromarray(s.image).resize(SIZES[i % len(SIZES)], Image.Resampling.BICUBIC)
            for i, s in enumerate(scenes("test", start, n))]


def _questions(n: int, start: int = START) -> list[str]:
    """BLIP-2's VQA prompt format, as its model card writes it."""
    return [f"Question: {pick_questions(s)[i % 3].text} Answer:" for i, s in enumerate(scenes("test", start, n))]


def _hf_inputs(source, images: list, texts: list[str] | None) -> dict:
    """The processor's batch as generate takes it (InstructBLIP's with the Q-Former's ids and mask, padded on the
    right as its BERT tokenizer pads); `texts` None: images alone (BLIP-2's captioning with no prompt)."""
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(source)
    proc.tokenizer.padding_side = "left"
    return dict(proc(images=images, text=texts, padding=texts is not None, return_tensors="pt"))


@torch.no_grad()
def _hf_generate(model, inputs: dict, beams: int, eos) -> list[list[int]]:
    out = model.generate(**inputs, max_new_tokens=MAX_NEW, num_beams=beams, do_sample=False)
    prompt = inputs["input_ids"].shape[1] if "input_ids" in inputs else model.config.num_query_tokens + 1
    return strip_prompt(out, prompt, eos)


def _model(adapter):
    import transformers

    return getattr(transformers, adapter.architecture).from_pretrained(adapter.source, attn_implementation="eager").eval()


def _caption_texts(manifest, n: int) -> list[str] | None:
    """HF's caption call: BLIP-2's, images alone; InstructBLIP's, the caption instruction (its generate needs text)."""
    text = manifest.prompt["caption_instruction"]
    return None if text == manifest.prompt["special_tokens"]["bos_token"] else [text] * n


def _eos(manifest):
    return manifest.tasks["vqa"]["generation"].get("eos_token_id", manifest.tasks["vqa"]["eos_id"])


@pytest.mark.parametrize("name", NAMES)
def test_export_validates_and_the_manifest_holds_the_prompt_rule(blip2_bundles, name):
    adapter, manifest, _, _ = blip2_bundles(name)
    v = manifest.validation
    assert v["passed"], v["failures"]
    for r in v["tokens"].values():
        assert r["agree_batched"] == r["agree_batch1"] == r["images"] and r["beam"]["agree"] == r["images"]
    assert manifest.contract == "prefix" and set(manifest.graphs) == {"vision_encoder", "embed", "decoder"}
    cfg = adapter.model.config
    assert manifest.dims["image_tokens"] == cfg.num_query_tokens  # one row per query, whatever the patch count
    assert manifest.graphs["vision_encoder"].outputs[0].shape == ("frames", cfg.num_query_tokens, cfg.text_config.hidden_size)
    assert manifest.prompt["add_special_tokens"] is False  # the template writes BOS after the image tokens
    vision_inputs = [t.name for t in manifest.graphs["vision_encoder"].inputs]
    if name.startswith("instructblip"):
        assert manifest.prompt["caption_instruction"] == "A short image description:"
        assert vision_inputs == ["pixel_values", "qformer_input_ids", "qformer_attention_mask"]
        assert manifest.prompt["vision_text"]["inputs"] == vision_inputs[1:]
    else:
        assert manifest.prompt["caption_instruction"] == "</s>"  # the caption's prompt: the image tokens and BOS alone
        assert vision_inputs == ["pixel_values"]
    # HF's generate hands generation to the language model: its generation_config (blip2-opt: the text config's
    # EOS "\n"; Vicuna: </s>)
    assert _eos(manifest) == cfg.text_config.eos_token_id == (2 if name == "instructblip-vicuna" else 4)


@pytest.mark.parametrize("name", NAMES)
def test_frames_and_prompt_ids_equal_the_processor(blip2_bundles, name):
    import vlmedge
    from vlmedge.runtime.prefix import user_turn

    adapter, manifest, path, _ = blip2_bundles(name)
    pipe = vlmedge.load(path)
    rng = np.random.default_rng(0)
    question = _questions(1)[0]
    caption = manifest.prompt["caption_instruction"]
    for w, h in SIZES:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ref = _hf_inputs(adapter.source, [img], [question])
        inputs, rows = pipe.prompt_inputs([[img], [img]], [[user_turn(question)], [user_turn(caption)]])
        assert rows[0] == ref["input_ids"][0].tolist(), (w, h)
        assert np.abs(ref["pixel_values"].numpy() - inputs[0][0].frames).max() < 1e-5, (w, h)
        cfg = adapter.model.config
        if name.startswith("instructblip"):
            assert list(inputs[0][0].text_ids) == ref["qformer_input_ids"][0].tolist()
            ref = _hf_inputs(adapter.source, [img], [caption])
            assert rows[1] == ref["input_ids"][0].tolist() and list(inputs[1][0].text_ids) == ref["qformer_input_ids"][0].tolist()
        else:  # captioning with no prompt: HF generate's own start, the image tokens and BOS
            assert rows[1] == [cfg.image_token_id] * cfg.num_query_tokens + [cfg.text_config.bos_token_id]
            assert rows[1] == _hf_inputs(adapter.source, [img], [""])["input_ids"][0].tolist()


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_prefill_logits_equal_hf_on_the_processors_padded_batch(blip2_bundles, name):
    import vlmedge
    from vlmedge.runtime.prefix import positions, user_turn

    adapter, _, path, _ = blip2_bundles(name)
    model = _model(adapter)
    pipe = vlmedge.load(path)
    images, texts = _images(3), _questions(3)
    inputs = _hf_inputs(adapter.source, images, texts)
    mask = inputs["attention_mask"]
    queries = adapter.model.config.num_query_tokens
    assert (mask[:, :queries] == 1).all() and (mask[:, queries:] == 0).any()  # padding between the image and the text
    # positions from the mask, as generate makes them (OPT makes them so itself; Llama's forward would count pads)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    ref = model(**inputs, position_ids=pos).logits[:, -1].numpy()
    proc_inputs, rows = pipe.prompt_inputs([[img] for img in images], [[user_turn(t)] for t in texts])
    width = max(map(len, rows))
    ids = np.ones((len(rows), width), np.int64)
    ours_mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], ours_mask[i, width - len(r):] = r, 1
    # the same tokens in the same order at the same positions as the processor's rows
    hf_ids, hf_mask = inputs["input_ids"].numpy(), mask.numpy()
    for i in range(len(rows)):
        assert ids[i][ours_mask[i] > 0].tolist() == hf_ids[i][hf_mask[i] > 0].tolist()
        assert positions(ours_mask)[i][ours_mask[i] > 0].tolist() == list(range(len(rows[i])))
    contract = pipe.decoder(pipe.embeddings(ids, proc_inputs), ours_mask, ids)
    ours = contract.start(ids)
    assert np.abs(ours - ref).max() < 1e-4
    if adapter.model.config.text_config.model_type != "opt":
        return  # rotary positions (Vicuna's Llama) depend on differences only: a shift changes nothing
    # positions matter: OPT's learned table read one place off is measurably different
    off = pipe.decoder(pipe.embeddings(ids, proc_inputs), ours_mask, ids, None)
    off.prompt_positions = off.prompt_positions + 1
    assert np.abs(off.start(ids) - ref).max() > 1e-2


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("beams", [1, 3])
def test_tokens_equal_hf_generate(blip2_bundles, name, beams):
    import vlmedge

    adapter, manifest, path, _ = blip2_bundles(name)
    model = _model(adapter)
    eos = _eos(manifest)
    pipe = vlmedge.load(path)
    images, questions = _images(3), _questions(3)
    assert len({img.size for img in images}) == 3
    ours = [list(g.ids) for g in pipe.vqa(images, questions, return_ids=True, num_beams=beams, max_new_tokens=MAX_NEW)]
    one_by_one = [list(pipe.vqa(img, q, return_ids=True, num_beams=beams, max_new_tokens=MAX_NEW).ids)
                  for img, q in zip(images, questions)]
    assert ours == _hf_generate(model, _hf_inputs(adapter.source, images, questions), beams, eos)
    assert ours == one_by_one
    assert len({tuple(r) for r in ours}) > 1  # the answers depend on the image and question
    caption = [list(g.ids) for g in pipe.caption(images, return_ids=True, num_beams=beams, max_new_tokens=MAX_NEW)]
    assert caption == _hf_generate(model, _hf_inputs(adapter.source, images, _caption_texts(manifest, 3)), beams, eos)
    assert len({tuple(r) for r in caption}) > 1


@pytest.mark.parametrize("name", ["blip2-opt"])  # the template's rules: one family
def test_a_conversation_or_two_images_are_refused_in_one_line(blip2_bundles, name):
    import vlmedge
    from vlmedge.errors import InputError

    pipe = vlmedge.load(blip2_bundles(name)[2])
    a, b = _images(2)
    for messages in ([{"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "Question: x"}]},
                      {"role": "assistant", "content": "red"}, {"role": "user", "content": "and ?"}],
                     [{"role": "user", "content": [{"type": "image", "image": a}, {"type": "image", "image": b}]}]):
        with pytest.raises(InputError) as e:
            pipe.chat(messages)
        assert "BLIP-2 takes" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", NAMES)
def test_weight_only_int4_runs(blip2_bundles, tmp_path, name):
    import onnx

    import vlmedge
    from vlmedge.calibration.quantize import QuantizeOptions, quantize_bundle

    path = blip2_bundles(name)[2]
    quantize_bundle(path, tmp_path / "int4", QuantizeOptions("int4-wo", calib="synthetic:6", held_out=2))
    pipe = vlmedge.load(tmp_path / "int4")
    p = pipe.manifest.precision
    assert p["graphs"] == ["decoder"] and p["nodes"]["decoder"] > 10
    model = onnx.load(str(tmp_path / "int4" / "decoder.onnx"))
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) == p["nodes"]["decoder"]
    assert pipe.manifest.prompt == vlmedge.load(path).manifest.prompt
    images, questions = _images(2), _questions(2)
    assert all(g.ids for g in pipe.vqa(images, questions, return_ids=True, max_new_tokens=MAX_NEW))
    assert all(g.ids for g in pipe.caption(images, return_ids=True, max_new_tokens=MAX_NEW))


@pytest.mark.parametrize("name", ["blip2-opt"])  # the CLI's path: one family (export through the CLI: test_block_families)
def test_caption_through_the_cli(blip2_bundles, tmp_path, capsys, name):
    from vlmedge.cli import main

    adapter, manifest, path, _ = blip2_bundles(name)
    images = _images(2)
    for i, img in enumerate(images):
        img.save(tmp_path / f"{i}.png")
    assert main(["caption", str(path), str(tmp_path / "0.png"), str(tmp_path / "1.png"), "--json", "--max-new-tokens",
                 str(MAX_NEW)]) == 0
    got = json.loads(capsys.readouterr().out)["results"]
    reloaded = [Image.open(tmp_path / f"{i}.png").convert("RGB") for i in range(2)]
    assert [r["ids"] for r in got] == _hf_generate(_model(adapter), _hf_inputs(adapter.source, reloaded, None), 1, _eos(manifest))
