"""Exported bundles: validation results, graph rules, the manifest contract.
(Token equality with PyTorch through the runtime is in tests/runtime/test_generation.py.)"""

import onnx
from onnx import numpy_helper
import pytest

from families import BLIP2_FAMILIES, BLOCK_FAMILIES, FAMILIES, IDEFICS_FAMILIES, MROPE_FAMILIES, PREFIX_FAMILIES
from vlmedge.models.registry import ARCHITECTURES
from vlmedge.runtime.bundle import GRAPH_NAMES, load_bundle, parse_manifest

ALL = [*FAMILIES, "shapes-vlm"]


def test_every_architecture_has_a_tiny_family():
    covered = {arch for arch, _, _ in FAMILIES.values()} | {"ShapesVLM"}
    covered |= {"Florence2ForConditionalGeneration"}  # its tiny model and tests: tests/florence/
    covered |= {arch for arch, _, _ in PREFIX_FAMILIES.values()}  # decoder-only: tests/export/test_prefix_families.py
    covered |= {arch for arch, _, _ in BLOCK_FAMILIES.values()}  # bidirectional blocks: tests/export/test_block_families.py
    covered |= {arch for arch, _, _ in MROPE_FAMILIES.values()}  # M-RoPE: tests/export/test_mrope_families.py
    covered |= {arch for arch, _, _ in BLIP2_FAMILIES.values()}  # BLIP-2, InstructBLIP: tests/export/test_blip2_families.py
    covered |= {arch for arch, _, _ in IDEFICS_FAMILIES.values()}  # gated cross-attention: tests/export/test_idefics.py
    covered |= {"CLIPModel", "SiglipModel", "Siglip2Model"}  # dual encoders: tests/encoders/tiny.py
    covered |= {"ViltForQuestionAnswering", "ViltForImageAndTextRetrieval", "BridgeTowerForImageAndTextRetrieval",
                "BridgeTowerForContrastiveLearning"}  # fusion encoders: tests/encoders/tiny_fusion.py
    assert covered == set(ARCHITECTURES)


@pytest.mark.parametrize("name", ALL)
def test_export_validation_passed(bundles, name):
    _, manifest, _ = bundles[name]
    v = manifest.validation
    assert v["passed"], v["failures"]
    for task, r in v["tokens"].items():
        assert r["images"] >= 8 and r["agree_batched"] == r["images"] and r["agree_batch1"] == r["images"]
    for graph, outs in v["graphs"].items():
        for out, e in outs.items():
            assert e["max_abs"] <= 1e-4 * max(1.0, e["ref_max"]), (graph, out, e)


@pytest.mark.parametrize("name", ALL)
def test_every_weight_is_stored_once(bundles, name):
    """The graph files hold each weight once: cross_kv the cross K/V projections, the decoder the
    rest of the decoder (no graph per phase repeating it)."""
    from vlmedge.export.inspect import weight_report

    bundle = load_bundle(bundles[name][2])
    report = weight_report(bundle)
    data = sum((bundle.path / g.data).stat().st_size for g in bundle.manifest.graphs.values())
    assert report["stored_bytes"] <= 1.05 * report["unique_bytes"] and data <= 1.05 * report["unique_bytes"], report


@pytest.mark.parametrize("name", ALL)
def test_graphs_match_the_manifest(bundles, name):
    _, manifest, path = bundles[name]
    assert parse_manifest(__import__("json").loads((path / "manifest.json").read_text())) == load_bundle(path).manifest
    for gname, spec in manifest.graphs.items():
        assert gname in GRAPH_NAMES
        model = onnx.load(str(path / spec.file))
        ops = {n.op_type for n in model.graph.node}
        for f in model.functions:
            ops |= {n.op_type for n in f.node}
        assert not ops & {"If", "Loop", "Scan"}, (gname, ops & {"If", "Loop", "Scan"})
        assert model.opset_import[0].version >= 17 or any(o.version >= 17 for o in model.opset_import if o.domain == "")
        for declared, actual in ((spec.inputs, model.graph.input), (spec.outputs, model.graph.output)):
            assert [t.name for t in declared] == [a.name for a in actual] or (
                # a graph may leave out an input its family ignores (BLIP's cross-attention mask)
                [a.name for a in actual] == [t.name for t in declared if t.name in {a.name for a in actual}])
            by_name = {t.name: t for t in declared}
            for a in actual:
                dims = tuple(d.dim_param or d.dim_value for d in a.type.tensor_type.shape.dim)
                assert dims == by_name[a.name].shape, (gname, a.name, dims)
                for d in a.type.tensor_type.shape.dim:
                    assert d.dim_param or d.dim_value > 0  # every axis fixed or named
                    if d.dim_param:
                        assert d.dim_param in manifest.axes


def test_cross_kv_is_not_recomputed_per_step(bundles):
    """The decoder takes cross K/V as inputs: the cross K and V projections live only in cross_kv,
    and the decoder's weights only in the decoder (the prompt and every step run the one graph)."""
    _, manifest, path = bundles["shapes-vlm"]
    cross = onnx.load(str(path / manifest.graphs["cross_kv"].file))
    decoder = onnx.load(str(path / manifest.graphs["decoder"].file))
    L = manifest.dims["decoder_layers"]
    assert sum(1 for n in cross.graph.node if n.op_type == "MatMul") == 2 * L
    weights = lambda m: {numpy_helper.to_array(t).tobytes() for t in m.graph.initializer if len(t.raw_data) >= 1024}  # noqa: E731
    assert weights(cross) and weights(decoder) and not weights(cross) & weights(decoder)


def test_caption_prompt_is_part_of_the_bundle(tiny_models, tmp_path):
    from vlmedge.export.exporter import export_bundle
    from vlmedge.models.registry import load_adapter

    adapter = load_adapter(str(tiny_models["blip-caption"]), prompt="a small red circle")
    manifest = export_bundle(adapter, "caption", tmp_path / "b")
    ids = manifest.tasks["caption"]["prompt_ids"]
    assert len(ids) == 5 and ids[0] == adapter.bos_id  # [DEC] a small red circle
    assert manifest.validation["passed"], manifest.validation["failures"]
