"""`vlmedge quantize`: INT8 variants that keep accuracy, follow TensorRT's Q/DQ rules, and refuse bad input."""

import json

import onnx
import pytest

from vlmedge.calibration.int8 import tensorrt_qdq_problems
from vlmedge.calibration.quantize import QuantizeOptions, quantize_bundle
from vlmedge.cli import main
from vlmedge.data.scenes import pick_questions, scenes
from vlmedge.errors import InputError, ValidationError
from vlmedge.runtime.bundle import load_bundle
from vlmedge.runtime.pipeline import Pipeline


def _size(path):
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


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
    quantize_bundle(src, out, QuantizeOptions("int8", calib="synthetic:48"))
    return src, out


def test_int8_reference_model_keeps_accuracy_and_shrinks(shapes_int8):
    src, out = shapes_int8
    p = load_bundle(out).manifest.precision
    assert p["dtype"] == "int8" and p["method"] == "entropy" and p["accuracy"]["within_budget"]
    assert p["calibration"]["source"] == "synthetic:48" and len(p["calibration"]["sha256"]) == 64
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


@pytest.mark.parametrize("name", ["blip-caption", "blip-vqa", "vit-gpt2", "vit-bert"])
def test_every_family_quantizes_and_still_runs(bundles, tmp_path, name):
    src = bundles[name][2]
    qfile = None
    if "vqa" in load_bundle(src).manifest.tasks:
        qfile = _calib_folder(tmp_path / "calib", 10)
    out = tmp_path / "int8"
    # random weights: the check is that every graph quantizes, obeys TensorRT's rules and runs
    quantize_bundle(src, out, QuantizeOptions("int8", calib=str(tmp_path / "calib") if qfile else "synthetic:12",
                                              questions=qfile, method="minmax", budget_vqa=1.0, budget_bleu=1.0))
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


def test_over_budget_returns_nodes_to_float_then_refuses(bundles, tmp_path):
    logs = []
    with pytest.raises(ValidationError, match="over budget after 2 nodes back in float"):
        quantize_bundle(bundles["vit-gpt2"][2], tmp_path / "q", QuantizeOptions(
            "int8", calib="synthetic:12", budget_bleu=-0.5, max_fallbacks=2), log=logs.append)
    assert any(line.startswith("sensitivity ranked") for line in logs)
    assert sum("back to float" in line for line in logs) == 2
    assert not (tmp_path / "q").exists()


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


def test_quantizing_a_quantized_bundle_is_refused(shapes_int8, tmp_path, capsys):
    code, err = _cli(capsys, shapes_int8[1], "--precision", "int8", "--out", tmp_path / "o")
    assert code == 2 and "precision.dtype is int8, not float32; quantize the FP32 bundle" in err
    with pytest.raises(InputError, match="--precision: 'int4'"):
        quantize_bundle(shapes_int8[0], tmp_path / "o", QuantizeOptions("int4"))


def test_fp16_variants_keep_accuracy_and_run(bundles, tmp_path):
    src = bundles["shapes-vlm"][2]
    m = quantize_bundle(src, tmp_path / "fp16", QuantizeOptions("fp16", calib="synthetic:32"))
    p = m.precision
    assert p["dtype"] == "float16" and p["io_dtype"] == "float32" and p["accuracy"]["within_budget"]
    assert all(t.dtype == "float32" for g in m.graphs.values() for t in g.inputs + g.outputs if t.dtype.startswith("float"))
    assert _size(tmp_path / "fp16") <= 0.55 * _size(src)
    for g in m.graphs.values():
        inits = onnx.load(str(tmp_path / "fp16" / g.file)).graph.initializer
        assert all(i.data_type != onnx.TensorProto.FLOAT for i in inits if i.name not in set().union(*p["excluded"].values()))
    # float16 inputs and outputs: the KV cache crosses steps in half precision
    m16 = quantize_bundle(bundles["vit-gpt2"][2], tmp_path / "io16", QuantizeOptions(
        "fp16", calib="synthetic:12", io_dtype="float16"))
    step = m16.graphs["decoder_step"]
    assert {t.dtype for t in step.inputs if t.name.startswith("past.")} == {"float16"}
    fp32 = Pipeline(load_bundle(bundles["vit-gpt2"][2]))
    half = Pipeline(load_bundle(tmp_path / "io16"))
    imgs = [s.image for s in scenes("test", 0, 4)]
    same = sum(a == b for a, b in zip(fp32.caption(imgs), half.caption(imgs)))
    assert same >= 3
