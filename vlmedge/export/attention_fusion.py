"""Attention as one ONNX Runtime `MultiHeadAttention` node, for the ONNX Runtime target.

ONNX Runtime's transformer optimizer recognizes the attention subgraphs that the TorchScript
exporter writes; the dynamo exporter writes attention the way the model's Python reads, and the
optimizer fuses none of it. This pass matches that form in the graphs of every family the project
exports (the reference model, ViT, GPT-2 with its KV cache concatenated in the graph):

    scores = MatMul(Q, Kt) [* scale | / divisor] [+ bias]
    out    = Reshape(Transpose(MatMul(Softmax(scores, axis=-1), V), perm=[0, 2, 1, 3]), shape)

    Q  = Transpose(Reshape(q, [B, S, N, H]), perm=[0, 2, 1, 3])        q: (B, S, N*H)
    Kt = Transpose(K, perm=[0, 1, 3, 2])                                K: (B, N, L, H)
       | Transpose(Reshape(k, [B, L, N, H]), perm=[0, 2, 3, 1])         k: (B, L, N*H)
    V  : (B, N, L, H), possibly Transpose(Reshape(v, [B, L, N, H]), perm=[0, 2, 1, 3])

and writes `MultiHeadAttention(q, k, v, attention_bias=bias; num_heads=N, scale=...)` in its place.
Keys and values go in as (B, L, N*H) where the graph projects them in place, and as (B, N, L, H)
(ONNX Runtime's "BNSH" form) where they come whole: the self-attention cache that the graph
concatenates and returns as `present.*`, and the cross-attention keys and values that are inputs of
the decoder. The cache stays the graph's own (the Concat and the `present.*` outputs are untouched),
so the graph's inputs and outputs are those of the bundle contract.

Every shape a match relies on is read from the graph's shape information (N and H static, the
output (.., N*H)); anything else is left as it is. Only float32 attention is fused: ONNX Runtime's
CPU kernel of MultiHeadAttention is float32.
"""

from __future__ import annotations

from dataclasses import dataclass

FUSED_DOMAIN = "com.microsoft"
_BNSH = [0, 2, 1, 3]


@dataclass
class _Graph:
    """What the matcher asks of a graph: who makes and who reads each tensor, constants, shapes."""

    producer: dict
    consumers: dict
    constants: dict
    shapes: dict  # tensor name -> list of dims (int, str or None), or absent
    types: dict  # tensor name -> onnx elem type
    outputs: set

    @classmethod
    def of(cls, model) -> "_Graph":
        import onnx
        from onnx import numpy_helper

        g = model.graph
        try:  # fills the shapes the exporter left out; a model over 2 GiB keeps what it has
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
        except Exception:  # noqa: BLE001 (shape inference raises many types; the graph keeps its own shapes)
            inferred = g
        shapes, types = {}, {}
        for v in list(inferred.value_info) + list(g.input) + list(g.output) + list(g.value_info):
            t = v.type.tensor_type
            if t.HasField("shape"):
                shapes[v.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                  for d in t.shape.dim]
            if t.elem_type:
                types[v.name] = t.elem_type
        producer, consumers = {}, {}
        constants = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        for n in g.node:
            for o in n.output:
                producer[o] = n
            for i in n.input:
                consumers.setdefault(i, []).append(n)
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                constants[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        return cls(producer, consumers, constants, shapes, types, {o.name for o in g.output})

    def made_by(self, name: str, op: str, perm: list[int] | None = None):
        n = self.producer.get(name)
        if n is None or n.op_type != op or n.domain not in ("", "ai.onnx"):
            return None
        if perm is not None and _attr(n, "perm") != perm:
            return None
        return n

    def only_reader(self, name: str, op: str):
        """The one node reading `name`, when it is an `op` and `name` is not a graph output."""
        readers = self.consumers.get(name, [])
        if len(readers) != 1 or name in self.outputs or readers[0].op_type != op:
            return None
        return readers[0]

    def scalar(self, name: str) -> float | None:
        c = self.constants.get(name)
        return float(c.reshape(-1)[0]) if c is not None and c.size == 1 else None

    def dims(self, name: str, rank: int) -> list | None:
        s = self.shapes.get(name)
        return s if s is not None and len(s) == rank else None


def _attr(node, name: str):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return list(helper.get_attribute_value(a)) if a.type == a.INTS else helper.get_attribute_value(a)
    return None


@dataclass
class _Match:
    nodes: list  # removed: scores MatMul .. output Transpose (and the output Reshape, when it goes too)
    query: tuple[str, bool]  # (tensor, whether it is (B, S, N, H) and needs flattening to (B, S, N*H))
    key: tuple[str, bool]
    value: tuple[str, bool]
    bias: str | None
    heads: int
    scale: float
    output: str  # the output Reshape's output, (B, S, N*H); the fused node writes it
    reshape: object  # the output Reshape when the graph flattens to (B*S, N*H) for a Gemm: it stays
    at: object  # the node the fused one takes the place of


def _split_heads(g: _Graph, x4: str, perm: list[int], heads: int, head_dim: int) -> tuple[str, bool] | None:
    """Where `x4` is Transpose(Reshape(x, [B, L, N, H]), perm): (x, False) when x is (B, L, N*H),
    (the Reshape's output, True) when x is (B*L, N*H) and the fused node needs (B, L, N*H) made from
    the (B, L, N, H) one; else None."""
    t = g.made_by(x4, "Transpose", perm)
    r = t and g.made_by(t.input[0], "Reshape")
    if r is None:
        return None
    split, flat = g.dims(r.output[0], 4), g.shapes.get(r.input[0])
    if split is None or flat is None or split[2:] != [heads, head_dim] or flat[-1] != heads * head_dim:
        return None
    if len(flat) == 3:
        return r.input[0], False
    return (r.output[0], True) if len(flat) == 2 else None


def _scores(g: _Graph, name: str):
    """(scores MatMul, scale, the nodes between) where `name` is MatMul, MatMul * c or MatMul / c."""
    n = g.producer.get(name)
    if n is None:
        return None
    if n.op_type == "MatMul":
        return n, 1.0, []
    if n.op_type in ("Mul", "Div"):
        for i, j in ((0, 1), (1, 0)) if n.op_type == "Mul" else ((0, 1),):
            m, c = g.producer.get(n.input[i]), g.scalar(n.input[j])
            if m is not None and m.op_type == "MatMul" and c and g.only_reader(m.output[0], n.op_type) is n:
                return m, (c if n.op_type == "Mul" else 1.0 / c), [n]
    return None


def _match(g: _Graph, softmax) -> _Match | None:
    axis = _attr(softmax, "axis")
    if axis not in (None, -1, 3) or g.dims(softmax.input[0], 4) is None:
        return None
    if g.only_reader(softmax.input[0], "Softmax") is not softmax:
        return None
    bias, between = None, []
    found = _scores(g, softmax.input[0])
    add = g.producer.get(softmax.input[0])
    if found is None and add is not None and add.op_type == "Add":
        for i in (0, 1):
            found = _scores(g, add.input[i])
            if found and g.only_reader(add.input[i], add.op_type) is add:
                bias, between = add.input[1 - i], [add]
                break
            found = None
    if found is None:
        return None
    qk, scale, scaling = found
    bias_dims = None if bias is None else g.dims(bias, 4)
    if bias is not None and (bias_dims is None or bias_dims[3] == 1):  # the kernel wants (.., .., S, L)
        return None
    pv = g.only_reader(softmax.output[0], "MatMul")
    if pv is None or pv.input[0] != softmax.output[0]:
        return None
    merge = g.only_reader(pv.output[0], "Transpose")
    if merge is None or _attr(merge, "perm") != _BNSH:
        return None
    out = g.only_reader(merge.output[0], "Reshape")
    if out is None:
        return None

    q4 = g.dims(qk.input[0], 4)
    if q4 is None or not isinstance(q4[1], int) or not isinstance(q4[3], int):
        return None
    heads, head_dim = q4[1], q4[3]
    query = _split_heads(g, qk.input[0], _BNSH, heads, head_dim)
    if query is None or g.types.get(qk.input[0]) != 1:  # float32 only
        return None

    keys3 = keys4 = None
    kt = g.made_by(qk.input[1], "Transpose")
    if kt is None:
        return None
    if _attr(kt, "perm") == [0, 1, 3, 2]:
        keys4 = kt.input[0]
        keys3 = _split_heads(g, keys4, _BNSH, heads, head_dim)
    elif _attr(kt, "perm") == [0, 2, 3, 1]:
        keys3 = _split_heads(g, qk.input[1], [0, 2, 3, 1], heads, head_dim)
    values4 = pv.input[1]
    values3 = _split_heads(g, values4, _BNSH, heads, head_dim)
    if keys3 and values3:
        key, value = keys3, values3
    elif keys4:
        key, value = (keys4, False), (values4, False)
        for x, _ in (key, value):
            d = g.dims(x, 4)
            if d is None or d[1] != heads or d[3] != head_dim:
                return None
    else:
        return None

    flat = g.shapes.get(out.output[0])
    if flat is None or flat[-1] != heads * head_dim or len(flat) not in (2, 3):
        return None
    keep_reshape = len(flat) == 2  # the graph flattens (B*S, N*H) for a Gemm: keep that Reshape after
    nodes = [qk, *scaling, *between, softmax, pv, merge] + ([] if keep_reshape else [out])
    return _Match(nodes, query, key, value, bias, heads, scale, output=out.output[0],
                  reshape=out if keep_reshape else None, at=merge)


def _bias_for(g: _Graph, match: _Match, new_nodes: list, initializers: list, tag: str) -> str:
    """The bias broadcast to (B|1, N|1, S, L): ONNX Runtime's kernel does not broadcast over S."""
    import numpy as np
    from onnx import helper, numpy_helper

    bias = match.bias
    s_bias, s_query = g.dims(bias, 4)[2], (g.shapes.get(match.query[0]) or [None, None])[1]
    if s_bias is not None and s_bias == s_query:
        return bias
    ones = f"{tag}/ones"
    initializers.append(numpy_helper.from_array(np.array([1, 1], dtype=np.int64), f"{ones}2"))
    initializers.append(numpy_helper.from_array(np.array([1], dtype=np.int64), f"{ones}1"))
    new_nodes += [
        helper.make_node("Shape", [match.query[0]], [f"{tag}/seq"], name=f"{tag}/seq", start=1, end=2),
        helper.make_node("Concat", [f"{ones}2", f"{tag}/seq", f"{ones}1"], [f"{tag}/bias_shape"],
                         name=f"{tag}/bias_shape", axis=0),
        helper.make_node("Expand", [bias, f"{tag}/bias_shape"], [f"{tag}/bias"], name=f"{tag}/bias"),
    ]
    return f"{tag}/bias"


def _flat(x: tuple[str, bool], name: str, new_nodes: list, initializers: list) -> str:
    """The tensor of `x` as (B, L, N*H): itself, or Reshape(x, [0, 0, -1]) of a (B, L, N, H) one."""
    import numpy as np
    from onnx import helper, numpy_helper

    tensor, flatten = x
    if not flatten:
        return tensor
    initializers.append(numpy_helper.from_array(np.array([0, 0, -1], dtype=np.int64), f"{name}/shape"))
    new_nodes.append(helper.make_node("Reshape", [tensor, f"{name}/shape"], [name], name=name))
    return name


def fuse_attention(model) -> int:
    """Rewrite the attention subgraphs of `model` (an onnx ModelProto, changed in place) as
    com.microsoft MultiHeadAttention nodes; returns how many were fused."""
    from onnx import helper

    graph = model.graph
    if any(a.type in (a.GRAPH, a.GRAPHS) for n in graph.node for a in n.attribute):
        return 0  # control flow: the tensors a subgraph reads are not followed here
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    g = _Graph.of(model)
    matches = [m for n in graph.node if n.op_type == "Softmax" for m in [_match(g, n)] if m is not None]
    if not matches:
        return 0
    removed = {id(n) for m in matches for n in m.nodes}
    if len(removed) != sum(len(m.nodes) for m in matches):
        return 0  # two matches share a node: the graph is not what this pass reads
    replacement = {}
    for k, m in enumerate(matches):
        tag = f"MultiHeadAttention_{k}"
        added: list = []
        bias = "" if m.bias is None else (_bias_for(g, m, added, graph.initializer, tag) if opset >= 15 else None)
        if bias is None:
            continue  # Shape(start, end) needs opset 15
        inputs = [_flat(x, f"{tag}/{role}", added, graph.initializer)
                  for x, role in ((m.query, "query"), (m.key, "key"), (m.value, "value"))]
        inputs += ["", "", bias] if bias else []
        output = m.output if m.reshape is None else f"{tag}/out"
        added.append(helper.make_node("MultiHeadAttention", inputs, [output], name=tag, domain=FUSED_DOMAIN,
                                      num_heads=m.heads, scale=m.scale))
        if m.reshape is not None:  # the graph's Reshape to (B*S, N*H) now reads the fused output
            m.reshape.input[0] = output
        replacement[id(m.at)] = added
    kept = [n for m in matches if id(m.at) not in replacement for n in m.nodes]
    removed -= {id(n) for n in kept}
    nodes = []
    for n in graph.node:
        if id(n) in replacement:
            nodes += replacement[id(n)]
        elif id(n) not in removed:
            nodes.append(n)
    _prune(graph, nodes)
    if replacement and not any(o.domain == FUSED_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(FUSED_DOMAIN, 1))
    return len(replacement)


def _prune(graph, nodes: list) -> None:
    """Set the graph's nodes to `nodes` less those whose outputs nothing reads; drop the
    initializers nothing reads and the shapes of tensors no node makes."""
    needed = {o.name for o in graph.output}
    live = []
    for n in reversed(nodes):
        if any(o in needed for o in n.output):
            live.append(n)
            needed.update(i for i in n.input if i)
    del graph.node[:]
    graph.node.extend(reversed(live))
    for i in [i for i in graph.initializer if i.name not in needed]:
        graph.initializer.remove(i)
    made = {o for n in live for o in n.output}
    for v in [v for v in graph.value_info if v.name not in made]:  # the shapes of removed tensors
        graph.value_info.remove(v)
