"""The dual-encoder commands: `vlmedge classify`, `vlmedge index`, `vlmedge search` (registered by vlmedge.cli).

    vlmedge classify bundles/clip photos/ --labels cat,dog,forklift      # zero-shot label probabilities
    vlmedge index bundles/clip photos/ --db photos.db                    # embed a folder into Milvus Lite
    vlmedge search bundles/clip --db photos.db "a forklift"              # top k images by text
    vlmedge search bundles/clip --db photos.db --image query.png         # ... or by image

A bad image is reported on its own line and the others still run; the exit status is then 2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from vlmedge.console import console, err_console
from vlmedge.console import progress as _progress
from vlmedge.errors import DependencyError, InputError, VlmedgeError

_DEVICE = typer.Option("cpu", help="cpu, cuda or tensorrt (ONNX Runtime execution providers; falls back with a message)")
_BATCH = typer.Option(16, "--batch-size", min=1, help="images per batch (within the bundle's batch range)")
_PIXELS = typer.Option(64_000_000, "--max-pixels", min=1, help="refuse images with more pixels than this")
_DB = typer.Option(..., "--db", help="Milvus Lite file (*.db) or a Milvus server's URI (http://HOST:19530)")
_COLLECTION = typer.Option("images", "--collection", help="collection in the database")
KILL_ENV = "VLMEDGE_KILL_AT"  # crash tests: `index-batch-N` dies (SIGKILL) right after batch N is written


def open_embedding(bundle: str, device: str = "cpu", max_pixels: int = 64_000_000, batch_size: int = 16):
    """A dual-encoder bundle's pipeline; another contract's bundle is refused in one line."""
    from vlmedge.console import warn
    from vlmedge.runtime.embedding import EmbeddingPipeline
    from vlmedge.runtime.pipeline import resolve_bundle

    from vlmedge.models.checkpoint import BUILTIN_MODELS, HF_BUILTINS

    dual = HF_BUILTINS.get(bundle) in ("CLIPModel", "SiglipModel", "Siglip2Model")  # shapes-clip: exported on first use
    if bundle in BUILTIN_MODELS and not dual and not Path(bundle).exists():  # (before exporting it into the cache for nothing)
        raise InputError(f"{bundle}: a built-in vision-language model, not a dual encoder; this command needs a "
                         "dual-encoder bundle (export a CLIPModel, SiglipModel or Siglip2Model directory)")
    loaded = resolve_bundle(bundle)
    if loaded.manifest.contract != "dual-encoder":
        raise InputError(f"{bundle}: a {loaded.manifest.contract} bundle; this command needs a dual-encoder bundle "
                         "(export a CLIPModel, SiglipModel or Siglip2Model directory)")
    return EmbeddingPipeline(loaded, device, max_pixels=max_pixels, batch_size=batch_size, warn=warn)


def parse_labels(text: str) -> list[str]:
    labels = [s.strip() for s in text.split(",")]
    if not text.strip() or any(not s for s in labels):
        raise InputError(f"--labels {text!r:.60}: expected comma-separated labels, e.g. --labels cat,dog,forklift")
    return labels


def _load_all(paths: list[Path], max_pixels: int) -> tuple[list[tuple[int, object]], list[dict], int]:
    """(index, image) of every image that loads; a result row per path; how many failed (each said on stderr)."""
    from vlmedge.runtime.images import load_image

    good, results, errors = [], [], 0
    for i, path in enumerate(paths):
        try:
            good.append((i, load_image(path, max_pixels)))
            results.append({"image": str(path)})
        except VlmedgeError as e:
            errors += 1
            results.append({"image": str(path), "error": str(e)})
            err_console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
    return good, results, errors


def classify(
    bundle: str = typer.Argument(..., help="a dual-encoder bundle (CLIP, SigLIP)"),
    images: list[str] = typer.Argument(..., help="image files, directories or glob patterns"),
    labels: str = typer.Option(..., "--labels", help="comma-separated labels, e.g. cat,dog,forklift"),
    template: Optional[str] = typer.Option(None, "--template", help='prompt per label, {} is the label (default: the bundle\'s, "a photo of a {}.")'),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1, help="print only the k most likely labels"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    device: str = _DEVICE, batch_size: int = _BATCH, max_pixels: int = _PIXELS,
) -> None:
    """Zero-shot classification: each image's label probabilities (softmax for CLIP, sigmoid per label for SigLIP)."""
    from vlmedge.runtime.images import expand_paths

    names = parse_labels(labels)
    pipe = open_embedding(bundle, device, max_pixels, batch_size)
    texts = pipe.prompts(names, template)  # checked before any image is read
    paths = expand_paths(images)
    if not paths:
        raise InputError(f"IMAGES: {' '.join(images)} matches no image files")
    text_embeds = pipe.embed_texts(texts)
    results, errors = [], 0
    for s in range(0, len(paths), pipe.batch_size):  # images are read a batch at a time, however many there are
        good, rows, failed = _load_all(paths[s: s + pipe.batch_size], max_pixels)
        errors += failed
        if good:
            probs = pipe.probabilities(pipe.logits(pipe.embed_images([img for _, img in good]), text_embeds))
            for (i, _), p in zip(good, probs):
                order = sorted(range(len(names)), key=lambda j: -p[j])[: top_k or len(names)]
                rows[i]["labels"] = [{"label": names[j], "score": float(p[j])} for j in order]
        results += rows
    if as_json:
        console.print_json(json.dumps({"bundle": str(pipe.bundle.path), "activation": pipe.activation,
                                       "template": template or pipe.template, "results": results}))
    else:
        for r in results:
            if "labels" in r:
                line = ", ".join(f"{x['label']} {x['score']:.4f}" for x in r["labels"])
                console.print(f"{r['image']}: {line}" if len(paths) > 1 else line, highlight=False, markup=False)
    if errors:
        raise typer.Exit(2)


def index(
    bundle: str = typer.Argument(..., help="a dual-encoder bundle (CLIP, SigLIP)"),
    images: list[str] = typer.Argument(..., help="directories, image files or glob patterns (quote ** patterns)"),
    db: str = _DB, collection: str = _COLLECTION,
    ray: bool = typer.Option(False, "--ray", help="embed on Ray Data (one pipeline per actor); needs the ray extra"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="with --ray: a running cluster (default: RAY_ADDRESS, else a local one)"),
    device: str = _DEVICE, batch_size: int = _BATCH, max_pixels: int = _PIXELS,
) -> None:
    """Embed images into a Milvus collection, batch by batch; rerun to resume (images already there are skipped)."""
    from vlmedge.retrieval.milvus import Collection, model_fingerprint
    from vlmedge.runtime.images import expand_paths

    pipe = open_embedding(bundle, device, max_pixels, batch_size)
    paths = expand_paths(images)
    if not paths:
        raise InputError(f"IMAGES: {' '.join(images)} matches no image files")
    keys = [str(p.resolve()) for p in paths]
    if any(len(k) > 4096 for k in keys):
        raise InputError(f"{next(k for k in keys if len(k) > 4096)[:80]}...: a path over 4096 characters")
    col = Collection.open(db, collection, pipe.dim, model_fingerprint(pipe.manifest), create=True)
    try:
        done = col.paths()
        unique = {k: p for p, k in reversed(list(zip(paths, keys)))}  # one row per file, however it was named
        todo = [(unique[k], k) for k in dict.fromkeys(keys) if k not in done]
        skipped, written, errors, batches = len(unique) - len(todo), 0, 0, 0
        with _progress() as bar:
            task = bar.add_task("indexing", total=len(unique), completed=skipped)
            chunks = [todo[s: s + pipe.batch_size] for s in range(0, len(todo), pipe.batch_size)]
            for chunk, embeds in _embedded(pipe, chunks, max_pixels, ray, ray_address):
                ok = [(k, e) for (_, k), e in zip(chunk, embeds) if e is not None]
                errors += len(chunk) - len(ok)
                if ok:
                    col.write([k for k, _ in ok], [e for _, e in ok])
                written += len(ok)
                batches += 1
                if os.environ.get(KILL_ENV) == f"index-batch-{batches}":
                    import signal

                    os.kill(os.getpid(), signal.SIGKILL)
                bar.advance(task, len(chunk))
        total = col.count()
    finally:
        col.close()
    console.print(f"{written} images indexed, {skipped} already there, {errors} failed; collection {collection!r} "
                  f"in {db} holds {total}", highlight=False, markup=False)
    if errors:
        raise typer.Exit(2)


def _embedded(pipe, chunks: list, max_pixels: int, ray: bool, ray_address: Optional[str] = None):
    """(chunk, embeddings) for each chunk of (path, key), in order; an image that fails to load is reported
    and gets None."""
    from vlmedge.runtime.images import load_image

    if ray:
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise DependencyError("--ray: needs Ray Data (ray is missing): pip install 'vlmedge[ray]'")
        from vlmedge.retrieval.ray_embed import embed_on_ray

        yield from embed_on_ray(pipe, chunks, max_pixels, address=ray_address,
                                on_error=lambda m: err_console.print(f"[red]error:[/red] {escape(m)}", highlight=False, soft_wrap=True))
        return
    for chunk in chunks:
        imgs = []
        for path, _ in chunk:
            try:
                imgs.append(load_image(path, max_pixels))
            except VlmedgeError as e:
                imgs.append(None)
                err_console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        good = [img for img in imgs if img is not None]
        embeds = iter(pipe.embed_images(good)) if good else iter(())
        yield chunk, [next(embeds) if img is not None else None for img in imgs]


def search(
    bundle: str = typer.Argument(..., help="the dual-encoder bundle that indexed the collection (or a variant of it)"),
    text: Optional[str] = typer.Argument(None, help="what to look for, in words"),
    image: Optional[Path] = typer.Option(None, "--image", help="look for images like this one instead"),
    db: str = _DB, collection: str = _COLLECTION,
    top_k: int = typer.Option(5, "--top-k", "-k", min=1, max=16384, help="how many images to return"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    device: str = _DEVICE, max_pixels: int = _PIXELS,
) -> None:
    """The top k images of a collection for a text or an image, with their cosine similarity."""
    from vlmedge.retrieval.milvus import Collection, model_fingerprint

    if (text is None) == (image is None):
        raise InputError("search: give a text or --image IMG (one of them)")
    if text is not None and not text.strip():
        raise InputError("search: the text is empty")
    pipe = open_embedding(bundle, device, max_pixels, 1)
    query = pipe.embed_texts(text) if text is not None else pipe.embed_images(image)
    col = Collection.open(db, collection, pipe.dim, model_fingerprint(pipe.manifest), create=False)
    try:
        hits = col.search([query], top_k)[0]
    finally:
        col.close()
    if as_json:
        console.print_json(json.dumps({"query": text if text is not None else str(image), "results":
                                       [{"image": h.path, "score": h.score} for h in hits]}))
    else:
        for h in hits:
            console.print(f"{h.score:.4f}  {h.path}", highlight=False, markup=False)
