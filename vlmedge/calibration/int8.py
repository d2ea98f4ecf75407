"""INT8 by explicit quantization: Q/DQ nodes, the form TensorRT (10.x, 11.x) and ONNX Runtime both run.

- Symmetric, zero-point 0; weights per output channel, activations per tensor; INT8 throughout.
- Only MatMul / Gemm / Conv nodes with a weight (an initializer input) are quantized. Attention's
  activation x activation MatMuls, LayerNorm, Softmax, residual adds and the LM head stay in float.
- Activation ranges come from real inputs recorded from FP32 generation (calibration.data), with a
  selectable method: entropy, minmax or percentile. Ranges are computed once per graph and cached,
  so re-quantizing with other nodes left in float (the sensitivity search) does not recalibrate.

`--method dynamic` is ONNX Runtime's other INT8 form, for the ONNX Runtime target only: weights in
INT8 per output channel, activations quantized per call from their own range (DynamicQuantizeLinear
feeding MatMulInteger, which ONNX Runtime fuses into DynamicQuantizeMatMul / MatMulIntegerToFloat).
No activation ranges to calibrate, and on the CPU it is the faster form: ONNX Runtime runs a Q/DQ
MatMul by dequantizing around a float MatMul, while MatMulInteger runs on INT8 kernels. TensorRT
does not parse MatMulInteger, so such a bundle is ONNX Runtime's (manifest target "onnxruntime").
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from vlmedge.errors import InputError
from vlmedge.export.graphs import copy_graph, save_graph

METHODS = ("entropy", "minmax", "percentile")
DYNAMIC = "dynamic"
QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")


def weight_nodes(model) -> list[str]:
    """MatMul / Gemm / Conv nodes with an initializer input: the ones INT8 quantizes."""
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS and any(x in inits for x in n.input[:2])]


def lm_head(model) -> list[str]:
    """The MatMul / Gemm that produces `logits` (through reshapes, gathers, bias adds), if any."""
    producer = {o: n for n in model.graph.node for o in n.output}
    names = {o.name for o in model.graph.output}
    if "logits" not in names:
        return []
    seen, todo = set(), ["logits"]
    while todo:
        t = todo.pop()
        node = producer.get(t)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in ("MatMul", "Gemm"):
            return [node.name]
        todo += [x for x in node.input if x]
    return []


class _Reader:
    """onnxruntime's CalibrationDataReader over recorded feeds, one feed per collection step
    (feeds of one graph differ in shape, e.g. past_len, which histograms cannot stack)."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]], inputs: Iterable[str]):
        names = set(inputs)
        self.feeds = [{k: v for k, v in f.items() if k in names} for f in feeds]
        self.set_range(0, len(self.feeds))

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self.feeds[start_index:end_index])

    def get_next(self):
        return next(self._it, None)


def quantize_graph(src: Path, dst: Path, method: str, cache: Path, feeds: Sequence[dict] | None = None,
                   exclude: Iterable[str] = (), only: Iterable[str] | None = None) -> list[str]:
    """Write the Q/DQ model of `src` to `dst`; returns the quantized node names. The first call per
    `cache` needs `feeds` and computes the activation ranges; later calls reuse them."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as _quantize_static

    if method not in METHODS:
        raise InputError(f"--method: {method!r} is not one of {', '.join(METHODS)}")
    model = onnx.load(str(src), load_external_data=False)
    excluded = set(exclude) | set(lm_head(model))
    nodes = [n for n in weight_nodes(model) if n not in excluded and (only is None or n in set(only))]
    if not nodes:
        copy_graph(src, dst)
        return []
    reader = None
    if not cache.is_file():
        if not feeds:
            raise InputError(f"{src.name}: no calibration inputs recorded for this graph")
        reader = _Reader(feeds, [i.name for i in model.graph.input])
    methods = {"entropy": CalibrationMethod.Entropy, "minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
    options = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False, "CalibPercentile": 99.99}
    if reader:
        options["CalibStridedMinMax"] = 1  # collect one feed at a time
    with contextlib.redirect_stdout(io.StringIO()):  # the calibrators print their progress
        _quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZED_OPS),
                         per_channel=True, reduce_range=False, activation_type=QuantType.QInt8,
                         weight_type=QuantType.QInt8, nodes_to_quantize=nodes, calibrate_method=methods[method],
                         calibration_cache_path=str(cache), extra_options=options)
    save_graph(onnx.load(str(dst)), dst)  # its weights beside it, as export writes them: mapped, and shared where tied
    return nodes


def gemm_as_matmul(model) -> int:
    """Rewrite, in place, each Gemm with a constant weight (no transpose of A, alpha = beta = 1) as
    MatMul (+ Add of its bias), under the Gemm's name: ONNX Runtime's dynamic quantizer quantizes
    MatMul, not Gemm (GPT-2's Conv1D layers export as Gemm). Returns the number rewritten."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    attr = lambda n, k, d: next((helper.get_attribute_value(a) for a in n.attribute if a.name == k), d)  # noqa: E731
    nodes, done = [], 0
    for n in model.graph.node:
        if (n.op_type != "Gemm" or n.input[1] not in inits or attr(n, "transA", 0)
                or attr(n, "alpha", 1.0) != 1.0 or attr(n, "beta", 1.0) != 1.0):
            nodes.append(n)
            continue
        weight = n.input[1]
        if attr(n, "transB", 0):
            w = numpy_helper.to_array(inits[weight]).T.copy()
            weight = f"{n.input[1]}_transposed"
            model.graph.initializer.append(numpy_helper.from_array(w, weight))
        has_bias = len(n.input) > 2 and n.input[2]
        product = f"{n.output[0]}_matmul" if has_bias else n.output[0]
        nodes.append(helper.make_node("MatMul", [n.input[0], weight], [product], name=n.name))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, n.input[2]], [n.output[0]], name=f"{n.name}_bias"))
        done += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return done


def quantize_graph_dynamic(src: Path, dst: Path, exclude: Iterable[str] = (), only: Iterable[str] | None = None) -> list[str]:
    """Write ONNX Runtime's dynamic INT8 model of `src` to `dst` (MatMulInteger, per-channel INT8
    weights; the LM head and Conv stay in float); returns the quantized node names."""
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    excluded = set(exclude) | set(lm_head(model))
    op = {n.name: n.op_type for n in model.graph.node}
    wanted = None if only is None else set(only)
    nodes = [n for n in weight_nodes(model) if n not in excluded and (wanted is None or n in wanted) and op[n] != "Conv"]
    if not nodes:
        copy_graph(src, dst)
        return []
    gemm_as_matmul(model)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        plain = Path(tmp) / src.name
        onnx.save(model, str(plain))
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_dynamic(str(plain), str(dst), weight_type=QuantType.QInt8, per_channel=True, reduce_range=False,
                             op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes)
    save_graph(onnx.load(str(dst)), dst)
    return nodes


def tensorrt_qdq_problems(model, base_dir: str = "") -> list[str]:
    """Where a Q/DQ graph breaks TensorRT's explicit-quantization rules: INT8 only, zero-points all
    zero, scales positive, per-channel scales only on weights (constant DQ inputs). `base_dir`: the
    graph's folder, where a model loaded without its weights reads the scales it checks."""
    from onnx import TensorProto, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}

    def value(name):
        if name in inits:
            return numpy_helper.to_array(inits[name], base_dir)
        if name in consts:
            return numpy_helper.to_array(consts[name].attribute[0].t)
        return None

    problems = []
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale = value(n.input[1])
        zp = value(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if scale is None:
            problems.append(f"{n.name}: scale is not a constant")
            continue
        if not (np.asarray(scale) > 0).all() or not np.isfinite(scale).all():
            problems.append(f"{n.name}: scale not positive and finite")
        if zp is None:
            problems.append(f"{n.name}: no zero-point (its type, INT8, must be explicit)")
        else:
            if zp.dtype != np.int8:
                problems.append(f"{n.name}: zero-point type {zp.dtype}, TensorRT needs int8")
            if np.any(zp != 0):
                problems.append(f"{n.name}: zero-point not 0")
        if np.asarray(scale).size > 1:
            on_weight = n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].data_type == TensorProto.INT8
            if not on_weight:
                problems.append(f"{n.name}: per-channel scale on an activation")
    return problems
