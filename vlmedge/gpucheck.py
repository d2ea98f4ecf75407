"""`make gpu-check` (`python -m vlmedge.gpucheck`): one command that proves the GPU path on a machine.

1. `vlmedge doctor`: what is installed and what each device would use.
2. The built-in `shapes-vlm` bundle in FP32, FP16 and INT8 (exported and quantized once on the CPU,
   cached beside the built-in bundle as `vlmedge demo` caches them), and the built-in decoder-only
   `shapes-smolvlm` (the prefix contract: one decoder engine with a prompt and a step profile) in
   FP32 and FP16.
3. The reference: CPU FP32 tokens for test scenes (a caption and an answer each), per model.
4. Per precision, every GPU runtime: native TensorRT engines (built here, with a shared timing
   cache) without and with CUDA graphs, ONNX Runtime's CUDA provider and its TensorRT provider.
   Each is checked against the reference: FP32 and FP16 tokens equal, or at least 99% identical with
   the differences listed; INT8 within the bundle's accuracy budget (VQA accuracy and BLEU-4 on test
   scenes against CPU FP32). Latency per stage at batch 1 (median).

`--bundle PATH` (repeatable) checks bundles you exported instead of the built-in models (any family: its
CPU FP32 tokens are the reference for its engines and every GPU runtime).

A part that cannot run here (no GPU, no TensorRT, no onnxruntime-gpu, no torch to export) is
reported as not run with its reason in one line, and the rest goes on. The exit status is 1 only if
a part that ran failed. Everything is written to `--out` (gpu-check.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import sys
import time
from pathlib import Path
from typing import Any, Callable

from vlmedge.errors import VlmedgeError, first_line
from vlmedge.outdir import write_file_atomic

PRECISIONS = ("fp32", "fp16", "int8")
PREFIX_MODEL, PREFIX_PRECISIONS = "shapes-smolvlm", ("fp32", "fp16")  # the decoder-only contract's check
RUNTIMES = ("tensorrt", "tensorrt+cuda-graphs", "ort-cuda", "ort-tensorrt")
AGREEMENT = 0.99  # FP32 / FP16: share of identical token sequences needed when not all are equal


class NotRun(Exception):
    """A part that cannot run on this machine; the message says why."""


def _say(line: str) -> None:
    print(line, flush=True)


class Check:
    """The parts run so far, each {name, status, reason, seconds, ...}."""

    def __init__(self) -> None:
        self.parts: list[dict[str, Any]] = []

    def part(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        t0 = time.perf_counter()
        try:
            detail = fn()
            status, reason = detail.pop("status", "ok"), detail.pop("reason", "")
        except NotRun as e:
            detail, status, reason = {}, "not run", str(e)
        except VlmedgeError as e:
            detail, status, reason = {}, "failed", str(e)
        except Exception as e:  # an unexpected failure of one part must not stop the others
            detail, status, reason = {}, "failed", f"{type(e).__name__}: {first_line(e)}"
        seconds = round(time.perf_counter() - t0, 2)
        self.parts.append({"name": name, "status": status, "reason": reason, "seconds": seconds, **detail})
        _say(f"[{status}] {name} ({seconds:.1f} s){': ' + reason if reason else ''}")
        return detail if status == "ok" or (status == "failed" and detail) else None


def _latency(pipe, image, runs: int = 20) -> dict[str, float]:
    """Median ms per stage of a batch-1 caption, after two warm-up calls."""
    from vlmedge.runtime.decoding import Timings

    ts = []
    for i in range(runs + 2):
        t = Timings()
        pipe.caption(image, timings=t)
        if i >= 2:
            ts.append(t)
    med = lambda xs: round(statistics.median(xs) * 1000, 3) if xs else None  # noqa: E731
    return {"preprocess_ms": med([t.preprocess for t in ts]), "vision_encoder_ms": med([t.encoder for t in ts]),
            "first_token_ms": med([t.first_token for t in ts]), "per_token_ms": med([x for t in ts for x in t.tokens]),
            "caption_ms": med([t.total for t in ts]), "tokens": len(ts[0].tokens) + 1}


def _outputs(pipe, world) -> dict[str, list]:
    images, questions = world
    caps = pipe.caption(images, return_ids=True)
    ans = pipe.vqa(images, questions, return_ids=True) if "vqa" in pipe.tasks else []
    return {"captions": [(g.text, list(g.ids)) for g in caps], "answers": [(g.text, list(g.ids)) for g in ans]}


def _agreement(got: dict[str, list], ref: dict[str, list]) -> dict[str, Any]:
    """Share of identical token sequences, and the first differences (what was expected, what came)."""
    same, total, diffs = 0, 0, []
    for kind in ("captions", "answers"):
        for i, (g, r) in enumerate(zip(got[kind], ref[kind])):
            total += 1
            if g[1] == r[1]:
                same += 1
            elif len(diffs) < 8:
                diffs.append({"kind": kind, "index": i, "cpu_fp32": r[0], "here": g[0]})
    return {"identical": same, "total": total, "agreement": round(same / max(1, total), 4), "differences": diffs}


def _quiet() -> None:
    """The exporter's and quantizer's warnings are nothing a user of this check can act on."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TORCH_LOGS", "-all")
    for name in ("torch", "torch.onnx", "torch.export", "onnxscript", "onnxruntime"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlmedge.gpucheck", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gpu-check.json"), help="the JSON report")
    ap.add_argument("--work", type=Path, default=None, help="engines and caches (default: beside the built-in bundle)")
    ap.add_argument("--scenes", type=int, default=64, help="test scenes whose tokens are compared")
    ap.add_argument("--eval-scenes", type=int, default=200, help="test scenes for the INT8 accuracy budget")
    ap.add_argument("--bundle", type=Path, action="append", default=[],
                    help="check this exported bundle (any family, repeatable) instead of the built-in models: its CPU "
                         "tokens, then TensorRT engines and every GPU runtime against them")
    args = ap.parse_args(argv)

    import vlmedge
    from vlmedge.doctor import diagnose, gpu_gates, print_report

    _quiet()
    check = Check()
    t_start = time.perf_counter()
    report: dict[str, Any] = {"vlmedge": vlmedge.__version__}
    doctor = check.part("doctor", lambda: {"report": diagnose()})
    report["doctor"] = doctor["report"] if doctor else None
    if doctor:
        from vlmedge.console import console

        print_report(doctor["report"], console)
    gates = gpu_gates()
    gate = {"tensorrt": gates["tensorrt"], "tensorrt+cuda-graphs": gates["tensorrt"], "ort-cuda": gates["ort_cuda"],
            "ort-tensorrt": gates["ort_tensorrt"]}
    any_gpu = any(v is None for v in gate.values())

    bundles: dict[str, Path] = {}  # "fp32", "fp16", "int8"; the decoder-only model's as "shapes-smolvlm/fp32", ...

    def make_bundles(model: str, precisions: tuple[str, ...], prefix: str = "") -> dict[str, Any]:
        from vlmedge.runtime.pipeline import resolve_bundle

        fp32 = resolve_bundle(model, lambda n, p: _say(f"  exporting {n} once, to {p}")).path
        bundles[prefix + "fp32"] = fp32
        for precision in precisions[1:]:
            path = fp32.with_name(f"{fp32.name}-{precision}")
            if not (path / "manifest.json").is_file():
                import logging

                from vlmedge.calibration.quantize import QuantizeOptions, quantize_bundle

                _say(f"  making the {precision} variant once, to {path}")
                logging.getLogger().setLevel(logging.ERROR)
                quantize_bundle(fp32, path, QuantizeOptions(precision, force=True), log=lambda s: None)
            bundles[prefix + precision] = path
        return {"bundles": {k: str(v) for k, v in bundles.items() if k.startswith(prefix) and (prefix or "/" not in k)}}

    def given(path: Path) -> dict[str, Any]:
        from vlmedge.runtime.bundle import load_bundle

        m = load_bundle(path).manifest  # checked as every load checks it
        bundles[f"{path.name}/fp32"] = path
        return {"bundle": str(path), "family": m.family, "contract": m.contract, "precision": m.precision.get("dtype")}

    if args.bundle:  # the given bundles instead of the built-in models
        for path in args.bundle:
            check.part(f"bundle {path.name}: {path}", lambda p=path: given(p))
    else:
        check.part("bundles: shapes-vlm FP32, FP16, INT8 (CPU; made once, then cached)", lambda: make_bundles("shapes-vlm", PRECISIONS))
        check.part(f"bundles: {PREFIX_MODEL} FP32, FP16 (decoder-only; CPU; made once, then cached)",
                   lambda: make_bundles(PREFIX_MODEL, PREFIX_PRECISIONS, f"{PREFIX_MODEL}/"))
    work = args.work or (next(iter(bundles.values())).parent / "gpu-check" if bundles else Path(tempfile.gettempdir()) / "vlmedge-gpu-check")

    state: dict[str, Any] = {}

    def reference(prefix: str = "") -> dict[str, Any]:
        if prefix + "fp32" not in bundles:
            raise NotRun("no bundles (see above)")
        from vlmedge.data.scenes import pick_questions, scenes
        from vlmedge.runtime.pipeline import open_pipeline
        from vlmedge.runtime.bundle import load_bundle

        scs = list(scenes("test", 0, args.scenes))
        state["world"] = ([s.image for s in scs], [pick_questions(s)[0].text for s in scs])
        cpu = open_pipeline(load_bundle(bundles[prefix + "fp32"]), "cpu")
        state["ref" + prefix] = _outputs(cpu, state["world"])
        if prefix:
            return {"scenes": args.scenes, "latency": _latency(cpu, state["world"][0][0])}
        out: dict[str, Any] = {"scenes": args.scenes, "latency": _latency(cpu, state["world"][0][0])}
        if any_gpu:
            from vlmedge.evaluation.scene_eval import evaluate_pipeline, evaluation_set

            state["es"] = evaluation_set("test", args.eval_scenes)
            state["ref_eval"] = evaluate_pipeline(cpu, state["es"])
            out["accuracy"] = {"vqa_accuracy": state["ref_eval"]["vqa"]["accuracy"],
                               "bleu4": state["ref_eval"]["caption"]["bleu4"]}
        return out

    models = [path.name for path in args.bundle] if args.bundle else ["", PREFIX_MODEL]
    for model in models:
        check.part(f"reference: {model or 'shapes-vlm'} CPU FP32 tokens and latency",
                   lambda prefix=f"{model}/" if model else "": reference(prefix))
    engines: dict[str, Path] = {}

    def build(precision: str) -> dict[str, Any]:
        from vlmedge.tensorrt.builder import BuildOptions, build_engines

        if gates["tensorrt"]:
            raise NotRun(gates["tensorrt"])
        if precision not in bundles:
            raise NotRun("no bundle (see above)")
        cache = work / "timing.cache"
        reused = cache.is_file()
        out = work / f"engines-{precision.replace('/', '-')}"
        em = build_engines(bundles[precision], out, BuildOptions(timing_cache=cache, force=True))
        engines[precision] = out
        return {"engines": str(out), "timing_cache_reused": reused, "timing_cache_bytes": cache.stat().st_size
                if cache.is_file() else 0, "tensorrt": em["tensorrt"], "gpu": em["gpu"]}

    def run(precision: str, runtime: str) -> dict[str, Any]:
        import vlmedge as v

        if gate[runtime]:
            raise NotRun(gate[runtime])
        model = precision.rpartition("/")[0]  # "" for shapes-vlm
        ref = state.get("ref" + (model + "/" if model else ""))
        if ref is None:
            raise NotRun("no CPU reference (see above)")
        warnings: list[str] = []
        if runtime.startswith("tensorrt"):
            if precision not in engines:
                raise NotRun("no engines (see the build above)")
            from vlmedge.runtime.backends.tensorrt import TensorRTBackend

            pipe = v.load(engines[precision], warn=warnings.append)
            if runtime.endswith("cuda-graphs"):
                em = json.loads((engines[precision] / "engines.json").read_text())
                pipe.backend = TensorRTBackend(engines[precision], em, pipe.manifest, warn=warnings.append,
                                               cuda_graph=True)
        else:
            device = "cuda" if runtime == "ort-cuda" else "tensorrt"
            pipe = v.load(bundles[precision], device=device, warn=warnings.append)
            want = "CUDAExecutionProvider" if device == "cuda" else "TensorrtExecutionProvider"
            if pipe.backend.name != f"onnxruntime/{want}":
                return {"status": "failed", "reason": f"ran on {pipe.backend.name}, not {want}", "warnings": warnings}
        got = _outputs(pipe, state["world"])
        agree = _agreement(got, ref)
        out: dict[str, Any] = {"backend": pipe.backend.name, "tokens": agree, "warnings": warnings}
        if runtime.endswith("cuda-graphs"):
            out["cuda_graph_replays"] = pipe.backend.graph_launches  # so far: the token check's captions and answers
        out["latency"] = _latency(pipe, state["world"][0][0])
        if precision == "int8":
            from vlmedge.evaluation.scene_eval import evaluate_pipeline

            budget = json.loads((bundles["int8"] / "manifest.json").read_text())["precision"]["accuracy"]["budget"]
            r = evaluate_pipeline(pipe, state["es"])
            ref = state["ref_eval"]
            drop = {"vqa_accuracy": round(ref["vqa"]["accuracy"] - r["vqa"]["accuracy"], 4),
                    "bleu4": round(ref["caption"]["bleu4"] - r["caption"]["bleu4"], 4)}
            out["accuracy_drop"], out["budget"] = drop, budget
            if drop["vqa_accuracy"] > budget["vqa_accuracy"] or drop["bleu4"] > budget["bleu4"]:
                out.update(status="failed", reason=f"over budget: VQA accuracy -{drop['vqa_accuracy']}, "
                                                   f"BLEU-4 -{drop['bleu4']} (budget {budget})")
        elif agree["agreement"] < 1 and agree["agreement"] < AGREEMENT:
            out.update(status="failed", reason=f"{agree['identical']}/{agree['total']} token sequences equal CPU FP32's "
                                               f"(needed {AGREEMENT:.0%}); first differences: {agree['differences'][:2]}")
        elif agree["agreement"] < 1:
            out["reason"] = f"{agree['identical']}/{agree['total']} equal; differences listed in the report"
        if runtime.endswith("cuda-graphs") and not out.get("status") and not out["cuda_graph_replays"]:
            out.update(status="failed", reason="no decoder step was replayed from a CUDA graph "
                                               f"({'; '.join(warnings) or 'no warning given'})")
        return out

    variants = [f"{model}/fp32" for model in models] if args.bundle else \
        [*PRECISIONS, *(f"{PREFIX_MODEL}/{p}" for p in PREFIX_PRECISIONS)]
    for precision in variants:
        check.part(f"{precision}: build TensorRT engines", lambda p=precision: build(p))
        for runtime in RUNTIMES:
            if runtime.endswith("cuda-graphs") and "/" in precision:
                continue  # CUDA graphs replay the cross-attention contract's decoder steps only
            check.part(f"{precision}: {runtime}", lambda p=precision, r=runtime: run(p, r))

    report["parts"] = check.parts
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    report["hardware_evidence"] = any(p["status"] == "ok" and ":" in p["name"] and "build" not in p["name"]
                                      and not p["name"].startswith(("bundles", "reference")) for p in check.parts)
    write_file_atomic(args.out, json.dumps(report, indent=2, default=str) + "\n")
    counts = {s: sum(p["status"] == s for p in check.parts) for s in ("ok", "not run", "failed")}
    _say(f"gpu-check: {counts['ok']} ok, {counts['not run']} not run, {counts['failed']} failed "
         f"in {report['seconds']:.0f} s; written to {args.out}")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
