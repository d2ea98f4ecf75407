"""Memory read bandwidth, measured as the field measures it, for the per-token floors of the benchmarks.

A decoder step at batch 1 reads every weight once, so no step can be faster than weight bytes / read
bandwidth. Earlier benchmarks summed a float32 array with numpy per thread; numpy's pairwise float
summation is partly compute-bound on this CPU, under-reads the bandwidth, and put a measured step
*below* its "floor". Here:

- `stream_read`: a STREAM-style read kernel with every core: torch's vectorised sum of a 1 GiB
  float32 tensor on `threads` intra-op threads (each thread streams its slice), best of `tries`.
- `sysbench_read`: the same machine's `sysbench memory --memory-oper=read` with as many threads, a
  standard tool (Debian's sysbench package), as a cross-check; None where it is not installed.

Run alone:  .venv/bin/python benchmarks/bandwidth.py
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time


def stream_read(threads: int = 2, gib: float = 1.0, tries: int = 7) -> float:
    """Bytes per second read by a vectorised sum over a ~1 GiB resident tensor on `threads` threads; best of `tries`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)  # written once: every page resident
        a.sum()
        best = float("inf")
        for _ in range(tries):
            t0 = time.perf_counter()
            a.sum()
            best = min(best, time.perf_counter() - t0)
        return a.numel() * 4 / best
    finally:
        torch.set_num_threads(before)


def sysbench_read(threads: int = 2, total_gib: int = 32) -> float | None:
    """sysbench's sequential memory read rate with `threads` threads (bytes per second), or None."""
    exe = shutil.which("sysbench")
    if not exe:
        return None
    out = subprocess.run([exe, "memory", "--memory-oper=read", "--memory-access-mode=seq", "--memory-block-size=1G",
                          f"--memory-total-size={total_gib}G", f"--threads={threads}", "run"],
                         capture_output=True, text=True, timeout=300).stdout
    m = re.search(r"\(([\d.]+) MiB/sec\)", out)
    return float(m.group(1)) * (1 << 20) if m else None


if __name__ == "__main__":
    print(json.dumps({"stream_read_gbps": stream_read() / 1e9, "sysbench_read_gbps": (sysbench_read() or 0) / 1e9}, indent=2))
