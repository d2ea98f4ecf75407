"""What fusing attention into MultiHeadAttention brings to the ONNX Runtime target, on the CPU.

Three forms of the same bundle run alternately in one process, after a warm-up round, with the same
images: the portable bundle, its ONNX Runtime target without the attention pass (ONNX Runtime's
optimizer alone: SkipLayerNormalization, Gelu and bias fusions) and the ONNX Runtime target as
`vlmedge export|quantize --target onnxruntime` writes it (attention fused too). Both targets are
written fresh in a temporary folder by this run (`retarget(..., attention=False|True)`), so no cache
of an older target is measured. Per form: whole caption (batch 1, greedy; 20 new tokens forced for
the random-weight ViT-GPT2), median decoder step, vision encoder; the tokens of all three must agree.

Models: `shapes-vlm` (the shipped reference model) and the base ViT-GPT2 (ViT-B/16 + GPT-2 124M
shapes, random weights), both as cached by benchmarks/runtime_latency.py in --work.

Run:  .venv/bin/python benchmarks/ort_attention.py [--model shapes|vit-gpt2|all] [--rounds 10]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import runtime_latency as rl  # noqa: E402

from vlmedge.export.ort_target import retarget  # noqa: E402
from vlmedge.runtime.bundle import load_bundle  # noqa: E402
from vlmedge.runtime.pipeline import Pipeline  # noqa: E402

FORMS = ("portable", "ort, attention unfused", "ort, attention fused")


def measure(model: rl.Model, rounds: int, threads: int, tmp: Path) -> dict:
    targets = {}
    for form, attention in ((FORMS[1], False), (FORMS[2], True)):
        out = tmp / f"{model.name}-{'attn' if attention else 'noattn'}"
        t0 = time.perf_counter()
        entry = retarget(model.bundle, out, attention=attention)
        rl.log(f"{model.name}: {form} written in {time.perf_counter() - t0:.0f} s, fused "
               f"{ {g: c.get('MultiHeadAttention', 0) for g, c in entry['fused_nodes'].items()} } MultiHeadAttention")
        targets[form] = out
    pipes = {FORMS[0]: Pipeline(load_bundle(model.bundle), "cpu", threads=threads, shared_threads=True)}
    pipes |= {f: Pipeline(load_bundle(p), "cpu", threads=threads, shared_threads=True) for f, p in targets.items()}
    gen = {"max_new_tokens": rl.MAX_NEW} | ({"min_new_tokens": rl.MAX_NEW} if model.force_len else {})
    total = {f: [] for f in FORMS}
    step = {f: [] for f in FORMS}
    encoder = {f: [] for f in FORMS}
    same = True
    busy_start = rl.busy_elsewhere()
    for r in range(rounds + 1):  # round 0 is the warm-up
        image = model.images[r % len(model.images)]
        ids = rl.pipelines_round(pipes, image, gen, bool(r), total, step, encoder)
        same &= len({str(v) for v in ids.values()}) == 1
    busy_end = rl.busy_elsewhere()
    return {"total": {f: rl.median(v) for f, v in total.items()}, "step": {f: rl.median(v) for f, v in step.items()},
            "encoder": {f: rl.median(v) for f, v in encoder.items()}, "same_tokens": same,
            "busy": (busy_start, busy_end)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("shapes", "vit-gpt2", "all"), default="all")
    ap.add_argument("--rounds", type=int, default=10, help="alternating rounds after the warm-up (default 10)")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    models = []
    if args.model in ("shapes", "all"):
        models.append(rl.shapes_model(args.work, quick=True))
    if args.model in ("vit-gpt2", "all"):
        models.append(rl.vit_gpt2_model(args.work, quick=True))
    info = rl.machine(args.threads)
    print(f"machine: {info}")
    with tempfile.TemporaryDirectory(prefix="ort-attention-") as tmp:
        for model in models:
            res = measure(model, args.rounds, args.threads, Path(tmp))
            base = res["total"][FORMS[1]]
            print(f"\n{model.name}, batch 1, {args.rounds} alternating rounds after 1 warm-up, {args.threads} threads "
                  f"(median ms); other work: {res['busy'][0]:.0%} of all cores busy at start, {res['busy'][1]:.0%} at end")
            print(f"{'form':<26}{'caption':>10}{'step':>9}{'encoder':>10}{'caption vs unfused':>20}")
            for f in FORMS:
                print(f"{f:<26}{res['total'][f] * 1e3:>10.2f}{res['step'][f] * 1e3:>9.3f}{res['encoder'][f] * 1e3:>10.2f}"
                      f"{res['total'][f] / base:>19.3f}x")
            print(f"same tokens in all three forms: {res['same_tokens']}")
            if not res["same_tokens"]:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
