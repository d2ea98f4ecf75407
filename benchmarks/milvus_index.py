"""Milvus Lite as `vlmedge index` / `vlmedge search` use it (vlmedge.retrieval.milvus.Collection): rows of
(path, embedding, model) upserted and flushed batch by batch, then exact (FLAT, cosine) search.

Measures, for N random unit vectors of width D (the embeddings' values do not change Milvus' work):
- indexing throughput: vectors per second through `Collection.write` (upsert + flush per batch);
- search latency: the median and p95 of single-query top-10 searches, after 3 warm-up searches.
The embedding itself is the pipeline's and is not measured here.

Run alone:  .venv/bin/python benchmarks/milvus_index.py --n 10000 --dim 512 --batch 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def measure(n: int, dim: int, batch: int, queries: int = 50) -> dict:
    from vlmedge.retrieval.milvus import Collection

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        col = Collection.open(str(Path(tmp) / "bench.db"), "images", dim, "bench", create=True)
        try:
            t0 = time.perf_counter()
            for s in range(0, n, batch):
                v = rng.standard_normal((min(batch, n - s), dim)).astype(np.float32)
                v /= np.linalg.norm(v, axis=1, keepdims=True)
                col.write([f"/images/{i:08d}.jpg" for i in range(s, s + len(v))], v)
            seconds = time.perf_counter() - t0
            q = rng.standard_normal((queries + 3, dim)).astype(np.float32)
            q /= np.linalg.norm(q, axis=1, keepdims=True)
            times = []
            for i, x in enumerate(q):
                t = time.perf_counter()
                col.search([x], 10)
                if i >= 3:
                    times.append((time.perf_counter() - t) * 1000)
            count = col.count()
        finally:
            col.close()
    times.sort()
    return {"vectors": n, "dim": dim, "batch": batch, "rows": count, "index_vectors_per_s": round(n / seconds),
            "search_ms_median": round(statistics.median(times), 2), "search_ms_p95": round(times[int(0.95 * (len(times) - 1))], 2)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[10_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    for n in args.n:
        print(json.dumps(measure(n, args.dim, args.batch)))
