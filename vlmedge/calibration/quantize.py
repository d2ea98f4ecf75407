"""`vlmedge quantize`: an FP16 or calibrated INT8 variant of an FP32 bundle, checked on held-out data.

1. Calibration images (and questions) calibrate; a disjoint held-out part (`--held-out`, 200 images
   and their questions by default) checks accuracy.
2. Every graph's inputs are recorded from real FP32 generation over the calibration part.
3. INT8: Q/DQ quantization of the weight MatMul/Gemm/Conv nodes (calibration.int8); for the ONNX
   Runtime target, `--method dynamic` instead (MatMulInteger, activations quantized per call).
   FP16: every float tensor in float16 except nodes whose FP32 outputs overflow float16 on the
   calibration inputs and nodes ONNX Runtime's CPU provider has no float16 kernel for
   (calibration.fp16).
4. The variant captions and answers the held-out part; its accuracy is compared with FP32's
   (against the references where known, else against FP32's own outputs), with a paired bootstrap
   interval for each delta. Over budget, the nodes are ranked once, most harmful first (by the graph
   output error each causes when it alone is quantized / converted), and a bisection over the ranked
   prefixes finds the fewest worst nodes to return to float: about log2(nodes) held-out probes. A
   variant that needs every node back in float (an FP32 copy) or more than `--max-fallbacks` is
   refused with one line giving the best variant's figures.
5. The bundle is written to a temp directory and renamed into place; its manifest records the
   precision, method, calibration set (count and sha256), excluded nodes with the reason, and the
   accuracy check.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from vlmedge.calibration.confidence import describe, paired_delta
from vlmedge.calibration.data import HELD_OUT, CalibrationSet, load_calibration, record_inputs
from vlmedge.errors import InputError, ValidationError, first_line
from vlmedge.outdir import OutputDir
from vlmedge.runtime.backends.onnxruntime import session_options
from vlmedge.export.graphs import copy_graph, save_graph, share_weights
from vlmedge.export.explain import explain_manifest
from vlmedge.runtime.bundle import MANIFEST, Bundle, GraphSpec, TensorSpec, graph_hashes, load_bundle
from vlmedge.runtime.prefix import extra_files
from vlmedge.runtime.pipeline import Pipeline, open_pipeline

PRECISIONS = ("fp16", "int8", "int8-wo", "int4-wo")
_DTYPE = {"fp16": "float16", "int8": "int8", "int8-wo": "int8-wo", "int4-wo": "int4-wo"}
_WEIGHT_ONLY = ("int8-wo", "int4-wo")


@dataclass(frozen=True)
class QuantizeOptions:
    precision: str
    calib: str = "synthetic:128"
    questions: Path | None = None
    method: str | None = None  # INT8 calibration: entropy (default), minmax, percentile; weight-only: gptq (default), rtn
    budget_vqa: float = 0.01  # VQA accuracy FP32 - variant, at most (1 point)
    budget_bleu: float = 0.02  # caption BLEU-4 FP32 - variant, at most
    io_dtype: str = "float32"  # FP16: graph inputs/outputs float32 (casts inside) or float16
    max_fallbacks: int | None = None  # nodes returned to float at most (None: up to all of them)
    held_out: int = HELD_OUT  # images kept aside for the accuracy check (a folder gives at most half)
    force: bool = False
    block_size: int = 32  # weight-only: weights sharing a scale along K
    graphs: tuple[str, ...] | None = None  # weight-only: graphs quantized (default: the decoder graphs)
    lm_head: bool | None = None  # weight-only: the LM head at the variant's bits (True), in float (False), or 8-bit if tied (None)
    format: str = "qdq"  # weight-only: qdq (DequantizeLinear with block_size) or matmulnbits (onnxruntime)


def held_out_accuracy(pipe: Pipeline, held: CalibrationSet, ref: dict | None = None) -> dict:
    """Caption BLEU-4 / exact match and VQA accuracy on the held-out set. References: the set's own
    where known, else `ref` (FP32's outputs). Returns the outputs too, as references for variants."""
    from vlmedge.evaluation.metrics import caption_scores, vqa_accuracy

    out: dict = {}
    m = pipe.manifest
    if "caption" in m.tasks:
        caps = pipe.caption(list(held.images))
        refs = [c if c is not None else (ref or {}).get("captions", caps)[i] for i, c in enumerate(held.captions)]
        s = caption_scores(caps, [[r] for r in refs])
        out.update(captions=caps, caption_refs=refs, bleu4=s["bleu4"], caption_exact_match=s["exact_match"])
    if "vqa" in m.tasks and held.questions:
        ans = pipe.vqa([held.images[i] for i, _ in held.questions], [q for _, q in held.questions])
        refs = [a if a is not None else (ref or {}).get("answers", ans)[i] for i, a in enumerate(held.answers)]
        scores = vqa_accuracy(ans, [[r] for r in refs])
        out.update(answers=ans, vqa_scores=scores, vqa_accuracy=float(np.mean(scores)))
    return out


def _within(fp32: dict, q: dict, o: QuantizeOptions) -> bool:
    ok = True
    if "bleu4" in fp32:
        ok &= fp32["bleu4"] - q["bleu4"] <= o.budget_bleu
    if "vqa_accuracy" in fp32:
        ok &= fp32["vqa_accuracy"] - q["vqa_accuracy"] <= o.budget_vqa
    return bool(ok)


def _summary(acc: dict) -> dict:
    return {k: v for k, v in acc.items() if k in ("bleu4", "caption_exact_match", "vqa_accuracy")}


class _Variant:
    """The graphs of the variant being built, in a temp bundle directory, and how to rebuild one."""

    def __init__(self, src: Bundle, work: Path, o: QuantizeOptions, feeds: dict):
        self.src, self.work, self.o, self.feeds = src, work, o, feeds
        self.excluded: dict[str, dict[str, str]] = {g: {} for g in src.manifest.graphs}
        self.overflow: dict[str, dict[str, float]] = {}
        self._reference: dict[str, list] = {}
        self._wo_cache: dict[str, dict] = {}  # weight-only: per graph, levels and scales per node, Hessians, heads' bits

    def build(self, graph: str, only: list[str] | None = None, dst: Path | None = None) -> list[str]:
        """(Re)write one graph with the current exclusions; returns the nodes it quantized/converted."""
        src = self.src.graph_path(graph)
        dst = dst or self.work / src.name
        skip = set(self.excluded[graph])
        if self.o.precision in _WEIGHT_ONLY:
            return self._weight_only(graph, src, dst, skip, only)
        if self.o.precision == "int8" and self.o.method == "dynamic":
            from vlmedge.calibration.int8 import quantize_graph_dynamic

            return quantize_graph_dynamic(src, dst, exclude=skip, only=only)
        if self.o.precision == "int8":
            from vlmedge.calibration.int8 import quantize_graph

            return quantize_graph(src, dst, self.o.method, self.work / ".calib" / f"{graph}.json",
                                  self.feeds.get(graph), exclude=skip, only=only)
        import onnx

        from vlmedge.calibration.fp16 import convert_for_cpu

        from vlmedge.calibration.fp16 import overflow_nodes

        model = onnx.load(str(src))
        names = [n.name for n in model.graph.node]
        if graph not in self.overflow:
            # values of 1e30 and beyond are attention-mask sentinels (finfo.min), clipped safely; the
            # rest would overflow float16 on real inputs
            found = overflow_nodes(model, self.feeds.get(graph, [])[:8])
            self.overflow[graph] = {n: v for n, v in found.items() if not abs(v) >= 1e30}
            for node, v in self.overflow[graph].items():
                self.excluded[graph][node] = f"overflow: FP32 output reaches {v:.3g} on calibration inputs"
        keep = skip | set(self.overflow[graph]) | (set(names) - set(only) if only is not None else set())
        converted, kept = convert_for_cpu(model, keep_fp32=keep, io_dtype=self.o.io_dtype)
        for node, why in kept.items():
            if node not in keep:
                self.excluded[graph].setdefault(node, why)
        save_graph(converted, dst)
        return [n for n in names if n not in keep and n not in kept]

    def _weight_only(self, graph: str, src: Path, dst: Path, skip: set, only) -> list[str]:
        from vlmedge.calibration import weight_only as wo

        if graph not in self.o.graphs:
            copy_graph(src, dst)
            return []
        o = self.o
        cache = self._wo_cache.setdefault(graph, {})
        return wo.quantize_graph(src, dst, wo.PRECISIONS[o.precision], o.block_size, o.method, o.format, o.lm_head,
                                 self.feeds.get(graph, [])[:64], exclude=skip, only=only, cache=cache)

    def graph_error(self, graph: str, path: Path, samples: int = 4) -> float:
        """Max over outputs of max abs error / max(1, |FP32|) on a few recorded inputs."""
        import onnxruntime as ort

        if graph not in self._reference:  # FP32 outputs, computed once per graph for all probes
            ref = ort.InferenceSession(str(self.src.graph_path(graph)), session_options(ort),
                                       providers=["CPUExecutionProvider"])
            feeds = self.feeds.get(graph, [])[:samples]
            self._reference[graph] = [(f, ref.run(None, {i.name: f[i.name] for i in ref.get_inputs()})) for f in feeds]
        got = ort.InferenceSession(str(path), session_options(ort), providers=["CPUExecutionProvider"])
        types = {i.name: (np.float16 if i.type == "tensor(float16)" else None) for i in got.get_inputs()}
        err = 0.0
        for f, a in self._reference[graph]:
            b = got.run(None, {k: (f[k].astype(t) if t else f[k]) for k, t in types.items()})
            for x, y in zip(a, b):
                err = max(err, float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max() / max(1.0, np.abs(x).max())))
        return err


def _write_manifest(src: Bundle, work: Path, precision: dict) -> None:
    import onnx

    m = src.manifest
    graphs = {}
    for name, g in m.graphs.items():
        model = onnx.load(str(work / g.file), load_external_data=False)
        types = {t.name: onnx.helper.tensor_dtype_to_np_dtype(t.type.tensor_type.elem_type).name
                 for t in [*model.graph.input, *model.graph.output]}
        retype = lambda ts: tuple(TensorSpec(t.name, types.get(t.name, t.dtype), t.shape) for t in ts)  # noqa: E731
        graphs[name] = GraphSpec(g.file, inputs=retype(g.inputs), outputs=retype(g.outputs), **graph_hashes(work / g.file))
    # MatMulNBits (a contrib op) and MatMulInteger are ONNX Runtime's, not TensorRT's: `build` refuses them
    ort_only = precision.get("format") == "matmulnbits" or precision.get("method") == "dynamic"
    target = "onnxruntime" if ort_only else m.target
    graphs = share_weights(work, graphs)  # a weight the variant's graphs still hold alike (a tied table kept in float)
    explain = {}
    if m.contract == "cross-attention":  # each variant's explain graphs come from its own graphs
        graphs, explain = explain_manifest(work, graphs, m.explain)
    manifest = replace(m, graphs=graphs, precision=precision, target=target, explain=explain)
    (work / MANIFEST).write_text(manifest.to_json())


def quantize_bundle(src_dir: Path, out: Path, o: QuantizeOptions, log: Callable[[str], None] = lambda s: None,
                    progress=None):
    """`progress`: a rich Progress (or None) that shows the recording over the calibration images."""
    if o.precision not in PRECISIONS:
        raise InputError(f"--precision: {o.precision!r} is not one of {', '.join(PRECISIONS)}")
    if o.io_dtype not in ("float32", "float16"):
        raise InputError(f"--io-dtype: {o.io_dtype!r} is not float32 or float16")
    src = load_bundle(src_dir)
    o = _resolve(o, src)
    have = src.manifest.precision.get("dtype", "float32")
    if have != "float32":
        raise InputError(f"{src_dir}: precision.dtype is {have}, not float32; quantize the FP32 bundle it came from")
    cs, calib, held = load_calibration(o.calib, o.questions, held_out=o.held_out,
                                       need_questions="vqa" in src.manifest.tasks and o.precision == "int8" and o.method != "dynamic"
                                       and "text_encoder" in src.manifest.graphs)
    with OutputDir(out, o.force) as writer:
        tmp = writer.path
        fp32 = open_pipeline(src)
        log(f"recording graph inputs from FP32 generation over {len(calib.images)} images, {len(calib.questions)} questions")
        bar = progress.add_task("recording calibration inputs", total=len(calib.images) * ("caption" in src.manifest.tasks)
                                + len(calib.questions) * ("vqa" in src.manifest.tasks)) if progress else None
        feeds = record_inputs(fp32, calib, progress=(lambda n: progress.advance(bar, n)) if progress else None)
        base = held_out_accuracy(fp32, held)
        shutil.copy2(src.tokenizer_path, tmp / src.tokenizer_path.name)
        for name in extra_files(src.manifest.prompt):  # InstructBLIP's vision-text tokenizer
            shutil.copy2(src.path / name, tmp / name)
        v = _Variant(src, tmp, o, feeds)
        (tmp / ".calib").mkdir()
        done = {g: v.build(g) for g in src.manifest.graphs}
        total = sum(len(n) for n in done.values())
        log(f"{o.precision}: " + ", ".join(f"{g} {len(n)} nodes" for g, n in done.items()))

        def check() -> dict:
            _write_manifest(src, tmp, {"dtype": _DTYPE[o.precision], "method": o.method})
            return held_out_accuracy(open_pipeline(load_bundle(tmp)), held, base)

        results = {0: check()}  # nodes back in float -> held-out accuracy of that variant
        history = [{"in_float": 0, **_summary(results[0])}]
        k: int | None = 0
        all_float = False
        if not _within(base, results[0], o):
            ranked = _rank(v, done, log)
            built = [0]  # the prefix the variant's graphs hold now
            kept = {g: dict(e) for g, e in v.excluded.items()}  # exclusions before any fallback
            cap = len(ranked) if o.max_fallbacks is None else min(o.max_fallbacks, len(ranked))
            all_float = cap == len(ranked) == total  # the longest prefix is the FP32 graph itself

            def fall_back(n: int) -> None:
                """Rebuild the variant with the `n` worst ranked nodes in float."""
                built[0] = n
                before = {g: set(e) for g, e in v.excluded.items()}
                v.excluded = {g: dict(e) for g, e in kept.items()}
                for graph, node, err in ranked[:n]:
                    v.excluded[graph][node] = (f"sensitivity: output error {err:.3g} when alone in {o.precision}; "
                                               "returned to float")
                for g in src.manifest.graphs:
                    if set(v.excluded[g]) != before[g]:
                        v.build(g)

            def probe(n: int) -> bool:
                fall_back(n)
                results[n] = check()
                history.append({"in_float": n, **_summary(results[n])})
                log(f"  {n} of {total} nodes in float: "
                    + ", ".join(f"{key} {x:.4f}" for key, x in _summary(results[n]).items()))
                return _within(base, results[n], o)

            k = smallest_passing_prefix(cap, probe, top_passes=all_float)
            log(f"fallback search: {len(history) - 1} held-out probes over {cap} ranked nodes")
            if k in results and built[0] != k:  # the bisection's last probe was another prefix
                fall_back(k)
        if k is None or (all_float and k not in results):
            best = max(results)  # the most nodes in float that were evaluated: the closest to FP32
            why = "" if k is None else f"only all {total} nodes in float (an FP32 copy) would meet it; "
            raise ValidationError(
                f"{o.precision}: best variant ({best} of {total} nodes in float) misses the budget: {why}"
                + describe(paired_delta(base, results[best]), {"vqa_accuracy": o.budget_vqa, "bleu4": o.budget_bleu}))
        acc = results[k]
        conf = paired_delta(base, acc)
        small = [f"{n} {what}" for what, n in (("captions", len(base.get("captions") or [])),
                                                ("questions", len(base.get("vqa_scores") or []))) if 0 < n < HELD_OUT]
        if small:
            log(f"warning: the held-out set has {' and '.join(small)} (fewer than {HELD_OUT}); the check sees "
                + describe(conf))
        if o.precision == "int8" and o.method != "dynamic":
            _check_tensorrt_rules(tmp, src)
        if o.precision in _WEIGHT_ONLY or o.method == "dynamic":
            _check_loads(tmp, src)
        precision = {
            "dtype": _DTYPE[o.precision],
            "method": o.method if o.precision != "fp16" else "cast",
            "io_dtype": o.io_dtype if o.precision == "fp16" else "float32",
            "calibration": {**cs.describe(), "calibration_images": len(calib.images), "held_out_images": len(held.images),
                            "held_out_questions": len(held.questions)},
            **({"bits": 8 if o.precision == "int8-wo" else 4, "block_size": o.block_size, "graphs": list(o.graphs),
                "lm_head": o.lm_head, "format": o.format,
                "lm_head_bits": next((b for g, c in v._wo_cache.items() for n, b in c.get("heads", {}).items()
                                      if n in done.get(g, ()) and n not in v.excluded.get(g, {})), None)}
               if o.precision in _WEIGHT_ONLY else {}),
            "nodes": {g: len(n) for g, n in done.items()},
            "excluded": {g: e for g, e in v.excluded.items() if e},
            "accuracy": {"fp32": _summary(base), o.precision: _summary(acc), "within_budget": True,
                         "budget": {"vqa_accuracy": o.budget_vqa, "bleu4": o.budget_bleu},
                         "held_out": {"images": len(held.images), "questions": len(held.questions)},
                         "confidence": {"method": "paired bootstrap, 1000 resamples, 95% interval of variant - FP32",
                                        **conf},
                         "in_float": k, "search": history},
        }
        _write_manifest(src, tmp, precision)
        shutil.rmtree(tmp / ".calib")
        writer.commit()
    return load_bundle(out).manifest


def smallest_passing_prefix(top: int, passes: Callable[[int], bool], top_passes: bool = False) -> int | None:
    """The smallest n in 1..top with passes(n), by bisection, where prefix 0 fails and passing is
    taken to be monotone in n (more nodes in float, closer to FP32). `top_passes`: n = top is known
    to pass without a probe (everything in float). At most ceil(log2(top)) + 1 probes; None when
    even `top` fails."""
    if top < 1 or (not top_passes and not passes(top)):
        return None
    lo, hi = 0, top  # lo fails, hi passes
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if passes(mid):
            hi = mid
        else:
            lo = mid
    return hi
def _resolve(o: QuantizeOptions, src: Bundle) -> QuantizeOptions:
    """Defaults that depend on the precision, and the weight-only options checked against the bundle."""
    if o.precision in _WEIGHT_ONLY:
        from vlmedge.calibration import weight_only as wo

        graphs = tuple(o.graphs) if o.graphs else tuple(g for g in wo.DEFAULT_GRAPHS if g in src.manifest.graphs)
        o = replace(o, method=o.method or "gptq", graphs=graphs)
        wo.check_options(o.precision, o.method, o.block_size, o.format, o.graphs, src.manifest.graphs)
        return o
    if o.method == "dynamic" and o.precision != "int8":
        raise InputError(f"--method dynamic: ONNX Runtime's dynamic quantization is INT8 (--precision int8), not {o.precision}")
    return replace(o, method=o.method or "entropy")


def _check_loads(work: Path, src: Bundle) -> None:
    """Every weight-only (opset 21, int4, or com.microsoft MatMulNBits) or dynamic INT8 graph loads in ONNX Runtime."""
    import onnxruntime as ort

    for g in src.manifest.graphs.values():
        try:
            ort.InferenceSession(str(work / g.file), session_options(ort), providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises several types; one line names the file
            raise ValidationError(f"{g.file}: the quantized graph does not load in ONNX Runtime: {first_line(e)}") from None


def _rank(v: _Variant, done: dict[str, list[str]], log) -> list[tuple[str, str, float]]:
    """Every quantized/converted weight node with the output error of its graph when it alone is."""
    from vlmedge.calibration.int8 import weight_nodes

    import onnx

    ranked = []
    probe = v.work / ".calib" / "probe.onnx"
    for graph, nodes in done.items():
        weights = set(weight_nodes(onnx.load(str(v.src.graph_path(graph)), load_external_data=False)))
        for node in nodes:
            if node in weights:
                v.build(graph, only=[node], dst=probe)
                ranked.append((graph, node, v.graph_error(graph, probe)))
    ranked.sort(key=lambda r: -r[2])
    log(f"sensitivity ranked {len(ranked)} nodes; worst: " + ", ".join(f"{g}/{n} {e:.3g}" for g, n, e in ranked[:3]))
    return ranked


def _check_tensorrt_rules(work: Path, src: Bundle) -> None:
    import onnx

    from vlmedge.calibration.int8 import tensorrt_qdq_problems

    for g in src.manifest.graphs.values():
        problems = tensorrt_qdq_problems(onnx.load(str(work / g.file), load_external_data=False), str(work))
        if problems:
            raise ValidationError(f"{g.file}: breaks TensorRT's Q/DQ rules: {problems[0]}")
