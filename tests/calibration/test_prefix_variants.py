"""Precision variants of a decoder-only (prefix contract) bundle: FP16, INT8 Q/DQ and weight-only
INT8/INT4 of its one decoder graph load, run, and stay close to FP32; the recording that calibrates
them runs the pipeline itself; compare measures every graph."""

import json

import onnx
import pytest

import vlmedge
from vlmedge.calibration import weight_only as wo
from vlmedge.calibration.data import record_inputs, synthetic
from vlmedge.calibration.quantize import QuantizeOptions, quantize_bundle
from vlmedge.data.scenes import pick_questions, scenes


@pytest.fixture(scope="module")
def smolvlm(prefix_bundles):
    return prefix_bundles("smolvlm")[2]


@pytest.fixture(scope="module")
def variants(smolvlm, tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix-variants")
    for precision in ("fp16", "int8", "int8-wo", "int4-wo"):
        quantize_bundle(smolvlm, root / precision, QuantizeOptions(precision, calib="synthetic:8", held_out=4))
    return root


def _ids(pipe, imgs, qs):
    return [g.ids for g in pipe.caption(imgs, return_ids=True, max_new_tokens=12)] + \
           [g.ids for g in pipe.vqa(imgs, qs, return_ids=True, max_new_tokens=12)]


def test_recording_sees_the_prompt_and_the_token_steps(smolvlm):
    feeds = record_inputs(vlmedge.load(smolvlm), synthetic(2))
    assert set(feeds) == {"vision_encoder", "embed", "decoder"}
    lengths = {f["inputs_embeds"].shape[1] for f in feeds["decoder"]}
    assert 1 in lengths and max(lengths) > 20  # token steps and prompts with their image tokens
    prompt = next(f for f in feeds["decoder"] if f["inputs_embeds"].shape[1] > 1)
    assert prompt["past.0.self.key"].shape[2] == 1 and (prompt["attention_mask"][:, 0] == 0).all()  # the hidden slot


def test_variants_load_run_and_follow_fp32(smolvlm, variants):
    test = list(scenes("test", 0, 4))
    imgs, qs = [s.image for s in test], [pick_questions(s)[0].text for s in test]
    ref = _ids(vlmedge.load(smolvlm), imgs, qs)
    agree = {}
    for precision in ("fp16", "int8", "int8-wo", "int4-wo"):
        m = vlmedge.load(variants / precision).manifest
        assert m.contract == "prefix" and m.prompt == vlmedge.load(smolvlm).manifest.prompt
        agree[precision] = wo.token_agreement(ref, _ids(vlmedge.load(variants / precision), imgs, qs))
    assert agree["fp16"] == 1.0 and agree["int8-wo"] >= 0.75, agree  # measured: 1.0 and 1.0
    p = vlmedge.load(variants / "int4-wo").manifest.precision
    assert p["graphs"] == ["decoder"] and p["nodes"]["decoder"] > 10
    model = onnx.load(str(variants / "int4-wo" / "decoder.onnx"))
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) == p["nodes"]["decoder"]
    for g in ("vision_encoder", "decoder"):
        assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(variants / "int8" / f"{g}.onnx")).graph.node)


def test_variants_store_the_tied_table_once(variants):
    """A variant keeps the bundle's property: no weight stored twice. Where its `embed` and LM head still
    hold the same table (FP16; weight-only INT4 leaves the head in float by default), `embed` reads it
    from the decoder's weights file."""
    from vlmedge.export.inspect import weight_report
    from vlmedge.runtime.bundle import load_bundle

    for precision in ("fp16", "int8", "int8-wo", "int4-wo"):
        bundle = load_bundle(variants / precision)
        report = weight_report(bundle)
        assert not report["shared"], (precision, report["shared"])
        graphs = bundle.manifest.graphs
        if precision in ("fp16", "int4-wo"):
            assert graphs["embed"].data_file == graphs["decoder"].data, precision
            assert report["read_once"][0][0] == ("decoder", "embed")


def test_compare_measures_every_graph_of_the_contract(smolvlm, variants, tmp_path):
    # the library call: the CLI's would turn on ONNX Runtime's process-wide thread pool, which the
    # rest of this test process (ONNX Runtime's own calibrator) cannot then share
    from vlmedge.compare import compare_bundles

    compare_bundles([smolvlm, variants / "int4-wo"], "synthetic:4", "cpu", tmp_path / "cmp", runs=2)
    report = json.loads((tmp_path / "cmp" / "report.json").read_text())
    text = json.dumps(report)
    for graph in ("vision_encoder", "embed", "decoder"):
        assert graph in text


def test_compare_replays_prompts_on_the_onnxruntime_target(smolvlm, tmp_path):
    # the target's decoder takes prompts one row at a time (axes.prompt_batch); compare replays FP32's
    # recorded batches of prompts on it
    from vlmedge.compare import compare_bundles
    from vlmedge.export.ort_target import retarget

    retarget(smolvlm, tmp_path / "ort", validate_images=2)
    compare_bundles([smolvlm, tmp_path / "ort"], "synthetic:4", "cpu", tmp_path / "cmp", runs=2)
    rows = json.loads((tmp_path / "cmp" / "report.json").read_text())["bundles"]
    assert rows[1]["agreement"]["overall"] == 1.0
