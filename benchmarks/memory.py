"""Bundle bytes, `vlmedge.load()` seconds and peak memory while captioning, per bundle, side by side.

Each bundle is measured in a fresh Python process (one per round; the best load time is kept), so
no bundle sees another's pages or ONNX Runtime's state:

- files: the bytes of the bundle's graph files (external data included);
- weights: the bytes of its distinct weights (initializers of 1 kB or more, each counted once by
  content, as `vlmedge inspect` reports them);
- load: seconds of `vlmedge.load(bundle)` (every session opened);
- peak RSS: the process's peak resident set through load and one caption, less its resident set
  after `import vlmedge` (VmHWM - VmRSS at that point), and that figure over the weights' bytes.

    python benchmarks/memory.py BUNDLE [BUNDLE ...] [--rounds 3] [--threads 2]

Run it on a quiet machine: page-cache pressure and other processes move both figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
import numpy as np
import vlmedge
from vlmedge.data.scenes import make_scene
base = status("VmRSS")
t0 = time.perf_counter()
pipe = vlmedge.load(sys.argv[1], threads=int(sys.argv[2]))
load = time.perf_counter() - t0
after_load = status("VmRSS")
task = "caption" if "caption" in pipe.manifest.tasks else next(iter(pipe.manifest.tasks))
image = make_scene(0).pil()
pipe.run(image, task) if task != "caption" else pipe.caption(image)
print(json.dumps({"load_s": load, "base_mb": base, "load_mb": after_load - base,
                  "peak_mb": status("VmHWM") - base}))
"""


def files_bytes(path: Path) -> int:
    from vlmedge.runtime.bundle import load_bundle

    b = load_bundle(path, verify_hashes=False)
    return sum(b.graph_bytes(n) for n in b.manifest.graphs)


def weight_bytes(path: Path) -> int:
    from vlmedge.export.inspect import weight_report
    from vlmedge.runtime.bundle import load_bundle

    return int(weight_report(load_bundle(path))["unique_bytes"])


def measure(path: Path, rounds: int, threads: int) -> dict:
    runs = []
    for _ in range(rounds):
        out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(threads)], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{path}: {out.stderr.strip().splitlines()[-1]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r["load_s"])
    return {"load_s": best["load_s"], "load_mb": best["load_mb"], "peak_mb": max(r["peak_mb"] for r in runs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print(f"{'bundle':44} {'files MB':>9} {'weights MB':>11} {'files/w':>8} {'load s':>7} {'RSS@load MB':>12} "
          f"{'peak MB':>8} {'peak/w':>7}")
    for path in args.bundles:
        files, weights = files_bytes(path), weight_bytes(path)
        r = measure(path, args.rounds, args.threads)
        mb = 1 << 20
        print(f"{str(path)[-44:]:44} {files / mb:9.1f} {weights / mb:11.1f} {files / weights:8.2f} {r['load_s']:7.2f} "
              f"{r['load_mb']:12.0f} {r['peak_mb']:8.0f} {r['peak_mb'] * mb / weights:7.2f}")


if __name__ == "__main__":
    main()
