"""The `vlmedge` command. Problems a user can fix print as one line and exit non-zero."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from vlmedge.console import console, err_console
from vlmedge.console import progress as _progress
from vlmedge.errors import InputError, VlmedgeError

app = typer.Typer(
    help="Export, quantize, build, run and compare vision-language models for ONNX Runtime and TensorRT.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
_verbose = False  # --verbose: errors print their traceback too


@app.callback()
def _options(verbose: bool = typer.Option(False, "--verbose", help="on an error, also print its traceback")) -> None:
    """Export, quantize, build, run and compare vision-language models for ONNX Runtime and TensorRT."""
    global _verbose
    _verbose = verbose




def _evaluate(model_name: str, split: str, n_scenes: int) -> dict:
    from vlmedge.evaluation.scene_eval import evaluate_pipeline, evaluate_torch_model, evaluation_set
    from vlmedge.models.checkpoint import HF_BUILTINS, load_pretrained

    es = evaluation_set(split, n_scenes)
    if model_name in HF_BUILTINS:  # a decoder-only built-in: evaluated through its bundle (exported once, cached)
        pipe = _open_pipeline(model_name, "cpu", 64_000_000, 16)
        with _progress() as p:
            task = p.add_task(f"evaluating on {split} through the runtime", total=len(es.scenes) + len(es.questions))
            return evaluate_pipeline(pipe, es, progress=lambda n: p.advance(task, n))
    model, tokenizer = load_pretrained(model_name)
    with _progress() as p:
        task = p.add_task(f"evaluating on {split}", total=len(es.scenes) + len(es.questions))
        return evaluate_torch_model(model, tokenizer, es, progress=lambda n: p.advance(task, n))


@app.command()
def evaluate(
    model: str = typer.Argument("shapes-vlm", help="built-in model name or model directory"),
    split: str = typer.Option("test", help="scene split: train, val or test"),
    scenes: int = typer.Option(1000, min=1, help="scenes to evaluate (one caption and ~5 questions each)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the report as JSON here"),
) -> None:
    """Caption exact match, BLEU-4, CIDEr and VQA accuracy of a reference model on a scene split."""
    from vlmedge.evaluation.report import print_report

    if split not in ("train", "val", "test"):
        raise InputError(f"--split: expected train, val or test, not {split!r}")
    report = _evaluate(model, split, scenes)
    print_report(report, console, title=model)
    if json_out:
        from vlmedge.outdir import write_file_atomic

        write_file_atomic(json_out, json.dumps(report, indent=2) + "\n")


@app.command()
def train(
    out: Path = typer.Option(Path("runs/shapes-vlm"), help="run directory (checkpoint, log, final model)"),
    steps: Optional[int] = typer.Option(None, min=1, help="optimizer steps (default: the shipped model's: 8400 for "
                                        "shapes-vlm, ~47 min on 2 cores; 4500 for shapes-smolvlm)"),
    seed: int = typer.Option(0, help="seed of the initial weights and of the question mix"),
    threads: int = typer.Option(2, min=1, help="CPU threads"),
    model: str = typer.Option("shapes-vlm", "--model", help="shapes-vlm (cross-attention) or shapes-smolvlm (decoder-only)"),
) -> None:
    """Train a reference model on generated scenes; resumes from OUT/checkpoint.pt if present.

    Writes OUT/model and evaluates it on the test split. The shipped checkpoints are `vlmedge train`
    (and `vlmedge train --model shapes-smolvlm`) with the defaults.
    """
    from dataclasses import replace

    if model == "shapes-smolvlm":
        from vlmedge.training.smolvlm import main as train_smolvlm

        train_smolvlm(["--out", str(out), *(["--steps", str(steps)] if steps else [])])
        return
    if model != "shapes-vlm":
        raise InputError(f"--model: expected shapes-vlm or shapes-smolvlm, not {model!r}")

    from vlmedge.evaluation.report import print_report
    from vlmedge.training.train import TrainOptions
    from vlmedge.training.train import train as run_training

    options = replace(TrainOptions(), seed=seed, threads=threads)
    if steps is not None:
        options = replace(options, steps=steps)
    with _progress() as p:
        run_training(out, options, progress=p)
    console.print(f"model written to {out / 'model'}")
    report = _evaluate(str(out / "model"), "test", 1000)
    print_report(report, console, title="trained model")
    from vlmedge.outdir import write_file_atomic

    write_file_atomic(out / "test_report.json", json.dumps(report, indent=2) + "\n")


@app.command("scenes")
def scenes_cmd(
    out: Path = typer.Option(..., help="directory for the PNG images and scenes.jsonl"),
    split: str = typer.Option("test", help="train, val or test"),
    count: int = typer.Option(8, min=1, help="number of scenes"),
    start: int = typer.Option(0, min=0, help="index of the first scene in the split"),
) -> None:
    """Write scenes of the built-in world as PNG files plus a JSONL of their captions and questions."""
    from vlmedge.data.scenes import pick_questions, scene_seed
    from vlmedge.data.scenes import scenes as gen

    if split not in ("train", "val", "test"):
        raise InputError(f"--split: expected train, val or test, not {split!r}")
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, s in enumerate(gen(split, start, count), start):
        name = f"{split}-{i:06d}.png"
        s.pil().save(out / name)
        qs = [{"question": q.text, "answer": q.answer, "type": q.qtype} for q in pick_questions(s)]
        lines.append(json.dumps({"image": name, "captions": [s.caption], "questions": qs, "seed": scene_seed(split, i)}))
    from vlmedge.outdir import write_file_atomic

    write_file_atomic(out / "scenes.jsonl", "\n".join(lines) + "\n")
    console.print(f"{count} scenes written to {out}")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), help="where the demo scenes are saved as PNG"),
    count: int = typer.Option(4, min=1, help="scenes to show"),
    scenes: int = typer.Option(1000, min=1, help="test scenes for the metrics"),
    variants: bool = typer.Option(True, help="also make FP16 and INT8 variants (once) and compare all three"),
    compare_scenes: int = typer.Option(200, "--compare-scenes", min=1, help="test scenes for the comparison"),
    model: str = typer.Option("shapes-vlm", "--model", help="shapes-vlm (cross-attention) or shapes-smolvlm (decoder-only)"),
) -> None:
    """Caption and answer test scenes with a built-in model through the runtime (exported once and
    cached), print latency per stage and test-split metrics, then compare FP32 with FP16 and INT8
    (shapes-vlm) or INT4 weight-only (shapes-smolvlm) variants."""
    import statistics

    from rich.table import Table

    from vlmedge.data.scenes import pick_questions
    from vlmedge.data.scenes import scenes as gen
    from vlmedge.evaluation.report import print_report
    from vlmedge.evaluation.scene_eval import evaluate_pipeline, evaluation_set
    from vlmedge.runtime.decoding import Timings

    from vlmedge.models.checkpoint import BUILTIN_MODELS

    if model not in BUILTIN_MODELS:
        raise InputError(f"--model: expected a built-in model ({', '.join(BUILTIN_MODELS)}), not {model!r}")
    pipe = _open_pipeline(model, "cpu", 64_000_000, 16, shared_threads=not variants)
    console.print(f"runtime: {pipe.bundle.path} on {pipe.backend.name}", highlight=False)
    out.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(gen("test", 0, count)):
        path = out / f"test-{i:06d}.png"
        s.pil().save(path)
        t = Table(title=str(path), show_lines=False)
        for col in ("", "model", "truth", ""):
            t.add_column(col)
        pred = pipe.caption(path)
        t.add_row("caption", pred, s.caption, "✓" if pred == s.caption else "✗")
        qs = pick_questions(s)
        for q, ans in zip(qs, pipe.vqa(path, [q.text for q in qs])):
            t.add_row(q.text, ans, q.answer, "✓" if ans == q.answer else "✗")
        console.print(t)

    image = next(gen("test", 0, 1)).pil()
    runs = []
    for r in range(21):
        t = Timings()
        pipe.caption(image, timings=t)
        if r:  # the first call warms up
            runs.append(t)
    med = lambda xs: statistics.median(xs) * 1000  # noqa: E731
    lat = Table(title="caption latency, batch 1, CPU (median of 20 runs)")
    lat.add_column("stage")
    lat.add_column("ms", justify="right")
    lat.add_row("preprocess", f"{med([t.preprocess for t in runs]):.2f}")
    lat.add_row("vision encoder", f"{med([t.encoder for t in runs]):.2f}")
    lat.add_row("first token", f"{med([t.first_token for t in runs]):.2f}")
    lat.add_row(f"per token ({len(runs[0].tokens) + 1} tokens)", f"{med([x for t in runs for x in t.tokens]):.2f}")
    lat.add_row("whole caption", f"{med([t.total for t in runs]):.2f}")
    console.print(lat)

    es = evaluation_set("test", scenes)
    with _progress() as p:
        bar = p.add_task("evaluating on test through the runtime", total=len(es.scenes) + len(es.questions))
        report = evaluate_pipeline(pipe, es, progress=lambda n: p.advance(bar, n))
    print_report(report, console, title=f"{model} through {pipe.backend.name}")
    if variants:
        _demo_variants(pipe.bundle.path, out, compare_scenes, ("fp16", "int4-wo") if model == "shapes-smolvlm" else ("fp16", "int8"))


def _demo_variants(fp32: Path, out: Path, n_scenes: int, precisions: tuple[str, ...]) -> None:
    """Variants of the built-in bundle (made once, cached beside it), then all of them compared."""
    import logging

    from vlmedge.calibration.quantize import QuantizeOptions, quantize_bundle
    from vlmedge.compare.compare import compare_bundles
    from vlmedge.compare.render import print_comparison

    paths = [fp32]
    for precision in precisions:
        path = fp32.with_name(f"{fp32.name}-{precision}")
        if not (path / "manifest.json").is_file():
            err_console.print(f"making the {precision} variant once, to {path}", highlight=False)
            _quiet_export_logs()
            logging.getLogger().setLevel(logging.ERROR)
            quantize_bundle(fp32, path, QuantizeOptions(precision, force=True),
                            log=lambda s: err_console.print(f"  {s}", highlight=False))
        paths.append(path)
    with _progress() as p:
        report = compare_bundles(paths, f"synthetic:{n_scenes}", "cpu", out / "compare", progress=p)
    print_comparison(report, console)
    from vlmedge.compare.compare import REPORT_FILES

    written = ", ".join(f for f in REPORT_FILES if (out / "compare" / f).is_file())
    console.print(f"comparison written to {out / 'compare'}: {written}", highlight=False)


@app.command()
def export(
    model: str = typer.Argument(..., help="built-in name (shapes-vlm), a model directory, or a hub id"),
    out: Path = typer.Option(..., "--out", help="bundle directory to write"),
    task: str = typer.Option("all", help="caption, vqa or all (what the model supports)"),
    opset: int = typer.Option(18, help="ONNX opset (17 or newer)"),
    max_batch: int = typer.Option(16, "--max-batch", help="largest batch (images x beams) the graphs declare"),
    max_length: Optional[int] = typer.Option(None, "--max-length",
                                             help="decoder positions declared, prompt + generated (default: 128 or the model's limit)"),
    prompt: Optional[str] = typer.Option(None, help='caption prompt for BLIP, e.g. "a picture of"'),
    target: str = typer.Option("tensorrt-portable", "--target",
                               help="tensorrt-portable (default) or onnxruntime: ONNX Runtime's fused ops, not for TensorRT"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty --out"),
) -> None:
    """Export a model's encoders and KV-cache decoder to ONNX, validate against PyTorch, write a bundle."""
    from vlmedge.export.exporter import ExportOptions, export_bundle
    from vlmedge.outdir import check_out

    check_out(out, force)  # fail before loading anything heavy
    _check_target(target)
    from vlmedge.models.registry import load_adapter

    _quiet_export_logs()
    adapter = load_adapter(model, prompt)
    if adapter.info.contract == "dual-encoder" and target != "tensorrt-portable":
        raise InputError(f"--target {target}: dual-encoder bundles have the portable target only (their graphs have no decoder to fuse)")
    if adapter.info.contract == "fusion" and target != "tensorrt-portable":
        raise InputError(f"--target {target}: fusion bundles have the portable target only (their graph has no decoder to fuse)")
    with _progress() as p:
        tasks: dict[str, object] = {}

        def on_graph(name: str, state: str) -> None:
            if name not in tasks:
                tasks[name] = p.add_task(f"{name}", total=1)
            if state == "done":
                p.update(tasks[name], completed=1, description=f"{name} [green]exported[/green]")
            elif state == "running":
                p.update(tasks[name], description=f"{name} (ONNX Runtime vs PyTorch)")
            else:
                p.update(tasks[name], description=f"{name} {state}")

        try:
            manifest = export_bundle(adapter, task, out, ExportOptions(opset=opset, force=force, max_batch=max_batch, max_length=max_length), on_graph=on_graph)
        except BaseException:
            p.live.transient = True  # a failure leaves its one error line, not a half-finished bar
            raise
        if "validation" in tasks:
            p.update(tasks["validation"], completed=1, description="validation [green]passed[/green]")
    if manifest.contract in ("dual-encoder", "fusion"):
        from vlmedge.export.dual_encoder import print_validation
    else:
        from vlmedge.export.inspect import print_validation

    print_validation(manifest.validation, console)
    _apply_target(out, target)
    console.print(f"bundle written to {out}")


@app.command()
def quantize(
    bundle: Path = typer.Argument(..., help="an FP32 bundle directory"),
    out: Path = typer.Option(..., "--out", help="bundle directory to write"),
    precision: str = typer.Option(..., "--precision", help="fp16, int8, or weight-only int8-wo / int4-wo (decoder MatMuls)"),
    calib: str = typer.Option("synthetic:128", "--calib", help="folder of images, or synthetic:N (scene world, val split)"),
    questions: Optional[Path] = typer.Option(None, "--questions", help="JSONL of questions about the calibration images (VQA)"),
    method: Optional[str] = typer.Option(None, "--method",
                                         help="INT8 activation ranges: entropy (default), minmax or percentile, or dynamic (per call; --target onnxruntime); weight-only: gptq (default) or rtn"),
    budget: Optional[float] = typer.Option(None, "--budget",
                                           help="accuracy loss allowed, in VQA accuracy points (default 1); BLEU-4 gets budget/50 (default 0.02)"),
    io_dtype: str = typer.Option("float32", "--io-dtype", help="FP16: graph inputs/outputs float32 (casts inside) or float16"),
    target: str = typer.Option("tensorrt-portable", "--target",
                               help="tensorrt-portable (default) or onnxruntime: ONNX Runtime's fused ops, not for TensorRT"),
    held_out: int = typer.Option(200, "--held-out",
                                 help="images kept aside for the accuracy check (synthetic:N adds them; a folder gives at most half)"),
    max_fallbacks: Optional[int] = typer.Option(None, "--max-fallbacks",
                                                help="nodes returned to float at most (default: as many as the budget needs)"),
    block_size: int = typer.Option(32, "--block-size", help="weight-only: weights sharing a scale along the input axis: 32, 64 or 128"),
    graphs: Optional[str] = typer.Option(None, "--graphs", help="weight-only: comma-separated graphs (default: the decoder)"),
    lm_head: Optional[bool] = typer.Option(None, "--lm-head/--no-lm-head",
                                           help="weight-only: the LM head at the variant's bits, or in float (default: in float, at 8 bits if tied to the token table)"),
    fmt: str = typer.Option("qdq", "--format", help="weight-only: qdq (DequantizeLinear, TensorRT and ONNX Runtime) or matmulnbits (ONNX Runtime only)"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty --out"),
) -> None:
    """Make an FP16, calibrated INT8 or weight-only INT8/INT4 variant of a bundle, checked against FP32 on held-out data."""
    from vlmedge.calibration.quantize import QuantizeOptions, quantize_bundle
    from vlmedge.outdir import check_out

    check_out(out, force)
    _check_target(target)
    from vlmedge.runtime.embedding import is_dual_encoder

    if is_dual_encoder(bundle):  # CLIP / SigLIP: checked on zero-shot accuracy, recall and cosine (calibration.dual_encoder)
        from vlmedge.calibration.dual_encoder import print_check, quantize_dual_encoder

        if target != "tensorrt-portable":
            raise InputError(f"--target {target}: dual-encoder bundles have the portable target only")

        _quiet_export_logs()
        with _progress() as p:
            manifest = quantize_dual_encoder(bundle, out, precision, calib, held_out, method, (1.0 if budget is None else budget) / 100,
                                             force, log=lambda s: p.console.print(s, highlight=False, markup=False))
        print_check(manifest, precision, console)
        console.print(f"bundle written to {out}")
        return
    from vlmedge.runtime.fusion import is_fusion

    if is_fusion(bundle):  # ViLT / BridgeTower: FP16, checked on answers and matching scores (calibration.fusion)
        from vlmedge.calibration.fusion import print_check as print_fusion_check
        from vlmedge.calibration.fusion import quantize_fusion

        if target != "tensorrt-portable":
            raise InputError(f"--target {target}: fusion bundles have the portable target only")
        _quiet_export_logs()
        with _progress() as p:
            manifest = quantize_fusion(bundle, out, precision, calib, held_out, method, (1.0 if budget is None else budget) / 100,
                                       force, log=lambda s: p.console.print(s, highlight=False, markup=False))
        print_fusion_check(manifest, precision, console)
        console.print(f"bundle written to {out}")
        return
    if method == "dynamic" and target != "onnxruntime":
        raise InputError("--method dynamic: ONNX Runtime's dynamic INT8 (MatMulInteger) does not run on TensorRT; "
                         "add --target onnxruntime, or calibrate (--method entropy) for the portable bundle")
    _quiet_export_logs()
    import logging

    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization logs through the root logger
    points = 1.0 if budget is None else budget
    options = QuantizeOptions(precision=precision, calib=calib, questions=questions, method=method,
                              budget_vqa=points / 100, budget_bleu=points / 50, io_dtype=io_dtype, force=force,
                              held_out=held_out, max_fallbacks=max_fallbacks, block_size=block_size, graphs=tuple(g.strip() for g in graphs.split(",") if g.strip()) if graphs else None,
                              lm_head=lm_head, format=fmt)
    with _progress() as p:
        manifest = quantize_bundle(bundle, out, options, log=lambda s: p.console.print(s, highlight=False), progress=p)
    p = manifest.precision
    acc = p["accuracy"]
    t = Table(title=f"{precision} variant of {bundle}, held-out check")
    for col in ("", "FP32", precision, "budget"):
        t.add_column(col)
    for k, budget_key in (("vqa_accuracy", "vqa_accuracy"), ("bleu4", "bleu4"), ("caption_exact_match", None)):
        if k in acc["fp32"]:
            t.add_row(k, f"{acc['fp32'][k]:.4f}", f"{acc[precision][k]:.4f}",
                      f"-{acc['budget'][budget_key]:.3g}" if budget_key else "")
    console.print(t)
    from vlmedge.calibration.confidence import describe

    console.print(f"variant - FP32 on the held-out set: {describe(acc['confidence'])}", highlight=False)
    excluded = sum(len(e) for e in p["excluded"].values())
    console.print(f"{excluded} nodes kept in float; calibration {p['calibration']['source']} "
                  f"({p['calibration']['calibration_images']} images, {p['calibration']['held_out_images']} held out)")
    _apply_target(out, target)
    console.print(f"bundle written to {out}")


def _check_target(target: str) -> None:
    from vlmedge.runtime.bundle import TARGETS

    if target not in TARGETS:
        raise InputError(f"--target: expected {' or '.join(TARGETS)}, got {target!r}")


def _apply_target(out: Path, target: str) -> None:
    """Rewrite the bundle just written at `out` for its target (the portable bundle needs nothing)."""
    if target == "onnxruntime":
        from vlmedge.export.ort_target import retarget

        entry = retarget(out, out, log=lambda s: err_console.print(f"onnxruntime target: {s}", highlight=False))
        fused = sum(sum(c.values()) for c in entry["fused_nodes"].values())
        console.print(f"onnxruntime target: {fused} fused nodes, greedy tokens equal to the unfused bundle's "
                      f"({', '.join(f'{t} {a}' for t, a in entry['token_agreement'].items())})")


@app.command()
def build(
    bundle: Path = typer.Argument(..., help="a bundle directory (FP32, FP16 or INT8)"),
    out: Path = typer.Option(..., "--out", help="engine directory to write"),
    workspace: float = typer.Option(4.0, "--workspace", help="builder workspace limit, GiB"),
    timing_cache: Optional[Path] = typer.Option(None, "--timing-cache", help="timing cache file, read and updated (per GPU)"),
    dla_core: Optional[int] = typer.Option(None, "--dla-core", help="run the vision encoder on this DLA core (batch 1), GPU fallback"),
    profile: Optional[list[str]] = typer.Option(None, "--profile", help="override an axis range: AXIS=MIN:OPT:MAX, e.g. batch=1:1:4"),
    version_compatible: bool = typer.Option(False, "--version-compatible", help="engines that later TensorRT versions of the same major can run"),
    hardware_compatible: bool = typer.Option(False, "--hardware-compatible", help="engines for any Ampere or newer GPU"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty --out"),
) -> None:
    """Build strongly typed TensorRT engines from a bundle (needs TensorRT and an NVIDIA GPU)."""
    from vlmedge.outdir import check_out
    from vlmedge.tensorrt.builder import BuildOptions, build_engines
    from vlmedge.tensorrt.profiles import parse_overrides

    check_out(out, force)
    options = BuildOptions(workspace_gib=workspace, timing_cache=timing_cache, dla_core=dla_core,
                           version_compatible=version_compatible, hardware_compatible=hardware_compatible,
                           profiles=parse_overrides(profile), force=force)
    with _progress() as p:
        tasks: dict[str, object] = {}

        def on_graph(name: str, state: str) -> None:
            if name not in tasks:
                tasks[name] = p.add_task(name, total=1)
            p.update(tasks[name], completed=state == "done", description=f"{name} {state}")

        em = build_engines(bundle, out, options, on_graph)
    console.print(f"engines for TensorRT {em['tensorrt']} on {em['gpu']['name']} (compute capability "
                  f"{em['gpu']['compute_capability']}) written to {out}", highlight=False)


@app.command("inspect")
def inspect_cmd(bundle: Path = typer.Argument(..., help="bundle directory")) -> None:
    """Print a bundle's manifest: graphs, inputs/outputs with dynamic axes, sizes, validation."""
    from vlmedge.export.inspect import print_bundle
    from vlmedge.runtime.bundle import load_bundle

    loaded = load_bundle(bundle)
    if loaded.manifest.contract == "dual-encoder":
        from vlmedge.export.dual_encoder import print_bundle
    if loaded.manifest.contract == "fusion":  # ViLT / BridgeTower
        from vlmedge.export.fusion import print_bundle as print_fusion

        print_fusion(loaded, console)
        return
    print_bundle(loaded, console)


def _open_pipeline(bundle: str, device: str, max_pixels: int, batch_size: int, shared_threads: bool = True):
    """A pipeline from a bundle directory or a built-in name (exported once into the cache).
    shared_threads: one onnxruntime thread pool for all graphs, for processes that only run pipelines
    (onnxruntime then refuses sessions with their own pools, e.g. those of quantization)."""
    from vlmedge.runtime.pipeline import open_pipeline, resolve_bundle

    def on_export(name: str, path: Path) -> None:
        _quiet_export_logs()
        err_console.print(f"exporting the built-in model {name} once, to {path}", highlight=False)

    def on_wait(holder: str) -> None:
        err_console.print(f"waiting for another process ({holder}) exporting {bundle} to the cache", highlight=False)

    from vlmedge.console import note, warn

    loaded = resolve_bundle(bundle, on_export, on_wait)
    if loaded.manifest.contract == "dual-encoder":  # CLIP / SigLIP: embeddings and classify, no generation
        from vlmedge.runtime.embedding import EmbeddingPipeline

        pipe = EmbeddingPipeline(loaded, device, max_pixels=max_pixels, batch_size=batch_size, warn=warn, shared_threads=shared_threads)
    elif loaded.manifest.contract == "fusion":  # ViLT / BridgeTower: answers from a vocabulary, image-text matching
        from vlmedge.runtime.fusion import FusionPipeline

        pipe = FusionPipeline(loaded, device, max_pixels=max_pixels, batch_size=batch_size, warn=warn, shared_threads=shared_threads)
    else:
        pipe = open_pipeline(loaded, device, max_pixels=max_pixels, batch_size=batch_size, warn=warn, shared_threads=shared_threads)
    if device != "cpu":  # which onnxruntime (or TensorRT) runs, and on which providers
        note(getattr(pipe.backend, "summary", pipe.backend.name))
    return pipe


def _answer_images(task: str, bundle: str, images: list[str], question: str | None, gen: dict,
                   device: str, batch_size: int, max_pixels: int, as_json: bool) -> None:
    """Caption / answer every image; a bad image is reported on its own line and the others still run."""
    from vlmedge.runtime.images import expand_paths, load_image

    pipe = _open_pipeline(bundle, device, max_pixels, batch_size)
    paths = expand_paths(images)
    if not paths:
        raise InputError(f"IMAGE: {' '.join(images)} matches no image files")
    if question is not None:  # the question is checked once, before any image is read
        pipe.question_ids([question])
    results: list[dict] = []
    good: list[tuple[int, object]] = []
    errors = 0
    for i, path in enumerate(paths):
        try:
            good.append((i, load_image(path, max_pixels)))
            results.append({"image": str(path)})
        except VlmedgeError as e:
            errors += 1
            results.append({"image": str(path), "error": str(e)})
            err_console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
    key = "caption" if task == "caption" else "answer"
    chunk = max(1, batch_size)
    show = len(good) > chunk and not as_json or len(good) > 4 * chunk
    with _progress() if show else _nullcontext() as p:
        bar = p.add_task(f"{task}", total=len(good)) if p else None
        for s in range(0, len(good), chunk):
            part = good[s : s + chunk]
            imgs = [img for _, img in part]
            out = (pipe.caption(imgs, return_ids=True, **gen) if task == "caption"
                   else pipe.vqa(imgs, [question] * len(imgs), return_ids=True, **gen))
            for (i, _), g in zip(part, out):
                results[i].update({key: g.text, "ids": list(g.ids)})
            if p:
                p.advance(bar, len(part))
    if as_json:
        console.print_json(json.dumps({"bundle": str(pipe.bundle.path), "task": task, "question": question,
                                       "results": results}))
    else:
        for r in results:
            if key in r:
                console.print(f"{r['image']}: {r[key]}" if len(paths) > 1 else r[key], highlight=False, markup=False)
    if errors:
        raise typer.Exit(2)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_DEVICE = typer.Option("cpu", help="cpu, cuda or tensorrt (ONNX Runtime execution providers; falls back with a message)")
_BATCH = typer.Option(8, "--batch-size", min=1, help="images per batch")
_PIXELS = typer.Option(64_000_000, "--max-pixels", min=1, help="refuse images with more pixels than this")
# generation options: unset ones take the model's own settings from the bundle (tasks.<task>.generation)
_BEAMS = typer.Option(None, "--beams", help="beam search width (1: greedy); default: the model's")
_MAX_NEW = typer.Option(None, "--max-new-tokens", help="default: the model's, else the bundle's")
_MIN_NEW = typer.Option(None, "--min-new-tokens", help="generate at least this many tokens; default: the model's")
_LENGTH_PENALTY = typer.Option(None, "--length-penalty", help="beam search length penalty; default: the model's")
_REPETITION = typer.Option(None, "--repetition-penalty", help="1.0: none; default: the model's")
_NGRAM = typer.Option(None, "--no-repeat-ngram-size", help="0: off; default: the model's")
_STREAM = typer.Option(False, "--stream", help="print the text as it is decoded (one beam: greedy or the model's sampling)")


def _stream_images(task: str, bundle: str, images: list[str], question: str | None, gen: dict, device: str,
                   max_pixels: int) -> None:
    """Caption / answer each image, printing its text piece by piece as the model decodes it."""
    from vlmedge.runtime.images import expand_paths, load_image

    pipe = _open_pipeline(bundle, device, max_pixels, 1)
    paths = expand_paths(images)
    if not paths:
        raise InputError(f"IMAGE: {' '.join(images)} matches no image files")
    if question is not None:
        pipe.question_ids([question])
    errors = 0
    for path in paths:
        try:
            img = load_image(path, max_pixels)
        except VlmedgeError as e:  # a bad image is reported on its own line and the others still run
            errors += 1
            err_console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
            continue
        _print_stream(pipe.stream(img, question, **gen), f"{path}: " if len(paths) > 1 else "")
    if errors:
        raise typer.Exit(2)


def _print_stream(pieces, head: str = "") -> None:
    sys.stdout.write(head)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def _no_stream_with(**given) -> None:
    for flag, on in given.items():
        if on:
            raise InputError(f"--stream: prints text as it comes; it does not go with --{flag.replace('_', '-')}")


def _generation(beams, max_new_tokens, min_new_tokens, length_penalty, repetition_penalty, no_repeat_ngram_size) -> dict:
    """The generation options given on the command line (HF names); the pipeline checks them."""
    given = dict(num_beams=beams, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                 length_penalty=length_penalty, repetition_penalty=repetition_penalty,
                 no_repeat_ngram_size=no_repeat_ngram_size)
    return {k: v for k, v in given.items() if v is not None}


@app.command()
def caption(
    bundle: str = typer.Argument(..., help="bundle directory, or a built-in model name (exported once, cached)"),
    images: list[str] = typer.Argument(..., help="image files, directories or glob patterns"),
    beams: Optional[int] = _BEAMS,
    max_new_tokens: Optional[int] = _MAX_NEW,
    min_new_tokens: Optional[int] = _MIN_NEW,
    length_penalty: Optional[float] = _LENGTH_PENALTY,
    repetition_penalty: Optional[float] = _REPETITION,
    no_repeat_ngram_size: Optional[int] = _NGRAM,
    device: str = _DEVICE,
    batch_size: int = _BATCH,
    max_pixels: int = _PIXELS,
    as_json: bool = typer.Option(False, "--json", help="print JSON: per image its caption and token ids, or its error"),
    out: Optional[Path] = typer.Option(None, "--out", help="write results to this JSONL instead; a rerun resumes where a stopped one ended"),
    ray: bool = typer.Option(False, "--ray", help="with --out: run on Ray Data across a cluster's workers, one pipeline per actor"),
    stream: bool = _STREAM,
) -> None:
    """Caption images with a bundle (ONNX Runtime; no PyTorch needed)."""
    gen = _generation(beams, max_new_tokens, min_new_tokens, length_penalty, repetition_penalty, no_repeat_ngram_size)
    if stream:
        _no_stream_with(json=as_json, out=out is not None, ray=ray)
        _stream_images("caption", bundle, images, None, gen, device, max_pixels)
        return
    if out is not None or ray:
        _caption_to_jsonl(bundle, images, out, ray, gen, device, batch_size, max_pixels)
        return
    _answer_images("caption", bundle, images, None, gen, device, batch_size, max_pixels, as_json)


@app.command("run")
def run_cmd(
    bundle: str = typer.Argument(..., help="bundle directory"),
    images: list[str] = typer.Argument(..., help="image files, directories or glob patterns"),
    task: str = typer.Option(..., "--task", help='a task the bundle names, e.g. "<OD>" or "<CAPTION>" (Florence-2)'),
    beams: Optional[int] = typer.Option(None, "--beams", min=1, help="beam search width (default: the bundle's)"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="default: the bundle's"),
    device: str = _DEVICE,
    batch_size: int = _BATCH,
    max_pixels: int = _PIXELS,
) -> None:
    """Run a named task on images and print JSON: per image its text, labels and boxes (original pixels)."""
    from vlmedge.runtime.images import expand_paths

    pipe = _open_pipeline(bundle, device, max_pixels, batch_size)
    paths = expand_paths(images)
    if not paths:
        raise InputError(f"IMAGE: {' '.join(images)} matches no image files")
    gen = {k: v for k, v in (("num_beams", beams), ("max_new_tokens", max_new_tokens)) if v is not None}
    out = pipe.run([str(p) for p in paths], task, **gen)
    console.print_json(json.dumps({"bundle": str(pipe.bundle.path), "task": task,
                                   "results": [{"image": str(p), **r.to_dict()} for p, r in zip(paths, out)]}))


def _caption_to_jsonl(bundle: str, images: list[str], out: Optional[Path], ray: bool, generation: dict, device: str,
                      batch_size: int, max_pixels: int) -> None:
    """`vlmedge caption --out FILE.jsonl [--ray]`: resumable results in a file (vlmedge.serving.offline)."""
    from vlmedge.runtime.images import expand_paths
    from vlmedge.serving import offline

    if out is None:
        raise InputError("--ray: needs --out FILE.jsonl (the results of a cluster run go to a file)")
    paths = expand_paths(images)
    if not paths:
        raise InputError(f"IMAGE: {' '.join(images)} matches no image files")
    with _progress() as p:
        bar = p.add_task("caption", total=len(paths))
        step = lambda n: p.advance(bar, n)  # noqa: E731
        if ray:
            try:
                import ray as _ray  # noqa: F401
            except ImportError:
                raise InputError("--ray needs Ray: pip install 'vlmedge[ray]'") from None
            s = offline.ray_caption_to_jsonl(bundle, device, paths, out, generation, batch_size, max_pixels, progress=step)
        else:
            pipe = _open_pipeline(bundle, device, max_pixels, batch_size)
            s = offline.caption_to_jsonl(pipe, paths, out, generation, batch_size, max_pixels, progress=step)
    err_console.print(f"{s.captioned} images written to {out}" + (f", {s.resumed} already there" if s.resumed else "")
                      + (f"; {s.errors} could not be read (their lines say why)" if s.errors else ""), highlight=False,
                      soft_wrap=True)
    if s.errors:
        raise typer.Exit(2)


@app.command()
def vqa(
    bundle: str = typer.Argument(..., help="bundle directory, or a built-in model name (exported once, cached)"),
    image: str = typer.Argument(..., help="an image file, a directory or a glob pattern"),
    question: str = typer.Argument(..., help="the question, asked of every image"),
    beams: Optional[int] = _BEAMS,
    max_new_tokens: Optional[int] = _MAX_NEW,
    min_new_tokens: Optional[int] = _MIN_NEW,
    length_penalty: Optional[float] = _LENGTH_PENALTY,
    repetition_penalty: Optional[float] = _REPETITION,
    no_repeat_ngram_size: Optional[int] = _NGRAM,
    device: str = _DEVICE,
    batch_size: int = _BATCH,
    max_pixels: int = _PIXELS,
    as_json: bool = typer.Option(False, "--json", help="print JSON: per image its answer and token ids, or its error"),
    stream: bool = _STREAM,
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1, help="fusion bundles (ViLT): answers per image with their scores (default 5)"),
) -> None:
    """Answer a question about images with a bundle (ONNX Runtime; no PyTorch needed)."""
    from vlmedge.runtime.fusion import is_fusion

    if is_fusion(bundle):  # ViLT: the top answers of its vocabulary, with scores (vlmedge.fusion_cli)
        from vlmedge.fusion_cli import vqa as fusion_vqa

        given = {"stream": stream, "beams": beams, "max-new-tokens": max_new_tokens, "min-new-tokens": min_new_tokens,
                 "length-penalty": length_penalty, "repetition-penalty": repetition_penalty, "no-repeat-ngram-size": no_repeat_ngram_size}
        flag = next((k for k, v in given.items() if v not in (None, False)), None)
        if flag:
            raise InputError(f"--{flag}: {bundle} is a fusion bundle, which scores a vocabulary of answers; it generates nothing")
        fusion_vqa(bundle, [image], question, top_k or 5, as_json, device, batch_size, max_pixels)
        return
    if top_k is not None:
        raise InputError("--top-k: for fusion bundles (ViLT), which score a vocabulary of answers; this bundle generates them")
    gen = _generation(beams, max_new_tokens, min_new_tokens, length_penalty, repetition_penalty, no_repeat_ngram_size)
    if stream:
        _no_stream_with(json=as_json)
        _stream_images("vqa", bundle, [image], question, gen, device, max_pixels)
        return
    _answer_images("vqa", bundle, [image], question, gen, device, batch_size, max_pixels, as_json)


@app.command()
def explain(
    bundle: str = typer.Argument(..., help="a cross-attention bundle directory, or a built-in model name"),
    image: str = typer.Argument(..., help="an image file"),
    out: Path = typer.Option(..., "--out", help="directory to write the heatmaps, attention.npz and tokens.json to"),
    question: Optional[str] = typer.Option(None, "--question", help="answer this question (VQA) instead of captioning"),
    reduce: str = typer.Option("mean", "--reduce", help="how layers and heads are combined: mean, last (layer) or max"),
    beams: Optional[int] = _BEAMS,
    max_new_tokens: Optional[int] = _MAX_NEW,
    device: str = _DEVICE,
    max_pixels: int = _PIXELS,
    force: bool = typer.Option(False, "--force", help="replace --out if it exists"),
) -> None:
    """Draw where each generated word looked: its cross-attention over the image, from the bundle's explain graphs."""
    from vlmedge.errors import InputError
    from vlmedge.evaluation.attention import draw, model_view
    from vlmedge.outdir import OutputDir
    from vlmedge.runtime.explain import REDUCTIONS

    if reduce not in REDUCTIONS:
        raise InputError(f"--reduce: {reduce!r} is not one of {', '.join(REDUCTIONS)}")
    gen = {k: v for k, v in (("num_beams", beams), ("max_new_tokens", max_new_tokens)) if v is not None}
    pipe = _open_pipeline(bundle, device, max_pixels, 1, shared_threads=False)
    if question is None:
        e = pipe.caption(image, return_attention=True, **gen)
    else:
        e = pipe.vqa(image, question, return_attention=True, **gen)
    e.heatmaps(reduce)  # a bundle without an image grid is refused before anything is written
    picture = model_view(pipe, image)
    with OutputDir(out, force) as writer:
        names = draw(e, picture, writer.path, reduce, question)
        writer.commit()
    console.print(e.text, highlight=False)
    err_console.print(f"{len(e.ids)} tokens: {len(names) - 3} heatmaps, tokens.png, attention.npz and tokens.json in {out}",
                      highlight=False)


@app.command()
def chat(
    bundle: str = typer.Argument(..., help="a decoder-only bundle directory (SmolVLM, Idefics3, LLaVA)"),
    text: str = typer.Argument(..., help="the user's message"),
    image: Optional[list[str]] = typer.Option(None, "--image", help="an image for the message (repeat for several)"),
    beams: Optional[int] = _BEAMS,
    max_new_tokens: Optional[int] = _MAX_NEW,
    repetition_penalty: Optional[float] = _REPETITION,
    device: str = _DEVICE,
    max_pixels: int = _PIXELS,
    as_json: bool = typer.Option(False, "--json", help="print JSON: the answer and its token ids"),
    stream: bool = _STREAM,
) -> None:
    """One user turn (text and images) through a decoder-only bundle's chat template; prints the answer."""
    if stream:
        _no_stream_with(json=as_json)
    pipe = _open_pipeline(bundle, device, max_pixels, 1)
    if not hasattr(pipe, "chat"):
        raise InputError(f"{bundle}: chat needs a decoder-only bundle (manifest contract prefix); use caption or vqa")
    gen = _generation(beams, max_new_tokens, None, None, repetition_penalty, None)
    content = [{"type": "image", "image": i} for i in image or []] + [{"type": "text", "text": text}]
    if stream:
        _print_stream(pipe.stream_chat([{"role": "user", "content": content}], **gen))
        return
    out = pipe.chat([{"role": "user", "content": content}], return_ids=True, **gen)
    if as_json:
        console.print_json(json.dumps({"bundle": str(pipe.bundle.path), "answer": out.text, "ids": list(out.ids)}))
    else:
        console.print(out.text, highlight=False, markup=False)


@app.command()
def doctor(as_json: bool = typer.Option(False, "--json", help="print the report as JSON")) -> None:
    """What is installed for the GPU path (onnxruntime, TensorRT, CUDA, GPU, DLA) and what each --device would use."""
    from vlmedge.doctor import diagnose, print_report

    report = diagnose()
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report, console)


def _register_compare() -> None:
    from vlmedge.compare.command import compare_command

    app.command("compare")(compare_command)


_register_compare()


def _register_encoders() -> None:
    """classify, index, search: the dual-encoder bundles' commands (vlmedge.retrieval.commands)."""
    from vlmedge.retrieval import commands

    app.command("classify")(commands.classify)
    app.command("index")(commands.index)
    app.command("search")(commands.search)
    from vlmedge import fusion_cli

    app.command("match")(fusion_cli.match)  # the fusion bundles' image-text matching (ViLT retrieval, BridgeTower)


_register_encoders()


@app.command()
def serve(
    bundle: str = typer.Argument(..., help="bundle or engine directory, or a built-in model name"),
    device: str = _DEVICE,
    host: str = typer.Option("127.0.0.1", help="address to listen on (default: this machine only)"),
    port: int = typer.Option(8000, min=0, max=65535, help="TCP port"),
    max_batch: int = typer.Option(16, "--max-batch", min=1, help="requests per model call (images x beams stay within the bundle's range)"),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", min=0, help="how long a batch waits for requests on their way in"),
    batching: str = typer.Option("static", "--batching", help="static: each batch runs to its end; inflight: one-beam requests "
                                 "join the running decode batch between steps (cross-attention bundles)"),
    max_queue: int = typer.Option(64, "--max-queue", min=1, help="requests admitted at once; more get 429 with Retry-After"),
    max_body_mb: float = typer.Option(20.0, "--max-body-mb", min=0.001, help="largest request body, MB (413 above)"),
    max_header_kb: float = typer.Option(32.0, "--max-header-kb", min=1, help="largest request header block, KiB (431 above)"),
    max_pixels: int = typer.Option(16_000_000, "--max-pixels", min=1, help="refuse images with more pixels than this (400)"),
    timeout: float = typer.Option(30.0, "--timeout", min=0.001, help="seconds before a request gets 504"),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="require Authorization: Bearer <the key this environment variable holds>"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="ONNX Runtime threads (default: all cores)"),
    ray: bool = typer.Option(False, "--ray", help="run as a Ray Serve deployment (needs the ray extra)"),
    replicas: int = typer.Option(1, "--replicas", min=1, help="with --ray: replicas (one GPU each on a GPU device)"),
    autoscaling: Optional[str] = typer.Option(None, "--autoscaling", help='with --ray: Serve autoscaling_config as JSON, e.g. \'{"min_replicas": 1, "max_replicas": 4}\''),
    replica_cpus: Optional[float] = typer.Option(None, "--replica-cpus", min=0, help="with --ray: CPUs reserved per replica (default 1)"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="with --ray: a running cluster (default: RAY_ADDRESS, else a local one)"),
) -> None:
    """Serve captions and answers over HTTP with dynamic batching (POST /v1/caption, /v1/vqa; /docs)."""
    from dataclasses import replace as _replace

    from vlmedge.serving.options import ServeOptions, api_key_from_env
    from vlmedge.serving.server import is_loopback, missing_extra

    options = ServeOptions(bundle=bundle, device=device, max_batch=max_batch, max_wait_ms=max_wait_ms,
                           max_queue=max_queue, max_body_bytes=int(max_body_mb * 1024 * 1024),
                           max_header_bytes=int(max_header_kb * 1024), max_pixels=max_pixels,
                           timeout_s=timeout, api_key=api_key_from_env(api_key_env), threads=threads, batching=batching)
    options.check()
    if not is_loopback(host) and options.api_key is None:
        err_console.print(f"[yellow]warning:[/yellow] listening on {escape(host)} without an API key: anyone who "
                          "can reach this port can use the model (--api-key-env VAR to require one)", highlight=False)
    log = lambda s: err_console.print(s, highlight=False, markup=False, soft_wrap=True)  # noqa: E731
    if ray:
        scaling = None
        if autoscaling:
            try:
                scaling = json.loads(autoscaling)
            except json.JSONDecodeError as e:
                raise InputError(f"--autoscaling: not valid JSON ({e})") from None
            if not isinstance(scaling, dict):
                raise InputError("--autoscaling: expected a JSON object, e.g. '{\"min_replicas\": 1, \"max_replicas\": 4}'")
        try:
            from vlmedge.serving.ray_serve import serve_ray
        except ImportError as e:
            raise missing_extra(e, "ray") from None
        serve_ray(options, host, port, replicas, scaling, replica_cpus, address=ray_address, log=log)
        return
    from vlmedge.serving.server import serve_uvicorn

    pipe = _open_pipeline(bundle, device, max_pixels, max_batch)  # a bad bundle is one line here, before binding
    serve_uvicorn(_replace(options, model_name=Path(bundle).name), host, port, pipe, log=log)


def _quiet_export_logs() -> None:
    """torch.onnx's exporter logs warnings a user cannot act on; keep the terminal to our progress."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TORCH_LOGS", "-all")
    for name in ("torch", "torch.onnx", "torch.export", "onnxscript", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _error(message: str) -> None:
    if _verbose:
        import traceback

        traceback.print_exc()
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)


def os_error_line(e: OSError) -> str:
    """An OS error (disk full, permission denied, read-only file system) as one line naming the path."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    code = errno.errorcode.get(e.errno, "") if e.errno else ""
    what = f"{e.strerror} ({code})" if e.strerror and code else (e.strerror or str(e) or type(e).__name__)
    return f"{where}: {what}" if where else what


def main(argv: list[str] | None = None) -> int:
    """Runs the app and returns its exit status. A VlmedgeError or an OSError becomes one line on
    stderr and exit 2; anything else one line and exit 1; `--verbose` adds the traceback."""
    global _verbose
    _verbose = False
    try:
        app(args=argv, prog_name="vlmedge")  # usage errors: typer prints them and exits 2
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except VlmedgeError as e:
        _error(str(e))
        return e.exit_code
    except OSError as e:
        _error(os_error_line(e))
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except Exception as e:  # a bug: still one line, and the traceback on request
        from vlmedge.errors import first_line

        _error(f"{type(e).__name__}: {first_line(e)} (a vlmedge bug; run with --verbose for the traceback)")
        return 1
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
