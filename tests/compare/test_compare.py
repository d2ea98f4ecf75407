"""`vlmedge compare`: accuracy, agreement, graph error, latency, size and memory of bundles of one model."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vlmedge
from vlmedge.compare import compare_bundles, compare_command
from vlmedge.compare.evalset import load_eval
from vlmedge.compare.plot import PANELS, comparison_figure, short_labels
from vlmedge.data.scenes import pick_questions, scenes
from vlmedge.errors import BundleError, InputError
from vlmedge.evaluation.scene_eval import evaluate_pipeline, evaluation_set

N = 20  # synthetic scenes per comparison
RUNS = 3  # latency calls per bundle


def _edit_manifest(bundle: Path, edit) -> None:
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def shapes(bundles):
    return bundles["shapes-vlm"][2]


@pytest.fixture(scope="module")
def perturbed(shapes, tmp_path_factory):
    """The shapes bundle with noise on every decoder weight: same contract, different tokens."""
    import onnx
    from onnx import numpy_helper

    out = _copy(shapes, tmp_path_factory.mktemp("perturbed") / "shapes-perturbed")
    path = out / "decoder.onnx"
    model = onnx.load(str(path))
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.size > 1:
            noisy = w + rng.normal(0.0, 0.5 * w.std(), w.shape).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(noisy, init.name))
    onnx.save(model, str(path))
    # its explain graph, from the perturbed decoder (whose weights go back to its weights file, read by both)
    from dataclasses import replace

    from vlmedge.export.explain import write_explain_graph
    from vlmedge.runtime.bundle import load_bundle

    spec = replace(load_bundle(out, verify_hashes=False).manifest.graphs["decoder"], data_sha256=None)
    decoder, explain = write_explain_graph(out, "decoder", spec)

    def edit(m):
        m["graphs"]["decoder"].update(sha256=decoder.sha256, data_sha256=decoder.data_sha256)
        m["explain"]["graphs"]["decoder"].update(sha256=explain.sha256, data_sha256=explain.data_sha256)

    _edit_manifest(out, edit)
    return out


@pytest.fixture(scope="module")
def same(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("same")
    return compare_bundles([shapes, shapes], f"synthetic:{N}", "cpu", out, runs=RUNS), out


@pytest.fixture(scope="module")
def noisy(shapes, perturbed):
    return compare_bundles([shapes, perturbed], f"synthetic:{N}", "cpu", runs=RUNS)


def test_a_bundle_agrees_exactly_with_itself(same, shapes):
    report, _ = same
    ref, other = report["bundles"]
    assert ref["reference"] and not other["reference"]
    assert [ref["label"], other["label"]] == ["shapes-vlm (1)", "shapes-vlm (2)"]
    assert other["agreement"] == {"caption": 1.0, "vqa": 1.0, "overall": 1.0}
    for b in (ref, other):
        assert set(b["graphs"]) == {"vision_encoder", "text_encoder", "cross_kv", "decoder"}
        assert b["graph_summary"]["max_abs_error"] == 0.0
        assert b["graph_summary"]["cosine"] == pytest.approx(1.0)
    assert ref["caption"] == other["caption"] and ref["vqa"] == other["vqa"]
    assert ref["caption"]["n"] == N and ref["vqa"]["n"] == report["eval"]["questions"] > N
    assert ref["caption"]["exact_match"] >= 0.9 and ref["vqa"]["accuracy"] >= 0.85
    assert report["graph_samples"]["calls"]["decoder"] >= 3  # several steps, with longer caches
    for b in (ref, other):  # the same maps: no drift
        for task in ("caption", "vqa"):
            d = b["attention_drift"][task]
            assert d["tokens"] > 0 and d["js_divergence"] == pytest.approx(0.0, abs=1e-9) and d["top5_overlap"] == 1.0


def test_latency_size_and_memory_are_measured(same, shapes):
    b = same[0]["bundles"][0]
    lat = b["latency_ms"]
    assert lat["task"] == "caption" and lat["runs"] == RUNS and lat["batch"] == 1 and lat["mean_tokens"] > 5
    for stage in ("preprocess", "encoder", "first_token", "per_token", "whole"):
        assert 0 < lat[stage]["p50"] <= lat[stage]["p90"]
    assert lat["whole"]["p50"] > lat["encoder"]["p50"] + lat["first_token"]["p50"]
    files = [shapes / f for g in ("vision_encoder", "text_encoder", "cross_kv", "decoder") for f in (f"{g}.onnx", f"{g}.onnx.data")]
    assert b["size_bytes"] == sum(f.stat().st_size for f in [*files, shapes / "tokenizer.json"])
    if Path("/proc/self/clear_refs").exists():  # Linux
        assert b["peak_rss_bytes"] >= b["rss_before_bytes"] > 0
    else:
        assert b["peak_rss_bytes"] is None


def test_synthetic_scores_are_the_scene_evaluation(same, shapes):
    expected = evaluate_pipeline(vlmedge.load(shapes), evaluation_set("test", N))
    b = same[0]["bundles"][0]
    assert b["caption"] == pytest.approx({**expected["caption"]})
    assert b["vqa"]["accuracy"] == pytest.approx(expected["vqa"]["accuracy"])
    assert b["vqa"]["by_type"] == expected["vqa"]["by_type"]


def test_perturbed_decoder_disagrees_only_where_it_changed(noisy):
    ref, other = noisy["bundles"]
    assert ref["agreement"]["overall"] == 1.0
    assert 0.0 < other["agreement"]["overall"] < 1.0
    step = other["graphs"]["decoder"]["outputs"]
    assert step["logits"]["max_abs_error"] > 0 and step["logits"]["cosine"] < 1.0
    assert other["graph_summary"]["cosine"] < 1.0
    for graph in ("vision_encoder", "text_encoder", "cross_kv"):  # untouched graphs, same inputs
        assert all(e["max_abs_error"] == 0.0 for e in other["graphs"][graph]["outputs"].values())
    assert other["caption"]["bleu4"] < ref["caption"]["bleu4"]
    # its attention, forced along the reference's tokens, moved
    assert other["attention_drift"]["caption"]["js_divergence"] > 0.01
    assert other["attention_drift"]["caption"]["top5_overlap"] < 1.0
    assert other["attention_drift"]["caption"]["tokens"] == ref["attention_drift"]["caption"]["tokens"]


def test_an_fp16_bundle_with_float16_inputs_is_compared_in_float32(shapes, tmp_path):
    from vlmedge.cli import main

    fp16 = tmp_path / "shapes-fp16"
    assert main(["quantize", str(shapes), "--out", str(fp16), "--precision", "fp16", "--calib", "synthetic:12",
                 "--io-dtype", "float16"]) == 0
    report = compare_bundles([shapes, fp16], "synthetic:8", "cpu", runs=2)
    b = report["bundles"][1]
    assert b["precision"] == "float16" and b["size_bytes"] < report["bundles"][0]["size_bytes"]
    assert b["agreement"]["overall"] >= 0.9
    assert 0.0 < b["graph_summary"]["max_abs_error"] < 0.1 and b["graph_summary"]["cosine"] > 0.999


def test_report_files(same):
    report, out = same
    assert sorted(p.name for p in out.iterdir()) == ["plot.png", "report.json", "report.md"]  # no temp files left
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["bundles"][1]["agreement"]["overall"] == 1.0
    assert on_disk["eval"] == report["eval"]
    md = (out / "report.md").read_text()
    assert "| bundle | precision | caption EM |" in md and "| shapes-vlm (2) | float32 |" in md
    assert "## VQA accuracy by question type" in md and "| decoder |" in md
    assert f"![{', '.join(PANELS)}](plot.png)" in md


def test_the_plot_is_a_png_of_three_panels_in_each_bundles_colour(same):
    report, out = same
    with Image.open(out / "plot.png") as img:
        assert img.format == "PNG" and img.size == (1600, 560)
        img.verify()
    with Image.open(out / "plot.png") as img:
        colours = {c for _, c in img.convert("RGB").getcolors(1 << 20)}
    assert {(31, 119, 180), (255, 127, 14)} <= colours  # matplotlib's first two colours: one per bundle

    fig = comparison_figure(report)
    acc, stages, size = fig.axes
    assert [ax.get_title() for ax in fig.axes] == list(PANELS)
    bundles = report["bundles"]
    points = [tuple(c.get_offsets()[0]) for c in acc.collections]
    assert points == [pytest.approx((b["latency_ms"]["whole"]["p50"], b["vqa"]["accuracy"])) for b in bundles]
    assert [t.get_text().splitlines()[0] for t in acc.texts] == short_labels(bundles)  # each point labelled
    bars = [p.get_height() for p in stages.patches]
    assert bars == pytest.approx([b["latency_ms"][s]["p50"] for b in bundles
                                  for s in ("preprocess", "encoder", "first_token", "per_token")])
    assert [t.get_text() for t in stages.get_xticklabels()] == ["preprocess", "encoder", "first token", "per token"]
    assert [p.get_height() for p in size.patches] == pytest.approx([b["size_bytes"] / 1e6 for b in bundles])


def test_without_matplotlib_the_reports_are_written_and_one_line_says_why(shapes, tmp_path):
    out = tmp_path / "cmp"
    code = ("import sys; sys.modules['matplotlib'] = None; from vlmedge.cli import main; "  # import matplotlib fails
            f"sys.exit(main(['compare', {str(shapes)!r}, '--eval', 'synthetic:2', '--runs', '1', '--out', {str(out)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]
    said = [line for line in r.stderr.splitlines() if "matplotlib" in line]
    assert len(said) == 1 and "no plot: matplotlib is not installed" in said[0], r.stderr
    assert "Traceback" not in r.stderr
    assert "No plot: matplotlib is not installed" in (out / "report.md").read_text()
    assert json.loads((out / "report.json").read_text())["bundles"][0]["vqa"]["n"] > 0
    assert r.stdout.rstrip().endswith(f"report written to {out}: report.json, report.md")


def test_a_bundle_without_a_task_reports_it_absent(shapes, tmp_path, capsys):
    caption_only = _copy(shapes, tmp_path / "caption-only")
    _edit_manifest(caption_only, lambda m: m["tasks"].pop("vqa"))
    report = compare_bundles([shapes, caption_only], "synthetic:6", "cpu", tmp_path / "out", runs=2)
    b = report["bundles"][1]
    assert b["vqa"] is None and b["absent_tasks"] == ["vqa"]
    assert b["caption"] == report["bundles"][0]["caption"]
    assert b["agreement"] == {"caption": 1.0, "overall": 1.0}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| caption-only | float32 |" in md and "absent" in md


def test_a_vqa_only_bundle_is_timed_on_answers(bundles):
    path = bundles["blip-vqa"][2]
    report = compare_bundles([path], "synthetic:4", "cpu", runs=2)
    b = report["bundles"][0]
    assert b["tasks"] == ["vqa"] and b["caption"] is None and b["absent_tasks"] == []
    assert b["latency_ms"]["task"] == "vqa" and b["vqa"]["n"] == report["eval"]["questions"]


def test_bundles_of_different_models_are_refused(bundles, shapes, tmp_path):
    other = bundles["blip-caption"][2]
    with pytest.raises(BundleError, match=rf"{other} and {shapes} were exported from different models \(family"):
        compare_bundles([shapes, other], "synthetic:2", "cpu")
    retrained = _copy(shapes, tmp_path / "retrained")
    _edit_manifest(retrained, lambda m: m["provenance"]["source_sha256"].update({"model.safetensors": "0" * 64}))
    with pytest.raises(BundleError, match=r"different models \(provenance.source_sha256 differs\)"):
        compare_bundles([shapes, retrained], "synthetic:2", "cpu")


# -- the JSONL evaluation file ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("evalset")
    (d / "images").mkdir()
    scs = list(scenes("test", 300, 4))
    lines = []
    for i, s in enumerate(scs):
        s.pil().save(d / "images" / f"{i}.png")
        qs = [{"question": q.text, "answers": [q.answer], "type": q.qtype} for q in pick_questions(s)[:2]]
        row = {"image": f"images/{i}.png", "questions": qs}
        if i != 3:  # the last image has questions only
            row["captions"] = [s.caption, "a picture"]
        lines.append(json.dumps(row))
    lines.insert(2, "")  # blank lines are skipped
    lines.append(json.dumps({"image": "images/0.png", "captions": [scs[0].caption]}))  # captions only
    (d / "eval.jsonl").write_text("\n".join(lines) + "\n")
    return d, scs


def test_eval_from_a_jsonl_file(shapes, scene_files):
    d, scs = scene_files
    report = compare_bundles([shapes], str(d / "eval.jsonl"), "cpu", runs=2)
    assert report["eval"] == {"spec": str(d / "eval.jsonl"), "images": 5, "captioned_images": 4, "questions": 8,
                              "tasks": ["caption", "vqa"]}
    b = report["bundles"][0]
    assert b["caption"]["n"] == 4 and b["caption"]["exact_match"] >= 0.75
    assert b["vqa"]["n"] == 8 and sum(r["n"] for r in b["vqa"]["by_type"].values()) == 8
    assert b["predictions"]["caption"][0] == scs[0].caption


def test_jsonl_answer_as_a_string_and_untyped_questions(tmp_path, scene_files):
    d, _ = scene_files
    f = tmp_path / "e.jsonl"
    f.write_text(json.dumps({"image": str(d / "images" / "0.png"),
                             "questions": [{"question": "how many objects are there ?", "answer": "3"}]}) + "\n")
    data = load_eval(str(f))
    assert data.tasks == ("vqa",) and data.questions[0].answers == ("3",) and data.questions[0].qtype is None


@pytest.mark.parametrize("line, message", [
    ('{"image": "images/0.png", "captions": ["a"]', r"not valid JSON"),
    ('["images/0.png"]', r'expected an object with "image"'),
    ('{"image": "images/0.png", "captions": "a red circle"}', r"captions: expected a list of non-empty strings"),
    ('{"image": "images/0.png", "questions": [{"question": "is it red ?"}]}', r'questions\[0\]: needs "answers"'),
])
def test_a_malformed_jsonl_line_is_named(scene_files, line, message):
    d, _ = scene_files
    f = d / "bad.jsonl"
    good = json.dumps({"image": "images/1.png", "captions": ["x"]})
    f.write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(InputError, match=rf"bad.jsonl:3: {message}"):
        load_eval(str(f))


def test_a_missing_image_is_named_with_its_line(scene_files, shapes):
    d, _ = scene_files
    f = d / "missing.jsonl"
    f.write_text(json.dumps({"image": "images/0.png", "captions": ["x"]}) + "\n"
                 + json.dumps({"image": "images/nope.png", "captions": ["x"]}) + "\n")
    with pytest.raises(InputError, match=r"missing.jsonl:2: image .*images/nope.png does not exist"):
        compare_bundles([shapes], str(f), "cpu")


def test_a_question_too_long_for_the_bundle_is_named(scene_files, shapes):
    d, _ = scene_files
    f = d / "long.jsonl"
    q = " ".join(["is there a red circle ?"] * 10)
    f.write_text(json.dumps({"image": "images/0.png", "questions": [{"question": q, "answers": ["yes"]}]}) + "\n")
    with pytest.raises(InputError, match=r"long.jsonl:1: questions\[0\]: \d+ tokens, over the model's maximum"):
        compare_bundles([shapes], str(f), "cpu", runs=1)


@pytest.mark.parametrize("spec, message", [("synthetic:x", "synthetic:N"), ("synthetic:0", "synthetic:N"),
                                           ("nowhere.jsonl", "no such file")])
def test_bad_eval_specs(shapes, spec, message):
    with pytest.raises(InputError, match=message):
        compare_bundles([shapes], spec, "cpu")


def test_bad_device(shapes):
    with pytest.raises(InputError, match="--device: 'tpu'"):
        compare_bundles([shapes], "synthetic:2", "tpu")


def test_the_command_prints_the_table_and_where_the_files_went(shapes, perturbed, tmp_path):
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()
    app.command("compare")(compare_command)
    app.callback()(lambda: None)  # keeps "compare" a subcommand, as in vlmedge.cli
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", str(shapes), str(perturbed), "--eval", "synthetic:4", "--out",
                                      str(out), "--runs", "2"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "shapes-perturbed" in result.output and "agreement" in result.output
    assert f"report written to {out}" in result.output
    assert (out / "report.json").is_file() and (out / "plot.png").is_file()
