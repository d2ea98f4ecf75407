"""`vlmedge quantize --precision int8 --method dynamic --target onnxruntime`: ONNX Runtime's dynamic INT8
(MatMulInteger), checked on held-out data like every variant, and kept off the portable bundle."""

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from vlmedge.calibration.int8 import gemm_as_matmul, quantize_graph_dynamic
from vlmedge.calibration.quantize import QuantizeOptions, quantize_bundle
from vlmedge.cli import main
from vlmedge.data.scenes import pick_questions, scenes
from vlmedge.errors import InputError
from vlmedge.export.ort_target import fused_counts
from vlmedge.runtime.bundle import load_bundle
from vlmedge.runtime.pipeline import Pipeline


def _ops(path):
    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


@pytest.fixture(scope="module")
def shapes_dynamic(bundles, tmp_path_factory):
    src = bundles["shapes-vlm"][2]
    out = tmp_path_factory.mktemp("dyn") / "int8-dynamic"
    quantize_bundle(src, out, QuantizeOptions("int8", method="dynamic", calib="synthetic:12", held_out=12))
    return src, out


def test_dynamic_int8_keeps_accuracy_and_is_an_onnxruntime_bundle(shapes_dynamic):
    src, out = shapes_dynamic
    m = load_bundle(out).manifest
    p = m.precision
    assert m.target == "onnxruntime" and p["dtype"] == "int8" and p["method"] == "dynamic"
    assert p["accuracy"]["within_budget"] and sum(p["nodes"].values()) > 80
    assert p["accuracy"]["fp32"]["vqa_accuracy"] - p["accuracy"]["int8"]["vqa_accuracy"] <= 0.01
    for g in m.graphs.values():
        ops = _ops(out / g.file)
        assert ops["MatMulInteger"] > 0 and ops["DynamicQuantizeLinear"] > 0, g.file
        assert ops["QuantizeLinear"] == 0 and ops["DequantizeLinear"] == 0, g.file  # no calibrated ranges
    size = lambda d: sum(f.stat().st_size for f in d.iterdir() if f.is_file())  # noqa: E731
    assert size(out) <= 0.4 * size(src)
    s = next(scenes("test", 300, 1))
    q = pick_questions(s)[0]
    pipe = Pipeline(load_bundle(out))
    assert pipe.caption(s.image) == s.caption and pipe.vqa(s.image, q.text) == q.answer


def test_gpt2_gemm_layers_become_matmuls_with_the_same_outputs_and_get_quantized(bundles, tmp_path):
    bundle = load_bundle(bundles["vit-gpt2"][2])
    src = bundle.graph_path("decoder")
    model = onnx.load(str(src))
    gemms = sum(n.op_type == "Gemm" for n in model.graph.node)
    assert gemms > 0 and gemm_as_matmul(model) == gemms
    assert not any(n.op_type == "Gemm" for n in model.graph.node)
    onnx.save(model, str(tmp_path / "matmul.onnx"))
    a = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(tmp_path / "matmul.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    shapes = {i.name: [d if isinstance(d, int) else 2 for d in i.shape] for i in a.get_inputs()}
    shapes["attention_mask"][1] = 4  # the past's 2 slots and the 2 tokens
    feeds = {i.name: (rng.integers(0, 5, shapes[i.name]) if "int" in i.type else rng.standard_normal(shapes[i.name]))
             .astype(np.int64 if "int" in i.type else np.float32) for i in a.get_inputs()}
    for x, y in zip(a.run(None, feeds), b.run(None, feeds)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    nodes = quantize_graph_dynamic(src, tmp_path / "dynamic.onnx")
    assert len(nodes) >= gemms - 1 and _ops(tmp_path / "dynamic.onnx")["MatMulInteger"] == len(nodes)


def _cli(capsys, *args):
    code = main(["quantize", *map(str, args)])
    return code, capsys.readouterr()


def test_cli_dynamic_needs_the_onnxruntime_target_then_fuses_and_build_refuses(bundles, tmp_path, capsys):
    src = bundles["shapes-vlm"][2]
    code, out = _cli(capsys, src, "--precision", "int8", "--method", "dynamic", "--out", tmp_path / "p")
    err = out.err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--method dynamic" in err and "--target onnxruntime" in err, err
    assert not (tmp_path / "p").exists()
    code, out = _cli(capsys, src, "--precision", "int8", "--method", "dynamic", "--target", "onnxruntime",
                     "--calib", "synthetic:6", "--held-out", 6, "--out", tmp_path / "o")
    assert code == 0, out.err
    m = load_bundle(tmp_path / "o").manifest
    assert m.target == "onnxruntime" and m.precision["method"] == "dynamic"
    assert m.validation["onnxruntime_target"]["token_agreement"] == {"caption": "4/4", "vqa": "4/4"}
    ops = _ops(tmp_path / "o" / m.graphs["decoder"].file)
    assert ops["MatMulInteger"] > 0 and fused_counts(tmp_path / "o" / m.graphs["decoder"].file)["SkipLayerNormalization"] > 0
    assert main(["build", str(tmp_path / "o"), "--out", str(tmp_path / "engines")]) != 0
    assert "ONNX Runtime-target bundle" in capsys.readouterr().err and not (tmp_path / "engines").exists()


def test_dynamic_is_an_int8_method_only(bundles, tmp_path):
    with pytest.raises(InputError, match="--method dynamic.*--precision int8"):
        quantize_bundle(bundles["shapes-vlm"][2], tmp_path / "o", QuantizeOptions("fp16", method="dynamic"))
    assert not (tmp_path / "o").exists()
