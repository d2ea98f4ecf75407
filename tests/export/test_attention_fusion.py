"""The ONNX Runtime target's attention pass on graphs written the way the dynamo exporter writes
attention: the fused graph computes what the unfused one does, and what the pass cannot prove it
leaves alone."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from vlmedge.export.attention_fusion import fuse_attention
from vlmedge.runtime.backends.onnxruntime import session_options

HEADS, HEAD_DIM = 3, 8
HIDDEN = HEADS * HEAD_DIM


def _attention_graph(dtype=TensorProto.FLOAT, cache: bool = True, flatten_2d: bool = False,
                     probs_output: bool = False) -> onnx.ModelProto:
    """x (B, S, HIDDEN) -> attention over [past; new] keys and values (the cache, concatenated in the
    graph and returned) or over projected keys of x itself, with an additive mask (B, 1, 1, L)."""
    rng = np.random.default_rng(0)
    np_type = np.float16 if dtype == TensorProto.FLOAT16 else np.float32
    inits = [numpy_helper.from_array((rng.standard_normal((HIDDEN, HIDDEN)) * 0.3).astype(np_type), w)
             for w in ("wq", "wk", "wv")]
    inits += [numpy_helper.from_array(np.array([0, 0, HEADS, HEAD_DIM], np.int64), "split"),
              numpy_helper.from_array(np.array([0, 0, HIDDEN], np.int64), "merge"),
              numpy_helper.from_array(np.array([-1, HIDDEN], np.int64), "rows"),
              numpy_helper.from_array(np.array(HEAD_DIM ** -0.5, np_type), "scale")]
    nodes = [helper.make_node("MatMul", ["x", w], [p]) for w, p in (("wq", "q"), ("wk", "k"), ("wv", "v"))]
    for p in "qkv":
        nodes += [helper.make_node("Reshape", [p, "split"], [f"{p}4"]),
                  helper.make_node("Transpose", [f"{p}4"], [f"{p}h"], perm=[0, 2, 1, 3])]
    inputs = [helper.make_tensor_value_info("x", dtype, ["batch", "seq", HIDDEN]),
              helper.make_tensor_value_info("mask", dtype, ["batch", 1, 1, "total"])]
    outputs = []
    if cache:
        inputs += [helper.make_tensor_value_info(n, dtype, ["batch", HEADS, "past", HEAD_DIM]) for n in ("pk", "pv")]
        nodes += [helper.make_node("Concat", ["pk", "kh"], ["present_k"], axis=2),
                  helper.make_node("Concat", ["pv", "vh"], ["present_v"], axis=2),
                  helper.make_node("Transpose", ["present_k"], ["kt"], perm=[0, 1, 3, 2])]
        keys, values = "kt", "present_v"
        outputs += [helper.make_tensor_value_info(n, dtype, ["batch", HEADS, "total", HEAD_DIM])
                    for n in ("present_k", "present_v")]
    else:
        nodes.append(helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]))
        keys, values = "kt", "vh"
    nodes += [helper.make_node("MatMul", ["qh", keys], ["scores"]),
              helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
              helper.make_node("Add", ["scaled", "mask"], ["masked"]),
              helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", values], ["ctx"]),
              helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ctx_t", "rows" if flatten_2d else "merge"], ["out"])]
    outputs.insert(0, helper.make_tensor_value_info("out", dtype, None))
    if probs_output:
        outputs.append(helper.make_tensor_value_info("probs", dtype, None))
    graph = helper.make_graph(nodes, "attention", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return onnx.shape_inference.infer_shapes(model)


def _run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    opts = session_options(ort)  # (the process-wide thread pool, when an earlier pipeline made one)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feed)


def _feed(cache: bool, batch=2, seq=4, past=3, dtype=np.float32) -> dict:
    rng = np.random.default_rng(1)
    total = past + seq if cache else seq
    mask = np.zeros((batch, 1, 1, total), dtype)
    mask[0, ..., 0] = np.finfo(dtype).min  # the first key of the first row is padding
    feed = {"x": rng.standard_normal((batch, seq, HIDDEN)).astype(dtype), "mask": mask}
    if cache:
        feed |= {n: rng.standard_normal((batch, HEADS, past, HEAD_DIM)).astype(dtype) for n in ("pk", "pv")}
    return feed


def _ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("cache,flatten_2d,seq", [(True, False, 4), (True, False, 1), (False, False, 5),
                                                  (True, True, 2)])
def test_fused_attention_computes_what_the_graph_did(cache, flatten_2d, seq):
    """KV cache in (B, N, L, H) or keys projected in place, a mask that broadcasts over the query
    positions, a prompt or a single step, the output flattened to rows for a Gemm afterwards."""
    model = _attention_graph(cache=cache, flatten_2d=flatten_2d)
    feed = _feed(cache, seq=seq)
    want = _run(model, feed)
    assert fuse_attention(model) == 1
    ops = _ops(model)
    assert ops.count("MultiHeadAttention") == 1 and "Softmax" not in ops, ops
    got = _run(model, feed)
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
    names = {o.name for o in model.graph.output}
    assert names >= {"out"} and (not cache or names >= {"present_k", "present_v"})


@pytest.mark.parametrize("why", ["float16", "probabilities are an output"])
def test_what_the_pass_cannot_prove_is_left_alone(why):
    """float16 (ONNX Runtime's CPU MultiHeadAttention is float32), or a tensor inside the pattern
    that something else reads: the graph is not changed."""
    model = (_attention_graph(TensorProto.FLOAT16) if why == "float16" else _attention_graph(probs_output=True))
    before = model.SerializeToString()
    assert fuse_attention(model) == 0
    assert model.SerializeToString() == before
