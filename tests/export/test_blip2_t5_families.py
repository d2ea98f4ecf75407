"""BLIP-2 and InstructBLIP with a Flan-T5 language model on the cross-attention contract: the ViT + Q-Former +
projection as the vision graph, the T5 encoder over [query embeddings; text] as the text encoder, the T5 decoder
(relative position buckets, no attention scaling, decoder start = pad 0) as cross_kv and decoder.

Each tiny random model of tests/families.py BLIP2_T5_FAMILIES (Salesforce/blip2-flan-t5-xl's and
Salesforce/instructblip-flan-t5-xl's classes and config choices) is exported once per session; then, through the
public API:
- the manifest holds the tasks: caption (BLIP-2's the empty text, as LAVIS captions; InstructBLIP's its instruction)
  and vqa; InstructBLIP's vision graph also takes the Q-Former's ids and mask of the same text (the caption
  instruction, or the question), from the tokenizer the manifest names (`prompt.vision_text`);
- pixels, the caption's prompt ids and the questions' ids and mask equal what the processor makes (one <image> per
  query token, then the text and </s>, padded on the right), on five image sizes;
- greedy and beam-3 tokens equal HF `generate` on the processor's batch, and a batch equals one by one;
- weight-only INT4 quantize runs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from families import BLIP2_T5_FAMILIES
from vlmedge.data.scenes import pick_questions, scenes
from vlmedge.models.hf import strip_prompt

NAMES = list(BLIP2_T5_FAMILIES)
SIZES = [(64, 64), (70, 50), (45, 83), (20, 20), (130, 31)]  # (w, h)
MAX_NEW = 12
START = 90  # test scenes the export's own validation does not use
EOS = 1


def _images(n: int, start: int = START) -> list[Image.Image]:
    return [Image.fromarray(s.image).resize(SIZES[i % len(SIZES)], Image.Resampling.BICUBIC)
            for i, s in enumerate(scenes("test", start, n))]


def _questions(n: int, start: int = START) -> list[str]:
    """BLIP-2's VQA prompt format, as its model card writes it."""
    return [f"Question: {pick_questions(s)[i % 3].text} Answer:" for i, s in enumerate(scenes("test", start, n))]


def _processor(source):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(source)


def _caption_text(name: str) -> str:
    return "A short image description:" if name.startswith("instructblip") else ""


@torch.no_grad()
def _hf_generate(adapter, images: list, texts: list[str], beams: int) -> list[list[int]]:
    """HF generate on the processor's batch (T5 pads on the right); the decoder start is not generated."""
    import transformers

    model = getattr(transformers, adapter.architecture).from_pretrained(adapter.source, attn_implementation="eager").eval()
    inputs = _processor(adapter.source)(images=images, text=texts, padding=True, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=MAX_NEW, num_beams=beams, do_sample=False)
    return strip_prompt(out, 1, EOS)


@pytest.mark.parametrize("name", NAMES)
def test_export_validates_and_the_manifest_holds_the_tasks(blip2_t5_bundles, name):
    adapter, manifest, _ = blip2_t5_bundles(name)
    v = manifest.validation
    assert v["passed"], v["failures"]
    for r in v["tokens"].values():
        assert r["agree_batched"] == r["agree_batch1"] == r["images"] and r["beam"]["agree"] == r["images"]
    assert manifest.contract == "cross-attention"
    assert set(manifest.graphs) == {"vision_encoder", "text_encoder", "cross_kv", "decoder"}
    cfg = adapter.model.config
    queries, width = cfg.num_query_tokens, cfg.text_config.d_model
    assert manifest.dims["image_tokens"] == queries  # one row per query, whatever the patch count
    assert manifest.graphs["vision_encoder"].outputs[0].shape == ("batch", queries, width)
    vision_inputs = [t.name for t in manifest.graphs["vision_encoder"].inputs]
    if name == "instructblip-t5":
        assert vision_inputs == ["pixel_values", "qformer_input_ids", "qformer_attention_mask"]
        assert manifest.prompt["vision_text"]["inputs"] == vision_inputs[1:]
        assert manifest.prompt["vision_text"]["texts"] == {"caption": "A short image description:"}
    else:
        assert vision_inputs == ["pixel_values"] and not manifest.prompt
    assert manifest.dims["decoder_heads"] == cfg.text_config.num_heads and manifest.dims["decoder_layers"] == 2
    assert set(manifest.tasks) == {"caption", "vqa"}
    for spec in manifest.tasks.values():
        # T5: the decoder starts from pad 0 and stops at </s> 1; the image rows are in the question's ids, not a prefix
        assert spec["prompt_ids"] == [0] and spec["eos_id"] == EOS and spec["pad_id"] == 0
        assert spec["encoder"] == "text_encoder" and not spec.get("image_prefix")
    caption = _processor(adapter.source)(images=[_images(1)[0]], text=[_caption_text(name)])["input_ids"][0]
    assert manifest.tasks["caption"]["text_prompt_ids"] == list(caption)
    assert caption[:queries] == [cfg.image_token_id] * queries and caption[-1] == EOS


def test_the_qformer_reads_each_question_and_its_tokenizer_travels_with_variants(blip2_t5_bundles, tmp_path):
    """InstructBLIP-T5: the vision graph's text ids are the processor's qformer_input_ids, question by question;
    the states depend on the Q-Former's text; quantize copies the Q-Former's tokenizer and compare measures every
    graph; a bundle whose tokenizer copy was changed is refused in one line."""
    import shutil

    import vlmedge
    from vlmedge.calibration.quantize import QuantizeOptions, quantize_bundle
    from vlmedge.errors import BundleError

    adapter, manifest, path = blip2_t5_bundles("instructblip-t5")
    pipe = vlmedge.load(path)
    images, questions = _images(3), _questions(3)
    ref = _processor(adapter.source)(images=images, text=questions, padding=True, return_tensors="np")
    feeds = pipe.vision_feeds("vqa", 3, pipe.question_ids(questions))
    assert feeds["qformer_input_ids"].tolist() == ref["qformer_input_ids"].tolist()
    assert feeds["qformer_attention_mask"].tolist() == ref["qformer_attention_mask"].tolist()
    from vlmedge.runtime.decoding import encode

    q, px, host = pipe.question_ids(questions[:1]), pipe.images(images[:1]), pipe.backend.to_host
    states, states2 = (host(pipe.encode("vqa", px, q)[0]) for _ in range(2))  # the same call twice: equal
    changed = host(encode(pipe.backend, px, *q, vision_text=pipe.vision_text.texts(["what shape is it ?"]))[0])
    assert np.abs(states - states2).max() == 0 and np.abs(states - changed).max() > 1e-3
    quantize_bundle(path, tmp_path / "int4", QuantizeOptions("int4-wo", calib="synthetic:6", held_out=2))
    name = manifest.prompt["vision_text"]["tokenizer"]
    assert (tmp_path / "int4" / name).read_bytes() == (path / name).read_bytes()
    assert vlmedge.load(tmp_path / "int4").vqa(images[0], questions[0], max_new_tokens=4)
    from vlmedge.compare import compare_bundles  # each graph measured on the inputs the pipeline gives it

    compare_bundles([path, tmp_path / "int4"], "synthetic:4", "cpu", tmp_path / "cmp", runs=2)
    text = (tmp_path / "cmp" / "report.json").read_text()
    assert all(g in text for g in ("vision_encoder", "text_encoder", "cross_kv", "decoder"))
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    (bad / name).write_text((bad / name).read_text().replace('"[UNK]"', '"[UNKNOWN]"'))
    with pytest.raises(BundleError) as e:
        vlmedge.load(bad)
    assert name in str(e.value) and "sha256" in str(e.value) and "\n" not in str(e.value)


def test_usage_counts_the_question_rows_once(blip2_t5_bundles):
    """The tokens read before the first generated one: the decoder's start and the question's rows, which already
    hold the image's (one <image> per query), so the image is not counted again."""
    import vlmedge

    pipe = vlmedge.load(blip2_t5_bundles("blip2-t5")[2])
    assert pipe.question_holds_image
    questions = _questions(2)
    steps = pipe.generate_steps("vqa", _images(2), questions, max_new_tokens=2)
    _, mask = pipe.question_ids(questions)
    assert steps.context.tolist() == (1 + mask.sum(1)).tolist()


@pytest.mark.parametrize("name", NAMES)
def test_pixels_and_prompt_ids_equal_the_processor(blip2_t5_bundles, name):
    import vlmedge

    adapter, manifest, path = blip2_t5_bundles(name)
    pipe = vlmedge.load(path)
    proc = _processor(adapter.source)
    rng = np.random.default_rng(0)
    questions = _questions(3)
    for w, h in SIZES:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ref = proc(images=[img] * 3, text=questions, padding=True, return_tensors="np")
        assert np.abs(ref["pixel_values"] - pipe.images([img])[0]).max() < 1e-5, (w, h)
        if "vqa" not in manifest.tasks:
            continue
        ids, mask = pipe.question_ids(questions)  # the runtime's question rows are the processor's input_ids
        assert ids.tolist() == ref["input_ids"].tolist() and mask.tolist() == ref["attention_mask"].tolist()
        assert (mask == 0).any()  # padding on the right, after </s>


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("beams", [1, 3])
def test_tokens_equal_hf_generate(blip2_t5_bundles, name, beams):
    import vlmedge

    adapter, manifest, path = blip2_t5_bundles(name)
    pipe = vlmedge.load(path)
    images = _images(3)
    assert len({img.size for img in images}) == 3
    caption = [list(g.ids) for g in pipe.caption(images, return_ids=True, num_beams=beams, max_new_tokens=MAX_NEW)]
    assert caption == _hf_generate(adapter, images, [_caption_text(name)] * 3, beams)
    assert caption == [list(pipe.caption(img, return_ids=True, num_beams=beams, max_new_tokens=MAX_NEW).ids) for img in images]
    assert len({tuple(r) for r in caption}) > 1  # the captions depend on the image
    if "vqa" not in manifest.tasks:
        return
    questions = _questions(3)
    ours = [list(g.ids) for g in pipe.vqa(images, questions, return_ids=True, num_beams=beams, max_new_tokens=MAX_NEW)]
    one_by_one = [list(pipe.vqa(img, q, return_ids=True, num_beams=beams, max_new_tokens=MAX_NEW).ids)
                  for img, q in zip(images, questions)]
    assert ours == _hf_generate(adapter, images, questions, beams)
    assert ours == one_by_one
    assert len({tuple(r) for r in ours}) > 1  # the answers depend on the image and question


def test_weight_only_int4_runs(blip2_t5_bundles, tmp_path):
    import onnx

    import vlmedge
    from vlmedge.calibration.quantize import QuantizeOptions, quantize_bundle

    path = blip2_t5_bundles("blip2-t5")[2]
    quantize_bundle(path, tmp_path / "int4", QuantizeOptions("int4-wo", calib="synthetic:6", held_out=2))
    pipe = vlmedge.load(tmp_path / "int4")
    p = pipe.manifest.precision
    assert p["nodes"]["decoder"] > 10
    model = onnx.load(str(tmp_path / "int4" / "decoder.onnx"))
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) == p["nodes"]["decoder"]
    images, questions = _images(2), _questions(2)
    assert all(g.ids for g in pipe.vqa(images, questions, return_ids=True, max_new_tokens=MAX_NEW))
    assert all(g.ids for g in pipe.caption(images, return_ids=True, max_new_tokens=MAX_NEW))


def test_the_decoder_bias_reads_the_given_positions(blip2_t5_bundles):
    """T5's self-attention bias comes from the positions given and the cache's mask: the prompt after one hidden
    slot or after two gives the same logits, and a position off by one does not."""
    import onnxruntime as ort

    import vlmedge

    _, manifest, path = blip2_t5_bundles("blip2-t5")
    pipe = vlmedge.load(path)
    run = lambda graph, feeds: ort.InferenceSession(str(path / f"{graph}.onnx")).run(None, feeds)  # noqa: E731
    ids, mask = pipe.question_ids(_questions(2))
    (image,) = run("vision_encoder", {"pixel_values": pipe.images(_images(2))})
    (states,) = run("text_encoder", {"question_ids": ids, "question_mask": mask, "image_states": image})
    cross = dict(zip((f"cross.{i}.{k}" for i in range(2) for k in ("key", "value")), run("cross_kv", {"encoder_states": states})))
    H, D = manifest.dims["decoder_heads"], manifest.dims["decoder_head_dim"]

    def logits(hidden: int, first: int):  # three tokens after `hidden` empty slots, at positions first, first + 1, ...
        past = {f"past.{i}.self.{k}": np.zeros((2, H, hidden, D), np.float32) for i in range(2) for k in ("key", "value")}
        feeds = {"input_ids": np.array([[0, 7, 9]] * 2), "attention_mask": np.array([[0] * hidden + [1] * 3] * 2),
                 "position_ids": np.arange(first, first + 3)[None].repeat(2, 0), "encoder_mask": mask, **past, **cross}
        return run("decoder", feeds)[0]

    assert np.abs(logits(1, 0) - logits(2, 0)).max() < 1e-5
    assert np.abs(logits(1, 0) - logits(1, 1)).max() > 1e-3


def test_attention_is_returned_without_a_patch_grid(blip2_t5_bundles):
    """The decoder's cross-attention over the T5 encoder's states (the queries, then the text) comes back,
    rows summing to 1; the queries are no patch grid, so the manifest has none and heatmaps() says so."""
    import vlmedge
    from vlmedge.errors import InputError

    _, manifest, path = blip2_t5_bundles("blip2-t5")
    assert "decoder" in manifest.explain["graphs"] and "image_grid" not in manifest.explain
    pipe = vlmedge.load(path)
    img = _images(1)[0]
    e = pipe.vqa(img, _questions(1)[0], return_attention=True, max_new_tokens=MAX_NEW)
    assert e.ids == pipe.vqa(img, _questions(1)[0], return_ids=True, max_new_tokens=MAX_NEW).ids
    assert e.attention.shape[:2] == (len(e.ids), manifest.dims["decoder_layers"]) and e.image_attention is None
    np.testing.assert_allclose(e.attention.sum(-1), 1.0, atol=1e-4)
    with pytest.raises(InputError, match="no explain.image_grid"):
        e.heatmaps()
