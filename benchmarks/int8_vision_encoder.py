"""INT8 against FP32 for a ViT-B/16 vision encoder on the CPU, side by side in one process.

The encoder is the vision_encoder graph of the base-size ViT-GPT2 bundle that
benchmarks/runtime_latency.py builds (random weights from configs; run that first, or pass
--bundle). It is quantized the way `vlmedge quantize --precision int8` does it (Q/DQ, symmetric,
per-channel weights, entropy-calibrated activations from scene images), then the FP32 and INT8
sessions alternate, batch 1, and the medians are compared (target: INT8 <= 0.75x FP32).

Run:  .venv/bin/python benchmarks/int8_vision_encoder.py [--bundle DIR] [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    import onnxruntime as ort

    from vlmedge import __version__
    from vlmedge.calibration.int8 import quantize_graph, tensorrt_qdq_problems
    from vlmedge.data.scenes import scenes
    from vlmedge.runtime.bundle import load_bundle
    from vlmedge.runtime.preprocess import pixel_values

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=ROOT / "benchmarks" / ".work" / f"vit-gpt2-base-bundle-v{__version__}")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--calib", type=int, default=32, help="scene images for calibration")
    args = ap.parse_args()

    bundle = load_bundle(args.bundle)
    src = bundle.graph_path("vision_encoder")
    prep = bundle.manifest.preprocessing
    calib = [{"pixel_values": pixel_values([s.image], prep)} for s in scenes("val", 0, args.calib)]
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "vision_encoder.int8.onnx"
        t0 = time.perf_counter()
        nodes = quantize_graph(src, dst, "entropy", Path(tmp) / "ranges.json", calib)
        quant_s = time.perf_counter() - t0
        import onnx

        problems = tensorrt_qdq_problems(onnx.load(str(dst)))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        fp32 = ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
        int8 = ort.InferenceSession(str(dst), opts, providers=["CPUExecutionProvider"])
        x = pixel_values([next(scenes("test", 0, 1)).image], prep)
        ref, got = fp32.run(None, {"pixel_values": x})[0], int8.run(None, {"pixel_values": x})[0]
        cos = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
        times = {"fp32": [], "int8": []}
        for _ in range(3):
            fp32.run(None, {"pixel_values": x})
            int8.run(None, {"pixel_values": x})
        for _ in range(args.repeats):
            for name, sess in (("fp32", fp32), ("int8", int8)):
                t = time.perf_counter()
                sess.run(None, {"pixel_values": x})
                times[name].append(time.perf_counter() - t)
        size = {"fp32": src.stat().st_size, "int8": dst.stat().st_size}
    f, q = statistics.median(times["fp32"]), statistics.median(times["int8"])
    print(f"ViT-B/16 vision encoder, batch 1, 2 threads, onnxruntime {ort.__version__}, {args.repeats} alternating repeats")
    print(f"quantized {len(nodes)} MatMul/Conv nodes in {quant_s:.0f} s; TensorRT Q/DQ rule problems: {len(problems)}")
    print(f"FP32 {f * 1e3:.1f} ms   INT8 {q * 1e3:.1f} ms   INT8/FP32 = {q / f:.2f}x   (target <= 0.75x)")
    print(f"size FP32 {size['fp32'] / 1e6:.0f} MB, INT8 {size['int8'] / 1e6:.0f} MB; output cosine INT8 vs FP32 {cos:.4f}")
    print(("PASS" if q / f <= 0.75 else "FAIL") + f"  INT8 vision encoder <= 0.75x FP32 latency (measured {q / f:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
