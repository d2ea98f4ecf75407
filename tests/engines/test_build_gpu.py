"""On a GPU with TensorRT (marked `gpu`; skipped elsewhere): engines of the shipped model in every
precision caption and answer like ONNX Runtime FP32, within the precision budgets."""

import pytest

import vlmedge
from vlmedge.calibration.quantize import QuantizeOptions, quantize_bundle
from vlmedge.evaluation.scene_eval import evaluate_pipeline, evaluation_set
from vlmedge.runtime.bundle import load_bundle
from vlmedge.runtime.decoding import Timings
from vlmedge.runtime.pipeline import Pipeline

BUDGET_VQA = {"fp32": 0.003, "fp16": 0.003, "int8": 0.01}  # FP16 within 0.3 points, INT8 within the default budget


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engines_of_every_precision_match_onnxruntime_fp32(bundles, tmp_path, precision):
    pytest.importorskip("tensorrt")
    from vlmedge.tensorrt.builder import build_engines

    src = bundles["shapes-vlm"][2]
    bundle = src
    if precision != "fp32":
        bundle = tmp_path / precision
        quantize_bundle(src, bundle, QuantizeOptions(precision, calib="synthetic:64"))
    engines = tmp_path / "engines"
    em = build_engines(bundle, engines)
    assert em["precision"] == load_bundle(bundle).manifest.precision["dtype"]
    es = evaluation_set("test", 200)
    ref = Pipeline(load_bundle(src))
    trt = vlmedge.load(engines, device="tensorrt")
    images = [s.image for s in es.scenes]
    got, want = trt.caption(images), ref.caption(images)
    agree = sum(a == b for a, b in zip(got, want)) / len(want)
    if precision != "int8":
        assert agree >= 0.9
    r_trt, r_ort = evaluate_pipeline(trt, es), evaluate_pipeline(ref, es)
    assert r_ort["vqa"]["accuracy"] - r_trt["vqa"]["accuracy"] <= BUDGET_VQA[precision]
    assert r_ort["caption"]["bleu4"] - r_trt["caption"]["bleu4"] <= (0.01 if precision == "fp16" else 0.02)
    t = Timings()
    trt.caption(images[0], timings=t)
    print(f"{precision}: caption agreement {agree:.1%}, per token {1000 * sum(t.tokens) / max(1, len(t.tokens)):.3f} ms")
