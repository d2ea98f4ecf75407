"""`vlmedge index --ray`: the embedding on Ray Data (one pipeline per actor), the writing here.

The images are embedded by Ray Data actors, each holding one pipeline of the bundle (one actor per GPU on a
GPU device, else one per CPU of the cluster); the embeddings come back in input order, batch by batch, and
this process writes them to Milvus as a plain run does, so a Ray run resumes the same way. The image paths
must be readable on every worker node.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np

from vlmedge.errors import VlmedgeError


class RayEmbedder:
    """A Ray Data actor: one dual-encoder pipeline, loaded once, embedding batches of image paths."""

    def __init__(self, bundle: str, device: str, max_pixels: int, threads: Optional[int]):
        from vlmedge.runtime.bundle import load_bundle
        from vlmedge.runtime.embedding import EmbeddingPipeline

        self.pipe = EmbeddingPipeline(load_bundle(bundle), device, threads, max_pixels=max_pixels, shared_threads=True)
        self.max_pixels = max_pixels

    def __call__(self, batch: dict) -> dict:
        from vlmedge.runtime.images import load_image

        paths = [str(p) for p in batch["path"]]
        images, errors = {}, []
        for i, p in enumerate(paths):
            try:
                images[i] = load_image(p, self.max_pixels)
                errors.append("")
            except VlmedgeError as e:
                errors.append(str(e))
        out = np.zeros((len(paths), self.pipe.dim), np.float32)
        if images:
            out[list(images)] = self.pipe.embed_images(list(images.values()))
        return {"path": batch["path"], "key": batch["key"], "embedding": out, "error": np.array(errors, dtype=object)}


def embed_on_ray(pipe, chunks: list, max_pixels: int, address: Optional[str] = None, actors: Optional[int] = None,
                 cpus_per_actor: float = 1.0, on_error=None) -> Iterator[tuple[list, list]]:
    """(chunk of (path, key), embeddings or None where the image failed), in input order, from Ray Data."""
    import ray

    todo = [x for c in chunks for x in c]
    if not todo:
        return
    if not ray.is_initialized():
        import logging

        for attempt in (1, 2):
            try:
                ray.init(address=address, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False,
                         logging_level=logging.ERROR)
                break
            except Exception as e:  # a cluster that cannot be reached or started: one line, not a traceback
                if attempt == 1 and address is None and "timed out" in str(e).lower():  # a local start on a busy machine
                    ray.shutdown()
                    continue
                from vlmedge.errors import DependencyError, first_line

                raise DependencyError(f"--ray: Ray could not start or join a cluster ({first_line(e)[:200]})") from None
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    gpu = pipe.device in ("cuda", "tensorrt")
    if actors is None:
        res = ray.cluster_resources()
        actors = max(1, int(res.get("GPU", 0)) if gpu else int(res.get("CPU", 1) // max(cpus_per_actor, 1e-3)))
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False  # the command shows its own
    ctx.print_on_execution_start = False
    ds = ray.data.from_items([{"path": str(p), "key": k} for p, k in todo]).map_batches(
        RayEmbedder, fn_constructor_kwargs=dict(bundle=str(pipe.bundle.path), device=pipe.device, max_pixels=max_pixels,
                                                threads=None if gpu else max(1, int(cpus_per_actor))),
        batch_size=pipe.batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor, num_gpus=1 if gpu else 0)
    for b in ds.iter_batches(batch_size=pipe.batch_size, batch_format="numpy"):
        chunk = [(str(p), str(k)) for p, k in zip(b["path"], b["key"])]
        embeds = []
        for e, err in zip(b["embedding"], b["error"]):
            if err and on_error:
                on_error(str(err))
            embeds.append(None if err else e)
        yield chunk, embeds
