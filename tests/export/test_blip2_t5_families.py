"""BLIP-2 and InstructBLIP with a Flan-T5 language model on the cross-attention contract: the ViT + Q-Former +
projection as the vision graph, the T5 encoder over [query embeddings; text] as the text encoder, the T5 decoder
(relative position buckets, no attention scaling, decoder start = pad 0) as cross_kv and decoder.

Each tiny random model of tests/families.py BLIP2_T5_FAMILIES (Salesforce/blip2-flan-t5-xl's and
Salesforce/instructblip-flan-t5-xl's classes and config choices) is exported once per session; then, through the
public API:
- the manifest holds the tasks: BLIP-2's caption (the empty text, as LAVIS captions) and vqa; InstructBLIP's caption
  (its instruction, which its Q-Former reads too) and no vqa, refused at export in one line;
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


@pytest.fixture(scope="session")
def blip2_t5_bundles(tmp_path_factory):
    """name -> (adapter, manifest, bundle path), exported once per session, on first use."""
    from vlmedge.export.exporter import ExportOptions, export_bundle
    from vlmedge.models.registry import load_adapter

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("blip2-t5-families")
    cache = {}

    def get(name):
        if name not in cache:
            model = BLIP2_T5_FAMILIES[name][1](root / "models" / name)
            adapter = load_adapter(str(model))
            manifest = export_bundle(adapter, BLIP2_T5_FAMILIES[name][2], root / "bundles" / name, ExportOptions(validate_images=2))
            cache[name] = (adapter, manifest, root / "bundles" / name)
        return cache[name]

    return get


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
    assert [t.name for t in manifest.graphs["vision_encoder"].inputs] == ["pixel_values"]
    assert manifest.dims["decoder_heads"] == cfg.text_config.num_heads and manifest.dims["decoder_layers"] == 2
    expect = {"caption", "vqa"} if name == "blip2-t5" else {"caption"}
    assert set(manifest.tasks) == expect
    for spec in manifest.tasks.values():
        # T5: the decoder starts from pad 0 and stops at </s> 1; the image rows are in the question's ids, not a prefix
        assert spec["prompt_ids"] == [0] and spec["eos_id"] == EOS and spec["pad_id"] == 0
        assert spec["encoder"] == "text_encoder" and not spec.get("image_prefix")
    caption = _processor(adapter.source)(images=[_images(1)[0]], text=[_caption_text(name)])["input_ids"][0]
    assert manifest.tasks["caption"]["text_prompt_ids"] == list(caption)
    assert caption[:queries] == [cfg.image_token_id] * queries and caption[-1] == EOS


def test_instructblip_vqa_is_refused_in_one_line(blip2_t5_bundles, tmp_path):
    from vlmedge.errors import InputError
    from vlmedge.export.exporter import export_bundle

    adapter = blip2_t5_bundles("instructblip-t5")[0]
    with pytest.raises(InputError) as e:
        export_bundle(adapter, "vqa", tmp_path / "vqa")
    assert "supports only caption" in str(e.value) and "\n" not in str(e.value)


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
