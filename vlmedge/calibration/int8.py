"""INT8 by explicit quantization: Q/DQ nodes, the form TensorRT (10.x, 11.x) and ONNX Runtime both run.

- Symmetric, zero-point 0; weights per output channel, activations per tensor; INT8 throughout.
- Only MatMul / Gemm / Conv nodes with a weight (an initializer input) are quantized. Attention's
  activation x activation MatMuls, LayerNorm, Softmax, residual adds and the LM head stay in float.
- Activation ranges come from real inputs recorded from FP32 generation (calibration.data), with a
  selectable method: entropy, minmax or percentile. Ranges are computed once per graph and cached,
  so re-quantizing with other nodes left in float (the sensitivity search) does not recalibrate.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from vlmedge.errors import InputError

METHODS = ("entropy", "minmax", "percentile")
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
        shutil.copyfile(src, dst)
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
    return nodes


def tensorrt_qdq_problems(model) -> list[str]:
    """Where a Q/DQ graph breaks TensorRT's explicit-quantization rules: INT8 only, zero-points all
    zero, scales positive, per-channel scales only on weights (constant DQ inputs)."""
    from onnx import TensorProto, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}

    def value(name):
        if name in inits:
            return numpy_helper.to_array(inits[name])
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
