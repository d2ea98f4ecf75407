"""Fusion encoders (ViLT, BridgeTower): the runtime's preprocessing, tokenizer and graph against Hugging Face.

Each tiny model (tests/encoders/tiny_fusion.py) is exported once per session. The reference is the
unmodified PyTorch model fed Hugging Face's own processor (the Pillow image processor class) and
tokenizer; the runtime is fed paths and strings and does its own preprocessing and tokenization.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from vlmedge.errors import BundleError, InputError

QUESTIONS = ["what colour is the circle?", "How many BLUE squares are there?!", "is there a triangle left of the square?",
             "it's 3 o'clock -- isn't it?", "x", "a large green square and " * 30]  # the last is past 40 tokens
TEXTS = ["a small red circle", "two large blue squares, left of a triangle", "A Green Triangle!", "a dog"]
SIZES = [(64, 64), (40, 100), (130, 50), (33, 57), (90, 91), (300, 60)]  # (height, width)


@pytest.fixture(scope="session")
def fusion_models(tmp_path_factory):
    from tiny_fusion import BUILDERS

    root = tmp_path_factory.mktemp("fusion-models")
    return {name: build(root / name) for name, build in BUILDERS.items()}


@pytest.fixture(scope="session")
def fusion_bundles(fusion_models, tmp_path_factory):
    """Each tiny fusion encoder exported (and validated) once: name -> (adapter, manifest, path, export seconds)."""
    import time

    from vlmedge.export.exporter import ExportOptions, export_bundle
    from vlmedge.models.registry import load_adapter

    root = tmp_path_factory.mktemp("fusion-bundles")
    out = {}
    for name, src in fusion_models.items():
        t0 = time.perf_counter()
        adapter = load_adapter(str(src))
        manifest = export_bundle(adapter, "all", root / name, ExportOptions(validate_images=6))
        out[name] = (adapter, manifest, root / name, time.perf_counter() - t0)
    return out


@pytest.fixture(scope="session")
def fusion_pipes(fusion_bundles):
    import vlmedge

    return {name: vlmedge.load(path, batch_size=4) for name, (_, _, path, _) in fusion_bundles.items()}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Scene images saved at several sizes and aspect ratios (ViLT batches of them are padded)."""
    from vlmedge.data.scenes import scenes

    d = tmp_path_factory.mktemp("fusion-photos")
    paths = []
    for i, (s, (h, w)) in enumerate(zip(scenes("test", 300, len(SIZES)), SIZES)):
        paths.append(d / f"scene-{i}.png")
        Image.fromarray(s.image).resize((w, h), Image.Resampling.BILINEAR).save(paths[-1])
    return paths


def _hf(adapter, images, texts):
    """The PyTorch model's logits on Hugging Face's own processor and tokenizer (truncated to the model's positions)."""
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(adapter.source, backend="pil")
    assert type(proc).__name__.endswith("Pil")
    px = proc([Image.open(p).convert("RGB") for p in images], return_tensors="pt")
    enc = adapter.hf_tokenizer()(texts, padding=True, truncation=True, max_length=adapter.info.text_len, return_tensors="pt")
    kw = {"pixel_mask": px["pixel_mask"]} if adapter.family == "vilt" else {}
    with torch.no_grad():
        out = adapter.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=px["pixel_values"], **kw)
    return out


# -- preprocessing and tokenizer ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vilt-vqa", "bridgetower-itm"])
def test_preprocessing_equals_the_hf_pillow_processor(name, fusion_models, fusion_bundles, fusion_pipes, photos):
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(fusion_models[name], backend="pil")
    pipe = fusion_pipes[name]
    for batch in ([photos[0]], [photos[1]], [photos[2]], photos[:3], photos[3:], [photos[5], photos[0]]):
        want = proc([Image.open(p).convert("RGB") for p in batch], return_tensors="np")
        got = pipe.image_inputs(batch)
        assert got["pixel_values"].shape == want["pixel_values"].shape
        assert np.abs(got["pixel_values"] - want["pixel_values"]).max() < 1e-5
        if name == "vilt-vqa":  # ViLT: a batch padded to its largest image, with the mask
            assert (got["pixel_mask"] == want["pixel_mask"]).all()
        else:
            assert "pixel_mask" not in got


@pytest.mark.parametrize("name", ["vilt-vqa", "bridgetower-itc"])
def test_token_ids_equal_the_hf_tokenizer_with_truncation(name, fusion_bundles, fusion_pipes):
    adapter = fusion_bundles[name][0]
    want = adapter.hf_tokenizer()(QUESTIONS, padding=True, truncation=True, max_length=adapter.info.text_len, return_tensors="np")
    ids, mask = fusion_pipes[name].text_ids(QUESTIONS)
    assert ids.shape[1] == adapter.info.text_len == 40  # the long text is truncated to the model's positions
    assert (ids == want["input_ids"]).all() and (mask == want["attention_mask"]).all()


# -- logits, answers and scores -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vilt-vqa", "vilt-retrieval", "bridgetower-itm", "bridgetower-itc"])
def test_logits_equal_hf_within_1e4(name, fusion_bundles, fusion_pipes, photos):
    adapter, manifest, _, _ = fusion_bundles[name]
    assert manifest.validation["passed"] and manifest.validation["graphs"]["fusion"]["logits"]["max_abs"] < 1e-4
    texts = QUESTIONS if name == "vilt-vqa" else TEXTS + TEXTS[:2]
    want = _hf(adapter, photos, texts).logits.numpy()
    got = fusion_pipes[name].logits(photos, texts)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-4


def test_vqa_answers_and_scores_equal_hf(fusion_bundles, fusion_pipes, photos):
    adapter = fusion_bundles["vilt-vqa"][0]
    pipe = fusion_pipes["vilt-vqa"]
    logits = _hf(adapter, photos, QUESTIONS).logits
    scores, ids = logits.sigmoid().topk(5)  # Hugging Face's VQA pipeline: a sigmoid per answer, the top k
    got = pipe.vqa(photos, QUESTIONS, top_k=5)
    for row, s, i in zip(got, scores, ids):
        assert [a.answer for a in row] == [adapter.model.config.id2label[int(j)] for j in i]
        assert [a.score for a in row] == pytest.approx(s.tolist(), abs=1e-5)
    one = pipe.vqa(photos[0], QUESTIONS[0], top_k=3)
    assert [a.answer for a in one] == [a.answer for a in got[0][:3]]


def test_vqa_batch_equals_one_by_one(fusion_pipes, photos):
    pipe = fusion_pipes["vilt-vqa"]
    batch = pipe.vqa(photos, QUESTIONS, top_k=4)  # images of six sizes, padded together; texts padded together
    for img, q, row in zip(photos, QUESTIONS, batch):
        single = pipe.vqa(img, q, top_k=4)
        assert [a.answer for a in single] == [a.answer for a in row]
        assert [a.score for a in single] == pytest.approx([a.score for a in row], abs=1e-5)


@pytest.mark.parametrize("name", ["vilt-retrieval", "bridgetower-itm", "bridgetower-itc"])
def test_match_scores_equal_hf(name, fusion_bundles, fusion_pipes, photos):
    adapter = fusion_bundles[name][0]
    pipe = fusion_pipes[name]
    img = photos[1]
    out = _hf(adapter, [img] * len(TEXTS), TEXTS)
    if name == "vilt-retrieval":  # the model card's score: logits[:, 0]
        want = out.logits[:, 0]
    elif name == "bridgetower-itm":  # the model card's score: logits[:, 1]
        want = out.logits[:, 1]
    else:  # the diagonal of the text-to-image logits
        want = adapter.model.logit_scale.exp() * (out.text_embeds * out.image_embeds).sum(-1)
    got = pipe.match(str(img), TEXTS)
    assert [m.text for m in got] == TEXTS
    assert [m.score for m in got] == pytest.approx(want.tolist(), abs=1e-4)
    many = pipe.match([str(photos[0]), str(img)], TEXTS)  # a batch of images equals one by one
    assert [m.score for m in many[1]] == pytest.approx([m.score for m in got], abs=1e-5)


# -- the bundle, the CLI and bad input --------------------------------------------------------------

def test_the_bundle_records_the_head_and_axes(fusion_bundles):
    from vlmedge.tensorrt.profiles import profiles

    raw = json.loads((fusion_bundles["vilt-vqa"][2] / "manifest.json").read_text())
    assert raw["contract"] == "fusion" and raw["schema_version"] == 5 and list(raw["graphs"]) == ["fusion"]
    assert raw["tasks"]["vqa"]["labels"][:2] == ["yes", "no"] and raw["tokenizer"]["max_length"] == 40
    assert [t["name"] for t in raw["graphs"]["fusion"]["inputs"]] == ["pixel_values", "pixel_mask", "input_ids", "attention_mask"]
    p = profiles(fusion_bundles["vilt-vqa"][1])["fusion"]
    assert p["pixel_values"] == {"min": (1, 3, 16, 16), "opt": (8, 3, 64, 64), "max": (16, 3, 96, 96)}
    p = profiles(fusion_bundles["bridgetower-itm"][1])["fusion"]
    assert p["pixel_values"]["max"] == (16, 3, 48, 48) and p["input_ids"]["max"] == (16, 40)
    itc = fusion_bundles["bridgetower-itc"][1].tasks["match"]
    assert itc["score"] == "contrastive" and itc["logit_scale"] == pytest.approx(np.exp(2.6592), rel=1e-5)


def test_cli_vqa_and_match(fusion_bundles, fusion_pipes, photos, capsys):
    from vlmedge.cli import main

    assert main(["vqa", str(fusion_bundles["vilt-vqa"][2]), str(photos[2]), QUESTIONS[0], "--top-k", "3"]) == 0
    want = fusion_pipes["vilt-vqa"].vqa(photos[2], QUESTIONS[0], top_k=3)
    assert capsys.readouterr().out.strip() == ", ".join(f"{a.answer} {a.score:.4f}" for a in want)
    texts = [t for t in TEXTS if "," not in t]
    assert main(["match", str(fusion_bundles["bridgetower-itm"][2]), str(photos[0]), "--texts", ",".join(texts), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"][0]["matches"]
    want = sorted(fusion_pipes["bridgetower-itm"].match(photos[0], texts), key=lambda m: -m.score)  # best first
    assert [r["text"] for r in rows] == [m.text for m in want]
    assert [r["score"] for r in rows] == pytest.approx([m.score for m in want], abs=1e-6)
    assert main(["inspect", str(fusion_bundles["bridgetower-itc"][2])]) == 0
    assert "contract fusion" in capsys.readouterr().out


@pytest.mark.parametrize("args, words", [
    (["vqa", "{vqa}", "{img}", "   "], "question 0: empty"),
    (["vqa", "{vqa}", "{bad}", "what?"], "not an image Pillow can read"),
    (["vqa", "{vqa}", "{img}", "what?", "--beams", "3"], "--beams: "),
    (["vqa", "{itm}", "{img}", "what?"], "scores image-text matches; use vlmedge match"),
    (["match", "{vqa}", "{img}", "--texts", "a,b"], "answers questions; use vlmedge vqa"),
    (["match", "{itm}", "{img}", "--texts", "a,,b"], "expected comma-separated texts"),
    (["vqa", "{hostile}", "{img}", "what?"], "leaves the directory"),
])
def test_bad_input_is_one_line(args, words, fusion_bundles, photos, tmp_path, capsys):
    from vlmedge.cli import main

    (tmp_path / "bad.png").write_text("not an image")
    hostile = tmp_path / "hostile"
    shutil.copytree(fusion_bundles["vilt-vqa"][2], hostile)
    raw = json.loads((hostile / "manifest.json").read_text())
    raw["graphs"]["fusion"]["file"] = "../../fusion.onnx"
    (hostile / "manifest.json").write_text(json.dumps(raw))
    names = {"vqa": fusion_bundles["vilt-vqa"][2], "itm": fusion_bundles["bridgetower-itm"][2], "img": photos[0],
             "bad": tmp_path / "bad.png", "hostile": hostile}
    assert main([a.format(**names) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err


def test_api_errors(fusion_pipes, photos):
    with pytest.raises(InputError, match="top_k"):
        fusion_pipes["vilt-vqa"].vqa(photos[0], "what?", top_k=0)
    with pytest.raises(InputError, match="2 images and 3 questions"):
        fusion_pipes["vilt-vqa"].vqa(photos[:2], ["a", "b", "c"])
    with pytest.raises(InputError, match="texts: empty"):
        fusion_pipes["bridgetower-itm"].match(photos[0], [])
    with pytest.raises(InputError, match="aspect ratio is too extreme"):
        fusion_pipes["vilt-vqa"].vqa(Image.new("RGB", (4000, 10)), "what?")
    with pytest.raises(InputError, match="writes no captions"):
        fusion_pipes["bridgetower-itm"].caption(photos[0])


@pytest.mark.parametrize("change, words", [
    (lambda m: m.update(schema_version=6), "schema_version 6 of the fusion contract is not supported"),
    (lambda m: m["tasks"]["vqa"].update(labels=[]), "tasks.vqa.labels"),
    (lambda m: m["tasks"]["vqa"].update(labels=["a", "b"]), "logits has 10 here, expected 2"),
    (lambda m: m["tasks"].update(match={"score": "logit", "index": 0}), "exactly one of vqa, match"),
    (lambda m: m["tokenizer"].update(max_length=500), "tokenizer.max_length"),
    (lambda m: m["tokenizer"].update(pad_id=10 ** 6), "tokenizer.pad_id"),
    (lambda m: m["graphs"]["fusion"].update(file="/etc/passwd"), "absolute path"),
    (lambda m: m["graphs"]["fusion"]["inputs"].pop(2), "graphs.fusion.inputs"),
    (lambda m: m["graphs"]["fusion"]["inputs"][0].update(shape=["batch", 3, "nope", "width"]), "axis 'nope' is not defined"),
    (lambda m: m["preprocessing"].update(crop_height=48, crop_width=48), "a graph with a pixel_mask takes images of any size"),
    (lambda m: m["preprocessing"].update(size_divisor=8), "not a multiple of dims.patch_size"),
    (lambda m: m["axes"].update(height={"min": 1, "opt": 1, "max": 1 << 20}, width={"min": 1, "opt": 1, "max": 1 << 20}),
     "elements at its largest shape"),
])
def test_a_hostile_manifest_is_refused_in_one_line(change, words, fusion_bundles, tmp_path):
    from vlmedge.runtime.bundle import load_bundle

    dst = tmp_path / "b"
    shutil.copytree(fusion_bundles["vilt-vqa"][2], dst)
    raw = json.loads((dst / "manifest.json").read_text())
    change(raw)
    (dst / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError) as e:
        load_bundle(dst)
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_graph_of_another_head_is_refused_when_opened(fusion_bundles, tmp_path):
    import vlmedge
    from vlmedge.runtime.bundle import sha256_file

    dst = tmp_path / "b"
    shutil.copytree(fusion_bundles["vilt-vqa"][2], dst)
    src = fusion_bundles["vilt-retrieval"][2]
    raw = json.loads((dst / "manifest.json").read_text())
    for f in src.iterdir():
        if f.name.startswith("fusion.onnx"):
            shutil.copy(f, dst / f.name)
    raw["graphs"]["fusion"].update({k: sha256_file(dst / n) for k, n in (("sha256", "fusion.onnx"), ("data_sha256", "fusion.onnx.data"))
                                    if (dst / n).is_file()})
    (dst / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="logits has dimension 1 = 1, but manifest.json"):
        vlmedge.load(dst)


def test_match_refuses_a_built_in_generating_model(capsys):
    from vlmedge.cli import main

    assert main(["match", "shapes-vlm", "x.png", "--texts", "a"]) == 2
    assert "not a fusion encoder" in capsys.readouterr().err


def test_fp16_variant_agrees_with_fp32(fusion_bundles, photos, tmp_path):
    import vlmedge
    from vlmedge.calibration.fusion import quantize_fusion

    src = fusion_bundles["vilt-vqa"][2]
    m = quantize_fusion(src, tmp_path / "fp16", "fp16", "synthetic:8", 12)
    acc = m.precision["accuracy"]
    assert m.precision["dtype"] == "float16" and acc["passed"] and acc["top1_agreement"] == 1.0
    fp16, fp32 = vlmedge.load(tmp_path / "fp16"), vlmedge.load(src)
    for a, b in zip(fp16.vqa(photos, QUESTIONS, top_k=3), fp32.vqa(photos, QUESTIONS, top_k=3)):
        assert a[0].answer == b[0].answer and a[0].score == pytest.approx(b[0].score, abs=0.02)
    from vlmedge.cli import main

    assert main(["compare", str(src), str(tmp_path / "fp16"), "--eval", "synthetic:4", "--out", str(tmp_path / "cmp"),
                 "--runs", "2"]) == 0
    rows = json.loads((tmp_path / "cmp" / "report.json").read_text())["bundles"]
    assert [r["precision"] for r in rows] == ["float32", "float16"] and rows[0]["score_max_abs"] == 0
    assert rows[1]["top1_agreement"] == 1.0 and 0 < rows[1]["score_max_abs"] < 0.02
    assert main(["compare", str(src), str(fusion_bundles["vilt-retrieval"][2]), "--eval", "synthetic:2",
                 "--out", str(tmp_path / "cmp2")]) == 2  # another model: refused in one line


def test_int8_variant_is_checked_and_a_failing_one_refused(fusion_bundles, photos, tmp_path):
    import onnx

    import vlmedge
    from vlmedge.calibration.fusion import quantize_fusion
    from vlmedge.errors import ValidationError

    m = quantize_fusion(fusion_bundles["vilt-vqa"][2], tmp_path / "int8", "int8", "synthetic:16", 12)
    assert m.precision["dtype"] == "int8" and m.precision["accuracy"]["passed"]
    ops = {n.op_type for n in onnx.load(str(tmp_path / "int8" / "fusion.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    got = vlmedge.load(tmp_path / "int8").vqa(photos[0], QUESTIONS[0], top_k=1)[0]
    want = vlmedge.load(fusion_bundles["vilt-vqa"][2]).vqa(photos[0], QUESTIONS[0], top_k=1)[0]
    assert got.answer == want.answer and got.score == pytest.approx(want.score, abs=0.05)
    with pytest.raises(ValidationError, match="fails its check") as e:  # random BridgeTower weights: scores move too far
        quantize_fusion(fusion_bundles["bridgetower-itc"][2], tmp_path / "bt-int8", "int8", "synthetic:16", 12)
    assert "\n" not in str(e.value) and not (tmp_path / "bt-int8").exists()


def test_a_sampling_vilt_checkpoint_is_refused(fusion_models, tmp_path):
    from vlmedge.errors import ModelLoadError
    from vlmedge.models.registry import load_adapter

    dst = tmp_path / "vilt"
    shutil.copytree(fusion_models["vilt-retrieval"], dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["max_image_length"] = 8
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="samples image patches at random"):
        load_adapter(str(dst))


def test_export_seconds_and_sizes(fusion_bundles):
    """(Reported with -s: what each tiny export took, and its size on disk.)"""
    for name, (_, manifest, path, seconds) in fusion_bundles.items():
        size = sum(f.stat().st_size for f in path.iterdir())
        print(f"{name}: exported in {seconds:.1f} s, {size / 1e6:.2f} MB, trace {manifest.provenance['export_seconds']['fusion']} s")
        assert seconds < 120 and size < 20e6


def test_serving_vqa_and_match_equal_the_pipeline(fusion_bundles, fusion_pipes, photos):
    import base64
    from concurrent.futures import ThreadPoolExecutor

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from vlmedge.serving.app import create_app
    from vlmedge.serving.options import ServeOptions

    b64 = [base64.b64encode(p.read_bytes()).decode() for p in photos[:4]]
    vqa = create_app(ServeOptions(bundle=str(fusion_bundles["vilt-vqa"][2]), max_wait_ms=300, shared_threads=False),
                     fusion_pipes["vilt-vqa"])
    with TestClient(vqa) as c:
        with ThreadPoolExecutor(4) as ex:  # four requests at once: one batch of images of four sizes
            rs = list(ex.map(lambda i: c.post("/v1/vqa", json={"image": b64[i], "question": QUESTIONS[i], "top_k": 3}), range(4)))
        for i, r in enumerate(rs):
            assert r.status_code == 200, r.text
            want = fusion_pipes["vilt-vqa"].vqa(photos[i], QUESTIONS[i], top_k=3)
            assert [a["answer"] for a in r.json()["answers"]] == [a.answer for a in want]
            assert [a["score"] for a in r.json()["answers"]] == pytest.approx([a.score for a in want], abs=1e-5)
        assert max(r.json()["batch_size"] for r in rs) > 1
        r = c.post("/v1/vqa", json={"image": b64[0], "question": " "})
        assert r.status_code == 400 and "question 0: empty" in r.json()["error"]
        assert c.post("/v1/match", json={"image": b64[0], "texts": ["a"]}).status_code == 404
        assert c.post("/v1/caption", json={"image": b64[0]}).status_code == 404
        assert c.get("/v1/models").json()["data"][0]["contract"] == "fusion"
    match = create_app(ServeOptions(bundle=str(fusion_bundles["bridgetower-itm"][2]), shared_threads=False),
                       fusion_pipes["bridgetower-itm"])
    with TestClient(match) as c:
        r = c.post("/v1/match", json={"image": b64[1], "texts": TEXTS})
        assert r.status_code == 200, r.text
        want = fusion_pipes["bridgetower-itm"].match(photos[1], TEXTS)
        assert [m["text"] for m in r.json()["matches"]] == TEXTS
        assert [m["score"] for m in r.json()["matches"]] == pytest.approx([m.score for m in want], abs=1e-5)
        r = c.post("/v1/match", json={"image": "not base64!", "texts": TEXTS})
        assert r.status_code == 400 and "\n" not in r.json()["error"]


def test_every_fusion_architecture_has_a_tiny_model(fusion_models):
    from vlmedge.models.fusion import ARCHITECTURES
    from vlmedge.models.registry import ARCHITECTURES as REGISTERED, architecture_of

    built = {architecture_of(path) for path in fusion_models.values()}
    assert built == set(ARCHITECTURES) and built <= set(REGISTERED)


def test_vqa_and_match_import_no_heavy_module(fusion_bundles, photos):
    import subprocess
    import sys

    heavy = ("torch", "transformers", "onnx", "onnxscript", "vlmedge.export", "vlmedge.models")
    code = (f"import sys, vlmedge; p = vlmedge.load({str(fusion_bundles['vilt-vqa'][2])!r}); print(p.vqa({str(photos[0])!r}, 'what?'));"
            f"q = vlmedge.load({str(fusion_bundles['bridgetower-itm'][2])!r}); print(q.match({str(photos[0])!r}, ['a', 'b']));"
            f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
