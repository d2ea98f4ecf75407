"""Serving a fusion bundle (ViLT, BridgeTower): answers from a vocabulary and image-text matching scores.

    POST /v1/vqa    {"image": base64 or data: URL, "question": "...", "top_k"?: 5}     (ViLT VQA bundles)
                    -> {"model", "answers": [{"answer", "score"}] best first, "batch_size", "timings_ms"}
    POST /v1/match  {"image": base64 or data: URL, "texts": ["...", ...]}               (ViLT retrieval, BridgeTower)
                    -> {"model", "matches": [{"text", "score"}] in the texts' order, "batch_size", "timings_ms"}

Policy. Requests go through the same admission (max_queue, 429 with Retry-After), timeout (504) and batcher
as captions: `FusionBatcher` groups waiting requests of the same task (and, for vqa, the same top_k) into one
pipeline call: every image-text pair of the group in one batch of the graph, split by the bundle's batch
range. Inputs are checked and images decoded before a request queues, so a bad one is a 400 naming the
input and never reaches a batch. /v1/vqa on a generating bundle is served by vlmedge.serving.app as before.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

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
from vlmedge.serving.embeddings import _b64, _validated
from vlmedge.serving.inputs import decode_image

MAX_TEXTS = 256  # texts per /v1/match request


class FusionVqaRequest(BaseModel):
    """POST /v1/vqa to a ViLT VQA bundle: one image, one question, how many answers to return."""

    model_config = ConfigDict(extra="forbid")
    image: StrictStr = Field(..., description="the image file's bytes, base64-encoded, or a data: URL")
    question: StrictStr
    top_k: StrictInt = Field(5, ge=1)
    model: Optional[StrictStr] = None


class MatchRequest(BaseModel):
    """POST /v1/match: one image and the texts to score against it."""

    model_config = ConfigDict(extra="forbid")
    image: StrictStr = Field(..., description="the image file's bytes, base64-encoded, or a data: URL")
    texts: list[StrictStr] = Field(..., min_length=1, max_length=MAX_TEXTS)
    model: Optional[StrictStr] = None


@dataclass(frozen=True)
class FusionJob:
    """One request for the model: an image and its question (vqa) or texts (match)."""

    task: str  # "vqa" or "match"
    image: Any  # a decoded RGB PIL image
    texts: tuple[str, ...]  # vqa: (the question,); match: the texts
    config: tuple = ()  # vqa: (top_k,), which a batch shares; match: ()
    conversation: None = None  # (what the batcher's grouping reads of a job)


class FusionBatcher(Batcher):
    """The batcher with a fusion pipeline's calls: one call per group of compatible requests."""

    def capacity(self, job) -> int:
        return max(1, self.max_batch)

    def _call(self, jobs: list, timings: Timings) -> list[Any]:
        pipe = self.pipe
        if any(not isinstance(j, FusionJob) for j in jobs):
            raise InputError("this server holds a fusion bundle: it answers from a vocabulary or scores image-text "
                             "matches (/v1/vqa, /v1/match); it does not write captions")
        t0 = time.perf_counter()
        if jobs[0].task == "vqa":
            out = pipe.vqa([j.image for j in jobs], [j.texts[0] for j in jobs], top_k=jobs[0].config[0])
        else:
            images = [j.image for j in jobs for _ in j.texts]
            scores = pipe.scores(pipe.logits(images, [t for j in jobs for t in j.texts]))
            out, start = [], 0
            for j in jobs:
                out.append(scores[start: start + len(j.texts)])
                start += len(j.texts)
        timings.encoder += time.perf_counter() - t0
        return out


def add_routes(app, options, state, metrics, *, authorize, read_body, serving, admit, model_error, api_error) -> None:
    """/v1/match on the app of vlmedge.serving.app (its helpers passed in); returns nothing. The app's /v1/vqa
    route hands fusion bundles to `app.state.fusion_vqa`."""

    def _fusion_pipe(task: str):
        pipe, batcher = serving()
        if getattr(pipe, "contract", None) != "fusion":
            raise api_error(400, "bad_input", f"this server's bundle has no {task} of image-text pairs (a fusion bundle "
                                              "does: ViLT, BridgeTower)")
        if pipe.task != task:
            raise api_error(404, "bad_input", f"this bundle has no {task} task (it has {pipe.task}: "
                                              f"{'/v1/vqa' if pipe.task == 'vqa' else '/v1/match'})")
        return pipe, batcher

    def _image(text: str):
        data = image_bytes(text, "image") if text.startswith("data:") else _b64(text)
        return decode_image(data, options.max_pixels)

    def _prepare_vqa(pipe, req: FusionVqaRequest) -> FusionJob:
        pipe.text_ids([req.question], "question")  # a bad question is this request's 400, not its batch's failure
        return FusionJob("vqa", _image(req.image), (req.question,), (req.top_k,))

    def _prepare_match(pipe, req: MatchRequest) -> FusionJob:
        pipe.text_ids(req.texts)
        return FusionJob("match", _image(req.image), tuple(req.texts))

    async def _run(request: Request, task: str, cls, prepare, respond):
        t0 = time.perf_counter()
        deadline = t0 + options.timeout_s
        code = 500
        try:
            authorize(request)
            pipe, batcher = _fusion_pipe(task)
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
            return JSONResponse({"model": state["name"], **respond(req, result.generation), "batch_size": result.batch_size,
                                 "timings_ms": {k: round(v * 1000, 3) for k, v in stages.items()}})
        except Exception as e:
            code = getattr(e, "status", 500)
            raise
        finally:
            metrics.requests.labels(task, str(code)).inc()

    async def vqa(request: Request) -> JSONResponse:
        return await _run(request, "vqa", FusionVqaRequest, _prepare_vqa,
                          lambda req, answers: {"answers": [{"answer": a.answer, "score": a.score} for a in answers]})

    app.state.fusion_vqa = vqa

    @app.post("/v1/match", summary="Image-text matching scores of an image and texts (fusion bundles: ViLT, BridgeTower)",
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": MatchRequest.model_json_schema()}}}})
    async def match(request: Request) -> JSONResponse:
        return await _run(request, "match", MatchRequest, _prepare_match,
                          lambda req, scores: {"matches": [{"text": t, "score": float(s)} for t, s in zip(req.texts, scores)]})


def model_summary(pipe, name: str, version: str) -> dict[str, Any]:
    """What /v1/models says of a fusion bundle."""
    m = pipe.manifest
    p = m.preprocessing
    return {
        "id": name, "object": "model", "created": int(pipe.bundle.path.stat().st_mtime), "owned_by": "vlmedge",
        "family": m.family, "architecture": m.architecture, "contract": "fusion", "tasks": [pipe.task],
        "precision": m.precision.get("dtype", "float32"), "backend": pipe.backend.name, "max_batch": pipe.batch_size,
        "max_text_tokens": m.tokenizer["max_length"], "answers": len(m.tasks["vqa"]["labels"]) if pipe.task == "vqa" else None,
        "image_size": [p.get("crop_height"), p.get("crop_width")] if "crop_height" in p else None,
        "source": m.provenance.get("source"), "vlmedge": version,
    }


def warm_up(pipe) -> None:
    image = np.full((int(pipe.manifest.preprocessing["shortest_edge"]),) * 2 + (3,), 128, dtype=np.uint8)
    pipe.logits([image], ["warm up"])
