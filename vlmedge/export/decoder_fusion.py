"""The decoder-only `decoder` graph with ONNX Runtime's own attention kernels, for the ONNX Runtime target.

The portable graph spells each layer's attention out in plain ONNX: the query, key and value
projections reshaped to heads, the rotary embedding as slices, negations and products, the cache
concatenated, and the grouped attention as reshapes around two MatMuls and a Softmax, about forty
nodes a layer. Each is cheap, but at one token a step their count is what separates a step from the
time its weights take to read. This pass writes each layer's attention as three contrib nodes:

    q = RotaryEmbedding(q_proj, position_ids, cos_cache, sin_cache)          (num_heads = heads)
    k = RotaryEmbedding(k_proj, position_ids, cos_cache, sin_cache)          (num_heads = kv_heads)
    out, present.{i}.self.key, present.{i}.self.value =
        GroupQueryAttention(q, k, v_proj, past.{i}.self.key, past.{i}.self.value, seqlens_k,
                            total_sequence_length, attention_bias=mask)     (do_rotary 0, causal)

The graph's inputs and outputs stay those of the prefix contract. Every row of a batch has the same
physical length (past + new), so `seqlens_k` is that length minus one for every row and the
attention mask (left padding, the prompt's hidden slot) goes in as an additive bias over key
positions; GroupQueryAttention adds the causal part. Positions go to RotaryEmbedding as given, so
left-padded rows keep HF's positions. The cos/sin tables are the graph's own: the subgraph that
computes them from `position_ids` is cut out and run over every position the bundle declares.
M-RoPE (Qwen2-VL, Qwen2.5-VL: `position_ids[3, batch, seq]`) has no table by position: there the
graph keeps its own cos/sin subgraph, and each call's rows (the first half of each token's cos/sin,
checked equal to the second) are that call's table, which RotaryEmbedding reads at `b * seq + s`
for token (b, s).

A decoder whose prompt holds blocks that attend both ways (`block_ids`: PaliGemma, Gemma 3) is left
as it is: GroupQueryAttention masks every prompt causally.

Each layer is matched on the form the exporter writes (checked, never assumed); a layer that does
not match stays as it is, and the target's validation compares tokens with the portable bundle's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlmedge.export.attention_fusion import _BNSH, FUSED_DOMAIN


@dataclass
class _Layer:
    q_lin: str
    k_lin: str
    v_lin: str
    out: str  # the attention output as the output projection reads it: (batch, seq, heads * head_dim)
    scale: float
    cos: str
    sin: str


class _Index:
    def __init__(self, graph):
        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inits = {i.name: i for i in graph.initializer}

    def op(self, tensor: str, op_type: str):
        n = self.producer.get(tensor)
        return n if n is not None and n.op_type == op_type and n.domain in ("", "ai.onnx") else None

    def constant(self, tensor: str):
        from onnx import numpy_helper

        if tensor in self.inits:
            return numpy_helper.to_array(self.inits[tensor])
        n = self.op(tensor, "Constant")
        if n is not None:
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def perm(self, node) -> list:
        return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])


def _heads_input(ix: _Index, bnsh: str) -> str | None:
    """x_lin of Transpose(Reshape(x_lin, [B, S, N, H]), perm [0, 2, 1, 3])."""
    t = ix.op(bnsh, "Transpose")
    if t is None or ix.perm(t) != _BNSH:
        return None
    r = ix.op(t.input[0], "Reshape")
    return r.input[0] if r is not None else None


def _rotary(ix: _Index, rotated: str):
    """(x_bnsh, cos, sin) of Add(Mul(x, Unsqueeze(cos)), Mul(Concat(Neg(x2), x1), Unsqueeze(sin)))."""
    add = ix.op(rotated, "Add")
    if add is None:
        return None
    muls = [ix.op(i, "Mul") for i in add.input]
    if any(m is None for m in muls):
        return None
    for plain, turned in (muls, muls[::-1]):
        cat = next((ix.op(i, "Concat") for i in turned.input if ix.op(i, "Concat") is not None), None)
        if cat is None or len(cat.input) != 2 or ix.op(cat.input[0], "Neg") is None:
            continue
        sin_u = next(i for i in turned.input if ix.op(i, "Concat") is None)
        for x, cos_u in (plain.input, plain.input[::-1]):
            cu, su = ix.op(cos_u, "Unsqueeze"), ix.op(sin_u, "Unsqueeze")
            if cu is None or su is None:  # what cos and sin are computed from is checked by running it
                continue
            neg_src = ix.op(ix.op(cat.input[0], "Neg").input[0], "Slice")
            if neg_src is None or neg_src.input[0] != x:
                continue
            return x, cu.input[0], su.input[0]
    return None


def _match_layer(ix: _Index, i: int) -> _Layer | str:
    """The layer's tensors, or why it does not match."""
    key, value = f"present.{i}.self.key", f"present.{i}.self.value"
    kc, vc = ix.op(key, "Concat"), ix.op(value, "Concat")
    if kc is None or vc is None or list(kc.input)[0] != f"past.{i}.self.key" or list(vc.input)[0] != f"past.{i}.self.value":
        return "the cache is not Concat(past, new)"
    k_rot = _rotary(ix, kc.input[1])
    v_lin = _heads_input(ix, vc.input[1])
    if k_rot is None or v_lin is None:
        return "key or value is not the rotary form over Transpose(Reshape(projection))"
    k_lin = _heads_input(ix, k_rot[0])
    # the scores: MatMul(Reshape(q_rot), Transpose(present key)) * scale
    kt = [n for n in ix.consumers.get(key, []) if n.op_type == "Transpose"]
    scores = [n for t in kt for n in ix.consumers.get(t.output[0], []) if n.op_type == "MatMul"]
    if k_lin is None or len(scores) != 1:
        return "no single product of the queries with the transposed keys"
    q_group = ix.op(scores[0].input[0], "Reshape")
    q_rot = _rotary(ix, q_group.input[0]) if q_group is not None else None
    q_lin = _heads_input(ix, q_rot[0]) if q_rot is not None else None
    if q_lin is None or q_rot[1:] != k_rot[1:]:
        return "the queries are not the rotary form over Transpose(Reshape(projection))"
    after = ix.consumers.get(scores[0].output[0], [])
    scale = ix.constant(next((i for i in after[0].input if i != scores[0].output[0]), "")) if len(after) == 1 and after[0].op_type == "Mul" else None
    if scale is None or scale.size != 1:
        return "the scores are not scaled by a constant"
    # the output: MatMul(probabilities, present value) -> Reshape -> Transpose -> Reshape
    pv = [n for n in ix.consumers.get(value, []) if n.op_type == "MatMul" and n.input[1] == value]
    if len(pv) != 1:
        return "no single product of the probabilities with the values"
    chain, t = [], pv[0].output[0]
    for op in ("Reshape", "Transpose", "Reshape"):
        nxt = ix.consumers.get(t, [])
        if len(nxt) != 1 or nxt[0].op_type != op:
            return "the attention output is not Reshape(Transpose(Reshape(.)))"
        chain.append(nxt[0])
        t = nxt[0].output[0]
    if ix.perm(chain[1]) != _BNSH:
        return "the attention output's transpose is not (0, 2, 1, 3)"
    return _Layer(q_lin, k_lin, v_lin, t, float(scale.reshape(())), k_rot[1], k_rot[2])


def _run_rotary(model, cos: str, sin: str, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray] | str:
    """The graph's cos/sin for `positions`, run from its own subgraph over position_ids, or why they
    cannot feed RotaryEmbedding (not from position_ids alone, or not two equal halves: the rotate-half
    form)."""
    import onnx
    import onnxruntime as ort

    try:
        sub = onnx.utils.Extractor(model).extract_model(["position_ids"], [cos, sin])
        sess = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
        c, s = sess.run(None, {"position_ids": positions})
    except Exception as e:  # noqa: BLE001 (onnx and onnxruntime raise many types): the graph stays as it is
        return f"the rotary tables do not follow from position_ids alone ({str(e).splitlines()[0][:120]})"
    half = c.shape[-1] // 2
    if s.shape != c.shape or not (np.array_equal(c[..., :half], c[..., half:]) and np.array_equal(s[..., :half], s[..., half:])):
        return "the rotary tables are not two equal halves (rotate-half form)"
    return c, s


def _tables(model, cos: str, sin: str, positions: int) -> tuple[np.ndarray, np.ndarray] | str:
    """cos/sin caches (positions, head_dim / 2) from the graph's own subgraph over position_ids."""
    got = _run_rotary(model, cos, sin, np.arange(positions, dtype=np.int64)[None])
    if isinstance(got, str):
        return got
    c, s = (t.reshape(positions, -1) for t in got)
    half = c.shape[1] // 2
    return np.ascontiguousarray(c[:, :half], dtype=np.float32), np.ascontiguousarray(s[:, :half], dtype=np.float32)


def _mrope_tables(model, cos: str, sin: str) -> str | None:
    """Why the graph's M-RoPE cos/sin (batch, seq, head_dim), computed from 3-D position_ids, cannot feed
    RotaryEmbedding as per-call caches, or None when they can: run on positions whose three rows differ,
    both must be two equal halves, as they are after Qwen2-VL's section selection."""
    positions = np.random.default_rng(0).integers(0, 512, size=(3, 2, 7)).astype(np.int64)
    got = _run_rotary(model, cos, sin, positions)
    if isinstance(got, str):
        return got
    if got[0].ndim != 3 or got[0].shape[:2] != (2, 7):
        return f"the rotary tables are {list(got[0].shape)}, not (batch, seq, head size)"
    return None


def _input_dims(graph) -> dict[str, list]:
    """Each graph input's dimensions (None where symbolic)."""
    return {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in graph.input}


def fuse_prefix_decoder(model, layers: int, positions: int) -> dict:
    """Rewrite `model` (the prefix contract's decoder, loaded with its weights) in place; returns
    {"fused_layers": n, "left": {layer: why}}."""
    from onnx import helper, numpy_helper

    g = model.graph
    ix = _Index(g)
    inputs = _input_dims(g)
    if "block_ids" in inputs:  # GroupQueryAttention masks every prompt causally: the blocks' keys ahead would be lost
        return {"fused_layers": 0, "left": {i: "the prompt's blocks attend both ways, and GroupQueryAttention is causal"
                                            for i in range(layers)}}
    matched, left = {}, {}
    for i in range(layers):
        got = _match_layer(ix, i)
        (matched if isinstance(got, _Layer) else left)[i] = got
    if not matched:
        return {"fused_layers": 0, "left": left}
    first = next(iter(matched.values()))
    if any((x.cos, x.sin) != (first.cos, first.sin) for x in matched.values()):
        return {"fused_layers": 0, "left": {i: "the layers rotate by different tables" for i in range(layers)}}
    # M-RoPE (Qwen2-VL): position_ids are (3, batch, seq), one row each for time, height and width
    mrope = len(inputs["position_ids"]) == 3
    tables = _mrope_tables(model, first.cos, first.sin) if mrope else _tables(model, first.cos, first.sin, positions)
    if isinstance(tables, str):
        return {"fused_layers": 0, "left": {i: tables for i in range(layers)}}
    kv_heads, head_dim = inputs["past.0.self.key"][1], inputs["past.0.self.key"][3]
    if not kv_heads or not head_dim:
        return {"fused_layers": 0, "left": {i: "the cache's heads and head size are not static" for i in range(layers)}}
    if head_dim % 8:  # ONNX Runtime's kernel refuses it at run time
        return {"fused_layers": 0, "left": {i: f"GroupQueryAttention needs a head size that is a multiple of 8, not {head_dim}"
                                            for i in range(layers)}}

    new = []
    name = "vlmedge_fused"
    if not mrope:
        g.initializer.extend([numpy_helper.from_array(tables[0], f"{name}.cos_cache"),
                              numpy_helper.from_array(tables[1], f"{name}.sin_cache")])
    g.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), f"{name}.zero"),
                          numpy_helper.from_array(np.array([1], np.int64), f"{name}.one_i"),
                          numpy_helper.from_array(np.array([2], np.int64), f"{name}.two_i"),
                          numpy_helper.from_array(np.array(1.0, np.float32), f"{name}.one"),
                          numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), f"{name}.masked"),
                          numpy_helper.from_array(np.array([1, 2], np.int64), f"{name}.axes12")])
    n = lambda op, ins, outs, **kw: new.append(helper.make_node(op, ins, outs, name=f"{name}/{outs[0]}", **kw))  # noqa: E731
    # per call: batch B and total length T from the mask, new length S from the positions
    n("Shape", ["attention_mask"], [f"{name}.mask_shape"])
    n("Shape", ["position_ids"], [f"{name}.pos_shape"])
    n("Gather", [f"{name}.mask_shape", f"{name}.zero"], [f"{name}.B"], axis=0)
    n("Gather", [f"{name}.mask_shape", f"{name}.one_i"], [f"{name}.T"], axis=0)
    n("Gather", [f"{name}.pos_shape", f"{name}.two_i" if mrope else f"{name}.one_i"], [f"{name}.S"], axis=0)
    rotary_positions = "position_ids"
    if mrope:
        # each call's own caches: row b * S + s is token (b, s)'s cos/sin (its first half), and
        # RotaryEmbedding reads row position_ids[b, s] = b * S + s
        g.initializer.extend([numpy_helper.from_array(np.array([head_dim // 2], np.int64), f"{name}.half"),
                              numpy_helper.from_array(np.array([-1], np.int64), f"{name}.last"),
                              numpy_helper.from_array(np.array([-1, head_dim // 2], np.int64), f"{name}.rows"),
                              numpy_helper.from_array(np.array(0, np.int64), f"{name}.zero_s"),
                              numpy_helper.from_array(np.array(1, np.int64), f"{name}.one_s")])
        for which, table in (("cos", first.cos), ("sin", first.sin)):
            n("Slice", [table, f"{name}.zero", f"{name}.half", f"{name}.last"], [f"{name}.{which}_half"])
            n("Reshape", [f"{name}.{which}_half", f"{name}.rows"], [f"{name}.{which}_cache"])
        n("Mul", [f"{name}.B", f"{name}.S"], [f"{name}.BS"])
        n("Squeeze", [f"{name}.BS", f"{name}.zero"], [f"{name}.BS_s"])
        n("Range", [f"{name}.zero_s", f"{name}.BS_s", f"{name}.one_s"], [f"{name}.flat"])
        n("Concat", [f"{name}.B", f"{name}.S"], [f"{name}.BS_shape"], axis=0)
        n("Reshape", [f"{name}.flat", f"{name}.BS_shape"], [f"{name}.rotary_positions"])
        rotary_positions = f"{name}.rotary_positions"
    n("Sub", [f"{name}.T", f"{name}.one_i"], [f"{name}.T1"])
    n("Cast", [f"{name}.T1"], [f"{name}.T1_32"], to=6)
    n("Expand", [f"{name}.T1_32", f"{name}.B"], [f"{name}.seqlens_k"])
    n("Cast", [f"{name}.T"], [f"{name}.T_32"], to=6)
    n("Squeeze", [f"{name}.T_32", f"{name}.zero"], [f"{name}.total_len"])
    # the additive mask over key positions: 0 where attended, float32's lowest where not
    n("Cast", ["attention_mask"], [f"{name}.maskf"], to=1)
    n("Sub", [f"{name}.one", f"{name}.maskf"], [f"{name}.masked01"])
    n("Mul", [f"{name}.masked01", f"{name}.masked"], [f"{name}.bias2"])
    n("Unsqueeze", [f"{name}.bias2", f"{name}.axes12"], [f"{name}.bias4"])
    n("Concat", [f"{name}.B", f"{name}.one_i", f"{name}.S", f"{name}.T"], [f"{name}.bias_shape"], axis=0)
    n("Expand", [f"{name}.bias4", f"{name}.bias_shape"], [f"{name}.attention_bias"])
    replaced = set()
    for i, layer in matched.items():
        width = _width(ix, layer.q_lin)
        if width is None or width % head_dim:
            left[i] = "the query projection's width is not readable from its weights"
            continue
        heads = width // head_dim
        q, k = f"{name}.{i}.q", f"{name}.{i}.k"
        n("RotaryEmbedding", [layer.q_lin, rotary_positions, f"{name}.cos_cache", f"{name}.sin_cache"], [q],
          domain=FUSED_DOMAIN, num_heads=heads, interleaved=0)
        n("RotaryEmbedding", [layer.k_lin, rotary_positions, f"{name}.cos_cache", f"{name}.sin_cache"], [k],
          domain=FUSED_DOMAIN, num_heads=kv_heads, interleaved=0)
        new.append(helper.make_node(
            "GroupQueryAttention",
            [q, k, layer.v_lin, f"past.{i}.self.key", f"past.{i}.self.value", f"{name}.seqlens_k", f"{name}.total_len",
             "", "", "", f"{name}.attention_bias"],
            [layer.out, f"present.{i}.self.key", f"present.{i}.self.value"], name=f"{name}/attention.{i}",
            domain=FUSED_DOMAIN, num_heads=heads, kv_num_heads=kv_heads, scale=layer.scale, do_rotary=0))
        replaced.update([layer.out, f"present.{i}.self.key", f"present.{i}.self.value"])
    kept = [x for x in g.node if not (set(x.output) & replaced)]
    del g.node[:]
    g.node.extend(kept + new)
    _topological(g)
    _drop_dead(g)
    return {"fused_layers": len([i for i in matched if i not in left]), "left": left}


def _width(ix: _Index, tensor: str) -> int | None:
    """Output width of a projection: MatMul by a weight, MatMulNBits (attribute N), or either plus a bias."""
    n = ix.producer.get(tensor)
    if n is None:
        return None
    if n.op_type == "Add":
        for a, b in (n.input, n.input[::-1]):
            bias = ix.constant(b)
            if bias is not None and bias.ndim == 1:
                return _width(ix, a) or int(bias.size)
        return None
    if n.op_type == "MatMul" and n.input[1] in ix.inits:
        return int(ix.inits[n.input[1]].dims[-1])
    if n.op_type == "MatMulNBits":
        return next((int(a.i) for a in n.attribute if a.name == "N"), None)
    return None


def _topological(g) -> None:
    """Sort the nodes so that each comes after what it reads."""
    have = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    pending, order = list(g.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in have for i in node.input):
                order.append(node)
                have.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"the fused graph has a cycle or a missing input ({rest[0].name})")
        pending = rest
    del g.node[:]
    g.node.extend(order)


def _drop_dead(g) -> None:
    """Remove nodes and initializers that no graph output depends on."""
    producer = {o: n for n in g.node for o in n.output}
    live, stack = set(), [o.name for o in g.output]
    while stack:
        t = stack.pop()
        n = producer.get(t)
        if n is None or id(n) in live:
            continue
        live.add(id(n))
        stack.extend(i for i in n.input if i)
    kept = [n for n in g.node if id(n) in live]
    del g.node[:]
    g.node.extend(kept)
    used = {i for n in g.node for i in n.input}
    inits = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)


def merge_projections(model) -> int:
    """Projections that read the same tensor (query, key and value; gate and up) as one product and a
    Split: one pass over the activations instead of two or three, and fewer, larger kernels. Float
    MatMuls by constant weights and MatMulNBits alike (same K, bits, block size, accuracy level; no
    bias, g_idx or zero points). Returns the number of products merged away."""
    import collections

    from onnx import helper, numpy_helper

    g = model.graph
    ix = _Index(g)

    def attrs(n) -> dict:
        return {a.name: helper.get_attribute_value(a) for a in n.attribute}

    groups = collections.defaultdict(list)
    for n in g.node:
        if n.op_type == "MatMul" and n.domain in ("", "ai.onnx") and n.input[1] in ix.inits and len(ix.inits[n.input[1]].dims) == 2:
            groups[("MatMul", n.input[0], ix.inits[n.input[1]].dims[0], ix.inits[n.input[1]].data_type)].append(n)
        elif n.op_type == "MatMulNBits" and n.domain == FUSED_DOMAIN and len(n.input) == 3 and all(i in ix.inits for i in n.input[1:]):
            a = attrs(n)
            groups[("MatMulNBits", n.input[0], a["K"], a.get("bits", 4), a["block_size"], a.get("accuracy_level", 0))].append(n)
    replace, drop, merged = {}, set(), 0
    for key, nodes in groups.items():
        if len(nodes) < 2:
            continue
        tag = f"vlmedge_merged.{merged}"
        outs = [n.output[0] for n in nodes]
        if key[0] == "MatMul":
            w = np.concatenate([numpy_helper.to_array(ix.inits[n.input[1]]) for n in nodes], axis=1)
            widths = [int(ix.inits[n.input[1]].dims[1]) for n in nodes]
            g.initializer.append(numpy_helper.from_array(w, f"{tag}.weight"))
            product = helper.make_node("MatMul", [key[1], f"{tag}.weight"], [f"{tag}.out"], name=tag)
        else:
            widths = [int(attrs(n)["N"]) for n in nodes]
            blobs = [numpy_helper.to_array(ix.inits[n.input[1]]) for n in nodes]
            scales = [numpy_helper.to_array(ix.inits[n.input[2]]) for n in nodes]
            b = np.concatenate(blobs, axis=0)
            sc = np.concatenate([s.reshape(w, -1) for s, w in zip(scales, widths)], axis=0)
            sc = sc.reshape(-1) if scales[0].ndim == 1 else sc
            g.initializer.extend([numpy_helper.from_array(b, f"{tag}.B"), numpy_helper.from_array(sc, f"{tag}.scales")])
            a = attrs(nodes[0])
            a["N"] = sum(widths)
            product = helper.make_node("MatMulNBits", [key[1], f"{tag}.B", f"{tag}.scales"], [f"{tag}.out"], name=tag,
                                       domain=FUSED_DOMAIN, **a)
        g.initializer.append(numpy_helper.from_array(np.array(widths, np.int64), f"{tag}.split"))
        split = helper.make_node("Split", [f"{tag}.out", f"{tag}.split"], outs, name=f"{tag}.split", axis=-1)
        replace[id(nodes[0])] = [product, split]
        drop.update(id(n) for n in nodes[1:])
        merged += len(nodes) - 1
    if merged:
        out = []
        for n in g.node:
            if id(n) not in drop:
                out.extend(replace.get(id(n), [n]))
        del g.node[:]
        g.node.extend(out)
        _drop_dead(g)
    return merged
