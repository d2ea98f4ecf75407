"""Request bodies to model jobs: image bytes decoded with the runtime's checks, generation options
validated, each problem one line naming the field (the server answers it with a 400)."""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from PIL import Image

from vlmedge.errors import InputError
from vlmedge.runtime.decoding import GenerationConfig
from vlmedge.runtime.images import open_checked, to_rgb

try:  # pydantic comes with FastAPI (the serve extra); the batcher and offline runs do without it
    from typing import Annotated

    from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
except ImportError:  # pragma: no cover
    BaseModel = object  # type: ignore[assignment,misc]


def _not_bool(value: Any) -> Any:
    """JSON true is not a count (pydantic would read it as 1)."""
    if isinstance(value, bool):
        raise ValueError("expected an integer, not true or false")
    return value


def load_json(body: bytes) -> Any:
    """A request body as JSON; not JSON, nested too deep or a number too long to read is one line (a 400)."""
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"body: not valid JSON ({e})") from None
    except RecursionError:
        raise InputError("body: JSON nested too deep") from None
    except ValueError as e:  # an integer of more digits than Python converts (int_max_str_digits)
        raise InputError(f"body: a number in the JSON is too long ({str(e).splitlines()[0][:80]})") from None


@dataclass(frozen=True)
class Job:
    """One request for the model: a decoded RGB image, the question (VQA), the generation options."""

    task: str  # "caption" or "vqa"
    image: Any  # RGB PIL image
    question: Optional[str]
    config: GenerationConfig
    conversation: Optional[list] = None  # decoder-only chat: the messages, images in them (task "vqa", image None)
    sink: Any = None  # a stream's Sink: each piece of text as it is decoded
    stepwise: bool = False  # decoded step by step (one beam), for token counts and stop strings
    stop: tuple[str, ...] = ()  # the answer ends before the first of these (OpenAI's stop)


if BaseModel is not object:
    Count = Annotated[int, BeforeValidator(_not_bool)]

    class GenerationOptions(BaseModel):
        """Generation options as in the Python API (`pipe.caption(..., num_beams=3)`), plus return_ids."""

        model_config = ConfigDict(extra="forbid")
        max_new_tokens: Optional[Count] = Field(None, ge=1, description="default: the bundle's")
        # None: the model's own setting from the bundle (tasks.<task>.generation), as in the Python API
        min_new_tokens: Optional[Count] = Field(None, ge=0)
        num_beams: Optional[Count] = Field(None, ge=1, description="beam search width (1: greedy; default: the model's)")
        length_penalty: Optional[float] = None
        early_stopping: Optional[Union[bool, Literal["never"]]] = None
        eos_token_id: Optional[Count] = None
        do_sample: Optional[bool] = Field(None, description="draw tokens (one beam) instead of taking the likeliest")
        temperature: Optional[float] = Field(None, gt=0, description="sampling: divides the logits")
        top_k: Optional[Count] = Field(None, ge=0, description="sampling: keep the k likeliest tokens (0: all; default 50)")
        top_p: Optional[float] = Field(None, ge=0, le=1, description="sampling: nucleus mass")
        min_p: Optional[float] = Field(None, ge=0, le=1, description="sampling: drop tokens under min_p x the likeliest")
        seed: Optional[Count] = Field(None, ge=0, lt=1 << 64, description="sampling: the same seed, the same tokens")
        return_ids: bool = Field(False, description="also return the generated token ids")
        stream: bool = Field(False, description="send the text as server-sent events while it is decoded (one beam)")

    class JsonRequest(GenerationOptions):
        """POST body as JSON: the image base64-encoded (PNG, JPEG, ...), the question for /v1/vqa."""

        image: str = Field(..., description="the image file's bytes, base64-encoded")
        question: Optional[str] = Field(None, description="the question (/v1/vqa only)")

    _OPTION_FIELDS = tuple(GenerationOptions.model_fields)


def decode_image(data: bytes, max_pixels: int, where: str = "image") -> Image.Image:
    """Image file bytes -> RGB image, with the checks `load_image` makes on a path: the pixel limit
    from the header before decoding, truncation, not an image, EXIF orientation."""
    if not data:
        raise InputError(f"{where}: empty (0 bytes); expected an image file's bytes")
    return to_rgb(open_checked(io.BytesIO(data), max_pixels, where))


INLINE_PIXELS = 256 * 256  # images up to this size are decoded on the event loop (well under 1 ms)


def small_image(data: bytes) -> bool:
    """True if the image's header says it is small enough to decode without leaving the event loop."""
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            w, h = img.size
    except Exception:  # a bad image is reported by decode_image, off the loop
        return False
    return w * h <= INLINE_PIXELS and len(data) <= 4 * INLINE_PIXELS


def _one_line(e: "ValidationError") -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "body"
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown field; expected one of image, question, {', '.join(_OPTION_FIELDS)}"
    if err["type"] == "missing":
        return f"{loc}: missing; expected {'the image (base64)' if loc == 'image' else 'a value'}"
    return f"{loc}: {err['msg'].lower()}, got {json.dumps(err.get('input'), default=str)[:60]}"


def parse_json_body(body: bytes) -> tuple[bytes, Optional[str], dict]:
    """A JSON body -> (image bytes, question, generation options incl. return_ids)."""
    raw = load_json(body)
    if not isinstance(raw, dict):
        raise InputError(f"body: expected a JSON object, got {type(raw).__name__}")
    try:
        req = JsonRequest.model_validate(raw)
    except ValidationError as e:
        raise InputError(_one_line(e)) from None
    try:
        data = base64.b64decode(req.image, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("image: not valid base64") from None
    opts = req.model_dump(exclude={"image", "question"})
    return data, req.question, opts


def parse_form_options(fields: dict[str, str]) -> dict:
    """Multipart form fields (strings) -> generation options incl. return_ids."""
    try:
        return GenerationOptions.model_validate(fields).model_dump()
    except ValidationError as e:
        raise InputError(_one_line(e)) from None


def split_options(opts: dict) -> tuple[GenerationConfig, bool]:
    """Validated options -> (GenerationConfig, return_ids)."""
    opts = {k: v for k, v in opts.items() if v is not None}  # None: the model's own setting
    return_ids = bool(opts.pop("return_ids", False))
    opts.pop("stream", None)
    return GenerationConfig(**opts), return_ids
