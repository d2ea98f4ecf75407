"""`vlmedge quantize`: INT8 variants that keep accuracy, follow TensorRT's Q/DQ rules, and refuse bad input."""

import json
import math

import numpy as np
import onnx
import pytest

from vlmedge.calibration.int8 import tensorrt_qdq_problems
from vlmedge.calibration.confidence import bleu_stats, corpus_bleu4
from vlmedge.calibration.quantize import QuantizeOptions, quantize_bundle, smallest_passing_prefix
from vlmedge.cli import main
from vlmedge.data.scenes import pick_questions, scenes
from vlmedge.errors import InputError, ValidationError
from vlmedge.runtime.bundle import load_bundle
from vlmedge.runtime.pipeline import Pipeline


def _size(path):
    """Bytes of a bundle's files but its explain graphs (graph structure only, a fixed cost that weighs on a
    tiny model's ratios: their weights are the production graphs')."""
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and not f.name.endswith("_explain.onnx"))


def _assert_tensorrt_rules(path):
    m = load_bundle(path).manifest
    for g in m.graphs.values():
        model = onnx.load(str(path / g.file))
        assert tensorrt_qdq_problems(model) == [], g.file
        assert any(n.op_type == "DequantizeLinear" for n in model.graph.node) or g.file == "text_encoder.onnx"


@pytest.fixture(scope="module")
def shapes_int8(bundles, tmp_path_factory):
    src = bundles["shapes-vlm"][2]
    out = tmp_path_factory.mktemp("q") / "int8"
    logs = []
    quantize_bundle(src, out, QuantizeOptions("int8", calib="synthetic:36", held_out=12), log=logs.append)
    return src, out, logs


def test_int8_reference_model_keeps_accuracy_and_shrinks(shapes_int8):
    src, out, _ = shapes_int8
    p = load_bundle(out).manifest.precision
    assert p["dtype"] == "int8" and p["method"] == "entropy" and p["accuracy"]["within_budget"]
    assert p["calibration"]["source"] == "synthetic:48" and len(p["calibration"]["sha256"]) == 64
    assert p["calibration"]["calibration_images"] == 36
    assert p["calibration"]["held_out_images"] == 12 and sum(p["nodes"].values()) > 80
    acc = p["accuracy"]
    assert acc["fp32"]["vqa_accuracy"] - acc["int8"]["vqa_accuracy"] <= 0.01
    assert acc["fp32"]["bleu4"] - acc["int8"]["bleu4"] <= 0.02
    assert _size(out) <= 0.35 * _size(src)
    _assert_tensorrt_rules(out)
    s = next(scenes("test", 300, 1))
    q = pick_questions(s)[0]
    pipe = Pipeline(load_bundle(out))
    assert pipe.caption(s.image) == s.caption and pipe.vqa(s.image, q.text) == q.answer
    # its explain graphs are its own INT8 graphs with the attention output: same answer, maps of the variant
    e = pipe.vqa(s.image, q.text, return_attention=True)
    assert e.text == q.answer and e.image_attention is not None
    np.testing.assert_allclose(e.attention.sum(-1), 1.0, atol=1e-3)
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(out / "decoder_explain.onnx"), load_external_data=False).graph.node)


@pytest.mark.parametrize("name", ["blip-caption", "blip-vqa", "vit-gpt2", "vit-bert"])
def test_every_family_quantizes_and_still_runs(bundles, tmp_path, name):
    src = bundles[name][2]
    qfile = None
    if "vqa" in load_bundle(src).manifest.tasks:
        qfile = _calib_folder(tmp_path / "calib", 10)
    out = tmp_path / "int8"
    # random weights: the check is that every graph quantizes, obeys TensorRT's rules and runs
    quantize_bundle(src, out, QuantizeOptions("int8", calib=str(tmp_path / "calib") if qfile else "synthetic:9",
                                              questions=qfile, held_out=3, method="minmax", budget_vqa=1.0, budget_bleu=1.0))
    _assert_tensorrt_rules(out)
    pipe = Pipeline(load_bundle(out))
    img = next(scenes("test", 0, 1)).image
    out_text = pipe.vqa(img, "what color is the circle ?") if qfile else pipe.caption(img)
    assert isinstance(out_text, str)
    if name in ("blip-caption", "vit-gpt2"):  # and the comparison tool takes the pair
        from vlmedge.compare import compare_bundles

        report = compare_bundles([src, out], "synthetic:3", "cpu", tmp_path / "cmp", runs=2)
        assert (tmp_path / "cmp" / "plot.png").is_file()
        assert [b["precision"] for b in report["bundles"]] == ["float32", "int8"]


def test_an_impossible_budget_searches_to_all_float_then_refuses_with_figures(bundles, tmp_path):
    logs = []
    with pytest.raises(ValidationError) as e:
        quantize_bundle(bundles["vit-gpt2"][2], tmp_path / "q", QuantizeOptions(
            "int8", calib="synthetic:9", held_out=3, budget_bleu=-0.5), log=logs.append)
    msg = str(e.value)
    ranked = int(next(line for line in logs if line.startswith("sensitivity ranked")).split()[2])
    assert msg.startswith(f"int8: best variant ({ranked - 1} of {ranked} nodes in float) misses the budget: "
                          f"only all {ranked} nodes in float (an FP32 copy) would meet it; ")
    assert "BLEU-4 +0.000 (budget -0.5, 95% CI" in msg and "\n" not in msg
    probes = sum(" nodes in float: " in line for line in logs)
    assert 1 <= probes <= math.ceil(math.log2(ranked)) and f"fallback search: {probes} held-out probes" in "\n".join(logs)
    assert not (tmp_path / "q").exists()


def test_cli_max_fallbacks_refuses_in_one_line_and_writes_nothing(bundles, tmp_path, capsys):
    code, err = _cli(capsys, bundles["vit-gpt2"][2], "--precision", "int8", "--calib", "synthetic:9", "--held-out", 3,
                     "--budget", -50, "--max-fallbacks", 2, "--out", tmp_path / "o")
    assert code == 2 and err.startswith("error: int8: best variant (2 of ") and "nodes in float) misses the budget: " in err
    assert "BLEU-4 +0.000 (budget -1, 95% CI +0.000 to +0.000, 3 captions)" in err
    assert not (tmp_path / "o").exists()


def _calib_folder(d, n, junk=0):
    d.mkdir(parents=True)
    rows = []
    for i, s in enumerate(scenes("val", 500, n)):
        s.pil().save(d / f"s{i}.png")
        q = pick_questions(s)[0]
        rows.append(json.dumps({"image": f"s{i}.png", "question": q.text, "answer": q.answer}))
    for j in range(junk):
        (d / f"junk{j}.png").write_text("not an image")
    (d.parent / "questions.jsonl").write_text("\n".join(rows) + "\n")
    return d.parent / "questions.jsonl"


def _cli(capsys, *args):
    code = main(["quantize", *map(str, args)])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_calibration_folder_errors(bundles, tmp_path, capsys):
    src = bundles["shapes-vlm"][2]
    junk = tmp_path / "junk"
    junk.mkdir()
    for j in range(3):
        (junk / f"j{j}.png").write_text("x")
    assert _cli(capsys, src, "--precision", "int8", "--calib", junk, "--out", tmp_path / "o") == (
        2, f"error: --calib {junk}: no readable images (3 unreadable)")
    few = _calib_folder(tmp_path / "few" / "imgs", 4)
    code, err = _cli(capsys, src, "--precision", "int8", "--calib", tmp_path / "few" / "imgs", "--questions", few, "--out", tmp_path / "o")
    assert code == 2 and "4 readable images, need at least 8" in err
    qfile = _calib_folder(tmp_path / "ok" / "imgs", 8, junk=2)
    lines = qfile.read_text().splitlines()
    qfile.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    code, err = _cli(capsys, src, "--precision", "int8", "--calib", tmp_path / "ok" / "imgs", "--questions", qfile, "--out", tmp_path / "o")
    assert code == 2 and f"{qfile}:2: not valid JSON" in err
    assert not (tmp_path / "o").exists()


def test_unreadable_calibration_images_are_skipped_and_counted(bundles, tmp_path):
    qfile = _calib_folder(tmp_path / "c" / "imgs", 8, junk=2)
    m = quantize_bundle(bundles["vit-gpt2"][2], tmp_path / "o", QuantizeOptions(
        "int8", calib=str(tmp_path / "c" / "imgs"), questions=qfile, budget_bleu=1.0))
    assert m.precision["calibration"]["skipped"] == 2 and m.precision["calibration"]["images"] == 8
    assert m.precision["calibration"]["held_out_images"] == 4  # a folder gives at most half to the check


def test_quantizing_a_quantized_bundle_is_refused(shapes_int8, tmp_path, capsys):
    code, err = _cli(capsys, shapes_int8[1], "--precision", "int8", "--out", tmp_path / "o")
    assert code == 2 and "precision.dtype is int8, not float32; quantize the FP32 bundle" in err
    with pytest.raises(InputError, match="--precision: 'int4'"):
        quantize_bundle(shapes_int8[0], tmp_path / "o", QuantizeOptions("int4"))


def test_held_out_size_and_interval_are_recorded_and_a_small_set_warns(shapes_int8):
    _, out, logs = shapes_int8
    acc = load_bundle(out).manifest.precision["accuracy"]
    n_q = acc["held_out"]["questions"]
    assert acc["held_out"]["images"] == 12 and n_q >= 12
    conf = acc["confidence"]
    assert conf["bleu4"]["items"] == 12 and conf["vqa_accuracy"]["items"] == n_q
    for key in ("bleu4", "vqa_accuracy"):
        lo, hi = conf[key]["ci95"]
        assert lo <= conf[key]["delta"] + 1e-9 and conf[key]["delta"] <= hi + 1e-9
        assert math.isclose(conf[key]["delta"], acc["int8"][key] - acc["fp32"][key], abs_tol=1e-12)
    warn = [line for line in logs if line.startswith("warning:")]
    assert len(warn) == 1 and f"12 captions and {n_q} questions (fewer than 200)" in warn[0] and "95% CI" in warn[0]


def test_bleu_statistics_reproduce_the_coco_scorer():
    from vlmedge.evaluation.metrics import caption_scores

    scs = list(scenes("val", 0, 30))
    refs = [s.caption for s in scs]
    hyps = [c if i % 3 else " ".join(c.split()[:-2]) for i, c in enumerate(reversed(refs))]
    hyps[4] = ""
    assert math.isclose(float(corpus_bleu4(bleu_stats(hyps, refs).sum(0))),
                        caption_scores(hyps, [[r] for r in refs])["bleu4"], rel_tol=1e-9)


def test_bisection_finds_the_smallest_prefix_a_linear_scan_finds():
    rng = np.random.default_rng(0)
    for top in [1, 2, 3, 7, 24, 96, 300]:
        for _ in range(20):
            first = int(rng.integers(1, top + 2))  # prefixes from `first` on pass; top + 1: none does
            passes = [n >= first for n in range(top + 1)]
            linear = next((n for n in range(1, top + 1) if passes[n]), None)
            probed = []
            found = smallest_passing_prefix(top, lambda n: probed.append(n) or passes[n])
            assert found == linear and len(probed) <= math.ceil(math.log2(top)) + 1
            # everything in float passes by definition: the top is never probed
            probed.clear()
            found = smallest_passing_prefix(top, lambda n: probed.append(n) or passes[n], top_passes=True)
            assert found == (linear or top) and top not in probed


def test_fp16_variants_keep_accuracy_and_run(bundles, tmp_path):
    src = bundles["shapes-vlm"][2]
    m = quantize_bundle(src, tmp_path / "fp16", QuantizeOptions("fp16", calib="synthetic:24", held_out=8))
    p = m.precision
    assert p["dtype"] == "float16" and p["io_dtype"] == "float32" and p["accuracy"]["within_budget"]
    assert all(t.dtype == "float32" for g in m.graphs.values() for t in g.inputs + g.outputs if t.dtype.startswith("float"))
    assert _size(tmp_path / "fp16") <= 0.55 * _size(src)
    fp16 = Pipeline(load_bundle(tmp_path / "fp16"))
    img = next(scenes("test", 7, 1)).image
    e = fp16.caption(img, return_attention=True)
    assert e.ids == fp16.caption(img, return_ids=True).ids and e.attention.dtype == np.float32
    np.testing.assert_allclose(e.attention.sum(-1), 1.0, atol=2e-3)
    for g in m.graphs.values():
        inits = onnx.load(str(tmp_path / "fp16" / g.file)).graph.initializer
        assert all(i.data_type != onnx.TensorProto.FLOAT for i in inits if i.name not in set().union(*p["excluded"].values()))
    # float16 inputs and outputs: the KV cache crosses steps in half precision
    m16 = quantize_bundle(bundles["vit-gpt2"][2], tmp_path / "io16", QuantizeOptions(
        "fp16", calib="synthetic:9", held_out=3, io_dtype="float16"))
    step = m16.graphs["decoder"]
    assert {t.dtype for t in step.inputs if t.name.startswith("past.")} == {"float16"}
    fp32 = Pipeline(load_bundle(bundles["vit-gpt2"][2]))
    half = Pipeline(load_bundle(tmp_path / "io16"))
    imgs = [s.image for s in scenes("test", 0, 4)]
    same = sum(a == b for a, b in zip(fp32.caption(imgs), half.caption(imgs)))
    assert same >= 3
