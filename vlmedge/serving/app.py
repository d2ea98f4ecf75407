"""The HTTP API: an ASGI app (FastAPI) around one pipeline and its batcher.

    POST /v1/caption   image (multipart file `image`, or JSON {"image": base64}) -> {"text", "timings_ms", ...}
    POST /v1/vqa       the same with `question`
    GET  /v1/models    the bundle's manifest in brief
    GET  /healthz      the process is up;  GET /readyz: the model is loaded and warmed up
    GET  /metrics      Prometheus text;    GET /docs, /openapi.json: the framework's OpenAPI docs

Errors are JSON {"error": one line, "kind": ...}: 400 bad input (the CLI's message), 401 without
the API key, 413 over the body limit, 429 at the queue limit (with Retry-After), 503 before the
model is ready or while shutting down, 504 past the request timeout, 500 if the model fails (the
server stays up). Model calls run on worker threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import time
from contextlib import asynccontextmanager
from typing import Any, Optional

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from vlmedge import __version__
from vlmedge.errors import VlmedgeError, first_line
from vlmedge.runtime.pipeline import Pipeline
from vlmedge.serving.batcher import Batcher, Closing, QueueFull
from vlmedge.serving.inputs import (
    GenerationOptions,
    Job,
    JsonRequest,
    decode_image,
    parse_form_options,
    small_image,
    parse_json_body,
    split_options,
)
from vlmedge.serving.metrics import ServeMetrics
from vlmedge.serving.options import ServeOptions


class ApiError(Exception):
    """An error answer: HTTP status, kind (the metrics label) and one line."""

    def __init__(self, status: int, kind: str, message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}


def open_pipeline(options: ServeOptions, warn=None) -> Pipeline:
    """The pipeline the options name (a bundle, an engine directory or a built-in model)."""
    from vlmedge.runtime.pipeline import open_pipeline as open_bundle, resolve_bundle

    return open_bundle(resolve_bundle(options.bundle), options.device, options.threads, max_pixels=options.max_pixels,
                       batch_size=options.max_batch, warn=warn, shared_threads=options.shared_threads)


def model_summary(pipe: Pipeline, name: str) -> dict[str, Any]:
    """What /v1/models says of the bundle: its family, tasks, precision, limits and source."""
    m = pipe.manifest
    return {
        "id": name, "object": "model", "owned_by": "vlmedge", "family": m.family, "architecture": m.architecture,
        "tasks": list(m.tasks), "precision": m.precision.get("dtype", "float32"), "backend": pipe.backend.name,
        "max_batch": pipe.max_batch, "max_new_tokens": {t: pipe.max_new_tokens(t) for t in m.tasks},
        "max_question_len": pipe.max_question_len or None,
        "image_size": [m.preprocessing.get("height"), m.preprocessing.get("width")], "source": m.provenance.get("source"),
        "vlmedge": __version__,
    }


_IMAGE_DOC = {"type": "string", "format": "binary", "description": "the image file (PNG, JPEG, ...)"}


def _openapi_body(task: str) -> dict:
    """The request body in the OpenAPI docs: JSON with a base64 image, or a multipart upload."""
    json_schema = JsonRequest.model_json_schema()
    form_props = {"image": _IMAGE_DOC, **GenerationOptions.model_json_schema()["properties"]}
    required = ["image"]
    if task == "vqa":
        form_props["question"] = {"type": "string"}
        required.append("question")
        json_schema = {**json_schema, "required": ["image", "question"]}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": json_schema},
        "multipart/form-data": {"schema": {"type": "object", "properties": form_props, "required": required}},
    }}}


def create_app(options: ServeOptions, pipeline: Optional[Pipeline] = None) -> FastAPI:
    """The app serving `pipeline` (opened from options.bundle at start-up when None) with these limits."""
    options.check()
    metrics = ServeMetrics()
    state: dict[str, Any] = {"ready": False, "pipe": pipeline, "batcher": None}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state["pipe"] is None:
            state["pipe"] = await run_in_threadpool(open_pipeline, options)
        pipe = state["pipe"]
        state["name"] = options.model_name or pipe.bundle.path.name
        batcher = Batcher(pipe, options.max_batch, options.max_wait_ms / 1000, options.max_queue, options.workers,
                          on_batch=lambda n, t: metrics.batch_size.observe(n),
                          on_depth=metrics.queue_depth.set)
        await batcher.start()
        state["batcher"] = batcher
        warm = asyncio.create_task(_warm_up(pipe, batcher))
        try:
            yield
        finally:
            state["ready"] = False
            metrics.ready.set(0)
            warm.cancel()
            await batcher.close(options.timeout_s + 5)

    async def _warm_up(pipe: Pipeline, batcher: Batcher) -> None:
        """One caption and one answer (where the bundle has them) before /readyz says ready."""
        pre = pipe.manifest.preprocessing
        image = np.full((int(pre.get("height", 224)), int(pre.get("width", 224)), 3), 128, dtype=np.uint8)

        def run() -> None:
            if "caption" in pipe.tasks:
                pipe.caption(image, max_new_tokens=2)
            if "vqa" in pipe.tasks:
                pipe.vqa(image, "what is this ?", max_new_tokens=2)

        try:
            await batcher.call(run)
        except Exception:  # a bundle that cannot answer shows in the requests' errors; readiness must not hang
            pass
        state["ready"] = True
        metrics.ready.set(1)

    app = FastAPI(title="vlmedge", version=__version__, lifespan=lifespan,
                  description="Captions and answers about images from a vlmedge bundle, batched dynamically.")
    app.state.vlmedge = state
    app.state.metrics = metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        metrics.errors.labels(e.kind).inc()
        return JSONResponse({"error": e.message, "kind": e.kind}, status_code=e.status, headers=e.headers)

    def _authorize(request: Request) -> None:
        if options.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), options.api_key.encode())
        if not ok:
            raise ApiError(401, "unauthorized", "missing or wrong API key; send Authorization: Bearer <key>",
                           {"WWW-Authenticate": "Bearer"})

    async def _read_body(request: Request) -> bytes:
        limit = options.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, "too_large", f"body: {int(declared):,} bytes, over the limit of {limit:,} (max_body_bytes)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "too_large", f"body: over the limit of {limit:,} bytes (max_body_bytes)")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _parse(request: Request, body: bytes, task: str) -> tuple[bytes, Optional[str], dict]:
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            async def replay() -> dict:
                return {"type": "http.request", "body": body, "more_body": False}

            try:
                form = await Request(request.scope, replay).form(max_files=1, max_fields=16)
            except Exception as e:
                raise VlmedgeError(f"body: not a valid multipart form ({first_line(e)})") from None
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise VlmedgeError("image: missing; expected a file field named image")
            data = await upload.read()
            fields = {k: v for k, v in form.items() if k not in ("image", "question") and isinstance(v, str)}
            question = form.get("question")
            return data, question if isinstance(question, str) else None, parse_form_options(fields)
        if ctype.startswith("application/json") or not ctype:
            return parse_json_body(body)
        raise VlmedgeError(f"content-type: {ctype.split(';')[0]!r}; expected application/json or multipart/form-data")

    def _prepare(pipe: Pipeline, task: str, data: bytes, question: Optional[str], opts: dict) -> tuple[Job, bool]:
        """Checks and decoding (in a thread): options, question, then the image, as the CLI checks them."""
        config, return_ids = split_options(opts)
        # the beam width this request decodes with (its own, else the model's): batches are sized by it
        beams = pipe.settings(pipe.caption_task if task == "caption" else task, config).num_beams
        config = dataclasses.replace(config, num_beams=beams)
        if config.num_beams > pipe.max_batch:
            raise VlmedgeError(f"num_beams: {config.num_beams} is over this bundle's batch range of {pipe.max_batch} "
                               "(axes.batch.max)")
        pipe.caption([], **opts_of(config)) if task == "caption" else pipe.vqa([], [], **opts_of(config))
        if task == "vqa":
            if question is None:
                raise VlmedgeError("question: missing; expected the question in words")
            try:
                pipe.question_ids([question])
            except VlmedgeError as e:
                raise VlmedgeError(str(e).replace("question 0:", "question:", 1)) from None
        elif question is not None:
            raise VlmedgeError("question: not used by /v1/caption; ask it of /v1/vqa")
        image = decode_image(data, options.max_pixels)
        return Job(task, image, question, config), return_ids

    async def _answer(request: Request, task: str) -> JSONResponse:
        t0 = time.perf_counter()
        code = 500
        try:
            _authorize(request)
            pipe, batcher = state["pipe"], state["batcher"]
            if batcher is None:
                raise ApiError(503, "unavailable", "the model is still loading; retry shortly", {"Retry-After": "1"})
            if task not in pipe.tasks:
                raise ApiError(404, "bad_input", f"this bundle has no {task} task (it has {', '.join(pipe.tasks)})")
            try:
                ticket = batcher.admit()
            except QueueFull as e:
                raise ApiError(429, "queue_full", str(e), {"Retry-After": str(e.retry_after)}) from None
            except Closing:
                raise ApiError(503, "unavailable", "the server is shutting down", {"Connection": "close"}) from None
            with ticket:
                try:
                    body = await _read_body(request)
                    data, question, opts = await _parse(request, body, task)
                    if small_image(data):  # decodes in well under a millisecond: no thread hop
                        job, return_ids = _prepare(pipe, task, data, question, opts)
                    else:
                        job, return_ids = await run_in_threadpool(_prepare, pipe, task, data, question, opts)
                except VlmedgeError as e:
                    raise ApiError(400, "bad_input", str(e)) from None
                t1 = time.perf_counter()
                try:
                    with anyio.fail_after(max(0.0, options.timeout_s - (t1 - t0))):
                        result = await ticket.run(job)
                except TimeoutError:
                    raise ApiError(504, "timeout", f"no answer within {options.timeout_s:g} s (the request timeout)") from None
                except VlmedgeError as e:
                    raise ApiError(400, "bad_input", str(e)) from None
                except Closing:
                    raise ApiError(503, "unavailable", "the server is shutting down") from None
                except Exception as e:
                    raise ApiError(500, "internal", f"the model failed on this request ({type(e).__name__}: {first_line(e)})") from None
            total = time.perf_counter() - t0
            stages = {"decode_image": t1 - t0, **result.timings, "total": total}
            for k, v in stages.items():
                metrics.stage.labels(k).observe(v)
            out: dict[str, Any] = {"model": state["name"], "text": result.generation.text}
            if return_ids:
                out["ids"] = list(result.generation.ids)
            out["batch_size"] = result.batch_size
            out["timings_ms"] = {k: round(v * 1000, 3) for k, v in stages.items()}
            code = 200
            return JSONResponse(out)
        except ApiError as e:
            code = e.status
            raise
        finally:
            metrics.requests.labels(task, str(code)).inc()

    @app.post("/v1/caption", summary="Caption an image", openapi_extra=_openapi_body("caption"))
    async def caption(request: Request) -> JSONResponse:
        return await _answer(request, "caption")

    @app.post("/v1/vqa", summary="Answer a question about an image", openapi_extra=_openapi_body("vqa"))
    async def vqa(request: Request) -> JSONResponse:
        return await _answer(request, "vqa")

    @app.get("/v1/models", summary="The served model")
    async def models(request: Request) -> dict:
        _authorize(request)
        if state["pipe"] is None:
            raise ApiError(503, "unavailable", "the model is still loading; retry shortly", {"Retry-After": "1"})
        return {"object": "list", "data": [model_summary(state["pipe"], state["name"])]}

    @app.get("/healthz", summary="The process is up")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="The model is loaded and warmed up")
    async def readyz() -> JSONResponse:
        if state["ready"]:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "warming up"}, status_code=503, headers={"Retry-After": "1"})

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus(request: Request) -> Response:
        _authorize(request)
        return Response(metrics.render(), media_type=metrics.content_type)

    return app


def opts_of(config) -> dict:
    """A GenerationConfig as keyword options of Pipeline.caption / vqa."""
    from dataclasses import asdict

    return {k: v for k, v in asdict(config).items() if v is not None}  # None: the model's own setting
