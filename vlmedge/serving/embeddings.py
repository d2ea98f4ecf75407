"""Serving a dual-encoder bundle (CLIP, SigLIP): OpenAI's embeddings API and zero-shot classification.

    POST /v1/embeddings  {"input": "a red circle" | ["text", "data:image/png;base64,...", ...],
                          "model"?, "encoding_format"?: "float" | "base64", "dimensions"?}
                         -> OpenAI's {"object": "list", "data": [{"object": "embedding", "index", "embedding"}],
                            "model", "usage"}; an input that is a data: URL of an image is embedded as an image,
                            any other string as a text (the same space: text-to-image search takes both)
    POST /v1/classify    {"image": base64 or data: URL, "labels": [...], "template"?, "top_k"?}
                         -> {"model", "labels": [{"label", "score"}] best first, "activation", "timings_ms"}

Policy. Requests go through the same admission (max_queue, 429 with Retry-After), timeout (504) and
batcher as captions: `EmbeddingBatcher` groups waiting requests of the same kind (embeddings; or
classification with the same labels and template, whose text embeddings are then computed once) into
one pipeline call, run on the model worker thread. Inputs are checked and images decoded before a
request queues, so a bad one is a 400 naming the input (`input[2]: ...`) and never reaches a batch.
Token arrays (OpenAI's pre-tokenised input) are refused: the bundle's tokenizer is the one that counts.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import anyio
import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.concurrency import run_in_threadpool

from vlmedge.errors import InputError, VlmedgeError
from vlmedge.runtime.decoding import Timings
from vlmedge.serving.batcher import Batcher
from vlmedge.serving.chat import image_bytes
from vlmedge.serving.inputs import decode_image, load_json

MAX_INPUTS = 2048  # OpenAI's limit of inputs per embeddings request


# -- the protocol ---------------------------------------------------------------------------------

class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings, as OpenAI documents it (input: a string or a list of strings)."""

    model_config = ConfigDict(extra="forbid")
    input: Union[StrictStr, list[Any]]
    model: Optional[StrictStr] = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[StrictInt] = Field(None, ge=1)
    user: Optional[StrictStr] = None


class ClassifyRequest(BaseModel):
    """POST /v1/classify: one image, the labels, optionally the prompt template and how many labels to return."""

    model_config = ConfigDict(extra="forbid")
    image: StrictStr = Field(..., description="the image file's bytes, base64-encoded, or a data: URL")
    labels: list[StrictStr] = Field(..., min_length=1)
    template: Optional[StrictStr] = None
    top_k: Optional[StrictInt] = Field(None, ge=1)
    model: Optional[StrictStr] = None


def _validated(cls, body: bytes):
    raw = load_json(body)
    if not isinstance(raw, dict):
        raise InputError(f"body: expected a JSON object, got {type(raw).__name__}")
    try:
        return cls.model_validate(raw)
    except Exception as e:  # pydantic's ValidationError: its first error, on one line
        err = e.errors()[0] if hasattr(e, "errors") else {"loc": (), "msg": str(e), "type": ""}
        loc = ".".join(str(x) for x in err["loc"]) or "body"
        if err.get("type") == "extra_forbidden":
            raise InputError(f"{loc}: unknown field; expected one of {', '.join(cls.model_fields)}") from None
        raise InputError(f"{loc}: {err['msg'].lower()}") from None


# -- jobs and their batcher -------------------------------------------------------------------------

@dataclass(frozen=True)
class EmbedJob:
    """One request for the model: embeddings of its items (a str is a text, a PIL image an image), or the
    label probabilities of one image (`config`: the prompts, which classification requests must share)."""

    task: str  # "embed" or "classify"
    items: tuple  # texts and images, in the request's order
    config: tuple = ()  # classify: the label prompts; embed: ()
    conversation: None = None  # (what the batcher's grouping reads of a job)


class EmbeddingBatcher(Batcher):
    """The batcher with a dual-encoder pipeline's calls: one call per group of compatible requests."""

    def capacity(self, job) -> int:
        return max(1, self.max_batch)

    def _call(self, jobs: list, timings: Timings) -> list[Any]:
        pipe = self.pipe
        if any(not isinstance(j, EmbedJob) for j in jobs):
            raise InputError("this server holds a dual-encoder bundle: it embeds and classifies (/v1/embeddings, "
                             "/v1/classify), it does not write captions or answers")
        t0 = time.perf_counter()
        if jobs[0].task == "classify":
            text = pipe.embed_texts(list(jobs[0].config))
            probs = pipe.probabilities(pipe.logits(pipe.embed_images([j.items[0] for j in jobs]), text))
            timings.encoder += time.perf_counter() - t0
            return list(probs)
        items = [x for j in jobs for x in j.items]
        texts = [i for i, x in enumerate(items) if isinstance(x, str)]
        images = [i for i, x in enumerate(items) if not isinstance(x, str)]
        out = np.zeros((len(items), pipe.dim), np.float32)
        if texts:
            out[texts] = pipe.embed_texts([items[i] for i in texts])
        if images:
            out[images] = pipe.embed_images([items[i] for i in images])
        timings.encoder += time.perf_counter() - t0
        rows, start = [], 0
        for j in jobs:
            rows.append(out[start: start + len(j.items)])
            start += len(j.items)
        return rows


# -- the routes ---------------------------------------------------------------------------------------

def _embedding_json(vector: np.ndarray, fmt: str) -> Any:
    if fmt == "base64":  # OpenAI's base64: little-endian float32 bytes
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode()
    return [float(x) for x in vector]


def add_routes(app, options, state, metrics, *, authorize, read_body, serving, admit, model_error, api_error) -> None:
    """/v1/embeddings and /v1/classify on the app of vlmedge.serving.app (its helpers passed in)."""

    def _embedding_pipe():
        pipe, batcher = serving()
        if getattr(pipe, "contract", None) != "dual-encoder":
            raise api_error(400, "bad_input", "this server's bundle does not embed (a dual-encoder bundle does: "
                                              "CLIP, SigLIP); it serves /v1/caption and /v1/vqa")
        return pipe, batcher

    def _prepare_embed(pipe, req: EmbeddingRequest) -> EmbedJob:
        inputs = [req.input] if isinstance(req.input, str) else req.input
        if not inputs:
            raise InputError("input: empty; expected a string or a list of strings")
        if len(inputs) > MAX_INPUTS:
            raise InputError(f"input: {len(inputs)} items, over the limit of {MAX_INPUTS}")
        if req.dimensions is not None and req.dimensions != pipe.dim:
            raise InputError(f"dimensions: {req.dimensions}; this model's embeddings have {pipe.dim} (they cannot be shortened)")
        items: list[Any] = []
        for i, x in enumerate(inputs):
            where = f"input[{i}]" if not isinstance(req.input, str) else "input"
            if not isinstance(x, str):
                raise InputError(f"{where}: expected a string (a text, or an image as a data: URL); "
                                 "token arrays are not accepted, the bundle's tokenizer counts")
            if x.startswith("data:"):
                items.append(decode_image(image_bytes(x, where), options.max_pixels, where))
            else:
                if not x.strip():
                    raise InputError(f"{where}: empty text")
                pipe.text_ids([x])  # checked here: a bad text is this request's 400, not its batch's failure
                items.append(x)
        return EmbedJob("embed", tuple(items))

    def _prepare_classify(pipe, req: ClassifyRequest) -> EmbedJob:
        prompts = pipe.prompts(req.labels, req.template)
        data = image_bytes(req.image, "image") if req.image.startswith("data:") else _b64(req.image)
        return EmbedJob("classify", (decode_image(data, options.max_pixels),), tuple(prompts))

    async def _run(request: Request, route: str, cls, prepare, respond):
        t0 = time.perf_counter()
        deadline = t0 + options.timeout_s
        code = 500
        try:
            authorize(request)
            pipe, batcher = _embedding_pipe()
            body = await read_body(request, deadline)
            try:
                req = _validated(cls, body)
            except VlmedgeError as e:
                raise api_error(400, "bad_input", str(e)) from None
            if req.model is not None and req.model != state["name"]:
                raise api_error(404, "not_found", f"model: {req.model!r:.80} is not served here; it serves {state['name']!r}")
            ticket = admit(batcher)
            try:
                try:
                    job = await run_in_threadpool(prepare, pipe, req)
                except VlmedgeError as e:
                    raise api_error(400, "bad_input", str(e)) from None
                t1 = time.perf_counter()
                try:
                    with anyio.fail_after(max(0.0, deadline - t1)):
                        result = await ticket.run(job)
                except Exception as e:
                    raise model_error(e) from None
            finally:
                ticket.release()
            stages = {"decode": t1 - t0, **result.timings, "total": time.perf_counter() - t0}
            for k, v in stages.items():
                metrics.stage.labels(k).observe(v)
            code = 200
            return JSONResponse(respond(pipe, req, job, result, stages))
        except Exception as e:
            code = getattr(e, "status", 500)
            raise
        finally:
            metrics.requests.labels(route, str(code)).inc()

    def _embeddings_body(pipe, req, job, result, stages) -> dict:
        tokens = sum(int(pipe.text_ids([x])[1].sum()) for x in job.items if isinstance(x, str))
        return {"object": "list", "model": state["name"],
                "data": [{"object": "embedding", "index": i, "embedding": _embedding_json(v, req.encoding_format)}
                         for i, v in enumerate(result.generation)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def _classify_body(pipe, req, job, result, stages) -> dict:
        p = result.generation
        order = sorted(range(len(req.labels)), key=lambda j: -p[j])[: req.top_k or len(req.labels)]
        return {"model": state["name"], "activation": pipe.activation,
                "labels": [{"label": req.labels[j], "score": float(p[j])} for j in order],
                "batch_size": result.batch_size, "timings_ms": {k: round(v * 1000, 3) for k, v in stages.items()}}

    @app.post("/v1/embeddings", summary="OpenAI embeddings: texts, and images as data: URLs (dual-encoder bundles)",
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": EmbeddingRequest.model_json_schema()}}}})
    async def embeddings(request: Request) -> JSONResponse:
        return await _run(request, "embeddings", EmbeddingRequest, _prepare_embed, _embeddings_body)

    @app.post("/v1/classify", summary="Zero-shot label probabilities of an image (dual-encoder bundles)",
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": ClassifyRequest.model_json_schema()}}}})
    async def classify(request: Request) -> JSONResponse:
        return await _run(request, "classify", ClassifyRequest, _prepare_classify, _classify_body)


def _b64(text: str) -> bytes:
    import binascii

    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("image: not valid base64 (or a data: URL)") from None


def model_summary(pipe, name: str, version: str) -> dict[str, Any]:
    """What /v1/models says of a dual-encoder bundle."""
    m = pipe.manifest
    return {
        "id": name, "object": "model", "created": int(pipe.bundle.path.stat().st_mtime), "owned_by": "vlmedge",
        "family": m.family, "architecture": m.architecture, "contract": "dual-encoder", "tasks": ["embeddings", "classify"],
        "precision": m.precision.get("dtype", "float32"), "backend": pipe.backend.name, "max_batch": pipe.batch_size,
        "dimensions": pipe.dim, "activation": pipe.activation, "max_text_tokens": m.tokenizer["max_length"],
        "image_size": [m.preprocessing.get("height"), m.preprocessing.get("width")], "source": m.provenance.get("source"),
        "max_num_patches": m.preprocessing.get("max_num_patches"), "vlmedge": version,
    }


def warm_up(pipe) -> None:
    pre = pipe.manifest.preprocessing
    pipe.embed_images(np.full((int(pre.get("height", 224)), int(pre.get("width", 224)), 3), 128, dtype=np.uint8))
    pipe.embed_texts("warm up")
