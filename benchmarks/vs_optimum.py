"""Caption latency of the base ViT-GPT2 (random weights) through vlmedge, HF `generate` and Optimum's
`ORTModelForVision2Seq`, alternating in one run, with the tokens of all three compared.

Optimum (optimum-onnx) pins transformers < 4.58, so it lives in a venv of its own (--optimum-python,
default /work/optvenv/bin/python) and runs as a worker subprocess of this script: it exports the
same saved model directory with Optimum once (cached beside it), then answers one JSON line per
request on stdin with its `generate` seconds and ids. Pixel values are vlmedge's preprocessing of
the same scene image, handed over as a .npy file, so all sides decode the same input.

Per round (after a warm-up): vlmedge (portable bundle), vlmedge (onnxruntime target, if --ort-bundle
exists), HF generate, Optimum generate; 20 new tokens forced everywhere (min_new_tokens), greedy,
batch 1, 2 threads each. Medians over rounds. The Optimum worker is idle (blocked on stdin) while
the others run.

Run (after benchmarks/runtime_latency.py --model vit-gpt2 has built the model and bundle):
  .venv/bin/python benchmarks/vs_optimum.py [--rounds 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from json_worker import JsonWorker  # (benchmarks/, this script's folder)

ROOT = Path(__file__).resolve().parent.parent
TARGET = 1.8  # vlmedge FP32 at least this many times faster than Optimum


# -- the Optimum side (runs in its own venv; imports nothing from vlmedge) ------------------------------


def worker(model_dir: Path, export_dir: Path, threads: int, max_new: int) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from optimum.onnxruntime import ORTModelForVision2Seq

    if not (export_dir / "config.json").is_file():
        ORTModelForVision2Seq.from_pretrained(str(model_dir), export=True, use_cache=True).save_pretrained(str(export_dir))
    import onnxruntime

    so = onnxruntime.SessionOptions()
    so.intra_op_num_threads = threads
    model = ORTModelForVision2Seq.from_pretrained(str(export_dir), use_cache=True, session_options=so)
    start = model.config.decoder_start_token_id
    from importlib.metadata import version

    import transformers

    print(json.dumps({"ready": True, "optimum_onnx": version("optimum-onnx"), "optimum": version("optimum"), "transformers": transformers.__version__,
                      "onnxruntime": onnxruntime.__version__, "torch": torch.__version__}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        px = torch.from_numpy(np.load(req["pixel_values"]))
        t0 = time.perf_counter()
        out = model.generate(pixel_values=px, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False, num_beams=1)
        seconds = time.perf_counter() - t0
        ids = [row[1:] if row and row[0] == start else row for row in out.tolist()]  # the decoder start token is the prompt
        print(json.dumps({"seconds": seconds, "ids": ids}), flush=True)


class OptimumSide(JsonWorker):
    def __init__(self, python: str, model_dir: Path, export_dir: Path, threads: int, max_new: int):
        super().__init__([python, str(Path(__file__).resolve()), "--worker", str(model_dir), str(export_dir), str(threads),
                          str(max_new)], cwd=tempfile.gettempdir())

    def run(self, pixel_file: str) -> tuple[float, list[list[int]]]:
        r = self.ask({"pixel_values": pixel_file})
        return r["seconds"], r["ids"]


# -- the main side ----------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--optimum-python", default="/work/optvenv/bin/python")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import numpy as np
    import runtime_latency as rl

    from vlmedge.runtime.bundle import load_bundle
    from vlmedge.runtime.pipeline import Pipeline
    from vlmedge.runtime.preprocess import pixel_values

    rl.torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    model = rl.vit_gpt2_model(args.work, quick=True)
    ort_bundle = model.bundle.with_name(model.bundle.name + "-ort")
    if not (ort_bundle / "manifest.json").is_file():
        from vlmedge.export.ort_target import retarget

        rl.log(f"making the onnxruntime target {ort_bundle}")
        retarget(model.bundle, ort_bundle, log=rl.log)
    pipes = {"vlmedge": Pipeline(load_bundle(model.bundle), "cpu", threads=args.threads, shared_threads=True),
             "vlmedge-ort": Pipeline(load_bundle(ort_bundle), "cpu", threads=args.threads, shared_threads=True)}
    hf = rl.TorchSide(model)
    rl.log("starting the Optimum worker (exports the model with Optimum on its first run)")
    opt = OptimumSide(args.optimum_python, model.bundle.parent / "vit-gpt2-base", args.work / "vit-gpt2-base-optimum",
                      args.threads, rl.MAX_NEW)
    rl.log(f"Optimum worker ready: {opt.info}")
    prep = model.adapter.info.preprocessing.__dict__
    tmp = Path(tempfile.mkdtemp(prefix="vs-optimum-"))
    gen = {"max_new_tokens": rl.MAX_NEW, "min_new_tokens": rl.MAX_NEW}
    times: dict[str, list[float]] = {k: [] for k in (*pipes, "hf", "optimum")}
    steps: dict[str, list[float]] = {k: [] for k in pipes}
    same = {k: True for k in (*pipes, "optimum")}
    busy_start = rl.busy_elsewhere()
    for r in range(args.rounds + 1):  # round 0 is the warm-up
        image = model.images[r % len(model.images)]
        pixel_file = str(tmp / f"px{r}.npy")
        np.save(pixel_file, pixel_values([image], prep))
        ids = rl.pipelines_round(pipes, image, gen, bool(r), times, steps)
        seconds, _, ids["hf"] = hf.run([image])
        if r:
            times["hf"].append(seconds)
        time.sleep(rl.PAUSE)
        seconds, ids["optimum"] = opt.run(pixel_file)
        if r:
            times["optimum"].append(seconds)
        time.sleep(rl.PAUSE)
        for k in same:
            same[k] &= ids[k] == ids["hf"]
        rl.log(f"round {r}{' (warm-up)' if r == 0 else ''}: " + ", ".join(
            f"{k} {s[-1] * 1e3:.0f} ms" for k, s in times.items() if s and r))
    opt.close()
    busy_end = rl.busy_elsewhere()
    med = {k: rl.median(v) for k, v in times.items()}
    print(f"\nBase ViT-GPT2 (random weights), batch 1, {rl.MAX_NEW} new tokens forced, {args.threads} threads each, "
          f"{args.rounds} alternating rounds after 1 warm-up (median ms)")
    print(f"other work on the machine: {busy_start:.0%} of all cores busy at start, {busy_end:.0%} at end")
    print(f"Optimum side: {opt.info}")
    for k, v in med.items():
        extra = f"  per token {steps[k] and rl.median(steps[k]) * 1e3:.1f} ms" if k in steps else ""
        vs = f"  Optimum/this {med['optimum'] / v:.2f}x  HF/this {med['hf'] / v:.2f}x"
        same_txt = "" if k == "hf" else f"  tokens equal to HF: {'yes' if same[k] else 'NO'}"
        print(f"{k:<12}{v * 1e3:>9.1f}{vs}{extra}{same_txt}")
    weight_bytes, _ = rl.decoder_weight_bytes(model.bundle)
    bw = rl.read_bandwidth(args.threads)
    floor_s = weight_bytes / bw
    print(f"\nfloor of a decoder step: {weight_bytes / 1e6:.1f} MB of float weights / {bw / 1e9:.1f} GB/s read bandwidth "
          f"(numpy sum of 1 GiB over {args.threads} threads, best of 5) = {floor_s * 1e3:.1f} ms; per token: " + ", ".join(
              f"{k} {rl.median(v) / floor_s:.2f}x" for k, v in steps.items()) + " the floor (target <= 1.3x)")
    best = min(med["vlmedge"], med["vlmedge-ort"])
    ok = med["optimum"] / best >= TARGET and all(same.values())
    print(f"\n{'PASS' if ok else 'FAIL'}  vlmedge FP32 >= {TARGET}x faster than Optimum with the same tokens "
          f"(portable {med['optimum'] / med['vlmedge']:.2f}x, onnxruntime target {med['optimum'] / med['vlmedge-ort']:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps({"medians_s": med, "raw": times, "steps": steps, "same_tokens": same,
                                         "optimum": opt.info, "busy": [busy_start, busy_end],
                                         "floor_s": floor_s, "bandwidth": bw}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        sys.exit(main())
