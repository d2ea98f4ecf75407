"""Time to first token and per token of several bundles of one model, side by side in one process.

Each round asks every bundle the same VQA question about the same image (a test scene resized to `--side`
px), `--new-tokens` tokens forced, batch 1, greedy, 2 threads; bundles alternate within a round, the first
round is a warm-up, and the figures are medians over the others. The bundles must give the same tokens
(checked, printed).

Run:  .venv/bin/python benchmarks/bundles_side_by_side.py BUNDLE [BUNDLE ...] [--side 448] [--rounds 6]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed_vqa(pipe, image, question: str, new_tokens: int) -> tuple[float, float, list[int]]:
    """(seconds to the first token, median seconds a token after it, the ids) of one VQA call that generates
    exactly `new_tokens` tokens; the first token's time includes preprocessing."""
    from vlmedge.runtime.decoding import Timings

    t = Timings()
    t0 = time.perf_counter()
    g = pipe.vqa(image, question, return_ids=True, max_new_tokens=new_tokens, min_new_tokens=new_tokens, timings=t)
    whole = time.perf_counter() - t0
    return whole - sum(t.tokens), statistics.median(t.tokens), list(g.ids)


def main(argv=None) -> int:
    from PIL import Image

    import vlmedge
    from vlmedge.data.scenes import pick_questions, scenes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--side", type=int, default=448)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=20)
    args = ap.parse_args(argv)
    scene = next(scenes("test", 0, 1))
    image = Image.fromarray(scene.image).resize((args.side, args.side), Image.Resampling.BICUBIC)
    question = pick_questions(scene)[0].text
    pipes = {b: vlmedge.load(b, threads=2) for b in args.bundles}
    times: dict[str, list] = {b: [] for b in pipes}
    tokens = {}
    for r in range(args.rounds):
        for b, pipe in pipes.items():
            first, per, tokens[b] = timed_vqa(pipe, image, question, args.new_tokens)
            if r:  # the first round warms up
                times[b].append((first, per))
    for b, v in times.items():
        print(f"{b}: first token {statistics.median(a for a, _ in v) * 1000:.0f} ms, "
              f"per token {statistics.median(s for _, s in v) * 1000:.2f} ms")
    same = len({tuple(t) for t in tokens.values()}) == 1
    print(f"same tokens: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
