"""The dual-encoder bundle: what export writes and validates, and the same trust checks as every bundle."""

import json
import shutil

import pytest

from vlmedge.errors import BundleError, ModelLoadError
from vlmedge.runtime.bundle import load_bundle


@pytest.mark.parametrize("name, activation, padding", [("clip", "softmax", "longest"), ("siglip", "sigmoid", "max_length"),
                                                       ("siglip2", "sigmoid", "max_length")])
def test_export_writes_a_validated_dual_encoder_bundle(name, activation, padding, encoder_bundles):
    adapter, manifest, path = encoder_bundles[name]
    raw = json.loads((path / "manifest.json").read_text())
    assert raw["contract"] == "dual-encoder" and raw["schema_version"] == 3
    assert sorted(raw["graphs"]) == ["image_encoder", "text_encoder"]
    files = {f.name for f in path.iterdir()}
    assert {"manifest.json", "tokenizer.json", "image_encoder.onnx", "text_encoder.onnx"} <= files
    assert files <= {"manifest.json", "tokenizer.json", "image_encoder.onnx", "text_encoder.onnx",
                     "image_encoder.onnx.data", "text_encoder.onnx.data"}  # (weights beside the graph, where it has them)
    for g in raw["graphs"].values():
        assert ("data_sha256" in g) == (g["file"] + ".data" in files)
    c = raw["tasks"]["classify"]
    assert c["activation"] == activation and c["template"] == "a photo of a {}."
    model = adapter.model
    assert c["logit_scale"] == pytest.approx(float(model.logit_scale.exp()), rel=1e-6)
    assert c["logit_bias"] == (pytest.approx(float(model.logit_bias)) if name != "clip" else 0.0)
    assert raw["tokenizer"]["padding"] == padding
    assert raw["tokenizer"]["max_length"] == model.config.text_config.max_position_embeddings
    ids = raw["graphs"]["text_encoder"]["inputs"][0]
    assert ids["shape"] == (["batch", 64] if name != "clip" else ["batch", "text_len"])
    v = raw["validation"]
    assert v["passed"] and v["tokenizer"]["equal"] and v["tokenizer"]["texts"] >= 10
    assert v["graphs"]["image_encoder"]["image_embeds"]["max_abs"] < 1e-5
    assert v["end_to_end"]["probabilities"]["max_abs"] < 1e-5
    assert load_bundle(path).manifest.contract == "dual-encoder"
    assert "preprocessing" in raw and ("shortest_edge" in raw["preprocessing"]) == (name == "clip")
    if name == "siglip2":  # NaFlex: patches, their mask and the patch grid; Gemma's tokenizer pads on the left
        assert [t["name"] for t in raw["graphs"]["image_encoder"]["inputs"]] == ["pixel_values", "pixel_attention_mask", "spatial_shapes"]
        assert raw["preprocessing"]["max_num_patches"] == 24 and raw["tokenizer"]["padding_side"] == "left"


def test_inspect_prints_the_contract(encoder_bundles, capsys):
    from vlmedge.cli import main

    assert main(["inspect", str(encoder_bundles["siglip"][2])]) == 0
    out = capsys.readouterr().out
    assert "contract dual-encoder" in out and "sigmoid" in out and "image_encoder" in out and "passed" in out


def _edit(src, tmp_path, change):
    dst = tmp_path / "b"
    shutil.copytree(src, dst)
    raw = json.loads((dst / "manifest.json").read_text())
    change(raw)
    (dst / "manifest.json").write_text(json.dumps(raw))
    return dst


@pytest.mark.parametrize("change, words", [
    (lambda m: m.update(schema_version=4), "schema_version 4 of the dual-encoder contract is not supported (this vlmedge reads 3); upgrade"),
    (lambda m: m["tasks"]["classify"].update(activation="relu"), "tasks.classify.activation"),
    (lambda m: m["tasks"]["classify"].update(logit_scale=float("nan")), "tasks.classify.logit_scale"),
    (lambda m: m["tasks"]["classify"].update(logit_scale=True), "tasks.classify.logit_scale"),
    (lambda m: m["tasks"]["classify"].update(template="no label here"), "tasks.classify.template"),
    (lambda m: m["tokenizer"].update(pad_id=10 ** 6), "tokenizer.pad_id"),
    (lambda m: m["tokenizer"].update(max_length=500), "tokenizer.max_length"),
    (lambda m: m["tokenizer"].update(file="../tokenizer.json"), "leaves the directory"),
    (lambda m: m["graphs"]["image_encoder"].update(file="/etc/passwd"), "absolute path"),
    (lambda m: m["graphs"]["image_encoder"]["outputs"][0].update(name="image_states"), "graphs.image_encoder.outputs"),
    (lambda m: m["graphs"]["image_encoder"]["inputs"][0].update(shape=["batch", 3, 64, 32]), "height is 32"),
    (lambda m: m["graphs"]["text_encoder"]["inputs"][0].update(shape=["batch", "nope"]), "axis 'nope' is not defined"),
    (lambda m: m["axes"].update(batch={"min": 1, "opt": 1, "max": 1 << 20}, text_len={"min": 1, "opt": 1, "max": 1 << 20}), "elements at its largest shape"),
    (lambda m: m["graphs"].update(decoder={}), "graphs.decoder"),
    (lambda m: m.pop("preprocessing"), "preprocessing: missing"),
    (lambda m: m["preprocessing"].update(patch_size=8), "preprocessing.patch_size"),
])
def test_a_bad_manifest_is_refused_in_one_line(change, words, encoder_bundles, tmp_path):
    path = _edit(encoder_bundles["clip"][2], tmp_path, change)
    with pytest.raises(BundleError) as e:
        load_bundle(path)
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_changed_graph_is_refused_by_its_hash(encoder_bundles, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(encoder_bundles["clip"][2], dst)
    with open(dst / "text_encoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="text_encoder.onnx: sha256 does not match"):
        load_bundle(dst)


def test_a_changed_weights_file_is_refused_by_its_hash(encoder_bundles, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(encoder_bundles["clip"][2], dst)
    data = dst / "image_encoder.onnx.data"
    if not data.is_file():
        pytest.skip("this exporter keeps the weights inside the graph file")
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="image_encoder.onnx.data: sha256 does not match"):
        load_bundle(dst)


def test_a_graph_swapped_for_the_other_is_refused_when_opened(encoder_bundles, tmp_path):
    import vlmedge
    from vlmedge.runtime.bundle import sha256_file

    dst = tmp_path / "b"
    shutil.copytree(encoder_bundles["clip"][2], dst)
    raw = json.loads((dst / "manifest.json").read_text())
    raw["graphs"]["text_encoder"] = {**raw["graphs"]["text_encoder"], "file": "image_encoder.onnx",
                                     **{k: v for k, v in raw["graphs"]["image_encoder"].items() if k.endswith("sha256")}}
    raw["graphs"]["text_encoder"]["sha256"] = sha256_file(dst / "image_encoder.onnx")
    (dst / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="not the graph manifest.json describes"):
        vlmedge.load(dst)


@pytest.mark.parametrize("change, words", [
    (lambda m: m["preprocessing"].update(height=32), "NaFlex (max_num_patches) takes patch_size and no height"),
    (lambda m: m["preprocessing"].pop("patch_size"), "NaFlex (max_num_patches) takes patch_size"),
    (lambda m: m["preprocessing"].update(max_num_patches=25), "pixel_values has 24 here, but the manifest's max_num_patches is 25"),
    (lambda m: m["tokenizer"].update(padding_side="middle"), "tokenizer.padding_side"),
])
def test_a_bad_naflex_manifest_is_refused(change, words, encoder_bundles, tmp_path):
    path = _edit(encoder_bundles["siglip2"][2], tmp_path, change)
    with pytest.raises(BundleError) as e:
        load_bundle(path)
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_clip_manifest_without_an_image_size_is_refused(encoder_bundles, tmp_path):
    path = _edit(encoder_bundles["clip"][2], tmp_path, lambda m: m["preprocessing"].pop("height"))
    with pytest.raises(BundleError, match="preprocessing.height: missing"):
        load_bundle(path)


def test_a_template_without_a_slot_is_refused_at_export(encoder_models):
    from vlmedge.models.registry import load_adapter

    with pytest.raises(ModelLoadError, match="template with {}"):
        load_adapter(str(encoder_models["clip"]), prompt="a photo")


def test_the_onnxruntime_target_is_refused_before_anything_is_written(encoder_models, tmp_path, capsys):
    from vlmedge.cli import main

    out = tmp_path / "b"
    assert main(["export", str(encoder_models["clip"]), "--out", str(out), "--target", "onnxruntime"]) == 2
    assert "portable target only" in capsys.readouterr().err and not out.exists()
