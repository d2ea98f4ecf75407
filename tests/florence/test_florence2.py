"""Florence-2 end to end: a tiny random Florence-2 exported with validation; every task's tokens
equal HF `generate` fed by `Florence2Processor`; boxes equal the processor's post-processing."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_florence2 import florence2  # noqa: E402

TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>", "<OCR>", "<OD>", "<OCR_WITH_REGION>",
         "<DENSE_REGION_CAPTION>")
REGION = {"<OD>": "bboxes", "<DENSE_REGION_CAPTION>": "bboxes", "<OCR_WITH_REGION>": "quad_boxes"}


@pytest.fixture(scope="module")
def flo(tmp_path_factory):
    """The tiny model, its processor, its bundle (exported and validated once) and a pipeline."""
    import torch
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    import vlmedge
    from vlmedge.export.exporter import ExportOptions, export_bundle
    from vlmedge.models.registry import load_adapter

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    root = tmp_path_factory.mktemp("florence2")
    src = florence2(root / "model")
    manifest = export_bundle(load_adapter(str(src)), "all", root / "bundle", ExportOptions(validate_images=1))
    model = Florence2ForConditionalGeneration.from_pretrained(src).eval()
    rng = np.random.default_rng(0)
    images = [(rng.random((h, w, 3)) * 255).astype(np.uint8) for h, w in ((70, 90), (41, 63), (120, 77))]
    return dict(manifest=manifest, bundle=root / "bundle", model=model, proc=AutoProcessor.from_pretrained(src),
                pipe=vlmedge.load(root / "bundle"), images=images)


def _hf(flo, task, images, **generation) -> list[list[int]]:
    """HF generate as a Florence-2 user runs it: the processor builds input_ids and pixel_values."""
    import torch
    from PIL import Image

    inputs = flo["proc"](text=[task] * len(images), images=[Image.fromarray(i) for i in images], return_tensors="pt")
    max_new = flo["manifest"].tasks[task]["max_new_tokens"]
    with torch.no_grad():
        out = flo["model"].generate(**inputs, max_new_tokens=max_new, do_sample=False, **generation)
    rows = []
    for r in out[:, 1:].tolist():  # the decoder start is not generated
        rows.append(r[: r.index(2) + 1] if 2 in r else r)
    return rows


def test_export_validated_every_task(flo):
    v = flo["manifest"].validation
    assert v["passed"], v["failures"]
    assert set(v["tokens"]) == set(TASKS)
    assert all(r["agree_batched"] == r["images"] == r["agree_batch1"] for r in v["tokens"].values())
    # the prompt the runtime feeds is the processor's (image tokens stripped)
    proc = flo["proc"]
    for task in TASKS:
        ids = proc(text=task, images=[np.zeros((8, 8, 3), np.uint8)], return_tensors="np")["input_ids"][0].tolist()
        n = flo["manifest"].dims["image_tokens"]
        assert ids[:n] == [proc.image_token_id] * n
        assert ids[n:] == flo["manifest"].tasks[task]["text_prompt_ids"]


@pytest.mark.parametrize("options", [{"num_beams": 1}, {}], ids=["greedy", "model-defaults"])
def test_every_task_equals_hf_generate(flo, options):
    """A batch of three images of different sizes, each task: tokens equal HF generate's, greedy and
    with the checkpoint's own settings (3 beams, no repeated trigrams, forced BOS and EOS, early
    stopping); region tasks' boxes equal Florence2Processor.post_process_generation on the same tokens."""
    pipe, proc = flo["pipe"], flo["proc"]
    generation = flo["manifest"].tasks["<OD>"]["generation"]
    assert generation["num_beams"] == 3 and generation["no_repeat_ngram_size"] == 3 and generation["forced_bos_token_id"] == 0
    outputs = set()
    for task in TASKS:
        want = _hf(flo, task, flo["images"], **options)
        got = pipe.run(flo["images"], task, **options)
        assert [list(r.ids) for r in got] == want, task
        outputs.update(tuple(r.ids) for r in got)
        for img, r in zip(flo["images"], got):
            ref = proc.post_process_generation(sequence=[2, *r.ids], task=task, image_size=(img.shape[1], img.shape[0]))[task]
            if task in REGION:
                assert [list(b) for b in r.boxes] == ref[REGION[task]] and list(r.labels) == ref["labels"], task
            else:
                assert r.text == ref and r.boxes == ()
    assert len(outputs) > len(TASKS)  # the answers depend on the image


def test_batch_equals_one_by_one_and_caption(flo):
    pipe = flo["pipe"]
    for task in ("<OD>", "<OCR>"):
        assert pipe.run(flo["images"], task) == [pipe.run(img, task) for img in flo["images"]]
    assert pipe.caption_task == "<CAPTION>"
    assert pipe.caption(flo["images"][0]) == pipe.run(flo["images"][0], "<CAPTION>").text
    from vlmedge.errors import InputError

    with pytest.raises(InputError, match="not a task of this bundle"):
        pipe.run(flo["images"][0], "<REGION_PROPOSAL>")


def _texts(tok):
    """Hand-made answers: many boxes, quads, labels with several boxes, malformed location runs."""
    rng = np.random.default_rng(1)
    loc = lambda: f"<loc_{rng.integers(0, 1000)}>"  # noqa: E731
    fixed = [
        "car" + "".join(loc() for _ in range(4)) + "a red sign" + "".join(loc() for _ in range(8)) + "cat<loc_0><loc_0><loc_999><loc_999>",
        "".join(f"obj {i}" + "".join(loc() for _ in range(4)) for i in range(25)),  # many boxes
        "<od>sign</od><loc_1><loc_2><loc_3><loc_4>text<loc_5><loc_6><loc_7>",  # a run of three: no box
        "<loc_1><loc_2><loc_3><loc_4>left alone" + "<loc_9>" * 11,  # no label first; 11 locations: two boxes
        "".join(f" word {i} " + "".join(loc() for _ in range(8)) for i in range(12)),  # quads
        "café<loc_10><loc_20><loc_30><loc_40>  spaced  <loc_999><loc_500><loc_0><loc_1>",  # non-ASCII label
        "</s><pad>pad<loc_3><loc_4><loc_5><loc_6>",
    ]
    vocab = ["car", " cat", " sign", "<od>", "</od>", "<pad>", "<s>", " the"] + [f"<loc_{i}>" for i in (0, 1, 499, 500, 998, 999)]
    fuzz = ["".join(rng.choice(vocab, size=int(rng.integers(1, 30)))) for _ in range(150)]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in fixed + fuzz]


def test_postprocessing_equals_processor_on_hand_made_tokens(flo):
    from tokenizers import Tokenizer

    from vlmedge.runtime.florence2 import parse, tokens_text

    proc = flo["proc"]
    tok = Tokenizer.from_file(str(flo["bundle"] / "tokenizer.json"))
    sizes = [(637, 481), (1, 1), (4000, 3), (768, 768)]
    boxes_seen = quads_seen = 0
    for n, ids in enumerate(_texts(proc.tokenizer)):
        seq = [2, 0, *ids, 2]
        size = sizes[n % len(sizes)]
        for task, kind in (("<OD>", "description_with_bboxes"), ("<OCR_WITH_REGION>", "ocr"), ("<OCR>", "pure_text")):
            ref = proc.post_process_generation(sequence=seq, task=task, image_size=size)[task]
            got = parse(task, kind, tokens_text(tok, seq[1:]), size)
            if kind == "pure_text":
                assert got.text == ref
                continue
            key = "bboxes" if kind != "ocr" else "quad_boxes"
            assert [list(b) for b in got.boxes] == ref[key] and list(got.labels) == ref["labels"], (task, seq)
            boxes_seen += len(got.boxes) * (kind != "ocr")
            quads_seen += len(got.boxes) * (kind == "ocr")
    assert boxes_seen > 100 and quads_seen > 15


def test_cli_run_prints_boxes(flo, capsys):
    from PIL import Image

    from vlmedge.cli import main

    path = flo["bundle"].parent / "img.png"
    Image.fromarray(flo["images"][1]).save(path)
    assert main(["run", str(flo["bundle"]), str(path), "--task", "<OD>"]) == 0
    out = json.loads(capsys.readouterr().out)
    r = flo["pipe"].run(flo["images"][1], "<OD>")
    assert out["results"][0]["boxes"] == [list(b) for b in r.boxes] and out["results"][0]["text"] == r.text
    assert main(["run", str(flo["bundle"]), str(path), "--task", "vqa"]) == 2
    assert "not a task of this bundle" in capsys.readouterr().err


def test_every_weight_is_stored_once(flo):
    """One decoder graph: no weight twice between phases. Florence-2's language encoder and decoder
    share one token embedding table (BART's `shared`): it is stored once, in the weights file of one of
    them, which the other reads."""
    from vlmedge.export.inspect import weight_report
    from vlmedge.runtime.bundle import load_bundle

    bundle = load_bundle(flo["bundle"])
    report = weight_report(bundle)
    table = flo["model"].model.language_model.shared.weight.numel() * 4
    assert report["stored_bytes"] == report["unique_bytes"] and report["shared"] == []
    assert report["read_once"] == [(("decoder", "text_encoder"), 1, table)]
    graphs = bundle.manifest.graphs
    assert graphs["text_encoder"].data_file == graphs["decoder"].data or graphs["decoder"].data_file == graphs["text_encoder"].data
    weights_files = sum((bundle.path / f).stat().st_size for f in {g.data for g in graphs.values()})
    assert weights_files <= 1.05 * report["unique_bytes"]


def test_manifest_tasks_checked_and_old_bundles_load(flo):
    from vlmedge.errors import BundleError
    from vlmedge.runtime.bundle import parse_manifest

    raw = json.loads((flo["bundle"] / "manifest.json").read_text())
    parse_manifest(raw)

    def broken(edit):
        m = json.loads(json.dumps(raw))
        edit(m)
        with pytest.raises(BundleError) as e:
            parse_manifest(m, "m.json")
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "caption, vqa or a task token" in broken(lambda m: m["tasks"].__setitem__("<od>", m["tasks"]["<OD>"]))
    assert "tasks.<OD>.postprocess" in broken(lambda m: m["tasks"]["<OD>"].__setitem__("postprocess", "boxes"))
    assert "tasks.<OD>.text_prompt_ids[0]" in broken(lambda m: m["tasks"]["<OD>"]["text_prompt_ids"].__setitem__(0, 10**6))
    assert "tasks.<OD>.encoder" in broken(lambda m: m["tasks"]["<OD>"].__setitem__("encoder", "vision_encoder"))
    assert "tasks.<OD>.image_prefix" in broken(lambda m: m["tasks"]["<OD>"].__setitem__("image_prefix", 1))
    # a bundle written before tasks had prompts: its tasks lack the three fields and still load
    old = json.loads(json.dumps(raw))
    old["tasks"] = {"caption": {k: v for k, v in raw["tasks"]["<OD>"].items()
                                if k not in ("text_prompt_ids", "image_prefix", "postprocess")}}
    old["tasks"]["caption"]["encoder"] = "vision_encoder"
    assert parse_manifest(old).tasks["caption"]["encoder"] == "vision_encoder"


def test_caption_attention_equals_hf_cross_attentions(flo):
    """return_attention on <CAPTION>: each token's attention over [pooled image token, image grid, task prompt]
    equals HF's cross_attentions[t][layer][0, :, -1, :] (eager attention) within 1e-4, with HF's tokens."""
    import torch
    from PIL import Image
    from transformers import Florence2ForConditionalGeneration

    model = Florence2ForConditionalGeneration.from_pretrained(flo["manifest"].provenance["source"], attn_implementation="eager").eval()
    grid = flo["manifest"].explain["image_grid"]
    assert grid["leading"] == 1  # the spatially pooled token before the grid
    for img in flo["images"][:2]:
        got = flo["pipe"].caption(img, return_attention=True, num_beams=1)  # (HF returns beam rows unordered)
        inputs = flo["proc"](text=["<CAPTION>"], images=[Image.fromarray(img)], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=flo["manifest"].tasks["<CAPTION>"]["max_new_tokens"], do_sample=False,
                                 num_beams=1, output_attentions=True, return_dict_in_generate=True)
        ids = out.sequences[0, 1:].tolist()
        ids = ids[: ids.index(2) + 1] if 2 in ids else ids
        assert list(got.ids) == ids
        want = np.stack([np.stack([layer[0, :, -1, :].numpy() for layer in step]) for step in out.cross_attentions[: len(ids)]])
        np.testing.assert_allclose(got.attention, want, atol=1e-4, rtol=1e-3)
        assert got.heatmaps().shape == (len(ids), grid["rows"], grid["cols"])
