"""`vlmedge export`: trace a model's canonical graphs to ONNX, validate them, write a bundle.

Everything is written through `vlmedge.outdir.OutputDir` (a temp dir beside `--out`, swapped in only
when validation passes), so a failed or killed export leaves the old `--out` as it was.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable


from vlmedge import __version__
from vlmedge.errors import ExportError, InputError, VlmedgeError, cause_chain, one_line, summary_line
from vlmedge.export.explain import explain_manifest, image_grid
from vlmedge.export.graphs import GraphDecl, TensorDecl, axis_ranges, graph_decls, save_graph, share_weights
from vlmedge.models.base import TASKS, Adapter
from vlmedge.outdir import OutputDir
from vlmedge.runtime.bundle import MANIFEST, AxisRange, GraphSpec, Manifest, TensorSpec, graph_hashes, sha256_file

DEFAULT_OPSET = 18
MIN_OPSET = 17  # LayerNormalization as one op


@dataclass(frozen=True)
class ExportOptions:
    opset: int = DEFAULT_OPSET
    force: bool = False
    validate_images: int = 8
    atol: float = 1e-4  # max abs error allowed per output, scaled by max(1, |reference|)
    max_batch: int = 16  # the batch axis' max (images x beams at run time)
    max_length: int | None = None  # decoder positions declared (prompt + generated); None: see axis_ranges


def select_tasks(adapter: Adapter, task: str) -> list[str]:
    supported = list(adapter.info.tasks)
    if task == "all":
        return supported
    if task not in TASKS and task not in supported:
        raise InputError(f"--task: expected caption, vqa, all or a task of the model ({', '.join(supported)}), not {task!r}")
    if task not in supported:
        raise InputError(f"--task {task}: {adapter.info.architecture} supports only {', '.join(supported)}")
    return [task]


def _rename_axes(path: Path, decl: GraphDecl) -> None:
    """Give every input/output exactly the declared shape: named dynamic axes, fixed ints."""
    import onnx

    model = onnx.load(str(path))
    by_name = {t.name: t for t in decl.inputs + decl.outputs}
    for vi in list(model.graph.input) + list(model.graph.output):
        want = by_name.get(vi.name)
        if want is None:
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != len(want.shape):
            raise ExportError(f"graph {decl.name}: {vi.name} has rank {len(dims)}, expected {len(want.shape)}")
        for d, w in zip(dims, want.shape):
            if isinstance(w, str):
                d.dim_param = w
            else:
                d.dim_value = w
    save_graph(model, path)


# torch.onnx.export wraps each failure in a banner of next steps; its first words say which step failed
_TORCH_ONNX_STEPS = {
    "Failed to export the model with torch.export": "torch.export failed",
    "Failed to decompose the FX graph": "decomposition for ONNX failed",
    "Failed to convert the exported program": "ONNX conversion failed",
}


def _raised_at(e: BaseException) -> str:
    """` (at file.py:LINE in function)`: the innermost frame of the traceback outside torch and this file,
    usually the model's own code; empty when every frame is torch's."""
    import traceback

    import torch

    skip = (str(Path(torch.__file__).parent), __file__)
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith(skip)]
    return f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""


def _root_cause(e: BaseException) -> str:
    """The exception at the bottom of e's chain on one line, with where it was raised. Where torch.onnx
    kept only the text of its cause, the first entry of its "Exception summary" (the innermost) stands in."""
    import re

    root = cause_chain(e)[-1]
    text = str(root)
    if text.startswith(tuple(_TORCH_ONNX_STEPS)):
        found = re.search(r"<class '([^']+)'>: *(.*)", text.partition("## Exception summary")[2])
        if found:
            return one_line(f"{found.group(1).removeprefix('builtins.')}: {found.group(2)}")
    return summary_line(root) + _raised_at(root)


class _ThreadOutput:
    """Stands in for sys.stderr while one thread traces: that thread's writes are kept (torch.export prints the
    partial graph of a failed trace there), other threads' (the progress bar) pass through."""

    def __init__(self, stream):
        import io
        import threading

        self._stream, self._thread, self.kept = stream, threading.get_ident(), io.StringIO()

    def write(self, text: str) -> int:
        import threading

        return (self.kept if threading.get_ident() == self._thread else self._stream).write(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _trace(module, args: tuple, decl: GraphDecl, dynamic_shapes, path: Path, opset: int) -> None:
    import torch

    stderr = sys.stderr
    sys.stderr = output = _ThreadOutput(stderr)
    try:
        prog = torch.onnx.export(
            module, args, dynamo=True, opset_version=opset, dynamic_shapes=dynamic_shapes,
            input_names=[t.name for t in decl.inputs], output_names=[t.name for t in decl.outputs],
            verbose=False,
        )
    except Exception as e:  # one line: the step that failed and its root cause, not torch's banner
        wrapper = next((str(c) for c in cause_chain(e) if str(c).startswith(tuple(_TORCH_ONNX_STEPS))), "")
        step = next((what for words, what in _TORCH_ONNX_STEPS.items() if wrapper.startswith(words)), "torch.onnx.export failed")
        error = ExportError(f"graph {decl.name}: {step}: {_root_cause(e)}")
        if output.kept.getvalue().strip():
            error.add_note(f"torch.onnx.export printed:\n{output.kept.getvalue().rstrip()}")  # shown with the trace (--verbose)
        raise error from e
    finally:
        sys.stderr = stderr
    stderr.write(output.kept.getvalue())
    prog.save(str(path))
    _rename_axes(path, decl)


def _stage_errors(export: Callable[..., Manifest]) -> Callable[..., Manifest]:
    """Any other failure inside `export` becomes an ExportError naming the stage it happened in (known
    from the progress reports) and its root cause, so the CLI prints one line; the cause stays chained
    for --verbose. VlmedgeError and OSError (which names its file) pass through as they are."""
    import functools
    import inspect

    signature = inspect.signature(export)

    @functools.wraps(export)
    def run(*args, **kwargs) -> Manifest:
        bound = signature.bind(*args, **kwargs)
        on_graph = bound.arguments.get("on_graph")
        stage = "preparing example inputs"

        def report(name: str, state: str) -> None:
            nonlocal stage
            stage = {"exporting": f"graph {name}", "done": "writing the bundle"}.get(state, name)
            if on_graph:
                on_graph(name, state)

        bound.arguments["on_graph"] = report
        try:
            return export(*bound.args, **bound.kwargs)
        except (VlmedgeError, OSError):
            raise
        except Exception as e:
            raise ExportError(f"{stage}: {_root_cause(e)}") from e

    return run


def _spec(decl: GraphDecl, path: Path) -> GraphSpec:
    t = lambda x: TensorSpec(x.name, x.dtype, tuple(x.shape))  # noqa: E731
    return GraphSpec(file=path.name, inputs=tuple(map(t, decl.inputs)), outputs=tuple(map(t, decl.outputs)), **graph_hashes(path))


def trace_plan(plan: list, decls: dict[str, GraphDecl], out: Path, opset: int,
               on_graph: Callable[[str, str], None] | None) -> tuple[dict[str, GraphSpec], dict[str, float]]:
    """Trace each (name, module factory, example args, dynamic shapes) of `plan` to out/NAME.onnx;
    returns every graph's spec and its tracing seconds."""
    graphs: dict[str, GraphSpec] = {}
    timings: dict[str, float] = {}
    for name, make, args, dyn in plan:
        if on_graph:
            on_graph(name, "exporting")
        t0 = time.perf_counter()
        path = out / f"{name}.onnx"
        _trace(make(), args, decls[name], dyn, path, opset)
        timings[name] = round(time.perf_counter() - t0, 2)
        graphs[name] = _spec(decls[name], path)
        if on_graph:
            on_graph(name, "done")
    return graphs, timings


@_stage_errors
def export_bundle(adapter: Adapter, task: str, out: Path, options: ExportOptions = ExportOptions(),
                  on_graph: Callable[[str, str], None] | None = None) -> Manifest:
    """Export, validate and write the bundle; returns its manifest. `on_graph(name, state)` reports progress."""
    import torch
    from torch.export import Dim

    from vlmedge.export.samples import sample_inputs
    from vlmedge.export.validate import validate_bundle

    if options.max_batch < 2:
        raise InputError(f"--max-batch {options.max_batch}: expected 2 or more")
    if options.max_length is not None and options.max_length < 3:
        raise InputError(f"--max-length {options.max_length}: expected 3 or more (prompt + generated tokens)")
    if options.opset < MIN_OPSET:
        raise InputError(f"--opset {options.opset}: vlmedge needs opset {MIN_OPSET} or newer (LayerNormalization)")
    if adapter.info.contract == "dual-encoder":  # CLIP / SigLIP: two encoders, no decoder
        from vlmedge.export.dual_encoder import export_dual_encoder

        return export_dual_encoder(adapter, out, options, on_graph)
    if adapter.info.contract == "fusion":  # ViLT / BridgeTower: one graph from pixels and text to the head
        from vlmedge.export.fusion import export_fusion

        return export_fusion(adapter, out, options, on_graph)
    tasks = select_tasks(adapter, task)
    if adapter.info.contract == "prefix":
        from vlmedge.export.prefix import export_prefix

        with OutputDir(out, options.force) as writer:
            manifest = export_prefix(adapter, tasks, writer.path, options, on_graph)
            _refuse_failed(adapter, manifest)
            writer.commit()
        return manifest
    with OutputDir(out, options.force) as writer:
        tmp = writer.path
        info = adapter.info
        d = info.dims
        with_text = any(info.tasks[t].encoder == "text_encoder" for t in tasks)
        sample = sample_inputs(adapter, n=2, tasks=tasks)
        vision_text = info.prompt.get("vision_text")  # InstructBLIP-T5: the vision graph reads each row's text too
        vision_args = adapter.vision_args(sample.pixel_values, sample.questions or [adapter.caption_text] * 2) \
            if vision_text else (sample.pixel_values,)
        with torch.no_grad():
            image_states = adapter.vision_encoder()(*vision_args)
        decls = {g.name: g for g in graph_decls(info, image_states.shape[-1], with_text)}
        ranges = axis_ranges(info, tasks, options.max_batch, options.max_length)
        vision_dyn = {"pixel_values": {0: Dim("batch", min=1, max=ranges["batch"][2])}}
        if vision_text:
            v = decls["vision_encoder"]
            decls["vision_encoder"] = GraphDecl(v.name, (*v.inputs, *(TensorDecl(n, "int64", ("batch", "vision_text_len"))
                                                                       for n in vision_text["inputs"])), v.outputs)
            longest = int(vision_text["max_length"])
            ranges["vision_text_len"] = (1, min(16, longest), longest)
            vision_dyn.update({n: {0: vision_dyn["pixel_values"][0], 1: Dim.DYNAMIC} for n in vision_text["inputs"]})

        # example inputs: no dynamic dim of size 1 (torch.export would specialise it)
        B = Dim("batch", min=1, max=ranges["batch"][2])
        enc_max = ranges["encoder_len"][2]
        S = Dim("encoder_len", min=1, max=max(enc_max, 2))
        P = Dim("past_len", min=1, max=max(ranges["past_len"][2], 2))
        T = Dim("seq_len", min=1, max=max(ranges["seq_len"][2], 2))
        L = d.decoder_layers
        enc_states = image_states
        enc_mask = torch.ones(enc_states.shape[:2], dtype=torch.long)
        if with_text:
            Q = Dim("question_len", min=1, max=max(ranges["question_len"][2], 2))
            with torch.no_grad():
                q_states = adapter.text_encoder()(sample.question_ids, sample.question_mask, image_states)
            enc_states, enc_mask = q_states, sample.question_mask
            if info.tasks[tasks[0]].image_prefix:  # the decoder attends to [image tokens; prompt]
                enc_mask = torch.cat([torch.ones(image_states.shape[:2], dtype=torch.long), enc_mask], 1)
        prompt = list(info.tasks[tasks[0]].prompt_ids)
        prompt_ids = torch.tensor([prompt + [prompt[-1]]] * 2 if len(prompt) < 2 else [prompt] * 2)
        with torch.no_grad():
            cross = list(adapter.cross_kv()(enc_states))
            # the example: the prompt after two cached slots (no dynamic size of 1), the first hidden
            start = torch.zeros(2, d.decoder_heads, 1, d.decoder_head_dim)
            n = prompt_ids.shape[1]
            head = adapter.decoder()(prompt_ids, torch.tensor([[0] + [1] * n] * 2), torch.arange(n).repeat(2, 1), enc_mask,
                                     *[start] * (2 * L), *cross)
        past = list(head[1:])
        example_mask = torch.tensor([[0] + [1] * (n + n)] * 2)
        example_pos = torch.arange(n, n + n).repeat(2, 1)

        plan = [("vision_encoder", adapter.vision_encoder, vision_args, vision_dyn)]
        if with_text:
            plan.append(("text_encoder", adapter.text_encoder, (sample.question_ids, sample.question_mask, image_states),
                         {"question_ids": {0: B, 1: Q}, "question_mask": {0: B, 1: Q}, "image_states": {0: B}}))
        plan.append(("cross_kv", adapter.cross_kv, (enc_states,), {"encoder_states": {0: B, 1: S}}))
        auto = Dim.DYNAMIC  # the attention mask's length is past + seq: the tracer keeps the relation
        plan.append(("decoder", adapter.decoder, (prompt_ids, example_mask, example_pos, enc_mask, *past, *cross),
                     {"input_ids": {0: B, 1: T}, "attention_mask": {0: B, 1: auto}, "position_ids": {0: B, 1: T},
                      "encoder_mask": {0: B, 1: S}, "kv": tuple([{0: B, 2: P}] * (2 * L) + [{0: B, 2: S}] * (2 * L))}))

        graphs, timings = trace_plan(plan, decls, tmp, options.opset, on_graph)
        graphs = share_weights(tmp, graphs)  # Florence-2's token table: its language encoder's and decoder's
        # where the vision graph's positions are patches (not a Q-Former's queries), how they lie on the image
        grid = image_grid(int(image_states.shape[1]), info.preprocessing.height, info.preprocessing.width) \
            if getattr(adapter, "image_grid", True) else None
        graphs, explain = explain_manifest(tmp, graphs, {"image_grid": grid} if grid else {})

        (tmp / "tokenizer.json").write_text(adapter.tokenizer_json())
        prompt = {}
        if vision_text:  # the vision graph's own tokenizer, beside the decoder's
            (tmp / vision_text["tokenizer"]).write_text(adapter.vision_text_tokenizer_json())
            prompt = {"vision_text": {**vision_text, "sha256": sha256_file(tmp / vision_text["tokenizer"])}}
        manifest = Manifest(
            family=info.family, architecture=info.architecture, prompt=prompt,
            tasks={t: {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(info.tasks[t]).items()} for t in tasks},
            dims=asdict(d), graphs=graphs,
            axes={k: AxisRange(*v) for k, v in ranges.items()},
            preprocessing={k: v for k, v in asdict(info.preprocessing).items() if v is not None},
            tokenizer={"file": "tokenizer.json", "sha256": sha256_file(tmp / "tokenizer.json")},
            precision={"dtype": "float32", "method": "export"},
            provenance=_provenance(adapter, options.opset, timings), explain=explain,
        )
        (tmp / MANIFEST).write_text(manifest.to_json())
        if on_graph:
            on_graph("validation", "running")
        validation = validate_bundle(adapter, tmp, tasks, options)
        manifest = Manifest(**{**manifest.__dict__, "validation": validation})
        (tmp / MANIFEST).write_text(manifest.to_json())
        _refuse_failed(adapter, manifest)
        writer.commit()
    return manifest


def _refuse_failed(adapter: Adapter, manifest: Manifest) -> None:
    if not manifest.validation["passed"]:
        from vlmedge.errors import ValidationError

        raise ValidationError(f"export of {adapter.source} failed validation: {manifest.validation['failures'][0]}")


def _provenance(adapter: Adapter, opset: int, timings: dict[str, float]) -> dict:
    import torch

    hashes = {}
    for f in adapter.weight_files():
        hashes[Path(f).name] = sha256_file(Path(f))
    prov = {
        "source": adapter.source, "source_sha256": hashes, "exporter": f"vlmedge {__version__}",
        "torch": torch.__version__, "opset": opset, "export_seconds": timings,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if "transformers" in sys.modules:  # a Hugging Face family
        prov["transformers"] = sys.modules["transformers"].__version__
    return prov
