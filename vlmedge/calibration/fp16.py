"""FP16 by graph rewrite: every float32 tensor of a graph in float16, chosen nodes left in float32.

onnxconverter-common's float16 converter breaks the graphs torch.onnx.export(dynamo=True) writes,
so the rewrite is done here, on the graph itself:
- initializers, Constant / ConstantOfShape values and Cast(to=FLOAT) become float16. Values beyond
  float16's range are clipped to +-65504, not made inf: the -3.4e38 attention masks become -65504,
  still zero weight after softmax, and a fully masked row stays finite (-inf would make it NaN, and
  so would 0 * -inf in (1 - mask) * min masks).
- graph inputs and outputs are float16 (io_dtype="float16") or stay float32 with Casts inside;
  their names do not change.
- nodes named in keep_fp32 run in float32: their float16 inputs are cast up and their outputs down;
  initializers only they read stay float32.
Nodes to keep: those whose FP32 outputs overflow float16 on real inputs (overflow_nodes) and those
ONNX Runtime's CPU provider refuses in float16 (cpu_unsupported, convert_for_cpu).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Collection, Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from vlmedge.errors import InputError, VlmedgeError, first_line
from vlmedge.runtime.backends.onnxruntime import session_options

FP16_MAX = 65504.0
FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
IO_DTYPES = {"float32": FLOAT, "float16": FLOAT16}
REQUESTED = "requested"
NO_KERNEL = "no float16 kernel in onnxruntime CPU"

# how onnxruntime refuses a float16 node: no kernel at all, or an op whose ONNX schema has no
# float16 (Range)
_NO_KERNEL = re.compile(r"Could not find an implementation for \w+\(\d+\) node with name '([^']*)'")
_NO_SCHEMA = re.compile(r"Type 'tensor\(float16\)' of input parameter \([^)]*\) of operator \(\w+\) in node \(([^)]*)\)")


def _fp16(t: TensorProto) -> TensorProto:
    a = numpy_helper.to_array(t)
    return numpy_helper.from_array(np.clip(a, -FP16_MAX, FP16_MAX).astype(np.float16), t.name)  # NaN stays NaN


def float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of the float32 tensors of a graph: inputs, initializers, node outputs."""
    g = onnx.shape_inference.infer_shapes(model).graph
    typed = [*g.input, *g.output, *g.value_info]
    return {v.name for v in typed if v.type.tensor_type.elem_type == FLOAT} | \
        {t.name for t in g.initializer if t.data_type == FLOAT}


def _make_fp16(node: onnx.NodeProto) -> None:
    """The float32 a node makes by itself (Cast target, constant value) made float16."""
    for a in list(node.attribute):
        if node.op_type == "Cast" and a.name == "to" and a.i == FLOAT:
            a.i = FLOAT16
        elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == FLOAT:  # Constant, ConstantOfShape
            a.t.CopyFrom(_fp16(a.t))
        elif node.op_type == "Constant" and a.name in ("value_float", "value_floats"):
            value = np.array(a.f if a.name == "value_float" else list(a.floats), np.float32)
            node.attribute.remove(a)
            node.attribute.append(helper.make_attribute("value", _fp16(numpy_helper.from_array(value))))
    if node.op_type == "ConstantOfShape" and not node.attribute:  # default value: float32 zero
        node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.zeros(1, np.float16))))


def _rename(g: onnx.GraphProto, old: str, new: str) -> None:
    for n in g.node:
        for names in (n.input, n.output):
            for i, x in enumerate(names):
                if x == old:
                    names[i] = new
    for v in g.value_info:
        if v.name == old:
            v.name = new


def _suffix(dtype: int) -> str:
    return "fp16" if dtype == FLOAT16 else "fp32"


def to_fp16(model: onnx.ModelProto, keep_fp32: Collection[str] = (), io_dtype: str = "float32") -> onnx.ModelProto:
    """A copy of `model` with every float32 tensor in float16 except around the nodes in keep_fp32;
    graph inputs and outputs keep their names and are of io_dtype."""
    if io_dtype not in IO_DTYPES:
        raise InputError(f"io_dtype: {io_dtype!r} is not float32 or float16")
    io, keep = IO_DTYPES[io_dtype], set(keep_fp32)
    missing = keep - {n.name for n in model.graph.node}
    if missing:
        raise InputError(f"keep_fp32: the graph has no node {sorted(missing)[0]!r}")
    floats = float_tensors(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph

    readers = defaultdict(list)
    for n in g.node:
        for x in n.input:
            readers[x].append(n.name)
    home = {v.name: io for v in g.input if v.name in floats}  # float tensor -> the type it is made in
    for t in g.initializer:
        if t.name in floats:
            home[t.name] = FLOAT if readers[t.name] and all(r in keep for r in readers[t.name]) else FLOAT16
            if home[t.name] == FLOAT16:
                t.CopyFrom(_fp16(t))
    for n in g.node:
        home.update({y: FLOAT if n.name in keep else FLOAT16 for y in n.output if y in floats})

    for v in [*g.input, *g.output]:
        if v.name in floats:
            v.type.tensor_type.elem_type = io
    tail = []  # an output made in the other type is renamed inside and cast to its name at the end
    for v in g.output:
        if v.name in floats and home[v.name] != io:
            inner = f"{v.name}_{_suffix(home[v.name])}"
            _rename(g, v.name, inner)
            home[inner] = home.pop(v.name)
            tail.append(helper.make_node("Cast", [inner], [v.name], name=f"{v.name}_cast", to=io))
    for v in g.value_info:  # shapes stay, types follow
        if v.name in home:
            v.type.tensor_type.elem_type = home[v.name]

    casts: dict[tuple[str, int], str] = {}  # (tensor, type) -> its cast, made once
    nodes = []
    for n in g.node:
        want = FLOAT if n.name in keep else FLOAT16
        for i, x in enumerate(n.input):
            if x in home and home[x] != want:
                if (x, want) not in casts:
                    casts[x, want] = y = f"{x}_{_suffix(want)}"
                    nodes.append(helper.make_node("Cast", [x], [y], name=f"{y}_cast", to=want))
                n.input[i] = casts[x, want]
        if n.name not in keep:
            _make_fp16(n)
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes + tail)
    return out


def _session(model: onnx.ModelProto, optimize: bool = True):
    import onnxruntime as ort

    opts = session_options(ort)
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def cpu_unsupported(model: onnx.ModelProto, keep_fp32: Collection[str] = (),
                    io_dtype: str = "float32") -> dict[str, str]:
    """Nodes of an FP32 model that ONNX Runtime's CPU provider refuses in float16, with why:
    converts and loads, keeping each refused node in float32, until the session loads.

    Where the CPU provider has a float32 kernel but no float16 one (MatMul, Gemm, Conv, Add, Mul,
    Softmax, Erf, ... in onnxruntime 1.32) it does not refuse: it casts around the node itself."""
    floats = float_tensors(model)
    ops = {n.name: n.op_type for n in model.graph.node}
    # nodes of one op with floats in the same places get the same kernel: one refusal keeps them all
    sig = {n.name: (n.op_type, tuple(x in floats for x in n.input), tuple(y in floats for y in n.output))
           for n in model.graph.node}
    found: dict[str, str] = {}
    while True:
        try:
            _session(to_fp16(model, {*keep_fp32, *found}, io_dtype))
            return found
        except Exception as e:  # onnxruntime raises its own Fail/NotImplemented/InvalidGraph types
            m = _NO_KERNEL.search(str(e)) or _NO_SCHEMA.search(str(e))
            node = m.group(1) if m else None
            if node not in ops or node in found or node in keep_fp32:
                raise VlmedgeError(f"onnxruntime cannot load the float16 graph: {first_line(e)}") from None
            why = NO_KERNEL if m.re is _NO_KERNEL else f"{ops[node]} has no float16 in ONNX"
            found.update({n: why for n, s in sig.items() if s == sig[node] and n not in keep_fp32})


def convert_for_cpu(model: onnx.ModelProto, keep_fp32: Collection[str] = (),
                    io_dtype: str = "float32") -> tuple[onnx.ModelProto, dict[str, str]]:
    """to_fp16 with the nodes ONNX Runtime's CPU provider refuses in float16 kept in float32 too;
    returns the model and {node: why it is float32} for every kept node."""
    kept = {n: REQUESTED for n in keep_fp32}
    kept.update(cpu_unsupported(model, keep_fp32, io_dtype))
    return to_fp16(model, kept, io_dtype), kept


def overflow_nodes(model: onnx.ModelProto, feeds: Iterable[dict[str, np.ndarray]],
                   limit: float = FP16_MAX) -> dict[str, float]:
    """Nodes of an FP32 model with a float output beyond +-limit (or inf/NaN) on any of the feeds,
    with the largest |value| seen: in float16 they would overflow."""
    floats = float_tensors(model)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    g = probe.graph
    producer = {y: n.name for n in g.node for y in n.output if y in floats}
    outputs = {v.name for v in g.output}
    g.output.extend(helper.make_tensor_value_info(y, FLOAT, None) for y in producer if y not in outputs)
    sess = _session(probe, optimize=False)
    names = [o.name for o in sess.get_outputs()]
    dtypes = {v.name: helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type) for v in g.input}
    worst: dict[str, float] = {}
    for feed in feeds:
        missing = [i.name for i in sess.get_inputs() if i.name not in feed]
        if missing:
            raise InputError(f"feeds: no value for graph input {missing[0]!r}")
        values = sess.run(names, {i.name: np.asarray(feed[i.name], dtypes[i.name]) for i in sess.get_inputs()})
        for y, v in zip(names, values):
            if y in producer and v.size:
                m = float(np.abs(v).max())
                if not m <= limit:  # NaN too
                    node = producer[y]
                    worst[node] = max(worst.get(node, m), m) if not np.isnan(m) else m
    return worst
