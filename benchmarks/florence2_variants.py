"""FP16 and INT8 variants of a Florence-2 bundle against FP32: for every task, the share of images
whose generated tokens are identical, and whose boxes are identical, on the scene world's test split.

    python benchmarks/florence2_variants.py FP32_BUNDLE FP16_BUNDLE INT8_BUNDLE [--images 20]

(`vlmedge compare` scores variants on caption and VQA references; Florence-2's tasks have none in
the scene world, so this reports agreement with FP32 only.)
"""

from __future__ import annotations

import argparse
import json
import time

import vlmedge
from vlmedge.data.scenes import scenes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("reference")
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--images", type=int, default=20)
    args = ap.parse_args()
    images = [s.image for s in scenes("test", 0, args.images)]
    ref = vlmedge.load(args.reference)
    report = {}
    for path in args.variants:
        pipe = vlmedge.load(path)
        rows = {}
        for task in ref.tasks:
            t0 = time.perf_counter()
            want = ref.run(images, task)
            t1 = time.perf_counter()
            got = pipe.run(images, task)
            t2 = time.perf_counter()
            rows[task] = {
                "tokens_identical": sum(a.ids == b.ids for a, b in zip(want, got)) / len(images),
                "boxes_identical": sum(a.boxes == b.boxes and a.labels == b.labels for a, b in zip(want, got)) / len(images),
                "boxes_fp32": sum(len(a.boxes) for a in want),
                "seconds_fp32": round(t1 - t0, 2), "seconds_variant": round(t2 - t1, 2),
            }
        report[path] = rows
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
