"""The measurements of one bundle: its generations, graph outputs, latency, size and peak memory.

Graph error follows Polygraphy's comparator: the reference bundle's graph inputs are recorded
while it captions a few real images and answers a few real questions (real prompts, real KV
caches, real cross-attention K/V); every bundle's graphs are then run on exactly those feeds and
each output is compared with the reference graph's output, in float32 and above.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from vlmedge.compare.evalset import EvalData
from vlmedge.errors import BundleError, InputError
from vlmedge.runtime.backends import Backend
from vlmedge.runtime.bundle import Bundle
from vlmedge.runtime.decoding import GenerationConfig, Timings, generate
from vlmedge.runtime.pipeline import Generation, Pipeline
from vlmedge.runtime.recording import RecordingBackend

SAMPLE_ITEMS = 2  # images captioned (and questions answered) as one batch while graph inputs are recorded
STEPS_KEPT = (0, 1, 3, 7, 15, 31)  # decoder token steps recorded per task: the first ones and longer caches

Feeds = dict[str, np.ndarray]


# -- generations ------------------------------------------------------------------------------------


def check_questions(pipe: Pipeline, data: EvalData) -> None:
    """Every question fits this bundle's tokenizer and length limit; an error names its line."""
    for q in data.questions:
        try:
            pipe.question_ids([q.text])
        except InputError as e:
            raise InputError(f"{q.where}: {str(e).split(': ', 1)[-1]}") from None


def generations(pipe: Pipeline, data: EvalData, tasks: Sequence[str], batch_size: int,
                advance: Callable[[int], None]) -> dict[str, list[Generation]]:
    """Greedy captions of the captioned images and answers to every question, with their token ids."""
    out: dict[str, list[Generation]] = {}
    if "caption" in tasks:
        idx = data.captioned
        out["caption"] = []
        for s in range(0, len(idx), batch_size):
            part = [data.images[i] for i in idx[s : s + batch_size]]
            out["caption"] += pipe.caption(part, return_ids=True, batch_size=batch_size)
            advance(len(part))
    if "vqa" in tasks:
        check_questions(pipe, data)
        qs = data.questions
        out["vqa"] = []
        for s in range(0, len(qs), batch_size):
            part = qs[s : s + batch_size]
            out["vqa"] += pipe.vqa([data.images[q.image] for q in part], [q.text for q in part], return_ids=True,
                                   batch_size=batch_size)
            advance(len(part))
    return out


DRIFT_ITEMS = 16  # images (captions) and questions whose attention maps are compared, per task
DRIFT_TOP_K = 5


def attention_maps(pipe: Pipeline, data: EvalData, tasks: Sequence[str], forced: dict[str, list[Generation]]) -> dict | None:
    """Per task, each token's attention over the image positions (layers and heads averaged, composed through
    the question for VQA) of the first DRIFT_ITEMS items, with the decoder forced along `forced` (the
    reference's tokens, so that a different word is not counted as drift); None without explain graphs."""
    if "decoder" not in pipe.manifest.explain.get("graphs", {}) or not hasattr(pipe.backend, "explain"):
        return None
    maps = {}
    if "caption" in tasks and "caption" in forced:
        idx = data.captioned[:DRIFT_ITEMS]
        got = pipe.forced_attention("caption", [data.images[i] for i in idx], [g.ids for g in forced["caption"][:DRIFT_ITEMS]])
        maps["caption"] = [e.image_weights() for e in got]
    if "vqa" in tasks and "vqa" in forced:
        qs = data.questions[:DRIFT_ITEMS]
        got = pipe.forced_attention("vqa", [data.images[q.image] for q in qs], [g.ids for g in forced["vqa"][:DRIFT_ITEMS]],
                                    [q.text for q in qs])
        maps["vqa"] = [e.image_weights() for e in got]
    return maps


def attention_drift(ref: dict | None, other: dict | None) -> dict | None:
    """Per task: mean Jensen-Shannon divergence (base 2) of each token's map against the reference's, and the
    mean share of the reference's top-k positions among the variant's top k."""
    from vlmedge.evaluation.attention import js_divergence, topk_overlap

    if not ref or not other:
        return None
    out = {}
    for task in ref:
        if task not in other:
            continue
        pairs = [(a, b) for a, b in zip(ref[task], other[task]) if len(a)]  # item by item: widths differ where the
        if not pairs:  # positions are an encoder's over the image and the question (BLIP-2 with Flan-T5)
            continue
        js = np.concatenate([js_divergence(a, b) for a, b in pairs])
        top = np.concatenate([topk_overlap(a, b, DRIFT_TOP_K) for a, b in pairs])
        out[task] = {"tokens": int(len(js)), "js_divergence": float(js.mean()), f"top{DRIFT_TOP_K}_overlap": float(top.mean())}
    return out or None


def agreement(ref: Sequence[Generation], other: Sequence[Generation]) -> float:
    """Fraction of items whose generated token ids are identical."""
    assert len(ref) == len(other)
    return sum(a.ids == b.ids for a, b in zip(ref, other)) / len(ref) if ref else float("nan")


# -- graph inputs and outputs -----------------------------------------------------------------------


def record_graph_inputs(pipe: Pipeline, data: EvalData, tasks: Sequence[str]) -> list[tuple[str, Feeds]]:
    """(graph, feeds) of the reference bundle while it captions the first SAMPLE_ITEMS captioned
    images and answers the first SAMPLE_ITEMS questions (greedy, one batch each)."""
    samples: list[tuple[str, Feeds]] = []
    for task in tasks:
        rec = RecordingBackend(pipe.backend, keep_step=lambda i: i in STEPS_KEPT)
        if pipe.manifest.contract == "prefix":  # the pipeline itself on the recording backend (prompts are per call)
            import copy

            recorder = copy.copy(pipe)
            recorder.backend = rec
            if task == "caption":
                recorder.caption([data.images[i] for i in data.captioned[:SAMPLE_ITEMS]])
            else:
                qs = data.questions[:SAMPLE_ITEMS]
                recorder.vqa([data.images[q.image] for q in qs], [q.text for q in qs])
            samples += rec.feeds
            continue
        if task == "caption":  # as the pipeline encodes it (a task's own prompt, a vision graph's text included)
            px = pipe.images([data.images[i] for i in data.captioned[:SAMPLE_ITEMS]])
            states, mask = pipe.encode(task, px, None, backend=rec)
        else:
            check_questions(pipe, data)
            qs = data.questions[:SAMPLE_ITEMS]
            px = pipe.images([data.images[q.image] for q in qs])
            states, mask = pipe.encode(task, px, pipe.question_ids([q.text for q in qs]), backend=rec)
        spec = pipe.manifest.tasks[task]
        generate(rec, pipe.layers, states, mask, spec["prompt_ids"], spec["eos_id"], GenerationConfig(),
                 min(spec["max_new_tokens"], pipe.max_new_tokens(task)), split=pipe.manifest.split_decoder)
        samples += rec.feeds
    return samples


def run_samples(backend: Backend, graphs: Sequence[str], samples: Sequence[tuple[str, Feeds]],
                advance: Callable[[int], None] = lambda n: None,
                prompt_rows: int | None = None) -> list[dict[str, np.ndarray] | None]:
    """Every output of every recorded call, as numpy; None for a graph this bundle does not have.
    `prompt_rows` (a decoder-only bundle's `axes.prompt_batch`): its decoder takes a prompt (more
    than one position) that many rows at a time, so a recorded batch of prompts runs in slices."""
    outs: list[dict[str, np.ndarray] | None] = []
    for graph, feeds in samples:
        if graph not in graphs:
            outs.append(None)
        elif prompt_rows and graph == "decoder" and "inputs_embeds" in feeds and feeds["inputs_embeds"].shape[1] > 1 and len(feeds["inputs_embeds"]) > prompt_rows:
            B = len(feeds["inputs_embeds"])
            parts = [_host(backend.run(graph, {k: v[s : s + prompt_rows] for k, v in feeds.items()}))
                     for s in range(0, B, prompt_rows)]
            outs.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
        else:
            outs.append(_host(backend.run(graph, feeds)))
        advance(1)
    return outs


def _host(out: dict) -> dict[str, np.ndarray]:
    # copies: a CPU output is a view into onnxruntime's buffer, which would keep the session's arena alive
    return {k: np.array(v) for k, v in out.items()}


def _error(ref: np.ndarray, out: np.ndarray) -> dict:
    a = ref.astype(np.float64).ravel()
    b = out.astype(np.float64).ravel()
    bad = int(np.size(b) - np.isfinite(b).sum())
    if bad:
        return {"cosine": None, "max_abs_error": None, "nonfinite": bad}
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    cosine = 1.0 if na == nb == 0 else 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))
    return {"cosine": min(cosine, 1.0), "max_abs_error": float(np.abs(a - b).max()) if a.size else 0.0, "nonfinite": 0}


def _worst(x: dict | None, y: dict) -> dict:
    if x is None:
        return y
    if x["cosine"] is None or y["cosine"] is None:
        return {"cosine": None, "max_abs_error": None, "nonfinite": x["nonfinite"] + y["nonfinite"]}
    return {"cosine": min(x["cosine"], y["cosine"]), "max_abs_error": max(x["max_abs_error"], y["max_abs_error"]),
            "nonfinite": 0}


def graph_errors(where: str, samples: Sequence[tuple[str, Feeds]], ref_outs: Sequence[dict | None],
                 outs: Sequence[dict | None]) -> dict[str, dict]:
    """graph -> {"calls": n, "outputs": {output -> worst cosine, worst max abs error, non-finite values}}
    over the recorded calls, against the reference's outputs on the same feeds."""
    result: dict[str, dict] = {}
    for (graph, _), ref, out in zip(samples, ref_outs, outs):
        if ref is None or out is None:
            continue
        g = result.setdefault(graph, {"calls": 0, "outputs": {}})
        g["calls"] += 1
        for name, r in ref.items():
            if name not in out:
                continue
            if out[name].shape != r.shape:
                raise BundleError(f"{where}: graph {graph} output {name} has shape {list(out[name].shape)}, "
                                  f"the reference's {list(r.shape)} on the same inputs")
            g["outputs"][name] = _worst(g["outputs"].get(name), _error(r, out[name]))
    return result


def error_summary(errors: dict[str, dict]) -> dict:
    """The worst cosine and max abs error over every output of every graph."""
    worst = None
    for g in errors.values():
        for e in g["outputs"].values():
            worst = _worst(worst, e)
    return worst or {"cosine": None, "max_abs_error": None, "nonfinite": 0}


# -- latency, size, memory --------------------------------------------------------------------------


def _percentiles(seconds: Sequence[float]) -> dict | None:
    if not seconds:
        return None
    p50, p90 = np.percentile(np.asarray(seconds) * 1e3, [50, 90])
    return {"p50": float(p50), "p90": float(p90)}


def latency(pipe: Pipeline, task: str, items: Sequence[Any], runs: int, warmup: int,
            advance: Callable[[int], None]) -> dict:
    """Batch-1 latency in ms (p50, p90) per stage over `runs` calls after `warmup`, cycling through
    `items` (images for caption; (image, question) for vqa). "encoder" is the vision encoder, plus
    the text encoder for vqa; "whole" is the wall time of the call, detokenisation included."""
    stages: dict[str, list[float]] = {"preprocess": [], "encoder": [], "first_token": [], "per_token": [], "whole": []}
    tokens = []
    for r in range(warmup + runs):
        item = items[r % len(items)]
        t = Timings()
        t0 = time.perf_counter()
        g = pipe.caption(item, timings=t, return_ids=True) if task == "caption" else pipe.vqa(*item, timings=t, return_ids=True)
        wall = time.perf_counter() - t0
        advance(1)
        if r < warmup:
            continue
        stages["preprocess"].append(t.preprocess)
        stages["encoder"].append(t.encoder)
        stages["first_token"].append(t.first_token)
        stages["per_token"] += t.tokens
        stages["whole"].append(wall)
        tokens.append(len(g.ids))
    return {"task": task, "runs": runs, "warmup": warmup, "batch": 1, "mean_tokens": float(np.mean(tokens)),
            **{k: _percentiles(v) for k, v in stages.items()}}


def size_on_disk(bundle: Bundle) -> int:
    """Bytes of the bundle's graph files (weights files included) and tokenizer."""
    return sum(bundle.graph_bytes(n) for n in bundle.manifest.graphs) + bundle.tokenizer_path.stat().st_size


def _release_free_memory() -> None:
    """Hand memory freed by earlier bundles back to the OS (glibc keeps it otherwise), so that each
    bundle's peak starts from what is really in use, not from heap pages the last one left behind."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def reset_peak_rss() -> bool:
    """Reset the resident-set high-water mark to the current RSS (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss(field: str = "VmHWM") -> int | None:
    """VmHWM (peak) or VmRSS (current) of this process in bytes, from /proc/self/status; None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass
class PeakMemory:
    """Peak RSS over a block: `with PeakMemory() as m: ...; m.peak` (None where it cannot be measured)."""

    before: int | None = None
    peak: int | None = None

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        _release_free_memory()
        self._reset = reset_peak_rss()
        self.before = rss("VmRSS")
        return self

    def __exit__(self, *exc) -> bool:
        self.peak = rss("VmHWM") if self._reset else None
        return False
