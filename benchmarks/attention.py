"""The pointing game on the built-in model, per precision, and what return_attention costs.

For every colour and shape word of a bundle's own caption of a test scene, the heatmap's peak cell
(`Explanation.heatmaps()`: mean over layers and heads) is a hit when it touches the object the word's
phrase names (the cell meets the object's bounding circle). The random rate is the share of cells
that touch that object: what a guess scores. Words of a phrase naming no object in the scene are
skipped (counted as `unmatched`).

Latency, batch 1, p50 over the same scenes, the median of --rounds rounds: `caption()` on the bundle and
`caption()` on the same bundle with its explain graphs removed from the manifest (alternated, the order
swapped each round: the fast path must not change), then `caption(return_attention=True)`.

    python benchmarks/attention.py --work /tmp/attn [--scenes 200] [--precisions fp32,fp16,int8,int4-wo]

Missing bundles are made under --work: the FP32 export of shapes-vlm, then `quantize` of each precision.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

CALIB = {"fp16": "synthetic:24", "int8": "synthetic:36", "int4-wo": "synthetic:12"}


def bundles(work: Path, precisions: list[str]) -> dict[str, Path]:
    from vlmedge.calibration.quantize import QuantizeOptions, quantize_bundle
    from vlmedge.export.exporter import export_bundle
    from vlmedge.models.registry import load_adapter

    out = {"fp32": work / "fp32"}
    if not (out["fp32"] / "manifest.json").is_file():
        export_bundle(load_adapter("shapes-vlm"), "all", out["fp32"])
    for p in precisions:
        if p == "fp32":
            continue
        out[p] = work / p
        if not (out[p] / "manifest.json").is_file():
            quantize_bundle(out["fp32"], out[p], QuantizeOptions(p, calib=CALIB.get(p, "synthetic:24"), held_out=12))
    return {p: out[p] for p in precisions}


def _touches(cell: tuple[int, int], grid: dict, obj, image: int) -> bool:
    """Whether grid cell (row, col) meets the object's bounding circle."""
    from vlmedge.data.scenes import SIZES

    r, c = cell
    ch, cw = image / grid["rows"], image / grid["cols"]
    nx = min(max(obj.x, c * cw), (c + 1) * cw)
    ny = min(max(obj.y, r * ch), (r + 1) * ch)
    return (nx - obj.x) ** 2 + (ny - obj.y) ** 2 <= (SIZES[obj.size] * 1.25) ** 2


def pointing(pipe, scenes_) -> dict:
    from vlmedge.data.scenes import COLORS, IMAGE_SIZE, SHAPES

    hits = {"colour": 0, "shape": 0}
    words = {"colour": 0, "shape": 0}
    chance = {"colour": 0.0, "shape": 0.0}
    unmatched = 0
    for s in scenes_:
        e = pipe.caption(s.image, return_attention=True)
        heat = e.heatmaps()
        grid = e.grid
        cells = [(r, c) for r in range(grid["rows"]) for c in range(grid["cols"])]
        by_name = {(o.color, o.shape): o for o in s.objects}
        phrase: list[int] = []  # token indices of the current phrase
        for t, tok in enumerate(list(e.tokens) + [","]):
            if tok in (",", "and") or t == len(e.tokens):
                named = [e.tokens[i] for i in phrase]
                colour = next((w for w in named if w in COLORS), None)
                shape = next((w for w in named if w in SHAPES), None)
                obj = by_name.get((colour, shape))
                for i in phrase:
                    kind = "colour" if e.tokens[i] in COLORS else "shape" if e.tokens[i] in SHAPES else None
                    if kind is None:
                        continue
                    if obj is None:
                        unmatched += 1
                        continue
                    peak = np.unravel_index(int(np.argmax(heat[i])), heat[i].shape)
                    words[kind] += 1
                    hits[kind] += _touches(peak, grid, obj, IMAGE_SIZE)
                    chance[kind] += sum(_touches(cell, grid, obj, IMAGE_SIZE) for cell in cells) / len(cells)
                phrase = []
            else:
                phrase.append(t)
    out = {k: {"words": words[k], "hit_rate": hits[k] / max(words[k], 1), "random_rate": chance[k] / max(words[k], 1)}
           for k in words}
    out["unmatched_words"] = unmatched
    return out


def latency(pipe, images, **kw) -> float:
    for img in images[:3]:
        pipe.caption(img, **kw)
    times = []
    for img in images:
        t0 = time.perf_counter()
        pipe.caption(img, **kw)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--latency-scenes", type=int, default=40)
    ap.add_argument("--precisions", default="fp32,fp16,int8,int4-wo")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6, help="latency rounds per bundle, with and without explain graphs alternated")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    import vlmedge
    from vlmedge.data.scenes import scenes

    a.work.mkdir(parents=True, exist_ok=True)
    paths = bundles(a.work, a.precisions.split(","))
    test = list(scenes("test", 0, a.scenes))
    images = [s.image for s in test[: a.latency_scenes]]
    report = {}
    print(f"pointing game over {a.scenes} test scenes (own captions), caption latency batch 1 over {len(images)} scenes, "
          f"{a.threads} threads")
    print(f"{'bundle':10} {'colour hit':>11} {'shape hit':>10} {'random':>8} {'words':>6} {'plain ms':>9} "
          f"{'no-explain ms':>14} {'attention ms':>13}")
    for name, path in paths.items():
        pipe = vlmedge.load(path, threads=a.threads)
        bare = a.work / f"{name}-no-explain"
        if not bare.exists():
            shutil.copytree(path, bare)
            m = json.loads((bare / "manifest.json").read_text())
            m.pop("explain", None)
            (bare / "manifest.json").write_text(json.dumps(m))
        plain_pipe = vlmedge.load(bare, threads=a.threads)
        rounds: dict[str, list[float]] = {"with": [], "without": []}
        for r in range(a.rounds):  # alternated, the order swapped every round (the first series runs colder)
            pair = [("with", pipe), ("without", plain_pipe)]
            for which, p in pair if r % 2 == 0 else pair[::-1]:
                rounds[which].append(latency(p, images))
        with_att = latency(pipe, images, return_attention=True)
        pg = pointing(pipe, test)
        row = {"pointing": pg, "caption_ms": statistics.median(rounds["with"]),
               "caption_no_explain_ms": statistics.median(rounds["without"]), "caption_attention_ms": with_att}
        report[name] = row
        rand = (pg["colour"]["random_rate"] * pg["colour"]["words"] + pg["shape"]["random_rate"] * pg["shape"]["words"]) \
            / max(pg["colour"]["words"] + pg["shape"]["words"], 1)
        print(f"{name:10} {pg['colour']['hit_rate']:>11.1%} {pg['shape']['hit_rate']:>10.1%} {rand:>8.1%} "
              f"{pg['colour']['words'] + pg['shape']['words']:>6} {row['caption_ms']:>9.2f} {row['caption_no_explain_ms']:>14.2f} "
              f"{with_att:>13.2f}")
    if a.json:
        a.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
