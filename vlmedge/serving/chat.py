"""Serving OpenAI's chat completions (vlmedge.serving.protocol) with the pipeline and batcher.

A request's messages become one model job. On a cross-attention bundle (caption and VQA models) the
last user message's text is the question about the conversation's last image, and with no text the
answer is the image's caption; system messages are read by nobody and left out. On a decoder-only
bundle the whole conversation (several turns and images, system messages too) goes through its chat
template, and a lone image without text is captioned. Images come as `data:` URLs; the server fetches
nothing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

from vlmedge.errors import InputError
from vlmedge.serving.batcher import Answered, Result, Sink
from vlmedge.serving.protocol import chunk, usage

_DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)


@dataclass(frozen=True)
class ChatInput:
    """What the messages ask: image bytes in order, and either a question (None: caption) for a
    cross-attention bundle, or the conversation (images as placeholders, in order) for a decoder-only one."""

    images: list[tuple[str, bytes]]  # (where, bytes)
    question: Optional[str]
    conversation: Optional[list[dict]]


def image_bytes(url: Any, where: str) -> bytes:
    """A data: URL's image bytes; anything else refused in one line."""
    if not isinstance(url, str) or not url:
        raise InputError(f"{where}: expected a data: URL with the image base64-encoded")
    if re.match(r"https?://", url, re.I):
        raise InputError(f"{where}: http(s) image URLs are not fetched by this server; send the image inline as "
                         "data:image/png;base64,...")
    m = _DATA_URL.match(url)
    if not m:
        raise InputError(f"{where}: expected a data: URL (data:image/png;base64,...), got {url[:30]!r}")
    if not m.group("b64"):
        raise InputError(f"{where}: the data: URL is not base64 (expected data:image/...;base64,...)")
    try:
        return base64.b64decode(url[m.end():], validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{where}: not valid base64") from None


def parse_messages(messages: list[Any], prefix: bool) -> ChatInput:
    """OpenAI messages -> ChatInput, each problem one line naming where it is."""
    images: list[tuple[str, bytes]] = []
    conv: list[dict] = []
    last_user: Optional[list] = None
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InputError(f"{where}: expected an object with role and content")
        role = m.get("role")
        if role in ("tool", "function"):
            raise InputError(f"{where}.role: {role} messages answer tool calls, which this server does not make")
        if role not in ("system", "developer", "user", "assistant"):
            raise InputError(f"{where}.role: expected system, developer, user or assistant, got {str(role)[:30]!r}")
        extra = set(m) - {"role", "content", "name"}
        if extra - {"refusal"} or m.get("refusal"):
            raise InputError(f"{where}: {', '.join(sorted(extra))}: not supported here (no tools, no audio)")
        content = m.get("content")
        parts: list[dict] = []
        texts: list[str] = []
        if isinstance(content, str):
            parts.append({"type": "text", "text": content})
            texts.append(content)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                pw = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                    texts.append(part["text"])
                elif kind == "image_url":
                    if role != "user":
                        raise InputError(f"{pw}: images go in user messages")
                    spec = part.get("image_url")
                    url = spec.get("url") if isinstance(spec, dict) else spec
                    images.append((f"{pw}.image_url", image_bytes(url, f"{pw}.image_url.url")))
                    parts.append({"type": "image"})
                elif kind in ("input_audio", "file", "refusal"):
                    raise InputError(f"{pw}: {kind} parts are not supported here; send text and image_url parts")
                else:
                    raise InputError(f"{pw}: expected a text part or an image_url part")
        else:
            raise InputError(f"{where}.content: expected a string or a list of parts")
        conv.append({"role": "system" if role == "developer" else role, "content": parts})
        if role == "user":
            last_user = parts
    if messages and not (isinstance(messages[-1], dict) and messages[-1].get("role") == "user"):
        raise InputError("messages: the last message must be the user's (the one to answer)")
    assert last_user is not None
    question = " ".join(p["text"].strip() for p in last_user if p["type"] == "text" and p["text"].strip()) or None
    if not images:
        raise InputError("messages: no image; this model answers about images (send an image_url part)")
    if prefix:
        lone = len(messages) == 1 and len(images) == 1 and question is None
        return ChatInput(images, None, None if lone else conv)
    if sum(p["type"] == "image" for p in last_user) > 1:
        raise InputError("messages: several images in one message; this model reads one image per question")
    return ChatInput(images[-1:], question, None)


def with_images(conversation: list[dict], images: list[Any]) -> list[dict]:
    """The conversation with its image placeholders holding the decoded images, in order (for PrefixPipeline)."""
    it = iter(images)
    return [{"role": m["role"], "content": [{"type": "image", "image": next(it)} if p["type"] == "image" else p
                                            for p in m["content"]]} for m in conversation]


def sse(data: Any) -> bytes:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def next_event(sink: Sink, future: asyncio.Future, timeout: Optional[float] = None) -> tuple[str, Any]:
    """The sink's next event, or the job's error once its batch has failed (an Exception raised)."""
    get = asyncio.ensure_future(sink.queue.get())
    try:
        done, _ = await asyncio.wait({get, future}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        get.cancel()
        raise
    if get in done:
        return get.result()
    get.cancel()
    if future in done:
        if future.cancelled():
            raise asyncio.CancelledError()
        exc = future.exception()
        if exc is not None:
            raise exc
        result: Result = future.result()  # the batch ended and this row's end event is still queued
        if not sink.queue.empty():
            return sink.queue.get_nowait()
        return "end", Answered(result.generation, result.prompt_tokens, result.finish_reason)
    raise TimeoutError()


async def chat_chunks(sink: Sink, future: asyncio.Future, id_: str, model: str, created: int, fingerprint: str,
                      include_usage: bool, on_error, deadline: Optional[float] = None) -> AsyncIterator[bytes]:
    """The SSE body of a streamed chat completion: a role chunk, a chunk per piece of text, one with the
    finish reason, the usage chunk if asked, then `data: [DONE]`. A failure after the first chunk is an
    error event (OpenAI's error object), which the openai client raises."""
    head = dict(id_=id_, model=model, created=created, fingerprint=fingerprint, with_usage=include_usage)
    yield sse(chunk(delta={"role": "assistant", "content": ""}, **head))
    async for kind, value in _events(sink, future, on_error, deadline):
        if kind == "error":
            yield sse(value)
        elif kind == "piece":
            yield sse(chunk(delta={"content": value}, **head))
        elif kind == "end":
            yield sse(chunk(delta={}, finish=value.finish_reason, **head))
            if include_usage:
                yield sse(chunk(delta=None, usage=usage(value.prompt_tokens, len(value.generation.ids)), **head))
            yield sse("[DONE]")


async def _events(sink: Sink, future: asyncio.Future, on_error,
                  deadline: Optional[float] = None) -> AsyncIterator[tuple[str, Any]]:
    """A streamed answer's ("piece", text) events up to its ("end", result); a failure, or the request's
    deadline (time.perf_counter) passing before the end, becomes one ("error", on_error(exception))
    event that ends it."""
    while True:
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.perf_counter())
            kind, value = await next_event(sink, future, timeout=timeout)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            yield "error", on_error(e)
            return
        yield kind, value
        if kind == "end":
            return


async def native_chunks(sink: Sink, future: asyncio.Future, model: str, on_error,
                        deadline: Optional[float] = None) -> AsyncIterator[bytes]:
    """The SSE body of a streamed /v1/caption or /v1/vqa: {"text": piece} events, then the whole answer
    with "done": true (and its ids and token counts)."""
    async for kind, value in _events(sink, future, on_error, deadline):
        if kind == "error":
            yield sse(value)
        elif kind == "piece":
            yield sse({"text": value})
        elif kind == "end":
            yield sse({"model": model, "text": value.generation.text, "ids": list(value.generation.ids), "done": True,
                       "finish_reason": value.finish_reason, "prompt_tokens": value.prompt_tokens})
            return
