"""IDEFICS (Flamingo's design, `IdeficsForVisionText2Text`) on the prefix contract with gated cross-attention:
the vision tower and perceiver resampler as the vision graph, the cross K/V of every gated layer projected once
(`cross_kv`), the LLaMA decoder with its gated cross-attention layers reading them under `cross_mask`.

The tiny random model of tests/families.py (HuggingFaceM4/idefics-9b-instruct's classes and config choices) is
exported once per session; then, through the public API, the CLI and the commands downstream:
- prompt ids, frames and the per-token image mask equal IdeficsProcessor's, for one image, two images with text
  between them and two images side by side, on several image sizes;
- prefill logits equal HF's within 1e-4 on the processor's own left-padded batch, and differ measurably when the
  image mask is dropped (every token seeing every image);
- greedy and beam-3 tokens equal HF `generate` on the processor's inputs, a batch equals one by one; a chat of two
  images interleaved with text, and a chat of two turns, equal HF's;
- weight-only INT4 and compare run; the TensorRT backend's path (profiles, the fake runtime of
  tests/runtime/test_tensorrt_backend.py) and `vlmedge serve` are tested beside their other families.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlmedge.data.scenes import pick_questions, scenes
from vlmedge.models.hf import strip_prompt

SIZES = [(30, 30), (64, 40), (33, 90), (16, 16)]  # (w, h)
MAX_NEW = 10
START = 90  # test scenes the export's own validation does not use


@pytest.fixture(scope="module")
def idefics(prefix_bundles):
    """(adapter, manifest, bundle path)"""
    return prefix_bundles("idefics")


def _images(n: int, start: int = START) -> list[Image.Image]:
    return [Image.fromarray(s.image).resize(SIZES[i % len(SIZES)], Image.Resampling.BICUBIC)
            for i, s in enumerate(scenes("test", start, n))]


def _questions(n: int, start: int = START) -> list[str]:
    return [pick_questions(s)[i % 3].text for i, s in enumerate(scenes("test", start, n))]


def _processor(source):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(source)
    proc.tokenizer.padding_side = "left"
    return proc


def _turn(*parts) -> list:
    """One user turn in the instruct format as the processor takes it: "User:", the parts, the turn's end."""
    items: list = ["User:"]
    for p in parts:
        if isinstance(p, str) and isinstance(items[-1], str):
            items[-1] += p
        else:
            items.append(p)
    end = "<end_of_utterance>\nAssistant:"
    return items[:-1] + [items[-1] + end] if isinstance(items[-1], str) else items + [end]


def _message(*parts) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image", "image": p}
                                        for p in parts]}


def _hf_inputs(source, prompts: list[list]) -> dict:
    return dict(_processor(source)(text=prompts, return_tensors="pt"))


def _model(adapter):
    from transformers import IdeficsForVisionText2Text

    return IdeficsForVisionText2Text.from_pretrained(adapter.source, attn_implementation="eager").eval()


@torch.no_grad()
def _hf_generate(model, inputs: dict, beams: int, eos: int) -> list[list[int]]:
    out = model.generate(**inputs, max_new_tokens=MAX_NEW, num_beams=beams, do_sample=False)
    return strip_prompt(out, inputs["input_ids"].shape[1], eos)


def test_export_validates_with_a_cross_kv_graph(idefics):
    adapter, manifest, _ = idefics
    v = manifest.validation
    assert v["passed"], v["failures"]
    for r in v["tokens"].values():
        assert r["agree_batched"] == r["agree_batch1"] == r["images"] and r["beam"]["agree"] == r["images"]
    cfg = adapter.model.config
    assert manifest.contract == "prefix" and set(manifest.graphs) == {"vision_encoder", "cross_kv", "embed", "decoder"}
    gated = cfg.num_hidden_layers // cfg.cross_layer_interval
    assert [t.name for t in manifest.graphs["cross_kv"].outputs] == [f"cross.{j}.{k}" for j in range(gated) for k in ("key", "value")]
    # the resampler's latents, in the vision width; the LM reads its own width
    latents = cfg.perceiver_config.resampler_n_latents
    assert manifest.dims["image_tokens"] == latents
    assert manifest.graphs["vision_encoder"].outputs[0].shape == ("frames", latents, cfg.vision_config.embed_dim)
    assert manifest.graphs["embed"].outputs[0].shape[-1] == cfg.hidden_size
    assert manifest.dims["vocab_size"] == cfg.vocab_size + cfg.additional_vocab_size  # the decoupled head's logits
    assert manifest.prompt["cross_attention"]["reset_token_id"] == cfg.eos_token_id
    assert manifest.axes["image_len"].max == latents * manifest.prompt["cross_attention"]["max_images"]
    assert "cross_kv" in v["graphs"] and all(e["passed"] for e in v["graphs"]["cross_kv"].values())


def test_prompt_ids_frames_and_image_mask_equal_the_processor(idefics):
    import vlmedge
    from vlmedge.runtime.prefix import cross_mask

    adapter, manifest, path = idefics
    pipe = vlmedge.load(path)
    proc = _processor(adapter.source)
    latents = manifest.dims["image_tokens"]
    rng = np.random.default_rng(0)
    for w, h in SIZES:
        a = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        b = Image.fromarray(rng.integers(0, 256, (w, h, 3), dtype=np.uint8))
        shapes = [(a, "what color is the circle ?"), ("what", a, "color is", b, "the circle ?"), (a, b, "how many circles ?")]
        ref = proc(text=[_turn(*s) for s in shapes], return_tensors="pt")
        inputs, rows = pipe.prompt_inputs([[p for p in s if not isinstance(p, str)] for s in shapes],
                                          [[_message(*s)] for s in shapes])
        width = ref["input_ids"].shape[1]
        for i, r in enumerate(rows):
            assert r == ref["input_ids"][i][ref["attention_mask"][i] > 0].tolist(), (w, h, i)
            for j, img in enumerate(inputs[i]):
                assert np.abs(ref["pixel_values"][i, j].numpy() - img.frames[0]).max() < 1e-5, (w, h, i, j)
        ids = np.array([[manifest.tasks["vqa"]["pad_id"]] * (width - len(r)) + r for r in rows])
        ours = cross_mask(ids, manifest.prompt["image_token_id"], manifest.prompt["cross_attention"]["reset_token_id"], latents, 2)
        real = ref["attention_mask"].numpy() > 0
        np.testing.assert_array_equal(ours[real], np.repeat(ref["image_attention_mask"].numpy(), latents, axis=2)[real])


def test_the_image_mask_follows_the_latest_image_and_stops_after_eos():
    from vlmedge.runtime.prefix import cross_mask

    I, E = 9, 2  # image token, EOS
    ids = np.array([[5, I, 5, 5, I, 5, E, 5, I, 5]])
    seen = cross_mask(ids, I, E, 1, 3)[0]
    assert seen.argmax(1).tolist() == [0, 0, 0, 0, 1, 1, 1, 0, 2, 2]
    assert seen.sum(1).tolist() == [0, 1, 1, 1, 1, 1, 1, 0, 1, 1]  # none before the first image, none after EOS
    assert cross_mask(ids, I, E, 3, 3).shape == (1, 10, 9)


@torch.no_grad()
def test_prefill_logits_equal_hf_and_the_image_mask_matters(idefics):
    import vlmedge

    adapter, manifest, path = idefics
    model = _model(adapter)
    pipe = vlmedge.load(path)
    a, b, c = _images(3)
    shapes = [(a, "what color is the circle ?"), ("what", b, "color is", c, "the square ?"), (c, "describe .")]
    inputs = _hf_inputs(adapter.source, [_turn(*s) for s in shapes])
    assert (inputs["attention_mask"] == 0).any()  # a left-padded batch
    ref = model(**inputs).logits[:, -1].numpy()
    proc_inputs, rows = pipe.prompt_inputs([[p for p in s if not isinstance(p, str)] for s in shapes], [[_message(*s)] for s in shapes])
    ids, mask = inputs["input_ids"].numpy(), inputs["attention_mask"].numpy()
    contract = pipe.decoder(pipe.embeddings(ids, proc_inputs), mask, ids, proc_inputs)
    assert np.abs(contract.start(ids) - ref).max() < 1e-4
    # every token seeing every image (the mask dropped) gives other logits
    dropped = pipe.decoder(pipe.embeddings(ids, proc_inputs), mask, ids, proc_inputs)
    dropped.prompt_cross_mask = np.ones_like(dropped.prompt_cross_mask)
    assert np.abs(dropped.start(ids) - ref).max() > 1e-2


@pytest.mark.parametrize("beams", [1, 3])
def test_tokens_equal_hf_generate(idefics, beams):
    import vlmedge

    adapter, manifest, path = idefics
    model = _model(adapter)
    eos = manifest.tasks["vqa"]["eos_id"]
    pipe = vlmedge.load(path)
    images, questions = _images(3), _questions(3)
    ours = [list(g.ids) for g in pipe.vqa(images, questions, return_ids=True, num_beams=beams, max_new_tokens=MAX_NEW)]
    one_by_one = [list(pipe.vqa(img, q, return_ids=True, num_beams=beams, max_new_tokens=MAX_NEW).ids)
                  for img, q in zip(images, questions)]
    assert ours == _hf_generate(model, _hf_inputs(adapter.source, [_turn(i, q) for i, q in zip(images, questions)]), beams, eos)
    assert ours == one_by_one
    assert len({tuple(r) for r in ours}) > 1  # the answers depend on the image and question
    caption = [list(g.ids) for g in pipe.caption(images, return_ids=True, num_beams=beams, max_new_tokens=MAX_NEW)]
    instruction = manifest.prompt["caption_instruction"]
    assert caption == _hf_generate(model, _hf_inputs(adapter.source, [_turn(i, instruction) for i in images]), beams, eos)


@pytest.mark.parametrize("beams", [1, 3])
def test_two_images_interleaved_and_two_turns_equal_hf_generate(idefics, beams):
    import vlmedge

    adapter, manifest, path = idefics
    model = _model(adapter)
    eos = manifest.tasks["vqa"]["eos_id"]
    pipe = vlmedge.load(path)
    a, b, c = _images(3, start=START + 5)
    interleaved = ("is this", a, "the same as", b, "?")
    got = pipe.chat([_message(*interleaved)], return_ids=True, num_beams=beams, max_new_tokens=MAX_NEW)
    assert list(got.ids) == _hf_generate(model, _hf_inputs(adapter.source, [_turn(*interleaved)]), beams, eos)[0]
    # a second turn: the answer, then a question about a third image (which the later tokens see instead)
    turns = [_message(a, "what color is the circle ?"), {"role": "assistant", "content": "red"}, _message(c, "and here ?")]
    got = pipe.chat(turns, return_ids=True, num_beams=beams, max_new_tokens=MAX_NEW)
    hf = ["User:", a, "what color is the circle ?<end_of_utterance>\nAssistant:red<end_of_utterance>\nUser:", c,
          "and here ?<end_of_utterance>\nAssistant:"]
    assert list(got.ids) == _hf_generate(model, _hf_inputs(adapter.source, [hf]), beams, eos)[0]


def test_weight_only_int4_and_compare_run(idefics, tmp_path):
    import onnx

    import vlmedge
    from vlmedge.calibration.quantize import QuantizeOptions, quantize_bundle
    from vlmedge.compare import compare_bundles

    path = idefics[2]
    quantize_bundle(path, tmp_path / "int4", QuantizeOptions("int4-wo", calib="synthetic:6", held_out=2))
    pipe = vlmedge.load(tmp_path / "int4")
    p = pipe.manifest.precision
    assert "decoder" in p["graphs"] and p["nodes"]["decoder"] > 10
    model = onnx.load(str(tmp_path / "int4" / "decoder.onnx"))
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) == p["nodes"]["decoder"]
    assert pipe.manifest.prompt == vlmedge.load(path).manifest.prompt
    images, questions = _images(2), _questions(2)
    assert all(g.ids for g in pipe.vqa(images, questions, return_ids=True, max_new_tokens=MAX_NEW))
    compare_bundles([path, tmp_path / "int4"], "synthetic:4", "cpu", tmp_path / "cmp", runs=2)
    text = (tmp_path / "cmp" / "report.json").read_text()
    for graph in ("vision_encoder", "cross_kv", "embed", "decoder"):
        assert graph in text


def test_inspect_and_caption_through_the_cli(idefics, tmp_path, capsys):
    from vlmedge.cli import main

    adapter, manifest, path = idefics
    images = _images(2)
    for i, img in enumerate(images):
        img.save(tmp_path / f"{i}.png")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "cross_kv" in out and "cross_mask" in out
    assert main(["caption", str(path), str(tmp_path / "0.png"), str(tmp_path / "1.png"), "--json", "--max-new-tokens",
                 str(MAX_NEW)]) == 0
    got = json.loads(capsys.readouterr().out)["results"]
    reloaded = [Image.open(tmp_path / f"{i}.png").convert("RGB") for i in range(2)]
    instruction = manifest.prompt["caption_instruction"]
    want = _hf_generate(_model(adapter), _hf_inputs(adapter.source, [_turn(i, instruction) for i in reloaded]), 1,
                        manifest.tasks["caption"]["eos_id"])
    assert [r["ids"] for r in got] == want


def test_more_images_than_the_bundle_allows_and_hostile_manifests_are_one_line(idefics, tmp_path):
    import shutil

    import vlmedge
    from vlmedge.errors import BundleError, InputError

    path = idefics[2]
    pipe = vlmedge.load(path)
    most = pipe.manifest.prompt["cross_attention"]["max_images"]
    img = _images(1)[0]
    with pytest.raises(InputError) as e:
        pipe.chat([_message(*([img] * (most + 1)), "what ?")])
    assert "images, over this bundle's maximum" in str(e.value) and "\n" not in str(e.value)
    for edit, words in [
        (lambda m: m["prompt"].pop("cross_attention"), "cross_attention"),
        (lambda m: m["graphs"]["decoder"]["inputs"].__setitem__(3, {**m["graphs"]["decoder"]["inputs"][3], "name": "x"}),
         "graphs.decoder.inputs"),
        (lambda m: m["graphs"]["cross_kv"]["outputs"].pop(), "graphs.cross_kv.outputs"),
    ]:
        bad = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        shutil.copytree(path, bad)
        m = json.loads((bad / "manifest.json").read_text())
        edit(m)
        (bad / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(BundleError) as e:
            vlmedge.load(bad)
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
