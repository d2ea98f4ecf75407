"""Explain graphs: a production graph that also returns its cross-attention probabilities.

An explain graph is the production graph as written (any precision: the FP32 export, or the FP16,
INT8 and weight-only graphs of `quantize`) with a few nodes added at the end, so its logits are the
production graph's own; its weights are the production graph's weights file, referenced in place.
Plain captioning never opens it (`Pipeline.caption(..., return_attention=True)` does).

Which softmax is a cross-attention is read from the graph, not from the family: a Softmax whose
probabilities (through casts and Q/DQ pairs) multiply a value that depends on nothing but the
encoder side's inputs (`cross.{i}.value` in the decoder, `image_states` in a question encoder).
Layers come in graph order.

    decoder_explain       ... -> logits, present.*, cross_attentions[batch, layers, heads, encoder_len]
                                 (the last query row: the attention that chose the next token)
    text_encoder_explain  ... -> encoder_states, image_attention[batch, layers, heads, question_len, image_len]
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from vlmedge.errors import ExportError
from vlmedge.export.graphs import save_graph
from vlmedge.runtime.bundle import GraphSpec, TensorSpec, graph_hashes, sha256_file

EXPLAIN_SUFFIX = "_explain"
OUTPUTS = {"decoder": "cross_attentions", "text_encoder": "image_attention"}
_PASS = {"Cast", "QuantizeLinear", "DequantizeLinear", "Identity", "Dropout"}


def _encoder_side(graph: str, inputs: list[str]) -> set[str]:
    if graph == "decoder":
        return {n for n in inputs if n.startswith("cross.")}
    return {"image_states"}


def cross_attention_probs(model, graph: str) -> list[str]:
    """The softmax outputs of `model`'s cross-attention layers, in graph order."""
    g = model.graph
    inputs = [i.name for i in g.input]
    sources = _encoder_side(graph, inputs)
    depends: dict[str, frozenset] = {n: frozenset({n}) for n in inputs}
    for node in g.node:  # ONNX nodes are stored in topological order
        # a tensor's shape is not its values: reshapes sized from the batch's shape read no token
        below = frozenset() if node.op_type in ("Shape", "Size") else \
            frozenset().union(*(depends.get(i, frozenset()) for i in node.input if i))
        for o in node.output:
            depends[o] = below
    consumers: dict[str, list] = {}
    for node in g.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    found = []
    for node in g.node:
        if node.op_type != "Softmax":
            continue
        frontier, seen = [node.output[0]], set()
        while frontier:
            t = frontier.pop()
            for c in consumers.get(t, []):
                if c.op_type in _PASS and c.output[0] not in seen:
                    seen.add(c.output[0])
                    frontier.append(c.output[0])
                elif c.op_type == "MatMul" and c.input[0] == t:
                    value = depends.get(c.input[1], frozenset())
                    if value and value <= sources and node.output[0] not in found:
                        found.append(node.output[0])
    return found


def _shape(model, name: str) -> list:
    for v in list(model.graph.value_info) + list(model.graph.output):
        if v.name == name:
            return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    return []


def _dims_of(model, name: str) -> list:
    for v in model.graph.input:
        if v.name == name:
            return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    raise ExportError(f"graph has no input {name}")


def add_attention_output(model, graph: str):
    """`model` with the cross-attention output of `graph` ("decoder" or "text_encoder") added (in place).
    Raises ExportError where the graph has no cross-attention softmax to read (a fused graph)."""
    import onnx
    from onnx import TensorProto, helper

    probs = cross_attention_probs(model, graph)
    if not probs:
        raise ExportError(f"{graph}: no cross-attention softmax found (fused attention has none to return)")
    shapes = {p: _shape(model, p) for p in probs}
    if any(not shapes[p] for p in probs):
        inferred = onnx.shape_inference.infer_shapes(model)
        shapes = {p: _shape(inferred, p) for p in probs}
    name = OUTPUTS[graph]
    const = lambda n, v: helper.make_node("Constant", [], [n], value=helper.make_tensor(n, TensorProto.INT64, [len(v)], v))  # noqa: E731
    if graph == "decoder":
        heads = _dims_of(model, "cross.0.key")[1]  # the cache's heads: [batch, heads, encoder_len, head_dim]
    else:
        heads = next((shapes[p][1] for p in probs if len(shapes[p]) == 4 and isinstance(shapes[p][1], int)), 0)
    if not isinstance(heads, int) or heads <= 0:
        raise ExportError(f"{graph}: the heads of cross-attention {probs[0]} are not a fixed number in the graph")
    nodes = [const(f"{name}/axis", [1]), const(f"{name}/last_row", [-1]), const(f"{name}/heads", [-1, heads]),
             const(f"{name}/from", [1]), const(f"{name}/to", [3])]
    parts = []
    for i, p in enumerate(probs):
        x, at = p, f"{name}/{i}"
        if len(shapes[p]) == 3:  # [batch * heads, queries, positions] (bmm-style attention) -> 4-D
            nodes += [helper.make_node("Shape", [x], [f"{at}/shape"]),
                      helper.make_node("Slice", [f"{at}/shape", f"{name}/from", f"{name}/to"], [f"{at}/rest"]),
                      helper.make_node("Concat", [f"{name}/heads", f"{at}/rest"], [f"{at}/dims"], axis=0),
                      helper.make_node("Reshape", [x, f"{at}/dims"], [f"{at}/4d"])]
            x = f"{at}/4d"
        elif len(shapes[p]) != 4:
            raise ExportError(f"{graph}: cross-attention {p} has shape {shapes[p]}, not [batch, heads, queries, positions]")
        if graph == "decoder":  # the last query's row: [batch, heads, 1, positions]
            nodes.append(helper.make_node("Gather", [x, f"{name}/last_row"], [f"{at}/row"], axis=2))
            x = f"{at}/row"
            nodes.append(helper.make_node("Cast", [x], [f"{at}/float"], to=TensorProto.FLOAT))
            nodes.append(helper.make_node("Transpose", [f"{at}/float"], [at], perm=[0, 2, 1, 3]))  # [batch, 1, heads, positions]
        else:
            nodes.append(helper.make_node("Cast", [x], [f"{at}/float"], to=TensorProto.FLOAT))
            nodes.append(helper.make_node("Unsqueeze", [f"{at}/float", f"{name}/axis"], [at]))
        parts.append(at)
    nodes.append(helper.make_node("Concat", parts, [name], axis=1))
    model.graph.node.extend(nodes)
    if graph == "decoder":
        dims = [_dims_of(model, "input_ids")[0], len(probs), heads, _dims_of(model, "cross.0.key")[2]]
    else:
        batch, question = _dims_of(model, "question_ids")
        dims = [batch, len(probs), heads, question, _dims_of(model, "image_states")[1]]
    model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
    return model


def write_explain_graph(out: Path, graph: str, spec: GraphSpec) -> tuple[GraphSpec, GraphSpec | None]:
    """Write `<graph>_explain.onnx` beside the production graph `spec` describes (in directory `out`), its
    weights read from the production graph's weights file. Returns the production graph's spec (its weights
    moved to `<file>.data` where they were inside the graph file, so that both graphs read one copy) and the
    explain graph's; None for the latter where the graph has no cross-attention to return (a question
    encoder without one; a fused graph)."""
    import onnx

    model = onnx.load(str(out / spec.file), load_external_data=False)
    try:
        add_attention_output(model, graph)
    except ExportError:
        return spec, None
    if spec.data is None or not (out / spec.data).is_file():  # weights inside the graph file: one weights file for both
        save_graph(onnx.load(str(out / spec.file)), out / spec.file)
        spec = replace(spec, **graph_hashes(out / spec.file))
        model = add_attention_output(onnx.load(str(out / spec.file), load_external_data=False), graph)
    del model.graph.value_info[:]  # what only the tracer's readers use: shapes of intermediates, source locations
    for node in model.graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
    file = Path(spec.file).stem + EXPLAIN_SUFFIX + ".onnx"
    path = out / file
    onnx.save(model, str(path))  # initializers keep their place in the production graph's weights file
    name = OUTPUTS[graph]
    out_t = next(o for o in model.graph.output if o.name == name)
    dims = tuple(d.dim_param or d.dim_value for d in out_t.type.tensor_type.shape.dim)
    data = spec.data if spec.data and (out / spec.data).is_file() else None
    return spec, GraphSpec(file, sha256_file(path), spec.inputs, spec.outputs + (TensorSpec(name, "float32", dims),),
                           data_sha256=spec.data_sha256 if data else None, data_file=data)


def explain_manifest(out: Path, graphs: dict[str, GraphSpec], explain: dict) -> tuple[dict[str, GraphSpec], dict]:
    """Write the explain graphs of a cross-attention bundle's `graphs` in `out`; returns the graphs (with
    new hashes where a graph's weights moved to its weights file) and the manifest's `explain`: those
    graphs and the image grid of `explain` (the source bundle's, or export's); {} where no graph has
    cross-attention to return (a fused ONNX Runtime target)."""
    graphs = dict(graphs)
    found = {}
    for graph in ("decoder", "text_encoder"):
        if graph in graphs:
            graphs[graph], spec = write_explain_graph(out, graph, graphs[graph])
            if spec is not None:
                found[graph] = spec
    return graphs, ({**{k: v for k, v in explain.items() if k != "graphs"}, "graphs": found} if found else {})


def image_grid(tokens: int, height: int, width: int) -> dict[str, int] | None:
    """How the vision encoder's `tokens` output positions map to an image of `height` x `width`: leading
    tokens that are not patches (ViT's CLS, DeiT's CLS and distillation, Florence-2's pooled token), then a
    row-major grid of rows x cols patches whose stride divides the image. None where no grid fits."""
    for leading in range(0, 3):
        patches = tokens - leading
        for stride in range(1, max(height, width) + 1):
            rows, cols = height // stride, width // stride
            if rows * cols == patches and rows and cols:
                return {"leading": leading, "rows": rows, "cols": cols}
            if rows * cols < patches:
                break
    return None
