"""`compare_bundles`: variants of one model (FP32, FP16, INT8, ...) on the same data, side by side.

Every bundle captions and answers the same evaluation set on the same device. Per bundle: task
accuracy; token agreement with the first (reference) bundle; per-graph output error against the
reference on the same recorded inputs; batch-1 latency per stage; size on disk; peak resident
memory while it was loaded and run. The bundles run one after another in this process, each
released before the next is loaded.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import os
import platform
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from vlmedge.compare import measure
from vlmedge.compare.evalset import EvalData, load_eval, score_answers, score_captions
from vlmedge.errors import BundleError, InputError
from vlmedge.runtime.backends import DEVICES
from vlmedge.runtime.bundle import Bundle, load_bundle
from vlmedge.runtime.images import load_image
from vlmedge.runtime.pipeline import Generation, open_pipeline

WARMUP = 2  # untimed calls before the latency runs
TASKS = ("caption", "vqa")


def check_same_model(ref: Bundle, other: Bundle) -> None:
    """Refuse bundles exported from different models: comparing them would say nothing about precision."""
    a, b = ref.manifest, other.manifest
    differs = None
    if a.family != b.family:
        differs = f"family {b.family} vs {a.family}"
    elif a.architecture != b.architecture:
        differs = f"architecture {b.architecture} vs {a.architecture}"
    else:
        sa, sb = a.provenance.get("source_sha256"), b.provenance.get("source_sha256")
        if sa and sb and sa != sb:  # without source hashes, family and architecture are all there is to check
            differs = "provenance.source_sha256 differs"
    if differs:
        raise BundleError(f"{other.path} and {ref.path} were exported from different models ({differs}); "
                          "compare variants of one model")


def _labels(bundles: Sequence[Bundle]) -> list[str]:
    """Folder names, numbered where two bundles share one."""
    names = [b.path.name or str(b.path) for b in bundles]
    return [n if names.count(n) == 1 else f"{n} ({names[:i + 1].count(n)})" for i, n in enumerate(names)]


def _latency_items(data: EvalData, task: str, runs: int) -> list[Any]:
    """Up to `runs` images (caption) or (image, question) pairs (vqa), decoded once, so that latency
    does not include reading files."""
    def pixels(img):
        return img if isinstance(img, np.ndarray) else np.asarray(load_image(img))

    if task == "caption":
        return [pixels(img) for img in data.images[:runs]]
    return [(pixels(data.images[q.image]), q.text) for q in data.questions[:runs]]


def _once(warn: Callable[[str], None] | None) -> Callable[[str], None]:
    """`warn` (default: stderr) saying each message once, not once per bundle loaded."""
    seen: set[str] = set()

    def say(msg: str) -> None:
        if msg not in seen:
            seen.add(msg)
            if warn:
                warn(msg)
            else:
                print(f"vlmedge: {msg}", file=sys.stderr)

    return say


class _Steps:
    """One progress-bar task per bundle (any object with rich Progress's add_task / update / advance)."""

    def __init__(self, progress, label: str, total: int):
        self.progress, self.label = progress, label
        self.task = progress.add_task(label, total=total) if progress else None

    def stage(self, what: str) -> None:
        if self.progress:
            self.progress.update(self.task, description=f"{self.label}: {what}")

    def advance(self, n: int) -> None:
        if self.progress:
            self.progress.advance(self.task, n)


@dataclass
class _Run:
    """What one bundle produced while it was loaded."""

    gens: dict[str, list[Generation]]  # task -> greedy generations over the evaluation set
    latency: dict | None
    outs: list  # its graphs' outputs on the recorded feeds
    backend: str
    memory: measure.PeakMemory
    maps: dict | None = None  # task -> per item, [tokens, image positions]: its attention along the reference's tokens


def _measure(bundle: Bundle, label: str, data: EvalData, samples: list, device: str, runs: int, batch_size: int,
         progress, warn, shared_threads: bool, forced: dict | None = None) -> _Run:
    """`forced`: the reference's generations, along which the attention maps are taken (None: this is the
    reference, its own)."""
    m = bundle.manifest
    tasks = [t for t in TASKS if t in m.tasks and t in data.tasks]
    lat_task = "caption" if "caption" in m.tasks else "vqa" if data.questions else None
    lat_items = _latency_items(data, lat_task, runs) if lat_task else []
    n_items = (len(data.captioned) if "caption" in tasks else 0) + (len(data.questions) if "vqa" in tasks else 0)
    steps = _Steps(progress, label, n_items + (WARMUP + runs if lat_task else 0) + len(samples))
    with measure.PeakMemory() as mem:
        steps.stage("loading")
        pipe = open_pipeline(bundle, device, batch_size=batch_size, warn=warn, shared_threads=shared_threads)
        steps.stage("captioning and answering")
        gens = measure.generations(pipe, data, tasks, batch_size, steps.advance)
        steps.stage("timing")
        lat = measure.latency(pipe, lat_task, lat_items, runs, WARMUP, steps.advance) if lat_task else None
        steps.stage("comparing graph outputs")
        prompt_rows = m.axes["prompt_batch"].max if "prompt_batch" in m.axes else None
        outs = measure.run_samples(pipe.backend, list(m.graphs), samples, steps.advance, prompt_rows)
        steps.stage("attention maps")
        maps = measure.attention_maps(pipe, data, tasks, gens if forced is None else forced) if m.contract == "cross-attention" else None
        backend = pipe.backend.name
        del pipe
        gc.collect()
    return _Run(gens, lat, outs, backend, mem, maps)


def _row(bundle: Bundle, label: str, data: EvalData, ref_tasks: list[str], run: _Run, ref: _Run,
         samples: list) -> dict:
    m = bundle.manifest
    gens = run.gens
    pairs = {t: (ref.gens[t], gens[t]) for t in TASKS if t in gens and t in ref.gens}
    agree = {t: measure.agreement(r, o) for t, (r, o) in pairs.items()}
    n = sum(len(r) for r, _ in pairs.values())
    agree["overall"] = sum(agree[t] * len(r) for t, (r, _) in pairs.items()) / n if n else None
    errors = measure.graph_errors(str(bundle.path), samples, ref.outs, run.outs)
    return {
        "label": label,
        "path": str(bundle.path),
        "reference": run is ref,
        "family": m.family,
        "precision": m.precision.get("dtype", "?"),
        "precision_details": m.precision,
        "backend": run.backend,
        "tasks": list(m.tasks),
        "absent_tasks": [t for t in ref_tasks if t not in m.tasks],
        "caption": score_captions(data, [g.text for g in gens["caption"]]) if "caption" in gens else None,
        "vqa": score_answers(data, [g.text for g in gens["vqa"]]) if "vqa" in gens else None,
        "agreement": agree,
        "graphs": errors,
        "graph_summary": measure.error_summary(errors),
        "attention_drift": measure.attention_drift(ref.maps, run.maps),
        "latency_ms": run.latency,
        "size_bytes": measure.size_on_disk(bundle),
        "peak_rss_bytes": run.memory.peak,
        "rss_before_bytes": run.memory.before,
        "predictions": {t: [g.text for g in gs] for t, gs in gens.items()},
    }


def compare_bundles(paths: Sequence[str | os.PathLike | Bundle], eval_spec: str, device: str = "cpu",
                    out_dir: str | os.PathLike | None = None, progress=None, *, runs: int = 20,
                    batch_size: int = 8, warn: Callable[[str], None] | None = None,
                    shared_threads: bool = False) -> dict:
    """Run every bundle on the evaluation set `eval_spec` (synthetic:N or a JSONL file) and return the
    report; with `out_dir`, also write report.json, report.md and plot.png there. The first bundle is
    the reference. `progress`: a rich Progress (or None); `shared_threads`: as in `vlmedge.load`."""
    if device not in DEVICES:
        raise InputError(f"--device: {device!r} is not one of {', '.join(DEVICES)}")
    if not paths:
        raise InputError("BUNDLE: give at least one bundle directory")
    if runs < 1:
        raise InputError(f"runs: expected >= 1, got {runs}")
    if out_dir is not None:
        check_report_dir(Path(out_dir))  # fail now, not after the whole comparison
    bundles = [p if isinstance(p, Bundle) else load_bundle(p) for p in paths]
    ref = bundles[0]
    for b in bundles[1:]:
        check_same_model(ref, b)
    data = load_eval(eval_spec)
    ref_tasks = [t for t in TASKS if t in ref.manifest.tasks and t in data.tasks]
    if not ref_tasks:
        raise InputError(f"--eval {eval_spec}: has references for {' and '.join(data.tasks)}, which the reference "
                         f"bundle {ref.path} does not do (it does {', '.join(ref.manifest.tasks)})")
    if "caption" in data.tasks and importlib.util.find_spec("pycocoevalcap") is None:  # fail before running, not after
        raise InputError("caption metrics (BLEU-4, CIDEr) need pycocoevalcap: pip install pycocoevalcap")
    labels = _labels(bundles)
    warn = _once(warn)

    # the reference's graph inputs on real data, recorded once
    pipe = open_pipeline(ref, device, batch_size=batch_size, warn=warn, shared_threads=shared_threads)
    samples = measure.record_graph_inputs(pipe, data, ref_tasks)
    del pipe

    first = _measure(ref, labels[0], data, samples, device, runs, batch_size, progress, warn, shared_threads)
    results = [first] + [_measure(b, label, data, samples, device, runs, batch_size, progress, warn, shared_threads, first.gens)
                         for b, label in zip(bundles[1:], labels[1:])]
    report = {
        "reference": labels[0],
        "device": device,
        "eval": data.describe(),
        "graph_samples": {"items": measure.SAMPLE_ITEMS, "steps": list(measure.STEPS_KEPT),
                          "calls": dict(Counter(graph for graph, _ in samples))},
        "machine": _machine(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "bundles": [_row(b, label, data, ref_tasks, r, results[0], samples)
                    for b, label, r in zip(bundles, labels, results)],
    }
    if out_dir is not None:
        write_outputs(report, Path(out_dir), warn)
    return report


def _machine() -> dict:
    import onnxruntime

    from vlmedge import __version__

    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "onnxruntime": onnxruntime.__version__, "vlmedge": __version__}


def _finite(x: Any) -> Any:
    """NaN and infinity as null: report.json stays standard JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


REPORT_FILES = ("report.json", "report.md", "plot.png")


def check_report_dir(out_dir: Path) -> None:
    """Refuse, before any work, a folder compare could not write or would clobber: compare replaces
    a folder only when it is new, empty, or holds nothing but an earlier report."""
    from vlmedge.outdir import check_out

    if out_dir.is_dir() and not {p.name for p in out_dir.iterdir()} <= set(REPORT_FILES):
        raise InputError(f"--out {out_dir}: holds files other than {', '.join(REPORT_FILES)}; "
                         "choose a new or empty folder")
    check_out(out_dir, force=True)


def write_outputs(report: dict, out_dir: Path, warn: Callable[[str], None] | None = None) -> dict[str, Path]:
    """report.json, report.md and plot.png in `out_dir`, swapped in together: a kill never leaves a
    new report beside an old plot. Without matplotlib there is no plot, and `warn` says so."""
    from vlmedge.compare.plot import PLOT, plot_unavailable, save_plot
    from vlmedge.compare.render import comparison_markdown
    from vlmedge.outdir import OutputDir

    check_report_dir(out_dir)
    text = json.dumps(_finite(report), indent=2) + "\n"
    no_plot = plot_unavailable()
    markdown = comparison_markdown(report, no_plot)
    with OutputDir(out_dir, force=True) as w:
        (w.path / "report.json").write_text(text)
        (w.path / "report.md").write_text(markdown)
        if not no_plot:
            save_plot(report, w.path / PLOT)
        w.commit()
    if no_plot and warn:
        warn(no_plot)
    files = {"json": out_dir / "report.json", "markdown": out_dir / "report.md", "plot": out_dir / PLOT}
    return {k: v for k, v in files.items() if not (k == "plot" and no_plot)}
