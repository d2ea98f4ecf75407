"""Weight-only INT8 / INT4: block-wise symmetric weights for the MatMuls of the decoder graphs.

Decoding is memory-bound: every generated token reads every decoder weight once. Storing the MatMul
weights in 8 or 4 bits (activations stay float) cuts the bytes read per token.

- Which nodes: MatMul nodes whose weight (input B, shape [K, N]) is a 2-D float initializer, in the
  graphs asked for (the decoder by default). The LM head (the MatMul producing `logits`): with
  `lm_head=True` at the variant's bits, with `False` in float; by default in float unless it is
  tied, that is another node of the graph reads its weight too (GPT-2's token table, read by the
  embedding lookup): then at 8 bits. Left in float, a tied table is held twice once ONNX Runtime
  opens the graph (as stored, for the lookup, and packed for the head's GEMM); its 8-bit copy
  weighs a quarter of that and is all but lossless.
- Blocks: `block_size` consecutive weights along K (the input axis) of one output column share a
  scale, max |w| / qmax; zero-point 0 (symmetric); the last block of a K that the block size does not
  divide is shorter.
- Methods: `rtn` rounds each weight to the nearest level; `gptq` (Frantar et al., 2022) quantizes
  the K rows one at a time and spreads each row's rounding error over the rows not yet quantized,
  weighted by the inverse Hessian H = X^T X of the MatMul's real inputs X (recorded by running the
  FP32 graph on the calibration feeds with those tensors added as outputs), damped by 1% of its mean
  diagonal.
- Forms: `qdq` (default, the form TensorRT 10+ documents for weight-only quantization):
  DequantizeLinear(w_q int4|int8, scale [ceil(K/B), N], axis=0, block_size=B) feeding the MatMul's
  weight input, opset 21. ONNX Runtime (1.32, CPU) fuses this pair into its MatMulNBits kernel itself
  (int8 and int4, axis 0, constant weight and scale; accuracy_level 4). `matmulnbits`: that
  com.microsoft MatMulNBits written out (the same levels and scales in its packed layout), for
  ONNX Runtime-only bundles: no fusion at load time, and smaller files (no opset-21 int4 needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from vlmedge.errors import InputError
from vlmedge.runtime.backends.onnxruntime import session_options

PRECISIONS = {"int8-wo": 8, "int4-wo": 4}
METHODS = ("rtn", "gptq")
FORMATS = ("qdq", "matmulnbits")
BLOCK_SIZES = (32, 64, 128)
DEFAULT_GRAPHS = ("decoder", "decoder_init", "decoder_step")  # the decoder of either contract (and of schema 1 bundles)
DAMP = 0.01  # GPTQ: fraction of the Hessian's mean diagonal added to it
ACCURACY_LEVEL = 4  # MatMulNBits: int8 products, what onnxruntime's own DQ -> MatMul fusion picks
_LAZY = 128  # GPTQ: rows quantized between two updates of the rest (a multiple of every block size)


def check_options(precision: str, method: str, block_size: int, fmt: str, graphs: Iterable[str], have: Iterable[str]) -> None:
    """One line for each bad option, naming it."""
    if precision not in PRECISIONS:
        raise InputError(f"--precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if method not in METHODS:
        raise InputError(f"--method: {method!r} is not one of {', '.join(METHODS)} (for {precision})")
    if block_size not in BLOCK_SIZES:
        raise InputError(f"--block-size: {block_size} is not one of {', '.join(map(str, BLOCK_SIZES))}")
    if fmt not in FORMATS:
        raise InputError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    have = list(have)
    for g in graphs:
        if g not in have:
            raise InputError(f"--graphs: the bundle has no graph {g!r} (it has {', '.join(have)})")


def weight_matmuls(model, lm_head: bool) -> dict[str, tuple[str, bool]]:
    """Node name -> (2-D float initializer, transposed) of the weight of every MatMul / Gemm that
    multiplies by one: MatMul(x, W), MatMul(x, Transpose(W)) (a tied LM head), Gemm(x, W[, bias]) with
    alpha = beta = 1 and transA = 0 (transB: W transposed). The LM head only if asked."""
    from onnx import TensorProto, helper

    from vlmedge.calibration.int8 import lm_head as find_lm_head

    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    head = set(find_lm_head(model))
    out = {}
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Gemm") or len(n.input) < 2 or (n.name in head and not lm_head):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        transposed = bool(attrs.get("transB", 0))
        if n.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            continue
        name, t = n.input[1], producer.get(n.input[1])
        if name not in inits and n.op_type == "MatMul" and t is not None and t.op_type == "Transpose":
            perm = [a.ints for a in t.attribute if a.name == "perm"]
            if perm and list(perm[0]) == [1, 0]:
                name, transposed = t.input[0], True
        w = inits.get(name)
        if w is not None and w.data_type == TensorProto.FLOAT and len(w.dims) == 2:
            out[n.name] = (name, transposed)
    return out


TIED_HEAD_BITS = 8  # a tied LM head's bits unless --lm-head / --no-lm-head says otherwise


def head_bits(model, bits: int, lm_head: bool | None) -> dict[str, int]:
    """LM head node -> the bits it is quantized at: every head at `bits` if `lm_head`, none if
    False, by default (None) the tied ones at 8 bits: their weight is also read by another node, or
    an embedding lookup reads the same table (an exporter may fold the head's Transpose into a copy)."""
    from onnx import numpy_helper

    from vlmedge.calibration.int8 import lm_head as find_lm_head

    heads = find_lm_head(model)
    if lm_head is not None:
        return {n: bits for n in heads} if lm_head else {}
    weights = weight_matmuls(model, lm_head=True)
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    tied = {}
    for name in [n for n in heads if n in weights]:
        (weight, transposed), skip = weights[name], {name}
        head = next(n for n in model.graph.node if n.name == name)
        if (t := producer.get(head.input[1])) is not None and t.op_type == "Transpose":
            skip.add(t.name)
        if any(weight in n.input for n in model.graph.node if n.name not in skip):
            tied[name] = TIED_HEAD_BITS
            continue
        table = list(inits[weight].dims)[::1 if transposed else -1]  # [vocab, hidden], as a lookup reads it
        for n in model.graph.node:
            other = inits.get(n.input[0]) if n.op_type == "Gather" and n.input else None
            if other is not None and list(other.dims) == table:
                w = numpy_helper.to_array(inits[weight])
                if np.array_equal(numpy_helper.to_array(other), w if transposed else w.T):
                    tied[name] = TIED_HEAD_BITS
                    break
    return tied


def _levels(bits: int) -> tuple[int, int]:
    q = 2 ** (bits - 1) - 1
    return -q - 1, q


def _block_scales(w: np.ndarray, bits: int, block: int) -> np.ndarray:
    """[ceil(K/B), N] scales of a [K, N] weight: max |w| of each block / qmax (1 for all-zero blocks)."""
    k, n = w.shape
    nb = -(-k // block)
    pad = np.zeros((nb * block, n), np.float32)
    pad[:k] = np.abs(w)
    s = pad.reshape(nb, block, n).max(axis=1) / _levels(bits)[1]
    return np.where(s > 0, s, 1.0).astype(np.float32)


def rtn(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Round to nearest: (levels int8 [K, N], scales float32 [ceil(K/B), N])."""
    s = _block_scales(w, bits, block)
    lo, hi = _levels(bits)
    q = np.clip(np.rint(w / np.repeat(s, block, axis=0)[: w.shape[0]]), lo, hi)
    return q.astype(np.int8), s


def gptq(w: np.ndarray, h: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ of a [K, N] weight given H = X^T X [K, K] of its inputs: (levels, scales) as `rtn`.
    Each block's scale is taken from the weights as updated by the errors of the rows before it."""
    lo, hi = _levels(bits)
    k, n = w.shape
    W = w.T.astype(np.float64).copy()  # [N, K]: rows are output columns, K is quantized in order
    H = h.astype(np.float64).copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H[np.diag_indices(k)] += DAMP * np.mean(np.diag(H))
    hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # upper Cholesky factor of H^-1
    Q = np.zeros((n, k), np.int8)
    S = np.zeros((n, -(-k // block)), np.float64)
    for i1 in range(0, k, _LAZY):
        i2 = min(i1 + _LAZY, k)
        W1, err1, h1 = W[:, i1:i2].copy(), np.zeros((n, i2 - i1)), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % block == 0:
                amax = np.abs(W1[:, i : i + block]).max(axis=1) / hi
                S[:, col // block] = np.where(amax > 0, amax, 1.0)
            s = S[:, col // block]
            q = np.clip(np.rint(W1[:, i] / s), lo, hi)
            Q[:, col] = q
            e = (W1[:, i] - q * s) / h1[i, i]
            W1[:, i:] -= np.outer(e, h1[i, i:])
            err1[:, i] = e
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return np.ascontiguousarray(Q.T), S.T.astype(np.float32)


def dequantize(q: np.ndarray, s: np.ndarray, block: int) -> np.ndarray:
    return q.astype(np.float32) * np.repeat(s, block, axis=0)[: q.shape[0]]


def hessians(model, feeds: Sequence[dict[str, np.ndarray]], tensors: Iterable[str]) -> dict[str, np.ndarray]:
    """H = X^T X / rows for each named tensor (a MatMul's input), from running the FP32 graph on `feeds`
    with those tensors added as outputs."""
    import onnx
    import onnxruntime as ort

    tensors = sorted(set(tensors))
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tensors if t not in have)
    so = session_options(ort)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the tensors exactly as in the graph
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    acc: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    for f in feeds:
        for t, x in zip(tensors, sess.run(tensors, {k: f[k] for k in names})):
            x = x.reshape(-1, x.shape[-1]).astype(np.float64)
            acc[t] = acc.get(t, 0) + x.T @ x
            rows[t] = rows.get(t, 0) + x.shape[0]
    if not feeds:
        raise InputError("gptq: no calibration inputs recorded for this graph")
    return {t: (acc[t] / max(1, rows[t])).astype(np.float32) for t in tensors}


def _matmulnbits(node, out: str, q: np.ndarray, s: np.ndarray, bits: int, block: int):
    """The com.microsoft MatMulNBits node and initializers for levels `q` [K, N] and scales `s`:
    B [N, blocks, block*bits/8] uint8 (levels + 2^(bits-1), two 4-bit levels a byte, low nibble first),
    scales [N * blocks], zero-point implied (2^(bits-1))."""
    from onnx import helper, numpy_helper

    k, n = q.shape
    nb = -(-k // block)
    u = np.full((nb * block, n), 2 ** (bits - 1), np.uint8)
    u[:k] = (q.astype(np.int16) + 2 ** (bits - 1)).astype(np.uint8)
    u = u.T.reshape(n, nb, block)
    if bits == 4:
        u = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
    b = numpy_helper.from_array(np.ascontiguousarray(u), f"{node.name}_w_q{bits}")
    sc = numpy_helper.from_array(np.ascontiguousarray(s.T).reshape(-1), f"{node.name}_w_scale")
    new = helper.make_node("MatMulNBits", [node.input[0], b.name, sc.name], [out], name=node.name, domain="com.microsoft",
                           K=k, N=n, bits=bits, block_size=block, accuracy_level=ACCURACY_LEVEL)
    return new, [b, sc]


def _qdq(node, q: np.ndarray, s: np.ndarray, bits: int, block: int):
    """DequantizeLinear(w_q, scale, axis=0, block_size) -> the MatMul's weight input."""
    from onnx import TensorProto, helper, numpy_helper

    w = f"{node.name}_w"
    raw = q.tobytes()
    if bits == 4:  # two levels a byte, the first in the low nibble
        nib = (q.reshape(-1) & 0x0F).astype(np.uint8)
        nib = np.append(nib, np.uint8(0)) if nib.size % 2 else nib
        raw = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes()
    qt = helper.make_tensor(f"{w}_q{bits}", TensorProto.INT4 if bits == 4 else TensorProto.INT8, q.shape, raw, raw=True)
    sc = numpy_helper.from_array(s, f"{w}_scale")
    dq = helper.make_node("DequantizeLinear", [qt.name, sc.name], [f"{w}_dq"], name=f"{node.name}_weight_dq",
                          axis=0, block_size=block)
    return dq, [qt, sc]


def quantize_model(model, bits: int, block: int, method: str, fmt: str, lm_head: bool | None = None,
                   feeds: Sequence[dict] | None = None, exclude: Iterable[str] = (), only: Iterable[str] | None = None,
                   cache: dict | None = None):
    """The weight-only model of `model` (changed in place and returned) and the node names quantized.
    `lm_head`: see `head_bits`. `cache` (a dict kept by the caller) holds each node's levels and
    scales, the Hessians and the heads' bits, so that re-quantizing with some nodes left in float
    computes nothing twice."""
    import onnx
    from onnx import numpy_helper

    from vlmedge.calibration.int8 import lm_head as find_lm_head

    cache = {} if cache is None else cache
    if "heads" not in cache:
        cache["heads"] = head_bits(model, bits, lm_head)
    heads, every_head = cache["heads"], set(find_lm_head(model))
    targets = {n: t for n, t in weight_matmuls(model, lm_head=True).items() if n in heads or n not in every_head}
    skip, only = set(exclude), None if only is None else set(only)
    nodes = [n for n in targets if n not in skip and (only is None or n in only)]
    by_name = {n.name: n for n in model.graph.node}
    inits = {i.name: i for i in model.graph.initializer}
    if method == "gptq" and "hessians" not in cache and nodes:
        cache["hessians"] = hessians(model, list(feeds or []), {by_name[n].input[0] for n in targets})
    new_nodes, new_inits = {}, []
    for name in nodes:
        node = by_name[name]
        weight, transposed = targets[name]
        b = heads.get(name, bits)
        key = (name, b, block, method)
        if key not in cache:
            w = numpy_helper.to_array(inits[weight]).astype(np.float32)
            w = np.ascontiguousarray(w.T) if transposed else w
            cache[key] = gptq(w, cache["hessians"][node.input[0]], b, block) if method == "gptq" else rtn(w, b, block)
        q, s = cache[key]
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
        out = f"{node.output[0]}_nobias" if bias else node.output[0]
        if fmt == "matmulnbits":
            mm, extra = _matmulnbits(node, out, q, s, b, block)
            new_nodes[name] = [mm]
        else:
            dq, extra = _qdq(node, q, s, b, block)
            mm = onnx.helper.make_node("MatMul", [node.input[0], dq.output[0]], [out], name=node.name)
            new_nodes[name] = [dq, mm]
        if bias:
            new_nodes[name].append(onnx.helper.make_node("Add", [out, bias], [node.output[0]], name=f"{node.name}_bias"))
        new_inits += extra
    if not nodes:
        return model, []
    rebuilt = [x for n in model.graph.node for x in new_nodes.get(n.name, [n])]
    _drop_unused(model, rebuilt)
    model.graph.initializer.extend(new_inits)
    if fmt == "matmulnbits":
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    else:
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx") and o.version < 21:
                o.version = 21  # DequantizeLinear's block_size and int4 (opset 19-21 only widen the types of the ops used)
        model.ir_version = max(model.ir_version, 10)
    return model, nodes


def _drop_unused(model, nodes: list) -> None:
    """Set the graph's nodes, without those whose outputs nobody uses any more (the Transpose of a
    tied weight), and drop the initializers no node reads."""
    from onnx import AttributeProto

    def reads(ns) -> set[str]:  # inputs of the nodes, and of the nodes of their subgraphs (If, Loop)
        names = set()
        for n in ns:
            names.update(n.input)
            for a in n.attribute:
                for g in ([a.g] if a.type == AttributeProto.GRAPH else list(a.graphs)):
                    names |= reads(g.node)
        return names

    graph_outputs = {o.name for o in model.graph.output}
    while True:
        used = reads(nodes) | graph_outputs
        keep = [n for n in nodes if any(o in used for o in n.output)]
        if len(keep) == len(nodes):
            break
        nodes = keep
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = reads(nodes)
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def quantize_graph(src: Path, dst: Path, bits: int, block: int, method: str, fmt: str, lm_head: bool | None,
                   feeds: Sequence[dict] | None, exclude: Iterable[str] = (), only: Iterable[str] | None = None,
                   cache: dict | None = None) -> list[str]:
    """Write the weight-only model of the graph file `src` to `dst`; returns the quantized node names."""
    import onnx

    from vlmedge.export.graphs import save_graph

    model, nodes = quantize_model(onnx.load(str(src)), bits, block, method, fmt, lm_head, feeds, exclude, only, cache)
    save_graph(model, dst)
    return nodes


def layer_error(w: np.ndarray, q: np.ndarray, s: np.ndarray, block: int, h: np.ndarray) -> float:
    """Relative output error ||X W - X W_q|| / ||X W|| of one layer on the inputs X whose
    H = X^T X / rows is `h` (the Hessian GPTQ minimizes against)."""
    d = (w - dequantize(q, s, block)).astype(np.float64)
    w = w.astype(np.float64)
    return float(np.sqrt(np.einsum("kn,kj,jn->", d, h, d) / max(np.einsum("kn,kj,jn->", w, h, w), 1e-30)))


def token_agreement(ref: Sequence[Sequence[int]], got: Sequence[Sequence[int]]) -> float:
    """Fraction of the reference's generated tokens that the variant produced at the same position."""
    total = sum(len(r) for r in ref)
    same = sum(sum(a == b for a, b in zip(r, g)) for r, g in zip(ref, got))
    return same / max(1, total)
