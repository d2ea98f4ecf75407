"""`vlmedge compare` of fusion bundles (ViLT, BridgeTower): variants of one model side by side against the
first bundle (the reference, usually FP32), on what this contract returns.

Per bundle, on the same evaluation images and texts (questions about them for vqa; each image with the
captions of its neighbours and its own for match, as calibration.fusion checks variants): agreement of the
best answer (or best text per image) with the reference's, near ties counted as agreeing and strict agreement
beside it, the largest score difference from the reference's, batch-1 latency of one image-text pair (median
of `runs` timed calls after 2 warm-up calls), and the graph's size on disk. Written as report.json and
report.md through the one writer of output directories.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlmedge.errors import InputError

REPORT_FILES = ("report.json", "report.md")
COLUMNS = (("precision", "precision", "{}"), ("top1_agreement", "best = ref", "{:.3f}"), ("top1_exact", "exactly", "{:.3f}"),
           ("score_max_abs", "max score diff", "{:.2g}"), ("pair_ms", "pair ms", "{:.2f}"), ("graph_mb", "MB", "{:.2f}"))


def compare_fusion(bundles: list, eval_spec: str, device: str, out: Path, runs: int = 20, progress=None) -> dict:
    """Measure every bundle against the first; write report.json and report.md to `out`; returns the report."""
    from vlmedge.calibration.fusion import _pairs, evaluate
    from vlmedge.compare.encoders import _latency, evaluation_images
    from vlmedge.outdir import OutputDir
    from vlmedge.runtime.fusion import FusionPipeline

    if len(bundles) < 2:
        raise InputError("compare: give the reference bundle and at least one variant of it")
    ref_m = bundles[0].manifest
    for b in bundles[1:]:
        m = b.manifest
        if m.contract != "fusion" or (m.architecture, m.tasks, m.provenance.get("source_sha256")) != \
                (ref_m.architecture, ref_m.tasks, ref_m.provenance.get("source_sha256")):
            raise InputError(f"{b.path}: not a variant of {bundles[0].path} (another contract, head or source weights)")
    images, captions = evaluation_images(eval_spec)
    pipes = [FusionPipeline(b, device, shared_threads=True) for b in bundles]
    pair_images, pair_texts = _pairs(pipes[0], images, [], captions)
    task = progress.add_task("compare", total=len(pipes)) if progress else None
    rows = []
    for b, p in zip(bundles, pipes):
        r = evaluate(pipes[0], p, pair_images, pair_texts)
        rows.append({"bundle": str(b.path), "precision": b.manifest.precision.get("dtype"), **r,
                     "pair_ms": _latency(lambda: p.logits(pair_images[:1], pair_texts[:1]), runs),
                     "graph_mb": b.graph_bytes("fusion") / 1e6})
        if progress:
            progress.advance(task)
    report = {"eval": eval_spec, "images": len(images), "device": device, "reference": str(bundles[0].path),
              "task": pipes[0].task, "bundles": rows}
    with OutputDir(out, force=True) as w:
        (w.path / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (w.path / "report.md").write_text(markdown(report))
        w.commit()
    return report


def _cells(row: dict) -> list[str]:
    return [fmt.format(row[k]) if k in row else "" for k, _, fmt in COLUMNS]


def markdown(report: dict) -> str:
    head = ["bundle", *(name for _, name, _ in COLUMNS)]
    lines = [f"# Fusion variants ({report['task']}) against {report['reference']}", "",
             f"{report['images']} images ({report['eval']}), device {report['device']}; batch-1 latency of one pair, median.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([Path(r["bundle"]).name, *_cells(r)]) + " |" for r in report["bundles"]]
    return "\n".join(lines) + "\n"


def print_report(report: dict, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"fusion variants ({report['task']}), {report['images']} images ({report['eval']})")
    for col in ["bundle", *(name for _, name, _ in COLUMNS)]:
        t.add_column(col)
    for r in report["bundles"]:
        t.add_row(escape(Path(r["bundle"]).name), *_cells(r))
    console.print(t)
