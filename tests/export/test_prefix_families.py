"""Decoder-only VLMs (the prefix contract) export and match Hugging Face exactly.

Each family in tests/families.py PREFIX_FAMILIES, a tiny random model built to a published checkpoint's
classes and config choices and saved with its processor as transformers 5 saves it, is exported once;
then, through the public API (`vlmedge.load(...).vqa / caption / chat`):
- the frames and prompt ids equal what the HF processor makes (apply_chat_template, tokenize=True) on
  images of five sizes and aspect ratios;
- greedy and beam-3 tokens equal HF `generate` on the processor's own left-padded batch, and a batch
  equals one by one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from families import PREFIX_FAMILIES
from vlmedge.data.scenes import pick_questions, scenes
from vlmedge.errors import InputError
from vlmedge.models.hf import strip_prompt

NAMES = list(PREFIX_FAMILIES)
SIZES = [(64, 64), (70, 50), (45, 83), (20, 20), (130, 31)]  # (w, h)
MAX_NEW = 12
START = 90  # test scenes the export's own validation does not use


def _msgs(question: str, images: int = 1) -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image"} for _ in range(images)), {"type": "text", "text": question}]}]


def _images(n: int, start: int = START) -> list[Image.Image]:
    return [Image.fromarray(s.image).resize(SIZES[i % len(SIZES)], Image.Resampling.BICUBIC)
            for i, s in enumerate(scenes("test", start, n))]


def _questions(n: int, start: int = START) -> list[str]:
    return [pick_questions(s)[i % 3].text for i, s in enumerate(scenes("test", start, n))]


def _processor_inputs(name: str, source: str, images: list, texts: list[str]) -> dict:
    """What the HF processor gives for a batch (left-padded, as for generation). SmolVLM's processor
    needs torchvision for its video half, which this machine's CPU torch cannot load; its image half and
    prompt expansion are HF's own functions, called as SmolVLMProcessor.__call__ calls them."""
    if name == "llava-onevision":
        return _onevision_inputs(source, [[img] for img in images], texts)
    if name != "smolvlm":
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(source)
        proc.tokenizer.padding_side = "left"
        return dict(proc(images=[[img] for img in images], text=texts, padding=True, return_tensors="pt"))
    from transformers import AutoTokenizer, SmolVLMImageProcessorPil
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    ip = SmolVLMImageProcessorPil.from_pretrained(source)  # reads processor_config.json's image_processor
    tok = AutoTokenizer.from_pretrained(source)
    tok.padding_side = "left"
    out = ip([[img] for img in images], return_row_col_info=True, return_tensors="pt")
    expanded = []
    for i, text in enumerate(texts):
        prompt = get_image_prompt_string(out["rows"][i][0], out["cols"][i][0], 4, "<fake_token_around_image>", "<image>",
                                         "<global-img>")
        expanded.append(text.replace("<image>", prompt))
    enc = tok(expanded, padding=True, return_tensors="pt", add_special_tokens=False)  # the template writes BOS
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "pixel_values": out["pixel_values"],
            "pixel_attention_mask": out["pixel_attention_mask"]}


def _onevision_inputs(source: str, images: list[list], texts: list[str]) -> dict:
    """LlavaOnevisionProcessor.__call__ for a batch, from HF's own pieces: its video half needs torchvision
    (see above); its token count is the processor's own method, called on the settings it reads."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer, LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor

    ip = LlavaOnevisionImageProcessorPil.from_pretrained(source)
    tok = AutoTokenizer.from_pretrained(source)
    tok.padding_side = "left"
    proc = SimpleNamespace(image_processor=ip, num_image_tokens=25, vision_aspect_ratio="anyres_max_2")
    proc._get_unpadded_features = lambda *a: LlavaOnevisionProcessor._get_unpadded_features(proc, *a)
    out = ip(images, return_tensors="pt")
    expanded, k = [], 0
    for text, item in zip(texts, images):
        parts = text.split("<image>")
        for i, img in enumerate(item):
            w, h = img.size
            n = 26 if len(item) > 1 else LlavaOnevisionProcessor._get_number_of_features(proc, h, w, 30, 30)
            parts[i] += "<image>" * n
            k += 1
        expanded.append("".join(parts))
    enc = tok(expanded, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "pixel_values": out["pixel_values"],
            "image_sizes": out["image_sizes"], "batch_num_images": out["batch_num_images"]}


def _chat_text(name: str, source: str, msgs: list[dict]) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source)
    return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False,
                                   chat_template=(Path(source) / "chat_template.jinja").read_text())


@pytest.mark.parametrize("name", NAMES)
def test_export_validates(prefix_bundles, name):
    _, manifest, _ = prefix_bundles(name)
    v = manifest.validation
    assert v["passed"], v["failures"]
    for r in v["tokens"].values():
        assert r["agree_batched"] == r["agree_batch1"] == r["images"] and r["beam"]["agree"] == r["images"]
    assert len(set(v["tokens"]["vqa"]["prompt_tokens"])) > 1  # prompts of different lengths: left padding exercised
    assert manifest.contract == "prefix" and set(manifest.graphs) == {"vision_encoder", "embed", "decoder"}


@pytest.mark.parametrize("name", NAMES)
def test_every_weight_is_stored_once(prefix_bundles, name, capsys):
    """A tied token table (`embed`'s and the decoder's LM head) is stored once, in the decoder's weights
    file, which `embed` reads; the bundle's files hold each weight once."""
    from vlmedge.export.inspect import weight_report
    from vlmedge.runtime.bundle import load_bundle

    adapter, manifest, path = prefix_bundles(name)
    bundle = load_bundle(path)
    report = weight_report(bundle)
    files = {f for g in manifest.graphs.values() for f in (g.file, g.data) if f}
    on_disk = sum((path / f).stat().st_size for f in files)
    assert on_disk == sum(bundle.graph_bytes(n) for n in manifest.graphs)
    assert report["stored_bytes"] == report["unique_bytes"] and not report["shared"], report["shared"]
    weights_files = sum((path / f).stat().st_size for f in {g.data for g in manifest.graphs.values()})
    assert weights_files <= 1.05 * report["unique_bytes"]  # (a tiny model's graph files are mostly structure)
    tied = adapter.model.config.get_text_config().tie_word_embeddings
    assert (manifest.graphs["embed"].data_file == manifest.graphs["decoder"].data) == tied
    if tied:
        assert report["read_once"][0][0] == ("decoder", "embed")
        from vlmedge.cli import main

        assert main(["inspect", str(path)]) == 0
        out = " ".join(capsys.readouterr().out.split())
        assert "stored once and read by several graphs (decoder and embed: 1 tensor" in out and "more than once" not in out


_MAPPED = """
import sys, onnxruntime as ort
path, data = sys.argv[1], sys.argv[2]
def mapped():  # bytes of `data` mapped into this process
    out = 0
    for line in open("/proc/self/maps"):
        f = line.split()
        if len(f) >= 6 and f[5] == data:
            a, z = (int(x, 16) for x in f[0].split("-"))
            out += z - a
    return out
def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
decoder = ort.InferenceSession(path + "/decoder.onnx", providers=["CPUExecutionProvider"])
before, r0 = mapped(), rss()
embed = ort.InferenceSession(path + "/embed.onnx", providers=["CPUExecutionProvider"])
print(mapped() - before, rss() - r0)
"""


def test_the_embed_session_reads_the_tied_table_in_place(prefix_bundles):
    """The second session that reads the tied table (`embed`, after the decoder's) maps it from the
    decoder's weights file, the pages the system already caches, instead of a copy of its own."""
    import subprocess
    import sys

    import onnx

    _, manifest, path = prefix_bundles("smolvlm")  # SmolVLM ties its LM head to the token table
    assert manifest.graphs["embed"].data_file == manifest.graphs["decoder"].data
    model = onnx.load(str(path / "embed.onnx"), load_external_data=False)
    table = max(int(np.prod(i.dims)) * 4 for i in model.graph.initializer)
    data = str((path / manifest.graphs["decoder"].data).resolve())
    out = subprocess.run([sys.executable, "-c", _MAPPED, str(path), data], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    mapped, grew = map(int, out.stdout.split())
    assert mapped >= table  # the table, mapped from the decoder's file
    assert grew < max(table // 2, 8 << 20), (grew, table)  # not copied (a tiny table is within the noise)


@pytest.mark.parametrize("name", NAMES)
def test_frames_and_prompt_ids_equal_the_processor(prefix_bundles, name):
    import vlmedge

    adapter, _, path = prefix_bundles(name)
    pipe = vlmedge.load(path)
    rng = np.random.default_rng(0)
    for w, h in SIZES:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        msgs = _msgs("what color is the circle ?")
        ref = _processor_inputs(name, adapter.source, [img], [_chat_text(name, adapter.source, msgs)])
        inputs, rows = pipe.prompt_inputs([[img]], [msgs])
        frames = inputs[0][0].frames
        px = ref["pixel_values"].numpy().reshape(-1, *frames.shape[1:])
        assert rows[0] == ref["input_ids"][0].tolist(), (w, h)
        assert px.shape == frames.shape and np.abs(px - frames).max() < 1e-5, (w, h)


@torch.no_grad()
def _hf_generate(model, inputs: dict, beams: int, eos) -> list[list[int]]:
    out = model.generate(**inputs, max_new_tokens=MAX_NEW, num_beams=beams, do_sample=False)
    return strip_prompt(out, inputs["input_ids"].shape[1], eos)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("beams", [1, 3])
def test_tokens_equal_hf_generate(prefix_bundles, name, beams):
    import transformers

    import vlmedge

    adapter, manifest, path = prefix_bundles(name)
    model = getattr(transformers, adapter.architecture).from_pretrained(adapter.source).eval()
    eos = manifest.tasks["vqa"]["generation"].get("eos_token_id", manifest.tasks["vqa"]["eos_id"])
    pipe = vlmedge.load(path)
    images, questions = _images(3), _questions(3)
    texts = [_chat_text(name, adapter.source, _msgs(q)) for q in questions]
    ours = [list(g.ids) for g in pipe.vqa(images, questions, return_ids=True, num_beams=beams, max_new_tokens=MAX_NEW)]
    one_by_one = [list(pipe.vqa(img, q, return_ids=True, num_beams=beams, max_new_tokens=MAX_NEW).ids)
                  for img, q in zip(images, questions)]
    theirs = _hf_generate(model, _processor_inputs(name, adapter.source, images, texts), beams, eos)
    assert ours == theirs
    assert ours == one_by_one
    assert len({tuple(r) for r in ours}) > 1  # the answers depend on the image and question
    caption = [list(g.ids) for g in pipe.caption(images[:2], return_ids=True, num_beams=beams, max_new_tokens=MAX_NEW)]
    instruction = manifest.prompt["caption_instruction"]
    ref = _hf_generate(model, _processor_inputs(name, adapter.source, images[:2],
                                                [_chat_text(name, adapter.source, _msgs(instruction))] * 2), beams, eos)
    assert caption == ref


@pytest.mark.parametrize("name", ["smolvlm", "llava-onevision", "llava"])  # Llama; Qwen2 (projection biases)
def test_the_onnxruntime_target_fuses_attention_and_keeps_hf_tokens(prefix_bundles, tmp_path, name):
    import transformers

    import vlmedge
    from vlmedge.export.ort_target import fused_counts, retarget

    adapter, manifest, path = prefix_bundles(name)
    entry = retarget(path, tmp_path / "ort", validate_images=2)
    assert fused_counts(tmp_path / "ort" / "vision_encoder.onnx").get("MultiHeadAttention", 0) >= 1
    decoder = fused_counts(tmp_path / "ort" / "decoder.onnx")
    # ONNX Runtime's GroupQueryAttention takes head sizes that are multiples of 8 (llava's tiny model has 12:
    # its layers stay unfused, and the tokens must still be HF's)
    fusable = manifest.dims["decoder_head_dim"] % 8 == 0
    assert decoder.get("GroupQueryAttention", 0) == (manifest.dims["decoder_layers"] if fusable else 0)
    assert entry["token_agreement"] == {"caption": "2/2", "vqa": "2/2"}
    model = getattr(transformers, adapter.architecture).from_pretrained(adapter.source).eval()
    images, questions = _images(3), _questions(3)
    texts = [_chat_text(name, adapter.source, _msgs(q)) for q in questions]
    pipe = vlmedge.load(tmp_path / "ort")
    assert (pipe.manifest.axes["prompt_batch"].max == 1) if fusable else ("prompt_batch" not in pipe.manifest.axes)
    eos = manifest.tasks["vqa"]["generation"].get("eos_token_id", manifest.tasks["vqa"]["eos_id"])
    for beams in (1, 3):  # a left-padded batch of three
        ours = [list(g.ids) for g in pipe.vqa(images, questions, return_ids=True, num_beams=beams, max_new_tokens=MAX_NEW)]
        assert ours == _hf_generate(model, _processor_inputs(name, adapter.source, images, texts), beams, eos)


@pytest.mark.parametrize("name", ["smolvlm", "llava", "llava-onevision"])
def test_chat_several_turns_and_images_equal_hf_generate(prefix_bundles, name):
    import transformers

    import vlmedge

    adapter, manifest, path = prefix_bundles(name)
    model = getattr(transformers, adapter.architecture).from_pretrained(adapter.source).eval()
    a, b = _images(2, start=START + 5)
    messages = [
        {"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "what color is the circle ?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": b}}, {"type": "text", "text": "and here ?"}]},
    ]
    got = vlmedge.load(path).chat(messages, return_ids=True, max_new_tokens=MAX_NEW)
    hf_msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the circle ?"}]},
               {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
               {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and here ?"}]}]
    text = _chat_text(name, adapter.source, hf_msgs)
    if name == "smolvlm":
        return _chat_smolvlm(model, adapter, text, a, b, got, manifest)
    if name == "llava-onevision":  # several images in one prompt: each padded to a square, no tiles
        inputs = _onevision_inputs(adapter.source, [[a, b]], [text])
        assert list(got.ids) == _hf_generate(model, inputs, 1, manifest.tasks["vqa"]["generation"]["eos_token_id"])[0]
        return
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(adapter.source)
    inputs = dict(proc(images=[[a, b]], text=[text], return_tensors="pt"))
    assert list(got.ids) == _hf_generate(model, inputs, 1, manifest.tasks["vqa"]["eos_id"])[0]


def _chat_smolvlm(model, adapter, text, a, b, got, manifest):
    from transformers import AutoTokenizer, SmolVLMImageProcessorPil
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    ip = SmolVLMImageProcessorPil.from_pretrained(adapter.source)
    out = ip([[a, b]], return_row_col_info=True, return_tensors="pt")
    parts = text.split("<image>")
    prompts = [get_image_prompt_string(out["rows"][0][i], out["cols"][0][i], 4, "<fake_token_around_image>", "<image>",
                                       "<global-img>") for i in range(2)]
    expanded = parts[0] + prompts[0] + parts[1] + prompts[1] + parts[2]
    enc = AutoTokenizer.from_pretrained(adapter.source)(expanded, return_tensors="pt", add_special_tokens=False)
    inputs = {**enc, "pixel_values": out["pixel_values"], "pixel_attention_mask": out["pixel_attention_mask"]}
    assert list(got.ids) == _hf_generate(model, inputs, 1, manifest.tasks["vqa"]["generation"]["eos_token_id"])[0]


def test_a_prompt_over_the_bundles_length_is_refused_before_any_graph_runs(prefix_bundles, tmp_path):
    from vlmedge.export.exporter import ExportOptions, export_bundle
    from vlmedge.models.registry import load_adapter

    import vlmedge

    adapter, _, _ = prefix_bundles("llava")
    short = tmp_path / "short"
    with pytest.raises(InputError, match="--max-length 24: one image of this model takes up to 25 tokens"):
        export_bundle(load_adapter(adapter.source), "vqa", short, ExportOptions(max_length=24))
    export_bundle(load_adapter(adapter.source), "vqa", short, ExportOptions(max_length=64, validate_images=2))
    pipe = vlmedge.load(short)
    assert pipe.vqa(_images(1)[0], "what color is the circle ?")  # fits
    with pytest.raises(InputError, match="has no caption task"):  # exported with --task vqa
        pipe.caption(_images(1)[0])
    from vlmedge.calibration.data import record_inputs, synthetic

    assert set(record_inputs(pipe, synthetic(2))) == {"vision_encoder", "embed", "decoder"}  # what quantize records
    with pytest.raises(InputError) as e:
        pipe.vqa(_images(1)[0], " ".join(["red"] * 60) + " ?")
    assert "\n" not in str(e.value) and "axes.seq_len" in str(e.value)


def test_image_tokens_in_the_text_and_bad_messages_are_one_line(prefix_bundles):
    import vlmedge

    _, _, path = prefix_bundles("llava")
    pipe = vlmedge.load(path)
    img = _images(1)[0]
    with pytest.raises(InputError, match="image placeholders for 1 images"):
        pipe.vqa(img, "what is <image> here ?")
    for bad, words in (([], "non-empty list"), ([{"role": "robot", "content": "hi"}], "messages[0]"),
                       ([{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]}], "messages[0].content[0]"),
                       ([{"role": "user", "content": [{"type": "image"}]}], "without an image")):
        with pytest.raises(InputError) as e:
            pipe.chat(bad)
        assert words in str(e.value) and "\n" not in str(e.value)


def test_remote_code_families_are_refused_in_one_line(tmp_path):
    import json

    from vlmedge.errors import ModelLoadError
    from vlmedge.models.registry import load_adapter

    for arch in ("HfMoondream", "Phi3VForCausalLM"):
        d = tmp_path / arch
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"architectures": [arch], "auto_map": {"AutoModelForCausalLM": "x.Y"}}))
        with pytest.raises(ModelLoadError) as e:
            load_adapter(str(d))
        assert "\n" not in str(e.value) and "remote code" in str(e.value)


@pytest.mark.parametrize("edit, words", [
    (lambda m: m.pop("prompt"), "prompt: missing"),
    (lambda m: m["preprocessing"].pop("processor"), "preprocessing.processor: missing"),
    (lambda m: m["prompt"].update(image_token_id=10**6), "prompt.image_token_id"),
    (lambda m: m["tasks"].update({"<OD>": m["tasks"]["vqa"]}), "tasks"),
    (lambda m: m["preprocessing"]["processor"].update(kind="pan_and_scan"), "preprocessing.processor.kind"),
    (lambda m: m["preprocessing"]["processor"].update(pan_and_scan={"min_crop_size": 8, "max_crops": 10**6, "min_ratio": 1.2,
                                                                    "intro": "", "crops_intro": ""}),
     "preprocessing.processor.pan_and_scan.max_crops"),
    (lambda m: m["graphs"].pop("embed"), "needs graph 'embed'"),
    (lambda m: m["axes"].pop("seq_len"), "seq_len"),
    (lambda m: m["graphs"].update(decoder_step=m["graphs"]["decoder"]), "not a graph of the prefix contract"),
    # the weights file a graph reads from another graph: that graph's own, with the same hash
    (lambda m: m["graphs"]["embed"].update(data_file="vision_encoder.onnx.data"), "graphs.embed.data_file"),
    (lambda m: m["graphs"]["embed"].update(data_file="decoder.onnx", data_sha256=m["graphs"]["decoder"]["sha256"]),
     "graphs.embed.data_file"),
])
def test_hostile_prefix_manifests_are_refused_in_one_line(prefix_bundles, tmp_path, edit, words):
    import json
    import shutil

    from vlmedge.errors import BundleError
    from vlmedge.runtime.bundle import load_bundle

    _, _, path = prefix_bundles("llava")
    copy = tmp_path / "b"
    shutil.copytree(path, copy)
    m = json.loads((copy / "manifest.json").read_text())
    edit(m)
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError) as e:
        load_bundle(copy)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_chat_template_that_reaches_outside_its_sandbox_is_refused(prefix_bundles, tmp_path):
    import json
    import shutil

    import vlmedge
    from vlmedge.errors import BundleError

    _, _, path = prefix_bundles("llava")
    copy = tmp_path / "b"
    shutil.copytree(path, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["prompt"]["chat_template"] = "{{ ''.__class__.__mro__[1].__subclasses__() }}<image>"
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError) as e:
        vlmedge.load(copy).vqa(_images(1)[0], "what is it ?")
    assert "prompt.chat_template" in str(e.value) and "\n" not in str(e.value)
