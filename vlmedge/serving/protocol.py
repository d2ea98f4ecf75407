"""OpenAI's chat completions API as typed request and response models, apart from the code that serves
them (vlmedge.serving.chat), as vLLM keeps its protocol apart from its serving code.

What a VLM on this server can honour is accepted: messages with text and `image_url` parts (data:
URLs; the server fetches nothing), max_tokens / max_completion_tokens, temperature, top_p, seed, stop,
n=1, stream and stream_options.include_usage, and the common extras of open servers (top_k, min_p,
repetition_penalty). Parameters that would change the answer in ways it cannot honour (tools,
response_format other than text, logprobs, penalties other than 0, ...) are refused with a 400 that
names them; parameters that change nothing here (user, metadata, store=false, ...) are accepted.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from vlmedge.errors import InputError

Number = Union[StrictInt, StrictFloat]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: Optional[StrictBool] = None
    include_obfuscation: Optional[StrictBool] = None  # the openai client may send it; there is nothing to obfuscate


class ChatRequest(BaseModel):
    """POST /v1/chat/completions, as OpenAI documents it."""

    model_config = ConfigDict(extra="allow")  # unknown fields are refused by name in `check`
    messages: list[Any] = Field(..., min_length=1)
    model: Optional[StrictStr] = None
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)
    temperature: Optional[Number] = Field(None, ge=0, le=2)
    top_p: Optional[Number] = Field(None, ge=0, le=1)
    seed: Optional[StrictInt] = None
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    n: Optional[StrictInt] = None
    stream: Optional[StrictBool] = None
    stream_options: Optional[StreamOptions] = None
    # extras of open servers (vLLM, llama.cpp): sent by the openai client as extra_body
    top_k: Optional[StrictInt] = Field(None, ge=0)
    min_p: Optional[Number] = Field(None, ge=0, le=1)
    repetition_penalty: Optional[Number] = Field(None, gt=0)
    # accepted, and change nothing here
    user: Optional[StrictStr] = None
    metadata: Optional[dict] = None
    store: Optional[StrictBool] = None
    service_tier: Optional[StrictStr] = None
    parallel_tool_calls: Optional[StrictBool] = None
    safety_identifier: Optional[StrictStr] = None
    prompt_cache_key: Optional[StrictStr] = None

    def check(self) -> None:
        """Refuse what this server cannot honour, naming the parameters (one line)."""
        extra = dict(self.model_extra or {})
        refused = [k for k, v in extra.items() if not _off(k, v)]
        unknown = [k for k in extra if k not in REFUSED_IF_SET]
        if unknown:
            raise InputError(f"{', '.join(unknown)}: unknown parameter{'s' if len(unknown) > 1 else ''} of chat completions")
        if refused:
            raise InputError(f"{', '.join(refused)}: not supported by this server (a vision-language model that "
                             "answers in plain text)")
        if self.n not in (None, 1):
            raise InputError(f"n: {self.n}; this server returns one choice per request (n=1)")
        if self.store:
            raise InputError("store: true; this server stores nothing")
        if self.stream_options is not None and not self.stream:
            raise InputError("stream_options: only with stream=true")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise InputError("stop: expected up to 4 non-empty strings")
        if self.seed is not None and not 0 <= self.seed < 1 << 64:
            raise InputError(f"seed: expected 0 to 2**64 - 1, got {self.seed}")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise InputError("max_tokens, max_completion_tokens: both given and different; send max_completion_tokens")

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def generation(self) -> dict[str, Any]:
        """The pipeline's generation options (HF names): greedy unless a temperature above 0 or a top_p
        asks for sampling; one beam, so that streamed and whole answers are the same."""
        out: dict[str, Any] = {"num_beams": 1}
        length = self.max_completion_tokens or self.max_tokens
        if length is not None:
            out["max_new_tokens"] = length
        sample = (self.temperature is not None and self.temperature > 0) or \
            (self.temperature is None and (self.top_p is not None or self.top_k or self.min_p is not None))
        if sample:
            out["do_sample"] = True
            out["top_k"] = self.top_k or 0  # OpenAI has no top_k: off unless asked (HF's default is 50)
            if self.temperature is not None:
                out["temperature"] = float(self.temperature)
            if self.top_p is not None:
                out["top_p"] = float(self.top_p)
            if self.min_p is not None:
                out["min_p"] = float(self.min_p)
            if self.seed is not None:
                out["seed"] = self.seed
        else:
            out["do_sample"] = False
        if self.repetition_penalty is not None:
            out["repetition_penalty"] = float(self.repetition_penalty)
        return out

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# parameters of OpenAI's API this server cannot honour, with the values that mean "not used"
REFUSED_IF_SET: dict[str, tuple] = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}), "logprobs": (None, False), "top_logprobs": (None, 0),
    "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,), "reasoning_effort": (None,),
    "web_search_options": (None,), "verbosity": (None,),
}


def _off(name: str, value: Any) -> bool:
    return name in REFUSED_IF_SET and any(value == v and type(value) is type(v) or value is v
                                          for v in REFUSED_IF_SET[name])


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion(id_: str, model: str, text: str, finish: str, usage: dict, fingerprint: str) -> dict:
    return {
        "id": id_, "object": "chat.completion", "created": int(time.time()), "model": model,
        "system_fingerprint": fingerprint,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                     "logprobs": None, "finish_reason": finish}],
        "usage": usage,
    }


def chunk(id_: str, model: str, created: int, fingerprint: str, delta: Optional[dict], finish: Optional[str] = None,
          usage: Optional[dict] = None, with_usage: bool = False) -> dict:
    """One streamed chunk: a delta of the one choice, or (delta None) the usage chunk with no choices."""
    out: dict[str, Any] = {"id": id_, "object": "chat.completion.chunk", "created": created, "model": model,
                           "system_fingerprint": fingerprint,
                           "choices": [] if delta is None else
                           [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    if with_usage:
        out["usage"] = usage
    return out


def usage(prompt: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


ErrorType = Literal["invalid_request_error", "authentication_error", "rate_limit_error", "not_found_error",
                    "server_error", "timeout_error", "service_unavailable"]


def error_body(message: str, status: int, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    """OpenAI's error object: what its clients read to raise BadRequestError, AuthenticationError, ..."""
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 408: "timeout_error",
            413: "invalid_request_error", 429: "rate_limit_error", 431: "invalid_request_error",
            503: "service_unavailable", 504: "timeout_error"}.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
