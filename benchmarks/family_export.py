"""Export time and bundle size of each tiny published-checkpoint architecture (tests/families.py).

    PYTHONPATH=. python benchmarks/family_export.py [--out DIR] [NAME ...]

Builds each tiny model, exports it with the default options (validation on 8 scenes included), and
prints a Markdown table: seconds per graph, validation seconds, total, and the bundle's size on disk.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from families import CHECKPOINTS  # noqa: E402

from vlmedge.export.exporter import ExportOptions, export_bundle  # noqa: E402
from vlmedge.models.registry import load_adapter  # noqa: E402


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*", default=list(CHECKPOINTS))
    ap.add_argument("--out", type=Path, default=None, help="where models and bundles go (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    root = args.out or Path(tempfile.mkdtemp(prefix="family-export-"))
    print("| tiny model of | architecture | vision / init / step export (s) | validation (s) | total (s) | bundle (KiB) |")
    print("|---|---|---|---|---|---|")
    for name in args.names:
        checkpoint, build, task = CHECKPOINTS[name]
        model_dir = build(root / "models" / name)
        t0 = time.perf_counter()
        adapter = load_adapter(str(model_dir))
        manifest = export_bundle(adapter, task, root / "bundles" / name, ExportOptions(force=True))
        total = time.perf_counter() - t0
        s = manifest.provenance["export_seconds"]
        traced = "/".join(f"{s[g]:.1f}" for g in ("vision_encoder", "decoder_init", "decoder_step"))
        if "text_encoder" in s:
            traced += f" (+ text {s['text_encoder']:.1f})"
        validation = total - sum(s.values())
        print(f"| {checkpoint} | {manifest.architecture} | {traced} | {validation:.1f} | {total:.1f} | "
              f"{_size(root / 'bundles' / name) / 1024:.0f} |", flush=True)


if __name__ == "__main__":
    main()
