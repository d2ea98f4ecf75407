"""The fusion bundles' commands (ViLT, BridgeTower; registered and dispatched by vlmedge.cli):

    vlmedge vqa bundles/vilt-vqa photos/ "what colour is the circle?" --top-k 3   # answers with scores
    vlmedge match bundles/bridgetower photo.png --texts "a red circle,two dogs"   # a score per text

A bad image is reported on its own line and the others still run; the exit status is then 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape

from vlmedge.console import console, err_console
from vlmedge.errors import InputError, VlmedgeError


def open_fusion(bundle: str, device: str = "cpu", max_pixels: int = 64_000_000, batch_size: int = 16):
    """A fusion bundle's pipeline; another contract's bundle is refused in one line."""
    from vlmedge.console import warn
    from vlmedge.models.checkpoint import BUILTIN_MODELS
    from vlmedge.runtime.fusion import FusionPipeline
    from vlmedge.runtime.pipeline import resolve_bundle

    if bundle in BUILTIN_MODELS and not Path(bundle).exists():  # (before exporting it into the cache for nothing)
        raise InputError(f"{bundle}: a built-in vision-language model, not a fusion encoder; this command needs a fusion "
                         "bundle (export a ViltFor*, BridgeTowerForImageAndTextRetrieval or BridgeTowerForContrastiveLearning directory)")
    loaded = resolve_bundle(bundle)
    if loaded.manifest.contract != "fusion":
        raise InputError(f"{bundle}: a {loaded.manifest.contract} bundle; this command needs a fusion bundle "
                         "(export a ViltFor*, BridgeTowerForImageAndTextRetrieval or BridgeTowerForContrastiveLearning directory)")
    return FusionPipeline(loaded, device, max_pixels=max_pixels, batch_size=batch_size, warn=warn)


def _images(pipe, images: list[str]) -> tuple[list[tuple[int, object]], list[dict], int]:
    """(index, image) of every image that loads; a result row per path; how many failed (each said on stderr)."""
    from vlmedge.runtime.images import expand_paths, load_image

    paths = expand_paths(images)
    if not paths:
        raise InputError(f"IMAGE: {' '.join(images)} matches no image files")
    good, results, errors = [], [], 0
    for i, path in enumerate(paths):
        try:
            good.append((i, load_image(path, pipe.max_pixels)))
            results.append({"image": str(path)})
        except VlmedgeError as e:
            errors += 1
            results.append({"image": str(path), "error": str(e)})
            err_console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
    return good, results, errors


def _print(results: list[dict], key: str, line, as_json: bool, head: dict) -> None:
    if as_json:
        console.print_json(json.dumps({**head, "results": results}))
        return
    for r in results:
        if key in r:
            console.print(f"{r['image']}: {line(r[key])}" if len(results) > 1 else line(r[key]), highlight=False, markup=False)


def vqa(bundle: str, images: list[str], question: str, top_k: int, as_json: bool, device: str, batch_size: int,
        max_pixels: int) -> None:
    """`vlmedge vqa` on a ViLT VQA bundle: each image's top answers with their scores."""
    pipe = open_fusion(bundle, device, max_pixels, batch_size)
    if pipe.task != "vqa":
        raise InputError(f"{bundle}: {pipe.manifest.architecture} scores image-text matches; use vlmedge match")
    pipe.text_ids([question], "question")  # checked once, before any image is read
    good, results, errors = _images(pipe, images)
    for s in range(0, len(good), pipe.batch_size):
        part = good[s: s + pipe.batch_size]
        for (i, _), answers in zip(part, pipe.vqa([img for _, img in part], question, top_k=top_k)):
            results[i]["answers"] = [{"answer": a.answer, "score": a.score} for a in answers]
    _print(results, "answers", lambda xs: ", ".join(f"{x['answer']} {x['score']:.4f}" for x in xs), as_json,
           {"bundle": str(pipe.bundle.path), "question": question})
    if errors:
        raise typer.Exit(2)


def match(
    bundle: str = typer.Argument(..., help="a fusion bundle (ViLT retrieval, BridgeTower)"),
    images: list[str] = typer.Argument(..., help="image files, directories or glob patterns"),
    texts: str = typer.Option(..., "--texts", help='comma-separated texts, e.g. --texts "a red circle,two dogs"'),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    device: str = typer.Option("cpu", help="cpu, cuda or tensorrt (ONNX Runtime execution providers; falls back with a message)"),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="image-text pairs per batch (within the bundle's batch range)"),
    max_pixels: int = typer.Option(64_000_000, "--max-pixels", min=1, help="refuse images with more pixels than this"),
) -> None:
    """Image-text matching: each image's score for each text (ViLT retrieval, BridgeTower), best first."""
    items = [s.strip() for s in texts.split(",")]
    if not texts.strip() or any(not s for s in items):
        raise InputError(f"--texts {texts!r:.60}: expected comma-separated texts, e.g. --texts \"a red circle,two dogs\"")
    pipe = open_fusion(bundle, device, max_pixels, batch_size)
    if pipe.task != "match":
        raise InputError(f"{bundle}: {pipe.manifest.architecture} answers questions; use vlmedge vqa")
    pipe.text_ids(items)  # checked before any image is read
    good, results, errors = _images(pipe, images)
    for i, img in good:
        rows = sorted(pipe.match(img, items), key=lambda m: -m.score)
        results[i]["matches"] = [{"text": m.text, "score": m.score} for m in rows]
    _print(results, "matches", lambda xs: ", ".join(f"{x['text']} {x['score']:.4f}" for x in xs), as_json,
           {"bundle": str(Path(pipe.bundle.path))})
    if errors:
        raise typer.Exit(2)
