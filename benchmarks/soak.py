"""Soak test of one pipeline shared by threads: many concurrent calls, the same outputs as serial
calls, and no memory growth once warm.

One `vlmedge.load` pipeline of the shipped model; 8 threads (default) each make 500 calls, cycling
through greedy captions, beam-search captions (2 beams) and VQA answers over 16 test scenes. Every
output must equal the serial output for the same call, computed first on the same pipeline. The
resident set size (VmRSS) is read after a warm-up (every thread runs each kind of call a few
times, so arenas and onnxruntime's buffers exist) and again at the end; the growth must stay under
5 MB. Prints the figures, and exits 1 if either check fails.

Run:  .venv/bin/python benchmarks/soak.py [--bundle DIR | shapes-vlm] [--threads 8] [--calls 500] [--json PATH]

The default bundle is the built-in model's name (exported once into the cache; that step needs torch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import vlmedge  # noqa: E402
from vlmedge.data.scenes import pick_questions, scenes  # noqa: E402

KINDS = ("caption", "beams", "vqa")


def rss_mb() -> float:
    """This process's resident set size now (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status")


def call(pipe, kind: str, image, question: str):
    if kind == "caption":
        return pipe.caption(image, return_ids=True)
    if kind == "beams":
        return pipe.caption(image, num_beams=2, return_ids=True)
    return pipe.vqa(image, question, return_ids=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="shapes-vlm")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--calls", type=int, default=500, help="calls per thread")
    ap.add_argument("--warmup", type=int, default=100, help="calls per thread before the first RSS reading")
    ap.add_argument("--budget-mb", type=float, default=5.0)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    pipe = vlmedge.load(a.bundle)
    scs = list(scenes("test", 0, 16))
    inputs = [(s.image, pick_questions(s)[0].text) for s in scs]
    work = [(k, i) for i in range(len(inputs)) for k in KINDS]  # 48 distinct calls
    serial = {(k, i): call(pipe, k, *inputs[i]) for k, i in work}

    mismatches: list[str] = []
    lock = threading.Lock()

    def worker(t: int, n: int) -> None:
        for j in range(n):
            k, i = work[(t * 7 + j) % len(work)]  # threads start at different calls
            got = call(pipe, k, *inputs[i])
            if got != serial[(k, i)]:
                with lock:
                    mismatches.append(f"thread {t} call {j}: {k} of scene {i}: {got} != {serial[(k, i)]}")

    def run(n: int) -> float:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(a.threads) as ex:
            for f in [ex.submit(worker, t, n) for t in range(a.threads)]:
                f.result()
        return time.perf_counter() - t0

    run(a.warmup)
    before = rss_mb()
    samples = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(1.0):
            samples.append(rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    seconds = run(a.calls)
    stop.set()
    sampler.join()
    after = rss_mb()
    total = a.threads * a.calls
    result = {
        "bundle": str(pipe.bundle.path), "backend": pipe.backend.name, "threads": a.threads, "calls": total,
        "seconds": round(seconds, 1), "calls_per_s": round(total / seconds, 1),
        "mismatches": len(mismatches), "rss_after_warmup_mb": round(before, 1), "rss_end_mb": round(after, 1),
        "rss_peak_mb": round(max(samples + [after]), 1), "rss_growth_mb": round(after - before, 2),
        "rss_quarters_mb": [round(samples[min(len(samples) - 1, len(samples) * q // 4)], 1) for q in (1, 2, 3)] + [round(after, 1)],
        "budget_mb": a.budget_mb, "cpus": os.cpu_count(), "machine": platform.platform(),
        "python": platform.python_version(), "vlmedge": vlmedge.__version__,
    }
    ok = not mismatches and result["rss_growth_mb"] < a.budget_mb
    print(f"{total} calls ({a.threads} threads x {a.calls}: greedy captions, 2-beam captions, VQA) on one pipeline "
          f"({result['backend']}) in {result['seconds']} s, {result['calls_per_s']} calls/s")
    print(f"outputs equal to serial: {total - len(mismatches)}/{total}")
    print(f"RSS after warm-up {result['rss_after_warmup_mb']} MB, at the end {result['rss_end_mb']} MB "
          f"(growth {result['rss_growth_mb']:+.2f} MB, budget {a.budget_mb} MB), peak {result['rss_peak_mb']} MB; "
          f"at each quarter of the run: {', '.join(map(str, result['rss_quarters_mb']))} MB")
    for m in mismatches[:5]:
        print("mismatch:", m)
    print("PASS" if ok else "FAIL")
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
