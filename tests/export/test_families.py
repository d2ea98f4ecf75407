"""Published checkpoint architectures export and match Hugging Face exactly.

One row per checkpoint in tests/families.py CHECKPOINTS: a tiny random model built to that checkpoint's
classes and config choices is exported with validation, then the runtime's greedy and beam-3 tokens
are compared with HF `generate` on the model as a user loads it (default attention, its own
generation_config), for a batch of 3 images and for each image alone.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from families import CHECKPOINTS
from vlmedge.data.scenes import scenes
from vlmedge.export.exporter import ExportOptions, export_bundle
from vlmedge.export.samples import sample_inputs
from vlmedge.models.hf import restore_sinusoidal_tables, strip_prompt
from vlmedge.models.registry import load_adapter
from vlmedge.runtime.bundle import load_bundle
from vlmedge.runtime.pipeline import Pipeline

NAMES = list(CHECKPOINTS)
MAX_NEW = 12
START = 80  # test scenes not used by the export's own validation


@pytest.fixture(scope="module")
def checkpoint_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: build(root / name) for name, (_, build, _) in CHECKPOINTS.items()}


@pytest.fixture(scope="module")
def exported(checkpoint_dirs, tmp_path_factory):
    """name -> (adapter, manifest, bundle path), each exported once, on first use."""
    root = tmp_path_factory.mktemp("checkpoint-bundles")
    cache = {}

    def get(name):
        if name not in cache:
            torch.set_num_threads(2)
            adapter = load_adapter(str(checkpoint_dirs[name]))
            manifest = export_bundle(adapter, CHECKPOINTS[name][2], root / name, ExportOptions(validate_images=3))
            cache[name] = (adapter, manifest, root / name)
        return cache[name]

    return get


def _hf_model(path):
    """The model as `from_pretrained` gives it: default attention, the checkpoint's generation_config."""
    import json

    import transformers

    arch = json.loads((path / "config.json").read_text()).get("architectures", ["VisionEncoderDecoderModel"])[0]
    model = getattr(transformers, arch).from_pretrained(str(path)).eval()
    # transformers 5.x leaves TrOCR's sinusoidal position table on the meta device (see hf.py)
    return restore_sinusoidal_tables(model)


@torch.no_grad()
def _hf_generate(model, task, eos, sample, sl, beams):
    px = sample.pixel_values[sl]
    if task == "vqa":
        mask = sample.question_mask[sl]
        width = int(mask.sum(1).max())
        out = model.generate(input_ids=sample.question_ids[sl][:, :width], attention_mask=mask[:, :width],
                             pixel_values=px, max_new_tokens=MAX_NEW, num_beams=beams)
    else:
        out = model.generate(pixel_values=px, max_new_tokens=MAX_NEW, num_beams=beams)
    return strip_prompt(out, 1, eos)


def _runtime(pipe, task, images, questions, beams):
    if task == "vqa":
        return [list(g.ids) for g in pipe.vqa(images, list(questions), return_ids=True, num_beams=beams,
                                              max_new_tokens=MAX_NEW)]
    return [list(g.ids) for g in pipe.caption(images, return_ids=True, num_beams=beams, max_new_tokens=MAX_NEW)]


@pytest.mark.parametrize("name", NAMES)
def test_export_validates(exported, name):
    _, manifest, _ = exported(name)
    v = manifest.validation
    assert v["passed"], v["failures"]
    for r in v["tokens"].values():
        assert r["agree_batched"] == r["agree_batch1"] == r["images"] == 3


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("beams", [1, 3])
def test_tokens_equal_hf_generate(exported, name, beams):
    adapter, manifest, path = exported(name)
    (task, spec), = manifest.tasks.items()
    model = _hf_model(Path(adapter.source))
    pipe = Pipeline(load_bundle(path))
    images = [s.image for s in scenes("test", START, 3)]
    sample = sample_inputs(adapter, n=3, tasks=[task], start=START)
    batched = _runtime(pipe, task, images, sample.questions, beams)
    one_by_one = [_runtime(pipe, task, [images[i]], sample.questions[i : i + 1], beams)[0] for i in range(3)]
    hf_batched = _hf_generate(model, task, spec["eos_id"], sample, slice(0, 3), beams)
    hf_one_by_one = [_hf_generate(model, task, spec["eos_id"], sample, slice(i, i + 1), beams)[0] for i in range(3)]
    assert batched == hf_batched
    assert one_by_one == hf_one_by_one
    if task != "vqa":
        # BLIP VQA excepted: its answer decoder's cross-attention ignores the question mask in
        # transformers 5.x, so padded questions in a batch change HF's own answers (and ours, equally)
        assert batched == one_by_one
    assert len({tuple(r) for r in one_by_one}) > 1  # the outputs depend on the image


def test_feature_map_encoder_is_refused_in_one_line(tmp_path):
    from families import convnext_gpt2

    from vlmedge.errors import ModelLoadError

    path = convnext_gpt2(tmp_path / "convnext-gpt2")
    with pytest.raises(ModelLoadError) as e:
        load_adapter(str(path))
    assert "\n" not in str(e.value) and "4-D output" in str(e.value) and "[batch, tokens, width]" in str(e.value)


# each family's leading non-patch tokens: ViT's and BEiT's CLS, DeiT's CLS and distillation token, BLIP's CLS;
# DonutSwin gives its last stage's grid alone
LEADING = {"vit-gpt2-image-captioning": 1, "blip-image-captioning-base": 1, "blip-image-captioning-large": 1,
           "blip-vqa-base": 1, "trocr-small-printed": 2, "trocr-base-printed": 1, "donut-base": 0, "nougat-small": 0}


@pytest.mark.parametrize("name", NAMES)
def test_attention_equals_hf_cross_attentions(exported, name):
    """return_attention gives, for each generated token, HF's cross_attentions[t][layer][0, :, -1, :] within
    1e-4 (eager attention, greedy, one image at a time, the same tokens); the image grid covers the
    vision encoder's tokens after the family's leading ones."""
    adapter, manifest, path = exported(name)
    (task, spec), = manifest.tasks.items()
    model = _hf_model(Path(adapter.source))
    model.set_attn_implementation("eager")
    pipe = Pipeline(load_bundle(path))
    grid = manifest.explain["image_grid"]
    assert grid["leading"] == LEADING[name]
    assert grid["leading"] + grid["rows"] * grid["cols"] == manifest.dims["image_tokens"]
    sample = sample_inputs(adapter, n=2, tasks=[task], start=START)
    images = [s.image for s in scenes("test", START, 2)]
    for i in range(2):
        if task == "vqa":
            got = pipe.vqa(images[i], sample.questions[i], return_attention=True, max_new_tokens=MAX_NEW, num_beams=1)
            mask = sample.question_mask[i : i + 1]
            width = int(mask.sum())
            kw = dict(input_ids=sample.question_ids[i : i + 1, :width], attention_mask=mask[:, :width])
        else:
            got = pipe.caption(images[i], return_attention=True, max_new_tokens=MAX_NEW, num_beams=1)
            kw = {}
        with torch.no_grad():
            out = model.generate(pixel_values=sample.pixel_values[i : i + 1], max_new_tokens=MAX_NEW, num_beams=1,
                                 output_attentions=True, return_dict_in_generate=True, **kw)
        ids = strip_prompt(out.sequences, 1, spec["eos_id"])[0]
        assert list(got.ids) == ids
        if getattr(out, "cross_attentions", None) is not None:
            want = np.stack([np.stack([layer[0, :, -1, :].numpy() for layer in step]) for step in out.cross_attentions[: len(ids)]])
        else:  # BLIP's generate returns no cross-attention: its text decoder run once along the tokens
            want = _blip_cross_attentions(model, task, sample.pixel_values[i : i + 1], kw, out.sequences[:, : len(ids)])
        assert got.attention.shape == want.shape
        np.testing.assert_allclose(got.attention, want, atol=1e-4, rtol=1e-3)  # (peaky maps: float32 sums differ in order)
        np.testing.assert_allclose(got.attention.sum(-1), 1.0, atol=1e-4)
        if task == "vqa":  # the question encoder's attention to the image
            with torch.no_grad():
                image = model.vision_model(pixel_values=sample.pixel_values[i : i + 1])[0]
                q = model.text_encoder(input_ids=kw["input_ids"], attention_mask=kw["attention_mask"], encoder_hidden_states=image,
                                       output_attentions=True, return_dict=True)
            want_image = np.stack([layer[0].numpy() for layer in q.cross_attentions])
            np.testing.assert_allclose(got.image_attention, want_image, atol=1e-4)
        assert got.heatmaps().shape == (len(ids), grid["rows"], grid["cols"])


@torch.no_grad()
def _blip_cross_attentions(model, task, pixel_values, kw, seq):
    """[tokens, layers, heads, positions]: BLIP's text decoder over `seq` (start token and the generated
    tokens but the last), one causal pass; row t is the query that chose token t."""
    states = model.vision_model(pixel_values=pixel_values)[0]
    mask = None
    if task == "vqa":
        states = model.text_encoder(input_ids=kw["input_ids"], attention_mask=kw["attention_mask"],
                                    encoder_hidden_states=states, return_dict=True)[0]
        mask = kw["attention_mask"]
    out = model.text_decoder(input_ids=seq, encoder_hidden_states=states, encoder_attention_mask=mask,
                             output_attentions=True, return_dict=True)
    return np.stack([layer[0].numpy() for layer in out.cross_attentions]).transpose(2, 0, 1, 3)
