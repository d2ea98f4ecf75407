"""Gemma 3 with pan and scan: the tiny Gemma 3 of tests/families.py with `do_pan_and_scan: true` in its image
processor's config (crops of at least 12 px, at most 3, from an aspect ratio of 1.2), exported once for the
module. The frames, the prompt ids and the blocks equal Hugging Face's Gemma3Processor called with
`do_pan_and_scan=True` on images that give 3, 2, 2 and no crops; greedy and beam-3 tokens equal HF `generate`,
and a batch equals one by one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from families import gemma3
from vlmedge.data.scenes import pick_questions, scenes
from vlmedge.models.hf import strip_prompt

CROPS = {"pan_and_scan_min_crop_size": 12, "pan_and_scan_max_num_crops": 3, "pan_and_scan_min_ratio_to_activate": 1.2}
SIZES = {(130, 31): 3, (50, 100): 2, (70, 50): 2, (64, 64): 0}  # (w, h): crops
MAX_NEW = 10


@pytest.fixture(scope="module")
def pas(tmp_path_factory):
    from vlmedge.export.exporter import ExportOptions, export_bundle
    from vlmedge.models.registry import load_adapter

    root = tmp_path_factory.mktemp("gemma3-pan-and-scan")
    model = gemma3(root / "model")
    cfg = json.loads((model / "processor_config.json").read_text())
    cfg["image_processor"].update(do_pan_and_scan=True, **CROPS)
    (model / "processor_config.json").write_text(json.dumps(cfg, indent=2))
    adapter = load_adapter(str(model))
    manifest = export_bundle(adapter, "all", root / "bundle", ExportOptions(validate_images=2))
    return adapter, manifest, root / "bundle"


def _images() -> list[Image.Image]:
    return [Image.fromarray(s.image).resize(size, Image.Resampling.BICUBIC) for s, size in zip(scenes("test", 90, 4), SIZES)]


def _processor(source):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(source)
    proc.tokenizer.padding_side = "left"
    return proc


def _hf_inputs(source, images, texts) -> dict:
    proc = _processor(source)
    msgs = [[{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": t}]}]
            for img, t in zip(images, texts)]
    out = dict(proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
                                        processor_kwargs={"padding": True, "do_pan_and_scan": True, **CROPS}))
    out.pop("labels", None)
    return out


def test_frames_prompt_ids_and_blocks_equal_the_processor_with_pan_and_scan(pas):
    import vlmedge
    from vlmedge.runtime.prefix import user_turn
    from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

    adapter, manifest, path = pas
    assert manifest.preprocessing["processor"]["pan_and_scan"]["max_crops"] == 3
    assert manifest.axes["frames"].max == 4  # the image and its crops in one vision call
    pipe = vlmedge.load(path)
    for img, crops in zip(_images(), SIZES.values()):
        ref = _hf_inputs(adapter.source, [img], ["what is it ?"])
        inputs, rows = pipe.prompt_inputs([[img]], [[user_turn("what is it ?")]])
        frames = inputs[0][0].frames
        assert len(frames) == len(ref["pixel_values"]) == 1 + crops, img.size
        assert np.abs(frames - ref["pixel_values"].numpy()).max() < 1e-5, img.size
        assert rows[0] == ref["input_ids"][0].tolist(), img.size
        # the text too (this tokenizer drops spaces): the image, then its crops, as the processor writes them
        assert inputs[0][0].text == _processor(adapter.source).replace_image_token({"num_crops": [crops]}, 0), img.size
        ids = np.asarray(rows, np.int64)
        blocks = pipe.decoder(pipe.embeddings(ids, inputs), np.ones_like(ids), ids).prompt_blocks
        theirs = get_block_sequence_ids_for_mask(ref["token_type_ids"]).numpy()
        assert len(set(blocks[0][blocks[0] >= 0].tolist())) == 1 + crops  # a block each
        assert ((blocks >= 0) == (theirs >= 0)).all(), img.size
        same = lambda b: (b[0][:, None] == b[0][None, :]) & (b[0] >= 0)[:, None]  # noqa: E731 (who shares a block)
        assert (same(blocks) == same(theirs)).all(), img.size


@pytest.mark.parametrize("beams", [1, 3])
@torch.no_grad()
def test_tokens_with_pan_and_scan_equal_hf_generate(pas, beams):
    import transformers

    import vlmedge

    adapter, manifest, path = pas
    model = getattr(transformers, adapter.architecture).from_pretrained(adapter.source, attn_implementation="eager").eval()
    pipe = vlmedge.load(path)
    images = _images()
    questions = [pick_questions(s)[i % 3].text for i, s in enumerate(scenes("test", 90, 4))]
    ours = [list(g.ids) for g in pipe.vqa(images, questions, return_ids=True, num_beams=beams, max_new_tokens=MAX_NEW)]
    eos = manifest.tasks["vqa"]["generation"]["eos_token_id"]
    inputs = _hf_inputs(adapter.source, images, questions)
    assert len(inputs["pixel_values"]) == sum(1 + c for c in SIZES.values())
    out = model.generate(**inputs, max_new_tokens=MAX_NEW, num_beams=beams, do_sample=False)
    assert ours == strip_prompt(out, inputs["input_ids"].shape[1], eos)
    assert len({tuple(r) for r in ours}) > 1
    assert ours == [list(pipe.vqa(img, q, return_ids=True, num_beams=beams, max_new_tokens=MAX_NEW).ids)
                    for img, q in zip(images, questions)]


def test_pan_and_scan_settings_no_processor_takes_are_refused_in_one_line(pas, tmp_path, capsys):
    import shutil

    from vlmedge.cli import main

    adapter = pas[0]
    model = tmp_path / "model"
    shutil.copytree(adapter.source, model)
    cfg = json.loads((model / "processor_config.json").read_text())
    cfg["image_processor"]["pan_and_scan_max_num_crops"] = 1  # Hugging Face's pan and scan makes 2 crops at least
    (model / "processor_config.json").write_text(json.dumps(cfg))
    assert main(["export", str(model), "--out", str(tmp_path / "bundle")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pan and scan" in err and "processor_config.json" in err, err
    assert not (tmp_path / "bundle").exists()
