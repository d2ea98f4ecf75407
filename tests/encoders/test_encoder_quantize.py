"""`vlmedge quantize` of dual-encoder bundles: FP16 and INT8 variants, checked against FP32 on held-out images
(cosine of embeddings, zero-shot agreement and accuracy, recall@1/5), refused when the check fails."""

import json

import numpy as np
import pytest

import vlmedge
from vlmedge.cli import main

CALIB = ["--calib", "synthetic:8", "--held-out", "16"]


def test_fp16_variant_passes_its_check_and_runs(encoder_bundles, encoder_pipes, scene_images, tmp_path, capsys):
    out = tmp_path / "clip-fp16"
    assert main(["quantize", str(encoder_bundles["clip"][2]), "--precision", "fp16", "--out", str(out), *CALIB]) == 0
    assert "zero-shot agreement with FP32" in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    p = m["precision"]
    assert p["dtype"] == "float16" and p["accuracy"]["passed"] and p["accuracy"]["cosine"]["image_mean"] > 0.999
    assert {"recall@1", "recall@5", "zero_shot_accuracy"} <= set(p["accuracy"]["variant"])
    assert p["calibration"]["held_out_images"] == 16
    import onnx

    g = onnx.load(str(out / "image_encoder.onnx"))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in g.graph.initializer)
    pipe = vlmedge.load(out)
    np.testing.assert_allclose(pipe.embed_images(scene_images), encoder_pipes["clip"].embed_images(scene_images), atol=2e-2)
    labels = ["red circle", "blue square"]
    assert len(pipe.classify(scene_images[0], labels)) == 2


def test_int8_variant_is_qdq_and_close_in_cosine(encoder_bundles, tmp_path):
    out = tmp_path / "siglip-int8"
    assert main(["quantize", str(encoder_bundles["siglip"][2]), "--precision", "int8", "--out", str(out), *CALIB,
                 "--budget", "100"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    acc = m["precision"]["accuracy"]
    assert m["precision"]["dtype"] == "int8" and acc["cosine"]["image_mean"] >= 0.98 and acc["cosine"]["text_mean"] >= 0.98
    import onnx

    ops = {n.op_type for n in onnx.load(str(out / "text_encoder.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert vlmedge.load(out).embed_texts("a cat").shape == (vlmedge.load(out).dim,)


def test_a_variant_that_fails_its_check_is_not_written(encoder_bundles, tmp_path, capsys, monkeypatch):
    """A cosine floor INT8 cannot reach (its error is ~1e-4 on these models) refuses the variant: nothing is written."""
    from vlmedge.calibration import dual_encoder

    monkeypatch.setitem(dual_encoder.FLOORS, "int8", 0.99999)
    out = tmp_path / "clip-int8"
    assert main(["quantize", str(encoder_bundles["clip"][2]), "--precision", "int8", "--out", str(out), *CALIB,
                 "--budget", "100"]) == 2
    errors = [e for e in capsys.readouterr().err.strip().splitlines() if e.startswith("error:")]  # (and the progress log)
    assert len(errors) == 1 and "fails its check: image embeddings: mean cosine to FP32" in errors[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".clip-int8.tmp")]


@pytest.mark.parametrize("args, words", [
    (["--precision", "int4-wo"], "a dual-encoder bundle has fp16 and int8 variants"),
    (["--precision", "fp16", "--method", "minmax"], "applies to int8"),
])
def test_bad_options_are_one_line(args, words, encoder_bundles, tmp_path, capsys):
    assert main(["quantize", str(encoder_bundles["clip"][2]), "--out", str(tmp_path / "x"), *CALIB, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1


def test_compare_shows_the_variants_against_fp32(encoder_bundles, tmp_path, capsys):
    ref = encoder_bundles["siglip"][2]
    fp16 = tmp_path / "siglip-fp16"
    assert main(["quantize", str(ref), "--precision", "fp16", "--out", str(fp16), *CALIB]) == 0
    out = tmp_path / "cmp"
    assert main(["compare", str(ref), str(fp16), "--eval", "synthetic:12", "--out", str(out), "--runs", "2"]) == 0
    assert "dual-encoder variants" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    first, second = report["bundles"]
    assert first["zero_shot_agreement"] == 1.0 and first["cosine"]["image_mean"] == pytest.approx(1.0, abs=1e-6)
    assert second["precision"] == "float16" and second["cosine"]["image_mean"] > 0.999
    assert {"recall@1", "recall@5", "zero_shot_accuracy", "image_ms", "text_ms"} <= set(second)
    assert "| siglip-fp16 | float16 |" in (out / "report.md").read_text()


def test_compare_refuses_another_model(encoder_bundles, tmp_path, capsys):
    assert main(["compare", str(encoder_bundles["clip"][2]), str(encoder_bundles["siglip"][2]), "--eval", "synthetic:4",
                 "--out", str(tmp_path / "cmp")]) == 2
    assert "not a variant of" in capsys.readouterr().err
