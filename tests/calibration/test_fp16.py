"""FP16 graph conversion: every graph of every family converts, loads in ONNX Runtime (CPU) and stays
close to FP32 on real inputs; kept nodes stay FP32; overflow is found."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vlmedge.calibration import fp16
from vlmedge.calibration.fp16 import NO_KERNEL, REQUESTED, convert_for_cpu, cpu_unsupported, overflow_nodes, to_fp16
from vlmedge.errors import InputError
from vlmedge.export.samples import sample_inputs
from vlmedge.runtime.backends.onnxruntime import OrtBackend
from vlmedge.runtime.bundle import kv_names, load_bundle

FAMILIES = ("blip-caption", "blip-vqa", "vit-gpt2", "vit-bert", "shapes-vlm")
# max abs error / max(1, |FP32| max) over a graph's outputs. Measured (onnxruntime 1.32 CPU, 4
# images, padded questions): 4e-4 .. 2.1e-3; a wrong weight, mask or cast is off by O(1).
TOL = 1e-2
_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


def _feeds(adapter, path) -> dict[str, dict[str, np.ndarray]]:
    """Real inputs of every graph: scenes (and padded questions) through the FP32 graphs."""
    bundle = load_bundle(path)
    m, be = bundle.manifest, OrtBackend(bundle)
    vqa = "text_encoder" in m.graphs
    s = sample_inputs(adapter, 4, ["vqa"] if vqa else ["caption"])
    px = s.pixel_values.numpy()
    feeds = {"vision_encoder": {"pixel_values": px}}
    states = be.run("vision_encoder", feeds["vision_encoder"])["image_states"]
    mask = np.ones(states.shape[:2], dtype=np.int64)
    if vqa:
        mask = s.question_mask.numpy()
        feeds["text_encoder"] = {"question_ids": s.question_ids.numpy(), "question_mask": mask, "image_states": states}
        states = be.run("text_encoder", feeds["text_encoder"])["encoder_states"]
    prompt = m.tasks["vqa" if vqa else "caption"]["prompt_ids"]
    feeds["cross_kv"] = {"encoder_states": states}
    cross = be.run("cross_kv", feeds["cross_kv"])
    B, n, L = len(px), len(prompt), m.dims["decoder_layers"]
    empty = np.zeros((B, m.dims["decoder_heads"], 1, m.dims["decoder_head_dim"]), np.float32)
    attention = np.concatenate([np.zeros((B, 1), np.int64), np.ones((B, n), np.int64)], 1)
    first = be.run("decoder", {"input_ids": np.array([prompt] * B, dtype=np.int64), "attention_mask": attention,
                               "position_ids": np.tile(np.arange(n), (B, 1)), "encoder_mask": mask, **cross,
                               **{p: empty for p in kv_names("past", L)}})
    # the decoder's feeds: a step after the prompt (past.* from present.*, cross.* as they are)
    feeds["decoder"] = {"input_ids": first["logits"].argmax(-1)[:, None].astype(np.int64),
                        "attention_mask": np.concatenate([attention, np.ones((B, 1), np.int64)], 1),
                        "position_ids": np.full((B, 1), n), "encoder_mask": mask, **cross,
                        **{p: first[p.replace("past", "present")] for p in kv_names("past", L)}}
    return {g: (onnx.load(str(bundle.graph_path(g))), f) for g, f in feeds.items()}


@pytest.fixture(scope="module")
def graphs(bundles):
    """family -> graph -> (FP32 model, real feeds)."""
    return {name: _feeds(adapter, path) for name, (adapter, _, path) in bundles.items()}


def _run(model: onnx.ModelProto, feed: dict) -> dict[str, np.ndarray]:
    sess = fp16._session(model)
    values = sess.run(None, {i.name: feed[i.name].astype(_NP[i.type]) for i in sess.get_inputs()})
    return dict(zip([o.name for o in sess.get_outputs()], values))


def _error(ref: dict, got: dict) -> float:
    assert got.keys() == ref.keys()
    return max(float(np.abs(ref[k].astype(np.float64) - got[k]).max() / max(1.0, np.abs(ref[k]).max())) for k in ref)


def _io_types(model) -> dict[str, int]:
    return {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}


def _check_initializers(fp32, converted, kept):
    readers = {}
    for n in fp32.graph.node:
        for x in n.input:
            readers.setdefault(x, set()).add(n.name)
    only_kept = {t.name for t in fp32.graph.initializer if readers.get(t.name) and readers[t.name] <= set(kept)}
    want = {t.name: TensorProto.FLOAT if t.name in only_kept else TensorProto.FLOAT16
            for t in fp32.graph.initializer if t.data_type == TensorProto.FLOAT}
    got = {t.name: t.data_type for t in converted.graph.initializer if t.name in want}
    assert got == want


@pytest.mark.parametrize("io_dtype", ["float32", "float16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_graph_converts_and_matches_fp32(graphs, family, io_dtype):
    for name, (model, feed) in graphs[family].items():
        converted, kept = convert_for_cpu(model, io_dtype=io_dtype)
        onnx.checker.check_model(converted, full_check=True)
        assert set(kept.values()) <= {NO_KERNEL}  # onnxruntime 1.32 refuses none: it casts around itself
        _check_initializers(model, converted, kept)
        io = TensorProto.FLOAT16 if io_dtype == "float16" else TensorProto.FLOAT
        assert _io_types(converted) == {k: io if t == TensorProto.FLOAT else t for k, t in _io_types(model).items()}
        err = _error(_run(model, feed), _run(converted, feed))
        assert err <= TOL, f"{family} {name}: error {err:.3g}"


def _weighted(model, op):
    """The first node of type `op` with a weight; None where the graph has none (cross_kv: no LayerNorm)."""
    inits = {t.name for t in model.graph.initializer}
    return next((n.name for n in model.graph.node if n.op_type == op and any(x in inits for x in n.input)), None)


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_nodes_run_in_fp32(graphs, family):
    for name, (model, feed) in graphs[family].items():
        # a LayerNorm, a weight MatMul/Gemm and the node that makes the first output (renamed inside)
        producer = {y: n.name for n in model.graph.node for y in n.output}
        gemm = "Gemm" if any(n.op_type == "Gemm" for n in model.graph.node) else "MatMul"
        keep = {_weighted(model, "LayerNormalization"), _weighted(model, gemm), producer[model.graph.output[0].name]} - {None}
        converted, kept = convert_for_cpu(model, keep_fp32=keep, io_dtype="float16")
        assert {n: kept[n] for n in keep} == {n: REQUESTED for n in keep}
        onnx.checker.check_model(converted, full_check=True)
        _check_initializers(model, converted, kept)
        err = _error(_run(model, feed), _run(converted, feed))
        assert err <= TOL, f"{family} {name}: error {err:.3g}"


def test_every_node_kept_is_fp32_inside(graphs):
    model, feed = graphs["vit-gpt2"]["decoder"]
    converted = to_fp16(model, keep_fp32=[n.name for n in model.graph.node], io_dtype="float16")
    onnx.checker.check_model(converted, full_check=True)
    assert all(t.data_type != TensorProto.FLOAT16 for t in converted.graph.initializer)
    assert _error(_run(model, feed), _run(converted, feed)) <= 1e-3  # only the float16 I/O rounds


@pytest.mark.parametrize("family", FAMILIES)
def test_no_activation_overflows_on_real_inputs(graphs, family):
    for name, (model, feed) in graphs[family].items():
        found = overflow_nodes(model, [feed])
        # only the attention masks' finfo(float32).min (BLIP's padded questions), which float16
        # clips to -65504; no activation comes near float16's range
        assert all(v >= 1e38 for v in found.values()), f"{family} {name}: {found}"


def _tiny() -> onnx.ModelProto:
    """Every way a graph makes float32 by itself, an additive -1e9 mask and a float Range."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])
    m = helper.make_tensor_value_info("m", TensorProto.INT64, [3, 3])
    nodes = [
        helper.make_node("Constant", [], ["two"], name="two", value_float=2.0),
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("ConstantOfShape", ["shape"], ["zeros"], name="zeros"),  # default value: float32 0
        helper.make_node("Cast", ["m"], ["mf"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["mf", "min"], ["bias"], name="bias"),
        helper.make_node("Add", ["x", "bias"], ["scores"], name="masked"),
        helper.make_node("Softmax", ["scores"], ["p"], name="softmax"),
        helper.make_node("Mul", ["p", "two"], ["p2"], name="double"),
        helper.make_node("Add", ["p2", "zeros"], ["y"], name="plus_zeros"),
        helper.make_node("Range", ["start", "limit", "delta"], ["r"], name="range"),
    ]
    inits = [numpy_helper.from_array(np.array(v, np.float32), n)
             for n, v in [("min", -1e9), ("start", 0.0), ("limit", 3.0), ("delta", 1.0)]]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 3]),
            helper.make_tensor_value_info("r", TensorProto.FLOAT, [3])]
    return _model(nodes, [x, m], outs, inits)


def _model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_constants_casts_and_masks():
    model = _tiny()
    feed = {"x": np.random.default_rng(0).standard_normal((3, 3)).astype(np.float32),
            "m": np.array([[0, 0, 1], [1, 1, 0], [1, 1, 1]])}  # the last row fully masked
    converted, kept = convert_for_cpu(model, io_dtype="float16")
    assert kept == {"range": "Range has no float16 in ONNX"}
    onnx.checker.check_model(converted, full_check=True)
    inits = {t.name: numpy_helper.to_array(t) for t in converted.graph.initializer}
    assert inits["min"].dtype == np.float16 and inits["min"] == -65504  # clipped, not -inf
    assert inits["start"].dtype == np.float32  # read by the kept Range only
    node = {n.name: n for n in converted.graph.node}
    assert numpy_helper.to_array(node["two"].attribute[0].t).dtype == np.float16
    assert numpy_helper.to_array(node["zeros"].attribute[0].t).dtype == np.float16
    assert node["cast"].attribute[0].i == TensorProto.FLOAT16
    ref, got = _run(model, feed), _run(converted, feed)
    assert np.isfinite(got["y"]).all()  # -inf would make the fully masked row NaN
    assert _error({k: v[:2] for k, v in ref.items()}, {k: v[:2] for k, v in got.items()}) <= 2e-3


def test_cpu_unsupported_keeps_every_node_of_a_refused_kind(monkeypatch):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    nodes = [helper.make_node("Tanh", ["x"], ["a"], name="t1"), helper.make_node("Tanh", ["a"], ["b"], name="t2"),
             helper.make_node("Neg", ["b"], ["y"], name="neg")]
    model = _model(nodes, [x], [y])
    real, tries = fp16._session, []

    def session(m, optimize=True):  # an onnxruntime without float16 Tanh
        tries.append(m)
        types = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(m).graph.value_info}
        for n in m.graph.node:
            if n.op_type == "Tanh" and types[n.output[0]] == TensorProto.FLOAT16:
                raise RuntimeError(f"[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation "
                                   f"for Tanh(13) node with name '{n.name}'")
        return real(m, optimize)

    monkeypatch.setattr(fp16, "_session", session)
    assert cpu_unsupported(model) == {"t1": NO_KERNEL, "t2": NO_KERNEL}
    assert len(tries) == 2  # one refusal kept both Tanh nodes


def test_overflow_nodes_finds_a_product_beyond_fp16():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    nodes = [helper.make_node("Mul", ["x", "k"], ["big"], name="times_1e5"),
             helper.make_node("Div", ["big", "k"], ["y"], name="back")]
    k = numpy_helper.from_array(np.array(1e5, np.float32), "k")
    model = _model(nodes, [x], [y], [k])
    feeds = [{"x": np.array([0.1, 0.2], np.float32)}, {"x": np.array([1.0, -3.0], np.float32)}]
    found = overflow_nodes(model, feeds)
    assert found.keys() == {"times_1e5"} and found["times_1e5"] == pytest.approx(3e5)
    assert overflow_nodes(model, feeds[:1]) == {}
    assert overflow_nodes(model, [{"x": np.array([np.inf, 0], np.float32)}]).keys() == {"times_1e5", "back"}


def test_bad_arguments_name_the_field():
    with pytest.raises(InputError, match="io_dtype"):
        to_fp16(_tiny(), io_dtype="bfloat16")
    with pytest.raises(InputError, match="keep_fp32: .*'nope'"):
        to_fp16(_tiny(), keep_fp32=["nope"])
