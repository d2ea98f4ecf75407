"""The HTTP API: an ASGI app (FastAPI) around one pipeline and its batcher.

    POST /v1/caption   image (multipart file `image`, or JSON {"image": base64}) -> {"text", "timings_ms", ...}
    POST /v1/vqa       the same with `question`; both take "stream": true for server-sent events
    POST /v1/chat/completions   OpenAI's chat completions, plain and streamed (vlmedge.serving.chat)
    GET  /v1/models    OpenAI's model list, each with the bundle's manifest in brief
    GET  /healthz      the process is up;  GET /readyz: the model is loaded and warmed up
    GET  /metrics      Prometheus text;    GET /docs, /openapi.json: the framework's OpenAPI docs

Errors are JSON {"error": one line, "kind": ...} (on the OpenAI routes, OpenAI's error object): 400
bad input (the CLI's message), 401 without the API key, 408 when the body does not arrive within the
request timeout, 413 over the body limit, 429 at the queue limit (with Retry-After), 503 before the
model is ready or while shutting down, 504 past the request timeout, 500 if the model fails (the
server stays up). Model calls run on worker threads, never on the event loop.

A request takes its place in the queue only once its body is read, and the body is read under the
request's deadline, so clients that trickle bytes cannot hold the queue's places.
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
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from vlmedge import __version__
from vlmedge.errors import InputError, VlmedgeError, first_line
from vlmedge.runtime.decoding import GenerationConfig
from vlmedge.runtime.pipeline import Pipeline
from vlmedge.serving import chat as chat_api
from vlmedge.serving import embeddings as embeddings_api
from vlmedge.serving import fusion as fusion_api
from vlmedge.serving import protocol
from vlmedge.serving.batcher import Batcher, Closing, QueueFull, Sink, Ticket
from vlmedge.serving.inputs import (
    GenerationOptions,
    Job,
    JsonRequest,
    decode_image,
    load_json,
    parse_form_options,
    small_image,
    parse_json_body,
    split_options,
)
from vlmedge.serving.metrics import ServeMetrics
from vlmedge.serving.options import ServeOptions

OPENAI_PATHS = ("/v1/chat/completions", "/v1/models", "/v1/embeddings")
_CODES = {"unauthorized": "invalid_api_key", "queue_full": "rate_limit_exceeded", "not_found": "model_not_found",
          "timeout": "timeout", "too_large": "request_too_large"}


class ApiError(Exception):
    """An error answer: HTTP status, kind (the metrics label) and one line."""

    def __init__(self, status: int, kind: str, message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}

    def openai(self) -> dict:
        """OpenAI's error object; `param` is the field the message names first, if it names one."""
        head = self.message.split(":", 1)[0] if ":" in self.message else ""
        param = head if head and " " not in head and len(head) < 60 else None
        return protocol.error_body(self.message, self.status, param, _CODES.get(self.kind))


class HeaderCap:
    """ASGI middleware: a request whose header block is over `limit` bytes gets 431 in one line. (The
    server's own cap stops a header block that arrives in pieces before it is buffered whole.)"""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + \
                sum(len(k) + len(v) + 4 for k, v in scope["headers"])
            if size > self.limit:
                body = JSONResponse({"error": f"request headers: {size:,} bytes, over the limit of {self.limit:,}",
                                     "kind": "too_large"}, status_code=431, headers={"Connection": "close"})
                await body(scope, receive, send)
                return
        await self.app(scope, receive, send)


class EventStream(StreamingResponse):
    """Server-sent events. A client that leaves ends the stream at once, even between events: the body's
    generator is closed, so its `finally` frees the request's place."""

    media_type = "text/event-stream"

    def __init__(self, content, on_close, **kw):
        super().__init__(content, **kw)
        self.on_close = on_close  # runs however the stream ends, even if its body never started

    async def __call__(self, scope, receive, send) -> None:
        try:
            await self._run(scope, receive, send)
        finally:
            self.on_close()

    async def _run(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as tg:
            async def body() -> None:
                try:
                    await self.stream_response(send)
                except OSError:  # the client is gone
                    pass
                finally:
                    tg.cancel_scope.cancel()

            tg.start_soon(body)
            await self.listen_for_disconnect(receive)
            tg.cancel_scope.cancel()
        await self.body_iterator.aclose()


def open_pipeline(options: ServeOptions, warn=None) -> Pipeline:
    """The pipeline the options name (a bundle, an engine directory or a built-in model)."""
    from vlmedge.runtime.pipeline import open_pipeline as open_bundle, resolve_bundle

    bundle = resolve_bundle(options.bundle)
    if bundle.manifest.contract == "dual-encoder":  # CLIP / SigLIP: /v1/embeddings and /v1/classify (serving.embeddings)
        from vlmedge.runtime.embedding import EmbeddingPipeline

        return EmbeddingPipeline(bundle, options.device, options.threads, max_pixels=options.max_pixels,
                                 batch_size=options.max_batch, warn=warn, shared_threads=options.shared_threads)
    if bundle.manifest.contract == "fusion":  # ViLT / BridgeTower: /v1/vqa and /v1/match (serving.fusion)
        from vlmedge.runtime.fusion import FusionPipeline

        return FusionPipeline(bundle, options.device, options.threads, max_pixels=options.max_pixels,
                              batch_size=options.max_batch, warn=warn, shared_threads=options.shared_threads)
    return open_bundle(bundle, options.device, options.threads, max_pixels=options.max_pixels,
                       batch_size=options.max_batch, warn=warn, shared_threads=options.shared_threads)


def model_summary(pipe: Pipeline, name: str) -> dict[str, Any]:
    """What /v1/models says of the bundle: its family, tasks, precision, limits and source."""
    if getattr(pipe, "contract", None) == "dual-encoder":
        return embeddings_api.model_summary(pipe, name, __version__)
    if getattr(pipe, "contract", None) == "fusion":
        return fusion_api.model_summary(pipe, name, __version__)
    m = pipe.manifest
    return {
        "id": name, "object": "model", "created": int(pipe.bundle.path.stat().st_mtime), "owned_by": "vlmedge",
        "family": m.family, "architecture": m.architecture,
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


def _inline(schema: dict) -> dict:
    """A JSON schema with its $defs written in place (an OpenAPI request body has no $defs of its own)."""
    defs = schema.pop("$defs", {})

    def walk(x):
        if isinstance(x, dict):
            return walk(defs[x["$ref"].split("/")[-1]]) if "$ref" in x else {k: walk(v) for k, v in x.items()}
        return [walk(v) for v in x] if isinstance(x, list) else x

    return walk(schema)


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
        contract = getattr(pipe, "contract", None)
        batcher = {"dual-encoder": embeddings_api.EmbeddingBatcher, "fusion": fusion_api.FusionBatcher}.get(contract, Batcher)(
            pipe, options.max_batch, options.max_wait_ms / 1000, options.max_queue, options.workers,
                          on_batch=lambda n, t: metrics.batch_size.observe(n),
                          on_depth=metrics.queue_depth.set, inflight=options.batching == "inflight")
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
            if getattr(pipe, "contract", None) == "dual-encoder":
                embeddings_api.warm_up(pipe)
                return
            if getattr(pipe, "contract", None) == "fusion":
                fusion_api.warm_up(pipe)
                return
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
    app.add_middleware(HeaderCap, limit=options.max_header_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        metrics.errors.labels(e.kind).inc()
        if request.url.path.startswith(OPENAI_PATHS):
            return JSONResponse(e.openai(), status_code=e.status, headers=e.headers)
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

    async def _read_body(request: Request, deadline: float) -> bytes:
        """The whole body, within the size limit and before the request's deadline (408 after it)."""
        limit = options.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, "too_large", f"body: {int(declared):,} bytes, over the limit of {limit:,} (max_body_bytes)")
        chunks, size = [], 0
        try:
            with anyio.fail_after(max(0.0, deadline - time.perf_counter())):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise ApiError(413, "too_large", f"body: over the limit of {limit:,} bytes (max_body_bytes)")
                    chunks.append(chunk)
        except TimeoutError:
            raise ApiError(408, "timeout", f"body: not received within {options.timeout_s:g} s (the request timeout)",
                           {"Connection": "close"}) from None
        return b"".join(chunks)

    def _serving() -> tuple[Pipeline, Batcher]:
        pipe, batcher = state["pipe"], state["batcher"]
        if batcher is None:
            raise ApiError(503, "unavailable", "the model is still loading; retry shortly", {"Retry-After": "1"})
        return pipe, batcher

    def _admit(batcher: Batcher) -> Ticket:
        try:
            return batcher.admit()
        except QueueFull as e:
            raise ApiError(429, "queue_full", str(e), {"Retry-After": str(e.retry_after)}) from None
        except Closing:
            raise ApiError(503, "unavailable", "the server is shutting down", {"Connection": "close"}) from None

    def _model_error(e: BaseException) -> ApiError:
        """A failed job as the error it answers with."""
        if isinstance(e, (TimeoutError, asyncio.TimeoutError)):
            return ApiError(504, "timeout", f"no answer within {options.timeout_s:g} s (the request timeout)")
        if isinstance(e, VlmedgeError):
            return ApiError(400, "bad_input", str(e))
        if isinstance(e, Closing):
            return ApiError(503, "unavailable", "the server is shutting down")
        return ApiError(500, "internal", f"the model failed on this request ({type(e).__name__}: {first_line(e)})")

    async def _start_stream(ticket: Ticket, job: Job, deadline: float, body, openai: bool) -> EventStream:
        """Queue a streaming job and answer once its batch has started (errors before then are plain
        HTTP errors); the ticket is released when the stream ends or its client leaves."""
        sink: Sink = job.sink
        future = ticket.submit(job)
        try:
            kind, _ = await chat_api.next_event(sink, future, timeout=max(0.0, deadline - time.perf_counter()))
        except BaseException as e:
            sink.cancelled = True
            future.cancel()
            ticket.release()
            if isinstance(e, Exception):
                raise _model_error(e) from None
            raise
        assert kind == "start", kind

        def on_error(e: BaseException) -> dict:
            err = _model_error(e)
            metrics.errors.labels(err.kind).inc()
            return err.openai() if openai else {"error": err.message, "kind": err.kind}

        def close() -> None:
            sink.cancelled = True
            future.cancel()
            ticket.release()

        async def events():
            try:
                async for part in body(sink, future, on_error):
                    yield part
            finally:
                close()

        return EventStream(events(), close, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

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

    async def _answer(request: Request, task: str) -> Response:
        t0 = time.perf_counter()
        deadline = t0 + options.timeout_s
        code = 500
        try:
            _authorize(request)
            pipe, batcher = _serving()
            if task not in pipe.tasks:
                raise ApiError(404, "bad_input", f"this bundle has no {task} task (it has {', '.join(pipe.tasks)})")
            body = await _read_body(request, deadline)
            ticket = _admit(batcher)
            try:
                try:
                    data, question, opts = await _parse(request, body, task)
                    stream = bool(opts.pop("stream", False))
                    if stream and opts.get("num_beams") not in (None, 1):
                        raise InputError(f"num_beams: {opts['num_beams']}; a stream follows one beam (num_beams 1)")
                    if stream:
                        opts["num_beams"] = 1
                    if small_image(data):  # decodes in well under a millisecond: no thread hop
                        job, return_ids = _prepare(pipe, task, data, question, opts)
                    else:
                        job, return_ids = await run_in_threadpool(_prepare, pipe, task, data, question, opts)
                except VlmedgeError as e:
                    raise ApiError(400, "bad_input", str(e)) from None
                if stream:
                    job = dataclasses.replace(job, sink=Sink(asyncio.get_running_loop()), stepwise=True)
                    name = state["name"]
                    response = await _start_stream(ticket, job, deadline,
                                                   lambda sink, fut, on_error: chat_api.native_chunks(sink, fut, name, on_error, deadline),
                                                   openai=False)
                    ticket = None  # the stream releases it
                    code = 200
                    return response
                t1 = time.perf_counter()
                try:
                    with anyio.fail_after(max(0.0, deadline - t1)):
                        result = await ticket.run(job)
                except Exception as e:
                    raise _model_error(e) from None
            finally:
                if ticket is not None:
                    ticket.release()
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

    def _prepare_chat(pipe: Pipeline, req: protocol.ChatRequest) -> Job:
        """The chat request as a model job (in a thread): messages, options, then the images decoded."""
        prefix = hasattr(pipe, "chat_prompt")
        asked = chat_api.parse_messages(req.messages, prefix)
        config = GenerationConfig(**req.generation())
        if asked.conversation is not None or asked.question is not None:
            task = "vqa"
            if task not in pipe.tasks:
                raise InputError(f"messages: this bundle answers no questions (it has {', '.join(pipe.tasks)}); "
                                 "send the image alone for its caption")
        else:
            task = "caption"
        pipe.settings(pipe.caption_task if task == "caption" else task, config)  # lengths and options, checked once
        if asked.question is not None:
            try:
                pipe.question_ids([asked.question])
            except VlmedgeError as e:
                raise InputError(str(e).replace("question 0:", "messages: the question:", 1)) from None
        images = [decode_image(data, options.max_pixels, where) for where, data in asked.images]
        conversation = None if asked.conversation is None else chat_api.with_images(asked.conversation, images)
        return Job(task, None if conversation is not None else images[0], asked.question, config,
                   conversation=conversation, stepwise=True, stop=tuple(req.stops))

    @app.post("/v1/chat/completions", summary="OpenAI chat completions: captions and answers about images",
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": _inline(protocol.ChatRequest.model_json_schema())}}}})
    async def chat_completions(request: Request) -> Response:
        t0 = time.perf_counter()
        deadline = t0 + options.timeout_s
        code = 500
        try:
            _authorize(request)
            pipe, batcher = _serving()
            body = await _read_body(request, deadline)
            try:
                raw = load_json(body)
                if not isinstance(raw, dict):
                    raise InputError(f"body: expected a JSON object, got {type(raw).__name__}")
                try:
                    req = protocol.ChatRequest.model_validate(raw)
                except Exception as e:  # pydantic's ValidationError
                    err = e.errors()[0] if hasattr(e, "errors") else {"loc": (), "msg": str(e)}
                    loc = ".".join(str(x) for x in err["loc"]) or "body"
                    raise InputError(f"{loc}: {err['msg'].lower()}") from None
                req.check()
            except VlmedgeError as e:
                raise ApiError(400, "bad_input", str(e)) from None
            if req.model is not None and req.model != state["name"]:
                raise ApiError(404, "not_found", f"model: {req.model!r:.80} is not served here; it serves {state['name']!r}")
            ticket = _admit(batcher)
            try:
                try:
                    job = await run_in_threadpool(_prepare_chat, pipe, req)
                except VlmedgeError as e:
                    raise ApiError(400, "bad_input", str(e)) from None
                id_, name, fingerprint = protocol.new_id(), state["name"], f"vlmedge-{__version__}"
                if req.stream:
                    job = dataclasses.replace(job, sink=Sink(asyncio.get_running_loop()))
                    created, include = int(time.time()), req.include_usage
                    response = await _start_stream(
                        ticket, job, deadline, lambda sink, fut, on_error: chat_api.chat_chunks(
                            sink, fut, id_, name, created, fingerprint, include, on_error, deadline), openai=True)
                    ticket = None  # the stream releases it
                    code = 200
                    return response
                try:
                    with anyio.fail_after(max(0.0, deadline - time.perf_counter())):
                        result = await ticket.run(job)
                except Exception as e:
                    raise _model_error(e) from None
            finally:
                if ticket is not None:
                    ticket.release()
            metrics.stage.labels("total").observe(time.perf_counter() - t0)
            code = 200
            return JSONResponse(protocol.completion(id_, name, result.generation.text, result.finish_reason,
                                                    protocol.usage(result.prompt_tokens, len(result.generation.ids)),
                                                    fingerprint))
        except ApiError as e:
            code = e.status
            raise
        finally:
            metrics.requests.labels("chat", str(code)).inc()

    embeddings_api.add_routes(app, options, state, metrics, authorize=_authorize, read_body=_read_body, serving=_serving,
                              admit=_admit, model_error=_model_error, api_error=ApiError)
    fusion_api.add_routes(app, options, state, metrics, authorize=_authorize, read_body=_read_body, serving=_serving,
                          admit=_admit, model_error=_model_error, api_error=ApiError)

    @app.post("/v1/caption", summary="Caption an image", openapi_extra=_openapi_body("caption"))
    async def caption(request: Request) -> JSONResponse:
        return await _answer(request, "caption")

    @app.post("/v1/vqa", summary="Answer a question about an image", openapi_extra=_openapi_body("vqa"))
    async def vqa(request: Request) -> JSONResponse:
        if getattr(state["pipe"], "contract", None) == "fusion":  # ViLT: answers from its vocabulary (serving.fusion)
            return await app.state.fusion_vqa(request)
        return await _answer(request, "vqa")

    @app.get("/v1/models", summary="The served model, in OpenAI's list format")
    async def models(request: Request) -> dict:
        _authorize(request)
        if state["pipe"] is None:
            raise ApiError(503, "unavailable", "the model is still loading; retry shortly", {"Retry-After": "1"})
        return {"object": "list", "data": [model_summary(state["pipe"], state["name"])]}

    @app.get("/v1/models/{model:path}", summary="One served model, in OpenAI's format")
    async def model(request: Request, model: str) -> dict:
        _authorize(request)
        if state["pipe"] is None:
            raise ApiError(503, "unavailable", "the model is still loading; retry shortly", {"Retry-After": "1"})
        if model != state["name"]:
            raise ApiError(404, "not_found", f"model: {model!r:.80} is not served here; it serves {state['name']!r}")
        return model_summary(state["pipe"], state["name"])

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
