"""INT8 against FP32 for a ViT-B/16 vision encoder on the CPU, side by side in one process.

The encoder is the vision_encoder graph of the base-size ViT-GPT2 bundle that
benchmarks/runtime_latency.py builds (random weights from configs; run that first, or pass
--bundle). It is quantized the way `vlmedge quantize --precision int8` does it (Q/DQ, symmetric,
per-channel weights, entropy-calibrated activations from scene images), then the FP32 and INT8
sessions alternate, batch 1, on one shared thread pool, and the medians are compared
(target: INT8 <= 0.75x FP32). The timing runs in a fresh process: onnxruntime's shared thread pool
must exist before any session, including the calibrator's.

The ONNX Runtime target's forms alternate with them: FP32 and the same Q/DQ INT8 with ONNX Runtime's
transformer fusions (vlmedge.export.ort_target.fuse_graph, what `--target onnxruntime` does), and
dynamic INT8 then fused, what `vlmedge quantize --precision int8 --method dynamic --target onnxruntime`
writes (MatMulInteger, activations quantized per call; ONNX Runtime only). The target is met when
either target's INT8 is at most 0.75x the portable FP32.

Run:  .venv/bin/python benchmarks/int8_vision_encoder.py [--bundle DIR] [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def quantize(bundle_dir: Path, n_calib: int) -> tuple[Path, Path, int, float]:
    from vlmedge.calibration.int8 import quantize_graph, tensorrt_qdq_problems
    from vlmedge.data.scenes import scenes
    from vlmedge.runtime.bundle import load_bundle
    from vlmedge.runtime.preprocess import pixel_values

    import onnx

    bundle = load_bundle(bundle_dir)
    src = bundle.graph_path("vision_encoder")
    dst = bundle_dir.parent / f"{bundle_dir.name}-vision_encoder.int8.onnx"
    ranges = dst.with_suffix(".ranges.json")
    ranges.unlink(missing_ok=True)
    calib = [{"pixel_values": pixel_values([s.image], bundle.manifest.preprocessing)} for s in scenes("val", 0, n_calib)]
    t0 = time.perf_counter()
    nodes = quantize_graph(src, dst, "entropy", ranges, calib)
    seconds = time.perf_counter() - t0
    problems = tensorrt_qdq_problems(onnx.load(str(dst)))
    print(f"quantized {len(nodes)} MatMul/Conv nodes in {seconds:.0f} s with {n_calib} calibration images; "
          f"TensorRT Q/DQ rule problems: {len(problems)}")
    return src, dst, len(nodes), seconds


def ort_target_forms(src: Path, dst: Path, heads: int, hidden: int) -> list[Path]:
    """The fused FP32 and fused Q/DQ INT8 encoders, and the fused dynamic INT8 one."""
    from vlmedge.calibration.int8 import quantize_graph_dynamic
    from vlmedge.export.ort_target import fuse_graph

    fp32, int8, dyn = (src.parent / f"{dst.stem.split('.')[0]}.{k}.onnx" for k in ("ort-fp32", "ort-int8", "ort-int8-dynamic"))
    unfused = dyn.with_suffix(".unfused.onnx")
    nodes = quantize_graph_dynamic(src, unfused)
    print("fused nodes, FP32:", fuse_graph(src, fp32, heads, hidden), " INT8 Q/DQ:", fuse_graph(dst, int8, heads, hidden),
          f" dynamic INT8 ({len(nodes)} MatMuls):", fuse_graph(unfused, dyn, heads, hidden))
    unfused.unlink()
    return [fp32, int8, dyn]


def time_side_by_side(src: Path, dst: Path, repeats: int, bundle_dir: Path, more: list[Path] = ()) -> None:
    import onnxruntime as ort

    from vlmedge.data.scenes import scenes
    from vlmedge.runtime.bundle import load_bundle
    from vlmedge.runtime.preprocess import pixel_values

    ort.set_global_thread_pool_sizes(2, 1)  # one pool for both sessions: no idle workers spinning against the other
    opts = ort.SessionOptions()
    opts.use_per_session_threads = False
    names = ["fp32", "int8"] + [p.name.split(".", 1)[1].removesuffix(".onnx") for p in more]
    sessions = {n: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
                for n, p in zip(names, [src, dst, *more])}
    fp32, int8 = sessions["fp32"], sessions["int8"]
    x = pixel_values([next(scenes("test", 0, 1)).image], load_bundle(bundle_dir).manifest.preprocessing)
    ref, got = fp32.run(None, {"pixel_values": x})[0], int8.run(None, {"pixel_values": x})[0]
    cos = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    for _ in range(3):
        for sess in sessions.values():
            sess.run(None, {"pixel_values": x})
    times: dict[str, list[float]] = {n: [] for n in sessions}
    for _ in range(repeats):
        for name, sess in sessions.items():
            t = time.perf_counter()
            sess.run(None, {"pixel_values": x})
            times[name].append(time.perf_counter() - t)
    f, q = statistics.median(times["fp32"]), statistics.median(times["int8"])
    best = q
    for name, p in zip(names[2:], more):
        out = sessions[name].run(None, {"pixel_values": x})[0]
        c = float((ref * out).sum() / np.linalg.norm(ref) / np.linalg.norm(out))
        if "int8" in name:
            best = min(best, statistics.median(times[name]))
        print(f"onnxruntime target {name}: {statistics.median(times[name]) * 1e3:.1f} ms = "
              f"{statistics.median(times[name]) / f:.2f}x portable FP32; size {p.stat().st_size / 1e6:.0f} MB; cosine vs FP32 {c:.4f}")
    print(f"ViT-B/16 vision encoder, batch 1, one shared pool of 2 threads, onnxruntime {ort.__version__}, "
          f"{repeats} alternating repeats")
    print(f"FP32 {f * 1e3:.1f} ms   INT8 {q * 1e3:.1f} ms   INT8/FP32 = {q / f:.2f}x   (target <= 0.75x)")
    print(f"size FP32 {src.stat().st_size / 1e6:.0f} MB, INT8 {dst.stat().st_size / 1e6:.0f} MB; "
          f"output cosine INT8 vs FP32 {cos:.4f}")
    print(f"portable INT8 (Q/DQ) {q / f:.2f}x FP32; best INT8 of either target {best / f:.2f}x")
    print(("PASS" if best / f <= 0.75 else "FAIL") + f"  INT8 vision encoder <= 0.75x FP32 latency, either target "
          f"(measured {best / f:.2f}x)")


def main() -> int:
    from vlmedge import __version__

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=ROOT / "benchmarks" / ".work" / f"vit-gpt2-base-bundle-v{__version__}")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--calib", type=int, default=32, help="scene images for calibration")
    ap.add_argument("--time", nargs="+", type=Path, metavar="ONNX", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.time:
        time_side_by_side(args.time[0], args.time[1], args.repeats, args.bundle, args.time[2:])
        return 0
    src, dst, _, _ = quantize(args.bundle, args.calib)
    from vlmedge.runtime.bundle import load_bundle

    dims = load_bundle(args.bundle).manifest.dims  # ViT-B/16 and GPT-2 124M share 12 heads of 64
    more = ort_target_forms(src, dst, dims["decoder_heads"], dims["decoder_heads"] * dims["decoder_head_dim"])
    return subprocess.call([sys.executable, __file__, "--time", str(src), str(dst), *map(str, more),
                            "--repeats", str(args.repeats), "--bundle", str(args.bundle)])


if __name__ == "__main__":
    raise SystemExit(main())
