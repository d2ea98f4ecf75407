"""Weight-only INT8 / INT4 decoders: they load and run, agree with FP32, carry block-quantized weights
in the documented forms, GPTQ beats round-to-nearest, and bad options are refused in one line."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from vlmedge.calibration import weight_only as wo
from vlmedge.calibration.data import record_inputs, synthetic
from vlmedge.calibration.quantize import QuantizeOptions, quantize_bundle
from vlmedge.cli import main
from vlmedge.data.scenes import pick_questions, scenes
from vlmedge.runtime.bundle import load_bundle
from vlmedge.runtime.pipeline import Pipeline

AGREEMENT_FLOOR = 0.95  # token agreement with FP32 on unseen test scenes (measured: 1.0 for both)


@pytest.fixture(scope="module")
def shapes(bundles):
    return bundles["shapes-vlm"][2]


@pytest.fixture(scope="module")
def variants(shapes, tmp_path_factory):
    root = tmp_path_factory.mktemp("wo")
    quantize_bundle(shapes, root / "int4", QuantizeOptions("int4-wo", calib="synthetic:12", held_out=4))  # gptq, qdq
    quantize_bundle(shapes, root / "int8", QuantizeOptions("int8-wo", calib="synthetic:9", held_out=3, method="rtn", format="matmulnbits"))
    return root


@pytest.fixture(scope="module")
def step_feeds(shapes):
    """decoder inputs recorded from FP32 generation over a few validation scenes."""
    return record_inputs(Pipeline(load_bundle(shapes)), synthetic(4))["decoder"]


def _ids(pipe, imgs, qs):
    return [g.ids for g in pipe.caption(imgs, return_ids=True)] + [g.ids for g in pipe.vqa(imgs, qs, return_ids=True)]


def test_int4_and_int8_weight_only_run_and_agree_with_fp32(shapes, variants):
    test = list(scenes("test", 0, 8))
    imgs, qs = [s.image for s in test], [pick_questions(s)[0].text for s in test]
    ref = _ids(Pipeline(load_bundle(shapes)), imgs, qs)
    for name, bits, method, fmt in (("int4", 4, "gptq", "qdq"), ("int8", 8, "rtn", "matmulnbits")):
        m = load_bundle(variants / name).manifest
        p = m.precision
        assert (p["dtype"], p["bits"], p["method"], p["format"], p["block_size"]) == (f"{name}-wo", bits, method, fmt, 32)
        assert p["graphs"] == ["decoder"] and p["lm_head"] is None and p["lm_head_bits"] is None  # its own head: float
        # MatMulNBits is ONNX Runtime's own op: that bundle is an ONNX Runtime-target one, which build refuses
        assert m.target == ("onnxruntime" if fmt == "matmulnbits" else "tensorrt-portable")
        assert p["accuracy"]["within_budget"] and p["nodes"]["decoder"] > 10 and p["nodes"]["vision_encoder"] == 0
        agree = wo.token_agreement(ref, _ids(Pipeline(load_bundle(variants / name)), imgs, qs))
        assert agree >= AGREEMENT_FLOOR, (name, agree)


def test_variants_explain_with_their_own_graphs(shapes, variants, step_feeds):
    """quantize writes each variant's explain graphs from its own production graphs: the same logits on the
    same feeds, the weights read from the variant's file, and attention rows that sum to 1."""
    s = next(scenes("test", 5, 1))
    for name in ("int4", "int8"):
        bundle = load_bundle(variants / name)
        spec, explain = bundle.manifest.graphs["decoder"], bundle.manifest.explain["graphs"]["decoder"]
        assert explain.data == spec.data and bundle.manifest.explain["image_grid"] == {"leading": 0, "rows": 8, "cols": 8}
        prod, expl = (ort.InferenceSession(str(variants / name / f)) for f in (spec.file, explain.file))
        feeds = step_feeds[3]
        assert np.array_equal(prod.run(["logits"], feeds)[0], expl.run(["logits"], feeds)[0])
        pipe = Pipeline(bundle)
        e = pipe.caption(s.image, return_attention=True)
        assert e.ids == pipe.caption(s.image, return_ids=True).ids
        np.testing.assert_allclose(e.attention.sum(-1), 1.0, atol=1e-3)


def test_qdq_form_is_block_quantized_int4_dequantize_feeding_matmul(shapes, variants):
    model = onnx.load(str(variants / "int4" / "decoder.onnx"))
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {21}
    inits = {i.name: i for i in model.graph.initializer}
    consumers = {x: n for n in model.graph.node for x in n.input}
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == load_bundle(variants / "int4").manifest.precision["nodes"]["decoder"]
    for n in dqs:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs == {"axis": 0, "block_size": 32}
        w, s = inits[n.input[0]], numpy_helper.to_array(inits[n.input[1]])
        assert w.data_type == onnx.TensorProto.INT4 and s.shape == (-(-w.dims[0] // 32), w.dims[1])
        assert consumers[n.output[0]].op_type == "MatMul" and consumers[n.output[0]].input[1] == n.output[0]
    # the LM head stays float; int8 weights in the MatMulNBits form are packed uint8
    head = wo.weight_matmuls(onnx.load(str(shapes / "decoder.onnx")), lm_head=True).keys() - \
        wo.weight_matmuls(onnx.load(str(shapes / "decoder.onnx")), lm_head=False).keys()
    assert head and all(n.op_type == "MatMul" for n in model.graph.node if n.name in head)
    nbits = onnx.load(str(variants / "int8" / "decoder.onnx"))
    mnb = [n for n in nbits.graph.node if n.op_type == "MatMulNBits"]
    assert mnb and all(onnx.helper.get_attribute_value(a) == 8 for n in mnb for a in n.attribute if a.name == "bits")


def test_a_tied_lm_head_is_stored_at_8_bits_by_default(bundles, shapes, tmp_path):
    """GPT-2's LM head reads the token table the embedding lookup reads: left in float, ONNX Runtime
    would hold the table twice. By default an INT4 variant stores that head at 8 bits (an untied head
    stays float); --lm-head puts it at 4 bits, --no-lm-head keeps it in float."""
    vit_gpt2 = bundles["vit-gpt2"][2]
    tied, own = onnx.load(str(vit_gpt2 / "decoder.onnx")), onnx.load(str(shapes / "decoder.onnx"))
    head = wo.weight_matmuls(tied, lm_head=True).keys() - wo.weight_matmuls(tied, lm_head=False).keys()
    assert len(head) == 1
    assert wo.head_bits(tied, 4, None) == dict.fromkeys(head, 8) and wo.head_bits(own, 4, None) == {}
    assert wo.head_bits(tied, 4, True) == dict.fromkeys(head, 4) and wo.head_bits(tied, 4, False) == {}
    quantize_bundle(vit_gpt2, tmp_path / "int4", QuantizeOptions("int4-wo", calib="synthetic:6", held_out=2, method="rtn"))
    p = load_bundle(tmp_path / "int4").manifest.precision
    assert p["lm_head"] is None and p["lm_head_bits"] == 8
    model = onnx.load(str(tmp_path / "int4" / "decoder.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    (mm,) = [n for n in model.graph.node if n.name in head]
    assert inits[dq[mm.input[1]].input[0]].data_type == onnx.TensorProto.INT8
    assert {inits[n.input[0]].data_type for n in dq.values() if n is not dq[mm.input[1]]} == {onnx.TensorProto.INT4}
    images = [s.image for s in scenes("test", 0, 4)]
    ref = [g.ids for g in Pipeline(load_bundle(vit_gpt2)).caption(images, return_ids=True)]
    got = [g.ids for g in Pipeline(load_bundle(tmp_path / "int4")).caption(images, return_ids=True)]
    assert all(got) and wo.token_agreement(ref, got) >= 0.5


def test_matmulnbits_form_equals_the_qdq_form(shapes, step_feeds):
    outs = {}
    for fmt in wo.FORMATS:
        model, nodes = wo.quantize_model(onnx.load(str(shapes / "decoder.onnx")), 4, 64, "rtn", fmt, lm_head=True)
        assert nodes
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        outs[fmt] = [sess.run(None, {i.name: f[i.name] for i in sess.get_inputs()}) for f in step_feeds[:4]]
    for a, b in zip(outs["qdq"], outs["matmulnbits"]):
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)


def test_gptq_layer_error_below_round_to_nearest(shapes, step_feeds):
    model = onnx.load(str(shapes / "decoder.onnx"))
    targets = dict(list(wo.weight_matmuls(model, lm_head=False).items())[:8])
    inputs = {n.name: n.input[0] for n in model.graph.node if n.name in targets}
    hs = wo.hessians(model, step_feeds, set(inputs.values()))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    wins = 0
    for node, (weight, transposed) in targets.items():
        w, h = inits[weight].T if transposed else inits[weight], hs[inputs[node]]
        e_rtn = wo.layer_error(w, *wo.rtn(w, 4, 32), 32, h)
        e_gptq = wo.layer_error(w, *wo.gptq(w, h, 4, 32), 32, h)
        wins += e_gptq < e_rtn
        assert e_gptq < 1.05 * e_rtn, node
    assert wins >= 0.9 * len(targets)


def _cli(capsys, *args):
    code = main(["quantize", *map(str, args)])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_bad_weight_only_options_are_one_line(shapes, tmp_path, capsys):
    out = tmp_path / "o"
    assert _cli(capsys, shapes, "--precision", "int4-wo", "--block-size", "48", "--out", out) == (
        2, "error: --block-size: 48 is not one of 32, 64, 128")
    code, err = _cli(capsys, shapes, "--precision", "int4-wo", "--graphs", "decoder,lm", "--out", out)
    assert code == 2 and err.startswith("error: --graphs: the bundle has no graph 'lm' (it has vision_encoder")
    assert _cli(capsys, shapes, "--precision", "int8-wo", "--method", "entropy", "--out", out) == (
        2, "error: --method: 'entropy' is not one of rtn, gptq (for int8-wo)")
    assert _cli(capsys, shapes, "--precision", "int8-wo", "--format", "awq", "--out", out) == (
        2, "error: --format: 'awq' is not one of qdq, matmulnbits")
    assert not out.exists()
