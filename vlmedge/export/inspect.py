"""Printing a bundle's manifest and an export's validation as terminal tables."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vlmedge.runtime.bundle import Bundle


WEIGHT_MIN = 1024


def weight_report(bundle: Bundle) -> dict:
    """The bundle's bytes by graph and by weight: each graph's file and the bytes of its initializers,
    which weights more than one graph holds (the same bytes, found by content hash), and whether they
    read one stored copy (a weights file two graphs share) or each store their own:
    {"graphs": {name: {file_bytes, weight_bytes, weights, shared_bytes}}, "stored_bytes", "unique_bytes",
    "shared": [(graphs, tensors, bytes of the copies past the first)], "read_once": [(graphs, tensors,
    bytes)]}. Weights are the initializers of WEIGHT_MIN bytes or more (not the small constants every
    graph has)."""
    import hashlib

    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_model

    where: dict[str, set[str]] = {}  # content hash -> graphs holding it
    places: dict[str, set[tuple]] = {}  # content hash -> where it is stored: (weights file, offset) or (graph, name)
    sizes: dict[str, int] = {}
    graphs = {}
    for name in bundle.manifest.graphs:
        path = bundle.graph_path(name)
        model = onnx.load(str(path), load_external_data=False)
        stored_at = {t.name: (lambda e: (e["location"], int(e.get("offset", 0))))({x.key: x.value for x in t.external_data})
                     for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
        load_external_data_for_model(model, str(path.parent))
        held: dict[str, int] = {}
        for init in model.graph.initializer:
            raw = numpy_helper.to_array(init).tobytes()
            if len(raw) < WEIGHT_MIN:
                continue
            key = hashlib.blake2b(raw, digest_size=16).hexdigest()
            held[key] = len(raw)
            places.setdefault(key, set()).add(stored_at.get(init.name, (name, init.name)))
        for key, n in held.items():
            where.setdefault(key, set()).add(name)
            sizes[key] = n
        graphs[name] = {"file_bytes": bundle.graph_bytes(name), "weight_bytes": sum(held.values()), "weights": len(held)}
    for name, g in graphs.items():
        g["shared_bytes"] = sum(sizes[k] for k, gs in where.items() if name in gs and len(gs) > 1)
    twice: dict[tuple, list[int]] = {}
    once: dict[tuple, list[int]] = {}
    for key, gs in where.items():
        if len(places[key]) > 1:
            twice.setdefault(tuple(sorted(gs)), []).append(sizes[key] * (len(places[key]) - 1))  # the copies past the first
        elif len(gs) > 1:
            once.setdefault(tuple(sorted(gs)), []).append(sizes[key])
    ranked = lambda groups: sorted(((gs, len(ns), sum(ns)) for gs, ns in groups.items()), key=lambda x: -x[2])  # noqa: E731
    return {"graphs": graphs, "stored_bytes": sum(sizes[k] * len(p) for k, p in places.items()),
            "unique_bytes": sum(sizes.values()), "shared": ranked(twice), "read_once": ranked(once)}


def print_weights(report: dict, console: Console) -> None:
    t = Table(title="weights by graph")
    for col in ("graph", "file", "weights", "tensors", "also in another graph"):
        t.add_column(col, justify="left" if col == "graph" else "right")
    for name, g in report["graphs"].items():
        t.add_row(escape(name), _size(g["file_bytes"]), _size(g["weight_bytes"]), str(g["weights"]), _size(g["shared_bytes"]))
    console.print(t)
    stored, unique = report["stored_bytes"], report["unique_bytes"]
    groups = lambda rows: "; ".join(f"{' and '.join(gs)}: {n} tensor{'s' if n > 1 else ''}, {_size(b)}" for gs, n, b in rows)  # noqa: E731
    line = f"weights: {_size(stored)} stored, {_size(unique)} unique"
    if report["read_once"]:
        line += f"; stored once and read by several graphs ({groups(report['read_once'])})"
    if stored > unique:
        line += f"; {_size(stored - unique)} stored more than once ({groups(report['shared'])})"
    console.print(escape(line))


def _shape(shape) -> str:
    return escape("[" + ", ".join(str(s) for s in shape) + "]")  # else rich reads [batch, 3, 64, 64] as markup


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def print_bundle(bundle: Bundle, console: Console) -> None:
    m = bundle.manifest
    console.print(f"[b]{escape(str(bundle.path))}[/b]: {escape(f'{m.family} ({m.architecture})')}, tasks {escape(', '.join(m.tasks))}, "
                  f"precision {m.precision.get('dtype')}, schema {m.schema_version}, opset {m.provenance.get('opset')}")
    t = Table(title="graphs")
    for col in ("graph", "file", "size", "tensor", "dtype", "shape"):
        t.add_column(col)
    for name, g in m.graphs.items():
        size = bundle.graph_bytes(name)
        rows = [("in", x) for x in g.inputs] + [("out", x) for x in g.outputs]
        shown = rows if len(rows) <= 10 else rows[:6] + [("", None)] + rows[-2:]
        for i, (kind, x) in enumerate(shown):
            first = i == 0
            if x is None:
                t.add_row("", "", "", f"... {len(rows) - 8} more", "", "")
                continue
            t.add_row(escape(name) if first else "", escape(g.file) if first else "", _size(size) if first else "",
                      escape(f"{kind} {x.name}"), escape(x.dtype), _shape(x.shape))
        t.add_section()
    console.print(t)
    a = Table(title="dynamic axes (TensorRT profiles)")
    for col in ("axis", "min", "opt", "max"):
        a.add_column(col, justify="right" if col != "axis" else "left")
    for name, r in m.axes.items():
        a.add_row(name, str(r.min), str(r.opt), str(r.max))
    console.print(a)
    tt = Table(title="tasks")
    prefix = m.contract == "prefix"  # the prompt is built per call from the chat template
    for col in ("task", "prompt" if prefix else "encoder", "prompt ids", "eos", "pad", "max new tokens"):
        tt.add_column(col)
    for name, spec in m.tasks.items():
        first = ("chat template + " + ("caption instruction" if name == "caption" else "question")) if prefix else spec["encoder"]
        ids = "per call" if prefix else str(spec["prompt_ids"])
        tt.add_row(escape(name), escape(first), escape(ids), str(spec["eos_id"]), str(spec["pad_id"]), str(spec["max_new_tokens"]))
    console.print(tt)
    p = m.preprocessing
    console.print(escape(f"preprocessing: {p['height']}x{p['width']} {p['resample']}, mean {p['mean']}, std {p['std']}"))
    if m.explain.get("graphs"):  # docs/explain.md
        grid = m.explain.get("image_grid")
        console.print(escape("explain graphs (return_attention, vlmedge explain): " + ", ".join(
            f"{n} -> {g.file} ({_size((bundle.path / g.file).stat().st_size)}"
            + (f", weights read from {g.data_file})" if g.data_file else ")") for n, g in m.explain["graphs"].items())
            + (f"; image grid {grid['rows']}x{grid['cols']} after {grid['leading']} leading tokens" if grid else "")))
    if prefix:
        proc = p["processor"]
        split = proc["kind"] == "idefics3" and proc.get("split", True)
        console.print(escape(f"contract: prefix (image tokens in the language model's sequence); processor {proc['kind']}"
                             + (f", tiles of {proc['tile']} px up to a longest edge of {proc['longest_edge']} px + a global image"
                                if split else "") + f", {proc['image_tokens']} {proc['image_token']} tokens per frame; "
                             f"caption instruction {m.prompt['caption_instruction']!r}"))
    prov = m.provenance
    print_weights(weight_report(bundle), console)
    console.print(escape(f"source: {prov.get('source')} ({', '.join(f'{k} {v[:12]}' for k, v in prov.get('source_sha256', {}).items())}), "
                         f"{prov.get('exporter')}, torch {prov.get('torch')}"))
    if m.validation:
        print_validation(m.validation, console)


def print_validation(v: dict, console: Console) -> None:
    t = Table(title=f"validation: ONNX Runtime (CPU) vs PyTorch, {'[green]passed[/green]' if v['passed'] else '[red]FAILED[/red]'}")
    for col in ("graph", "outputs", "max abs error", "mean rel error"):
        t.add_column(col, justify="right" if col != "graph" else "left")
    for g, outs in v["graphs"].items():
        t.add_row(g, str(len(outs)), f"{max(e['max_abs'] for e in outs.values()):.2e}",
                  f"{max(e['mean_rel'] for e in outs.values()):.2e}")
    console.print(t)
    t = Table(title="greedy tokens: ONNX decode loop vs PyTorch generate")
    for col in ("task", "images", "same tokens, one batch", "same tokens, batch 1", "mean new tokens"):
        t.add_column(col, justify="right" if col != "task" else "left")
    for task, r in v["tokens"].items():
        t.add_row(task, str(r["images"]), f"{r['agree_batched']}/{r['images']}", f"{r['agree_batch1']}/{r['images']}",
                  f"{r['mean_new_tokens']:.1f}")
    console.print(t)
    for f in v.get("failures", []):
        console.print(f"[red]failure:[/red] {f}")
