"""Weight-only INT8 / INT4 decoders on the CPU: per-token time and whole captions against FP32 and HF
`generate`, and, on shapes-vlm, their held-out accuracy and token agreement with FP32.

1. Base ViT-GPT2 (random weights, ViT-B/16 + GPT-2 124M shapes, built and exported by
   benchmarks/runtime_latency.py's helpers into --work, reused when there): the int8-wo and int4-wo
   variants are made with `quantize_bundle` (round to nearest, block 32, LM head included unless
   --no-lm-head; the accuracy check is waived with a budget of 1.0, since random weights caption
   nothing meaningful, and the method does not change the speed) into --variants. Then, in one
   process, rounds alternate FP32 / INT8-wo / INT4-wo / HF generate FP32 on one image each: batch 1,
   20 new tokens forced, greedy. Reported: median decoder per-token time of each variant over FP32's
   (targets INT4 <= 0.45x, INT8 <= 0.6x) and whole caption of INT4-wo against HF generate (target >= 2x).
2. shapes-vlm (the shipped model): int8-wo and int4-wo with GPTQ through `quantize_bundle` (its
   held-out check against FP32, budget VQA 1 point / BLEU-4 0.02), then the token agreement of each
   with FP32 on unseen test scenes (captions and one question each). This part runs first: the timed
   pipelines share one ONNX Runtime thread pool, and a process that has one cannot open sessions of
   their own (as quantize_bundle's do) afterwards.

Run:  .venv/bin/python benchmarks/weight_only.py --work benchmarks/.work [--variants DIR] [--rounds 5]
      [--calib synthetic:64] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import runtime_latency as rl  # noqa: E402

from vlmedge.calibration.quantize import QuantizeOptions, quantize_bundle  # noqa: E402
from vlmedge.calibration.weight_only import token_agreement  # noqa: E402
from vlmedge.data.scenes import pick_questions, scenes  # noqa: E402
from vlmedge.outdir import write_file_atomic  # noqa: E402
from vlmedge.runtime.bundle import load_bundle  # noqa: E402
from vlmedge.runtime.pipeline import Pipeline  # noqa: E402

INT4_STEP, INT8_STEP, INT4_VS_HF = 0.45, 0.60, 2.0  # targets
PRECISIONS = ("int8-wo", "int4-wo")


def variant(src: Path, out: Path, precision: str, **options) -> Path:
    if not (out / "manifest.json").is_file():
        rl.log(f"making {precision} {options} -> {out}")
        t0 = time.perf_counter()
        quantize_bundle(src, out, QuantizeOptions(precision, force=True, **options), log=lambda s: rl.log(f"  {s}"))
        rl.log(f"  done in {time.perf_counter() - t0:.0f} s")
    return out


def base_speed(args) -> dict:
    rl.torch.set_num_threads(args.threads)
    model = rl.vit_gpt2_model(args.work, quick=True)
    bundles = {"fp32": model.bundle}
    for p in PRECISIONS:
        bundles[p] = variant(model.bundle, args.variants / f"vit-gpt2-base-{p}{'' if args.lm_head else '-nohead'}", p,
                             calib="synthetic:8", method="rtn", lm_head=args.lm_head, budget_vqa=1.0, budget_bleu=1.0)
    pipes = {k: Pipeline(load_bundle(b), "cpu", threads=args.threads, shared_threads=True) for k, b in bundles.items()}
    hf = rl.TorchSide(model)
    gen = {"max_new_tokens": rl.MAX_NEW, "min_new_tokens": rl.MAX_NEW}
    times: dict[str, list[float]] = {k: [] for k in (*pipes, "hf")}
    steps: dict[str, list[float]] = {k: [] for k in pipes}
    agree: dict[str, list[float]] = {k: [] for k in PRECISIONS}
    busy_start = rl.busy_elsewhere()
    for r in range(args.rounds + 1):  # round 0 warms up
        image = model.images[r % len(model.images)]
        ids = rl.pipelines_round(pipes, image, gen, bool(r), times, steps)
        seconds, _, hf_ids = hf.run([image])
        if r:
            times["hf"].append(seconds)
            for p in PRECISIONS:
                agree[p].append(token_agreement(ids["fp32"], ids[p]))
        time.sleep(rl.PAUSE)
        rl.log(f"round {r}{' (warm-up)' if r == 0 else ''}: " + ", ".join(
            f"{k} {s[-1] * 1e3:.0f} ms" for k, s in times.items() if s and r) + f"; fp32 = HF tokens: {ids['fp32'] == hf_ids}")
    med = {k: rl.median(v) for k, v in times.items()}
    step = {k: rl.median(v) for k, v in steps.items()}
    return {"medians_s": med, "step_s": step, "raw": times, "steps": steps, "busy": [busy_start, rl.busy_elsewhere()],
            "ratios": {"int8_step": step["int8-wo"] / step["fp32"], "int4_step": step["int4-wo"] / step["fp32"],
                       "int4_vs_hf": med["hf"] / med["int4-wo"], "int8_vs_hf": med["hf"] / med["int8-wo"],
                       "fp32_vs_hf": med["hf"] / med["fp32"]},
            "agreement_random_weights": {k: sum(v) / len(v) for k, v in agree.items()},
            "sizes_mb": {k: sum(f.stat().st_size for f in b.iterdir() if f.name.startswith("decoder")) / 1e6 for k, b in bundles.items()}}


def shapes_accuracy(args) -> dict:
    model = rl.shapes_model(args.work, quick=True)
    test = list(scenes("test", 0, args.agreement_scenes))
    imgs, qs = [s.image for s in test], [pick_questions(s)[0].text for s in test]

    def ids(pipe):
        return [g.ids for g in pipe.caption(imgs, return_ids=True)] + [g.ids for g in pipe.vqa(imgs, qs, return_ids=True)]

    ref = ids(Pipeline(load_bundle(model.bundle)))
    out = {}
    for p in PRECISIONS:
        b = variant(model.bundle, args.variants / f"shapes-vlm-{p}-gptq{'' if args.lm_head else '-nohead'}", p,
                    calib=args.calib, method="gptq", lm_head=args.lm_head)
        prec = load_bundle(b).manifest.precision
        out[p] = {"accuracy": prec["accuracy"], "held_out_images": prec["calibration"]["held_out_images"],
                  "held_out_questions": prec["calibration"]["held_out_questions"],
                  "token_agreement": token_agreement(ref, ids(Pipeline(load_bundle(b))))}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work", help="the FP32 models and bundles (built if missing)")
    ap.add_argument("--variants", type=Path, help="where the weight-only bundles are kept (default: --work)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib", default="synthetic:64", help="shapes-vlm calibration set")
    ap.add_argument("--agreement-scenes", type=int, default=32)
    ap.add_argument("--lm-head", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--skip", choices=("base", "shapes"), help="leave one part out")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    args.variants = args.variants or args.work
    args.variants.mkdir(parents=True, exist_ok=True)
    info = rl.machine(args.threads)
    print(f"machine: {info}")
    results: dict = {"machine": info, "lm_head": args.lm_head}
    if args.skip != "shapes":
        s = results["shapes"] = shapes_accuracy(args)
        print(f"shapes-vlm, GPTQ, block 32, calibration {args.calib}; agreement on {args.agreement_scenes} test scenes "
              f"(caption + one question each)")
        for p, v in s.items():
            a = v["accuracy"]
            deltas = ", ".join(f"{k} {a['fp32'][k]:.4f} -> {a[p][k]:.4f}" for k in a["fp32"])
            print(f"{'PASS' if a['within_budget'] else 'FAIL'}  {p}: {deltas} (held out {v['held_out_images']} images, "
                  f"{v['held_out_questions']} questions); token agreement with FP32 {v['token_agreement']:.4f}")
    if args.skip != "base":  # last: its pipelines share one ONNX Runtime thread pool, which later sessions must too
        b = results["base"] = base_speed(args)
        r = b["ratios"]
        print(f"\nBase ViT-GPT2 (random weights), batch 1, {rl.MAX_NEW} new tokens forced, {args.threads} threads, "
              f"{args.rounds} alternating rounds after a warm-up (medians); LM head {'quantized' if args.lm_head else 'float'}")
        print(f"other work on the machine: {b['busy'][0]:.0%} of all cores busy at start, {b['busy'][1]:.0%} at end")
        for k in ("fp32", *PRECISIONS, "hf"):
            step = f"  per token {b['step_s'][k] * 1e3:.1f} ms" if k in b["step_s"] else ""
            size = f"  decoder files {b['sizes_mb'][k]:.0f} MB" if k in b["sizes_mb"] else ""
            print(f"{k:<8}{b['medians_s'][k] * 1e3:>9.1f} ms caption{step}{size}")
        print(f"{'PASS' if r['int4_step'] <= INT4_STEP else 'FAIL'}  INT4-wo per token {r['int4_step']:.2f}x FP32 (target <= {INT4_STEP}x)")
        print(f"{'PASS' if r['int8_step'] <= INT8_STEP else 'FAIL'}  INT8-wo per token {r['int8_step']:.2f}x FP32 (target <= {INT8_STEP}x)")
        print(f"{'PASS' if r['int4_vs_hf'] >= INT4_VS_HF else 'FAIL'}  INT4-wo caption {r['int4_vs_hf']:.2f}x faster than HF "
              f"generate FP32 (target >= {INT4_VS_HF}x; FP32 {r['fp32_vs_hf']:.2f}x, INT8-wo {r['int8_vs_hf']:.2f}x)")
        print("token agreement with FP32 (random weights): " + ", ".join(f"{k} {v:.2f}" for k, v in b["agreement_random_weights"].items()))
    if args.json:
        write_file_atomic(args.json, json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
