"""`vlmedge compare` of dual-encoder bundles (CLIP, SigLIP): variants of one model side by side on what
matters for this contract, against the first bundle (the reference, usually FP32).

Per bundle, on the same evaluation images: zero-shot accuracy over the scene world's colour x shape labels
(where the images are scenes) and agreement of the top label with the reference's, text-to-image retrieval
recall@1 and recall@5 (captions as queries, where there are captions), the cosine of image and text
embeddings to the reference's, batch-1 latency of each encoder (median of `runs` timed calls after 2
warm-up calls), and the size of the graphs on disk. Written as report.json and report.md through the one
writer of output directories.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from vlmedge.errors import InputError

REPORT_FILES = ("report.json", "report.md")


def evaluation_images(spec: str) -> tuple[list, list]:
    """(images, captions) from synthetic:N (the scene world's test split, with captions) or a folder of images."""
    from vlmedge.calibration.data import from_folder

    if spec.startswith("synthetic:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            raise InputError(f"--eval {spec}: expected synthetic:N with N a number") from None
        if n < 2:
            raise InputError(f"--eval {spec}: expected at least 2 images")
        from vlmedge.data.scenes import scenes

        scs = list(scenes("test", 0, n))
        return [s.image for s in scs], [s.caption for s in scs]
    cs = from_folder(Path(spec))
    return cs.images, [None] * len(cs.images)


def _latency(fn, runs: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def compare_dual_encoders(bundles: list, eval_spec: str, device: str, out: Path, runs: int = 20, progress=None) -> dict:
    """Measure every bundle against the first; write report.json and report.md to `out`; returns the report."""
    from vlmedge.calibration.dual_encoder import evaluate
    from vlmedge.outdir import OutputDir
    from vlmedge.runtime.embedding import EmbeddingPipeline
    from vlmedge.retrieval.milvus import model_fingerprint

    if len(bundles) < 2:
        raise InputError("compare: give the reference bundle and at least one variant of it")
    images, captions = evaluation_images(eval_spec)
    pipes = [EmbeddingPipeline(b, device, shared_threads=True) for b in bundles]
    ref = pipes[0]
    for b, p in zip(bundles[1:], pipes[1:]):
        if model_fingerprint(p.manifest) != model_fingerprint(ref.manifest):
            raise InputError(f"{b.path}: not a variant of {bundles[0].path} (other source weights or width)")
    task = progress.add_task("compare", total=len(pipes)) if progress else None
    rows = []
    for b, p in zip(bundles, pipes):
        r = evaluate(ref, p, images, captions)
        size = sum((b.path / g.file).stat().st_size for g in b.manifest.graphs.values())
        rows.append({"bundle": str(b.path), "precision": b.manifest.precision.get("dtype"), "graph_bytes": size,
                     "image_ms": _latency(lambda: p.embed_images(images[:1]), runs),
                     "text_ms": _latency(lambda: p.embed_texts(["a photo of a red circle."]), runs),
                     **{k: v for k, v in r.items() if k not in ("fp32", "variant", "images")},
                     **r.get("variant", {})})
        if progress:
            progress.advance(task)
    report = {"eval": eval_spec, "images": len(images), "device": device, "reference": str(bundles[0].path), "bundles": rows}
    with OutputDir(out, force=True) as w:
        (w.path / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (w.path / "report.md").write_text(markdown(report))
        w.commit()
    return report


COLUMNS = (("precision", "precision", "{}"), ("zero_shot_accuracy", "zero-shot acc.", "{:.3f}"),
           ("zero_shot_agreement", "top label = ref", "{:.3f}"), ("recall@1", "R@1", "{:.3f}"), ("recall@5", "R@5", "{:.3f}"),
           ("image_cosine", "cos images", "{:.5f}"), ("text_cosine", "cos texts", "{:.5f}"),
           ("image_ms", "image ms", "{:.2f}"), ("text_ms", "text ms", "{:.2f}"), ("graph_bytes", "MB", "{:.2f}"))


def _cells(row: dict) -> list[str]:
    values = {**row, "image_cosine": row["cosine"]["image_mean"], "text_cosine": row["cosine"]["text_mean"],
              "graph_bytes": row["graph_bytes"] / 1e6}
    return [fmt.format(values[k]) if k in values else "" for k, _, fmt in COLUMNS]


def markdown(report: dict) -> str:
    head = ["bundle", *(name for _, name, _ in COLUMNS)]
    lines = [f"# Dual-encoder variants against {report['reference']}", "",
             f"{report['images']} images ({report['eval']}), device {report['device']}; batch-1 latency, median.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([Path(r["bundle"]).name, *_cells(r)]) + " |" for r in report["bundles"]]
    return "\n".join(lines) + "\n"


def print_report(report: dict, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"dual-encoder variants, {report['images']} images ({report['eval']})")
    for col in ["bundle", *(name for _, name, _ in COLUMNS)]:
        t.add_column(col)
    for r in report["bundles"]:
        t.add_row(escape(Path(r["bundle"]).name), *_cells(r))
    console.print(t)
