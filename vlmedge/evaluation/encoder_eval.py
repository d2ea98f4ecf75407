"""Zero-shot accuracy and retrieval recall of a dual encoder (CLIP, SigLIP) on the scene world.

What is asked, fixed by the split's seeds:
- zero-shot colour and shape: scenes of ONE object, made from the split's seeds (`make_scene(seed, 1)`),
  so that "a photo of a red object." against the seven other colours (8-way) and "a photo of a circle."
  against square and triangle (3-way) each have one right answer; chance is 12.5% and 33.3%;
- zero-shot colour x shape on the split's own scenes (2-5 objects): the top one of the 24 labels
  ("red circle", ...) is right when it names an object of the scene (as `vlmedge quantize` checks it);
- text-to-image recall@1 and recall@5: each of the first N scenes' captions as a query over those N
  images; a hit is an image with that caption in the top k (two scenes can share a caption).

The model is reached only through two functions, images -> (N, D) and texts -> (M, D), L2-normalised, so a
bundle of any precision (`EmbeddingPipeline.embed_images` / `embed_texts`) and a PyTorch model in training
are measured by the same code.

    python -m vlmedge.evaluation.encoder_eval BUNDLE [BUNDLE...] [--single 400] [--scenes 1000] [--recall-n 100 1000]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from vlmedge.data.scenes import COLORS, SHAPES, Scene, make_scene, scene_seed, scenes

COLOR_LABELS = tuple(f"{c} object" for c in COLORS)  # "a photo of a red object."
SHAPE_LABELS = SHAPES  # "a photo of a circle."
PAIR_LABELS = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)  # "a photo of a red circle."
TEMPLATE = "a photo of a {}."

Embed = Callable[[list], np.ndarray]


@dataclass(frozen=True)
class EncoderEvalSet:
    split: str
    single: tuple[Scene, ...]  # one object each: zero-shot colour and shape
    scenes: tuple[Scene, ...]  # the split's scenes (2-5 objects): colour x shape, recall


def encoder_evaluation_set(split: str = "test", n_single: int = 400, n_scenes: int = 1000) -> EncoderEvalSet:
    single = tuple(make_scene(scene_seed(split, i), n_objects=1) for i in range(n_single))
    return EncoderEvalSet(split, single, tuple(scenes(split, 0, n_scenes)))


def _zero_shot(images: np.ndarray, labels: np.ndarray, truth: Sequence[set[int]]) -> float:
    top = (images @ labels.T).argmax(-1)  # the logit scale and a softmax change no argmax
    return float(np.mean([int(t) in ok for t, ok in zip(top, truth)]))


def recall_at(text_embeds: np.ndarray, image_embeds: np.ndarray, captions: Sequence[str], ks=(1, 5)) -> dict[str, float]:
    """Caption i as a query over the images; a hit when an image with caption i is among the top k."""
    order = np.argsort(-(text_embeds @ image_embeds.T), axis=1, kind="stable")  # (N queries, N images)
    caps = np.asarray(captions, dtype=object)
    out = {}
    for k in ks:
        out[f"recall@{k}"] = float(np.mean([(caps[order[i, :k]] == caps[i]).any() for i in range(len(caps))]))
    return out


def evaluate_encoder(embed_images: Embed, embed_texts: Embed, es: EncoderEvalSet, template: str = TEMPLATE,
                     recall_n: Sequence[int] = (100,)) -> dict:
    """The metrics of the module docstring, as a flat dict of floats plus the counts they are over."""
    prompt = lambda labels: [template.replace("{}", x) for x in labels]  # noqa: E731
    single = embed_images([s.image for s in es.single])
    colors, shapes = list(COLORS), list(SHAPES)
    r: dict = {"split": es.split, "single_object_images": len(es.single), "scenes": len(es.scenes)}
    r["zero_shot_color"] = _zero_shot(single, embed_texts(prompt(COLOR_LABELS)),
                                      [{colors.index(s.objects[0].color)} for s in es.single])
    r["zero_shot_shape"] = _zero_shot(single, embed_texts(prompt(SHAPE_LABELS)),
                                      [{shapes.index(s.objects[0].shape)} for s in es.single])
    imgs = embed_images([s.image for s in es.scenes])
    r["zero_shot_color_shape"] = _zero_shot(imgs, embed_texts(prompt(PAIR_LABELS)),
                                            [{PAIR_LABELS.index(f"{o.color} {o.shape}") for o in s.objects} for s in es.scenes])
    caps = [s.caption for s in es.scenes]
    txt = embed_texts(caps)
    for n in recall_n:
        if n > len(caps):
            raise ValueError(f"recall over {n} images, but the set holds {len(caps)} scenes")
        for k, v in recall_at(txt[:n], imgs[:n], caps[:n]).items():
            r[f"{k}/{n}"] = v
    return r


def summary(r: dict) -> str:
    rec = "  ".join(f"{k} {v:.1%}" for k, v in r.items() if k.startswith("recall@"))
    return (f"{r['split']}: zero-shot colour {r['zero_shot_color']:.1%} shape {r['zero_shot_shape']:.1%} "
            f"({r['single_object_images']} one-object scenes), colour x shape {r['zero_shot_color_shape']:.1%} "
            f"({r['scenes']} scenes)  {rec}")


def main(argv: Sequence[str] | None = None) -> None:
    from vlmedge.runtime.bundle import load_bundle
    from vlmedge.runtime.embedding import EmbeddingPipeline

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", nargs="+", help="dual-encoder bundle directories (FP32 and its variants)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--single", type=int, default=400, help="one-object scenes for zero-shot colour and shape")
    ap.add_argument("--scenes", type=int, default=1000, help="scenes for colour x shape and recall")
    ap.add_argument("--recall-n", type=int, nargs="+", default=[100, 1000], help="images per recall pool")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: its own choice)")
    ap.add_argument("--json", dest="json_out", help="also write the reports here")
    a = ap.parse_args(argv)
    es = encoder_evaluation_set(a.split, a.single, a.scenes)
    reports = {}
    for b in a.bundles:
        pipe = EmbeddingPipeline(load_bundle(b), "cpu", a.threads, batch_size=64)
        reports[b] = r = evaluate_encoder(pipe.embed_images, pipe.embed_texts, es, pipe.template, a.recall_n)
        print(f"{b} ({pipe.manifest.precision.get('dtype')}): {summary(r)}", flush=True)
    if a.json_out:
        from pathlib import Path

        from vlmedge.outdir import write_file_atomic

        write_file_atomic(Path(a.json_out), json.dumps(reports, indent=2) + "\n")


if __name__ == "__main__":
    main()
