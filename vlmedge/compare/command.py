"""`vlmedge compare`: the command-line face of `compare_bundles` (registered by vlmedge.cli)."""

from __future__ import annotations

from pathlib import Path

import typer


def compare_command(
    bundles: list[str] = typer.Argument(..., help="bundle directories (or built-in model names) of one model; "
                                                  "the first is the reference"),
    eval_spec: str = typer.Option("synthetic:100", "--eval",
                                  help="synthetic:N (the scene world's test split) or a JSONL file of images with "
                                       "reference captions and questions"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or tensorrt (ONNX Runtime execution providers)"),
    out: Path = typer.Option(..., "--out", help="folder for report.json, report.md and plot.png"),
    runs: int = typer.Option(20, "--runs", min=1, help="batch-1 calls timed per bundle, after 2 warm-up calls"),
) -> None:
    """Compare variants of one model (e.g. FP32, FP16, INT8) on the same data: accuracy, token agreement
    and graph error against the first bundle, latency, size and peak memory."""
    from vlmedge.compare.compare import compare_bundles
    from vlmedge.compare.render import print_comparison
    from vlmedge.console import console, err_console, progress, warn
    from vlmedge.runtime.pipeline import resolve_bundle

    def on_export(name: str, path: Path) -> None:
        err_console.print(f"exporting the built-in model {name} once, to {path}", highlight=False)

    resolved = [resolve_bundle(b, on_export) for b in bundles]
    if any(b.manifest.contract == "dual-encoder" for b in resolved):  # CLIP / SigLIP: vlmedge.compare.encoders
        from vlmedge.compare.encoders import REPORT_FILES, compare_dual_encoders, print_report

        with progress() as p:
            report = compare_dual_encoders(resolved, eval_spec, device, out, runs, progress=p)
        print_report(report, console)
        console.print(f"report written to {out}: {', '.join(REPORT_FILES)}", highlight=False)
        return
    if any(b.manifest.contract == "fusion" for b in resolved):  # ViLT / BridgeTower: vlmedge.compare.fusion
        from vlmedge.compare.fusion import REPORT_FILES as FUSION_FILES
        from vlmedge.compare.fusion import compare_fusion, print_report as print_fusion

        with progress() as p:
            report = compare_fusion(resolved, eval_spec, device, out, runs, progress=p)
        print_fusion(report, console)
        console.print(f"report written to {out}: {', '.join(FUSION_FILES)}", highlight=False)
        return
    with progress() as p:
        report = compare_bundles(resolved, eval_spec, device, out, progress=p, runs=runs, warn=warn,
                                 shared_threads=True)  # as the other commands run
    print_comparison(report, console)
    from vlmedge.compare.compare import REPORT_FILES

    console.print(f"report written to {out}: {', '.join(f for f in REPORT_FILES if (out / f).is_file())}", highlight=False)
