"""The ONNX Runtime target of the shipped shapes-vlm bundle: fused kernels, the same tokens as the
portable bundle, the target in the manifest, and `vlmedge build` refusing it."""

import json

import pytest

from vlmedge.cli import main
from vlmedge.data.scenes import pick_questions, scenes
from vlmedge.errors import BundleError, InputError
from vlmedge.export.ort_target import fused_counts, retarget
from vlmedge.runtime.bundle import MANIFEST, load_bundle, parse_manifest
from vlmedge.runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def portable_and_ort(tmp_path_factory):
    from vlmedge.export.exporter import export_bundle
    from vlmedge.models.registry import load_adapter

    root = tmp_path_factory.mktemp("ort-target")
    export_bundle(load_adapter("shapes-vlm"), "all", root / "portable")
    entry = retarget(root / "portable", root / "ort")
    return root / "portable", root / "ort", entry


def _softmaxes(path) -> int:
    import onnx

    return sum(n.op_type == "Softmax" for n in onnx.load(str(path), load_external_data=False).graph.node)


def _inputs(path) -> list[str]:
    import onnx

    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]


def test_every_graph_has_fused_attention_layer_norms_and_gelus(portable_and_ort):
    portable, ort, entry = portable_and_ort
    m = load_bundle(ort).manifest
    assert set(m.graphs) == {"vision_encoder", "text_encoder", "cross_kv", "decoder"}
    for name in set(m.graphs) - {"cross_kv"}:  # (cross_kv: the K/V projections, nothing to fuse)
        counts = fused_counts(ort / m.graphs[name].file)
        assert counts.get("SkipLayerNormalization", 0) > 0 and counts.get("BiasGelu", 0) > 0, (name, counts)
        # every attention (one Softmax each) is one MultiHeadAttention node; none is left unfused
        attentions = _softmaxes(portable / m.graphs[name].file)
        assert attentions > 0 and counts.get("MultiHeadAttention") == attentions, (name, counts)
        assert _softmaxes(ort / m.graphs[name].file) == 0
        assert counts == entry["fused_nodes"][name]
        assert fused_counts(portable / m.graphs[name].file) == {}  # the portable graphs keep standard ops
    assert m.validation["onnxruntime_target"]["token_agreement"] == {"caption": "4/4", "vqa": "4/4"}


def test_same_tokens_as_the_portable_bundle(portable_and_ort):
    portable, ort, _ = portable_and_ort
    picked = list(scenes("test", 0, 6))
    images = [s.image for s in picked]
    questions = [pick_questions(s)[i % 5].text for i, s in enumerate(picked)]
    a, b = Pipeline(load_bundle(portable), "cpu"), Pipeline(load_bundle(ort), "cpu")
    for run in (lambda p: p.caption(images, return_ids=True), lambda p: p.vqa(images, questions, return_ids=True),
                lambda p: p.caption(images[:2], return_ids=True, num_beams=3)):
        want, got = [g.ids for g in run(a)], [g.ids for g in run(b)]
        assert got == want and all(len(ids) > 0 for ids in got)


def test_the_manifest_records_the_target_and_old_bundles_are_portable(portable_and_ort):
    portable, ort, _ = portable_and_ort
    assert load_bundle(ort).manifest.target == "onnxruntime"
    raw = json.loads((portable / MANIFEST).read_text())
    assert raw["target"] == "tensorrt-portable"
    del raw["target"]  # a bundle written before targets existed
    assert parse_manifest(raw).target == "tensorrt-portable"
    raw["target"] = "tensorrt"
    with pytest.raises(BundleError, match=r"target.*tensorrt-portable") as e:
        parse_manifest(raw)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="already an ONNX Runtime-target bundle"):
        retarget(ort, ort.parent / "again")


def test_build_refuses_an_onnxruntime_target_bundle_in_one_line(portable_and_ort, tmp_path, capsys):
    _, ort, _ = portable_and_ort
    assert main(["build", str(ort), "--out", str(tmp_path / "engines")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ONNX Runtime-target bundle" in err and "'onnxruntime'" in err, err
    assert not (tmp_path / "engines").exists()


def test_an_unknown_target_is_one_line(tmp_path, capsys):
    assert main(["export", "shapes-vlm", "--out", str(tmp_path / "b"), "--target", "tensorrt"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--target" in err and "onnxruntime" in err, err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("family", ["blip-vqa", "vit-gpt2"])
def test_hugging_face_families_get_their_decoder_attention_fused(bundles, family, tmp_path):
    """BLIP's decoder (whose graphs keep the encoder_mask input it ignores) and GPT-2's (Conv1D
    layers flattened to rows around a Gemm, cross-attention): every decoder attention is fused, the
    graph inputs stay the bundle contract's, and greedy tokens stay those of the portable bundle."""
    _, _, portable = bundles[family]
    entry = retarget(portable, tmp_path / "ort")
    src, out = load_bundle(portable), load_bundle(tmp_path / "ort")
    for name in ("decoder",):
        attentions = _softmaxes(portable / src.manifest.graphs[name].file)
        assert attentions > 0 and entry["fused_nodes"][name].get("MultiHeadAttention") == attentions, (name, entry)
        assert _inputs(out.path / out.manifest.graphs[name].file) == _inputs(portable / src.manifest.graphs[name].file)
    assert set(entry["token_agreement"].values()) == {"4/4"}
