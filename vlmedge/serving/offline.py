"""Captioning folders at scale: a JSONL of results that a rerun resumes, on one machine or on a Ray
cluster's workers (Ray Data, one pipeline per actor).

Each line is {"image": path, "caption": text, "ids": [...]} or {"image": path, "error": one line}.
Lines are appended in the order of the input paths and flushed to disk after every batch, so a
run killed at any point leaves a prefix of the finished file (at worst with a half-written last
line, which the rerun drops) and the rerun appends exactly what is missing: the result equals an
uninterrupted run's. Images that failed are not retried (their error is their result).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from vlmedge.errors import InputError, VlmedgeError
from vlmedge.runtime.pipeline import Pipeline, open_pipeline


@dataclass(frozen=True)
class OfflineSummary:
    """What a run did: images captioned now, found already done in the file, failed now."""

    captioned: int
    resumed: int
    errors: int
    out: Path


def read_done(out: Path) -> set[str]:
    """The images a previous run finished, read from `out`; a half-written last line (a killed run)
    is cut off the file. Any other line that is not a result is an error naming it."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # the last line was being written when the run stopped
        with open(out, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    done: set[str] = set()
    for n, line in enumerate(data[:end].decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"{out}:{n}: not a JSON line of an earlier run; move the file away or pick another --out") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
            raise InputError(f"{out}:{n}: expected {{\"image\": ..., \"caption\": ...}}; is this file an earlier run's output?")
        done.add(rec["image"])
    return done


def caption_records(pipe: Pipeline, paths: Sequence[str], generation: dict[str, Any], max_pixels: int) -> list[dict]:
    """Results of one batch of image paths, bad images reported in their record (the same function
    runs in plain and Ray runs, so both write the same lines)."""
    from vlmedge.runtime.images import load_image

    records: list[dict] = []
    good: list[tuple[int, Any]] = []
    for path in paths:
        try:
            good.append((len(records), load_image(path, max_pixels)))
            records.append({"image": path})
        except VlmedgeError as e:
            records.append({"image": path, "error": str(e)})
    if good:
        out = pipe.caption([img for _, img in good], return_ids=True, batch_size=len(good), **generation)
        for (i, _), g in zip(good, out):
            records[i].update({"caption": g.text, "ids": list(g.ids)})
    return records


class _Writer:
    """Appends result lines to the JSONL and makes each batch durable before the next."""

    def __init__(self, out: Path):
        out.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(out, "a", encoding="utf-8")
        self.errors = 0
        self.written = 0

    def write(self, records: Sequence[dict]) -> None:
        self.f.write("".join(json.dumps(r) + "\n" for r in records))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.written += len(records)
        self.errors += sum("error" in r for r in records)

    def close(self) -> None:
        self.f.close()


def _todo(paths: Sequence[Path], out: Path) -> tuple[list[str], int]:
    done = read_done(out)
    names = [str(p) for p in paths]
    todo = [p for p in names if p not in done]
    return todo, len(names) - len(todo)


def caption_to_jsonl(pipe: Pipeline, paths: Sequence[Path], out: Path, generation: dict[str, Any],
                     batch_size: int = 8, max_pixels: int = 64_000_000,
                     progress: Optional[Callable[[int], None]] = None) -> OfflineSummary:
    """Caption every path not yet in `out`, appending batch by batch."""
    todo, resumed = _todo(paths, out)
    if progress and resumed:
        progress(resumed)
    w = _Writer(out)
    try:
        for s in range(0, len(todo), batch_size):
            part = todo[s : s + batch_size]
            w.write(caption_records(pipe, part, generation, max_pixels))
            if progress:
                progress(len(part))
    finally:
        w.close()
    return OfflineSummary(w.written, resumed, w.errors, out)


class RayCaptioner:
    """A Ray Data actor: one pipeline, loaded once, captioning batches of paths."""

    def __init__(self, bundle: str, device: str, max_pixels: int, generation: dict[str, Any], threads: Optional[int]):
        from vlmedge.runtime.pipeline import resolve_bundle

        self.pipe = open_pipeline(resolve_bundle(bundle), device, threads, max_pixels=max_pixels, shared_threads=True)
        self.generation = generation
        self.max_pixels = max_pixels

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        paths = [str(p) for p in batch["image"]]
        lines = [json.dumps(r) for r in caption_records(self.pipe, paths, self.generation, self.max_pixels)]
        return {"line": np.array(lines, dtype=object)}


def ray_caption_to_jsonl(bundle: str, device: str, paths: Sequence[Path], out: Path, generation: dict[str, Any],
                         batch_size: int = 8, max_pixels: int = 64_000_000, actors: Optional[int] = None,
                         cpus_per_actor: float = 1.0, address: Optional[str] = None,
                         progress: Optional[Callable[[int], None]] = None) -> OfflineSummary:
    """As caption_to_jsonl, on Ray Data: `actors` pipelines (default: one per GPU on a GPU device,
    else one per `cpus_per_actor` CPUs of the cluster). Results come back in input order and are
    written by this process as they arrive, so the file resumes as a plain run's does. The paths
    must be readable on every worker node."""
    import ray

    from vlmedge.runtime.pipeline import resolve_bundle

    todo, resumed = _todo(paths, out)
    if progress and resumed:
        progress(resumed)
    bundle = str(resolve_bundle(bundle).path)  # a built-in name is exported here once, not per actor
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, ignore_reinit_error=True)
    gpu = device in ("cuda", "tensorrt")
    if actors is None:
        res = ray.cluster_resources()
        actors = max(1, int(res.get("GPU", 0)) if gpu else int(res.get("CPU", 1) // max(cpus_per_actor, 1e-3)))
    w = _Writer(out)
    try:
        if todo:
            ctx = ray.data.DataContext.get_current()
            ctx.execution_options.preserve_order = True
            if progress:  # the caller shows its own progress; Ray Data's bars and plan would interleave with it
                ctx.enable_progress_bars = False
                ctx.print_on_execution_start = False
            ds = ray.data.from_items([{"image": p} for p in todo]).map_batches(
                RayCaptioner,
                fn_constructor_kwargs=dict(bundle=bundle, device=device, max_pixels=max_pixels, generation=generation,
                                           threads=max(1, int(cpus_per_actor)) if not gpu else None),
                batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=cpus_per_actor, num_gpus=1 if gpu else 0)
            for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
                w.write([json.loads(x) for x in b["line"]])
                if progress:
                    progress(len(b["line"]))
    finally:
        w.close()
    return OfflineSummary(w.written, resumed, w.errors, out)
