"""What every model family exposes to export, calibration, the builder and the runtime.

A family adapter wraps the original PyTorch model and hands out the canonical graphs
(vision encoder, question encoder for VQA, cross-attention K/V, one decoder for prompt and steps), plus the
facts the runtime needs (dimensions, preprocessing, tokenizer, special ids). Nothing downstream
reads a family's raw config: `ModelDims` is computed once, here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

TASKS = ("caption", "vqa")


def flat_kv(pairs) -> list:
    """[(k0, v0), (k1, v1), ...] -> [k0, v0, k1, v1, ...]: the order of the graphs' K/V tensors."""
    return [t for kv in pairs for t in kv]


def pair_kv(tensors) -> list[tuple]:
    """The inverse of flat_kv."""
    return [(tensors[i], tensors[i + 1]) for i in range(0, len(tensors), 2)]


@dataclass(frozen=True)
class ModelDims:
    """Decoder and encoder sizes, normalised across families."""

    decoder_layers: int
    decoder_heads: int
    decoder_head_dim: int
    vocab_size: int
    encoder_hidden: int  # width of the states the decoder cross-attends to
    image_tokens: int  # vision encoder sequence length at the native image size
    max_target_len: int  # longest decoder sequence (prompt + generated) the positions allow
    max_question_len: int = 0  # 0 where the family has no question encoder


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB image becomes `pixel_values`: resize, rescale to [0, 1], standardise, NCHW."""

    height: int
    width: int
    resample: str  # Pillow filter name: "bicubic", "bilinear", "nearest", "box", "lanczos"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale: float = 1.0 / 255.0
    channel_order: str = "RGB"
    # decoder-only families: how an image of any size becomes frames and prompt tokens (runtime.processors)
    processor: dict[str, Any] | None = None
    # Donut's and Nougat's processors (runtime.preprocess.fit_pad): "fit_pad" keeps the aspect ratio (resize the
    # short side, shrink to fit) and pads with black, centred; None (absent from the manifest): "stretch", straight
    # to height x width. The rest are None unless fit_pad.
    resize_mode: str | None = None
    align_long_axis: bool | None = None  # rotate a portrait image for a landscape target and back
    crop_margin: bool | None = None  # Nougat: crop to the bounding box of the darker pixels first
    thumbnail_resample: str | None = None  # the shrink-to-fit filter; None: `resample`
    thumbnail_reducing_gap: float | None = None  # Pillow's reducing_gap for that shrink (Nougat: 2.0)


@dataclass(frozen=True)
class TaskSpec:
    """How one task runs: what the decoder cross-attends to, and how decoding starts and stops."""

    encoder: str  # graph whose output the decoder cross-attends to: vision_encoder or text_encoder
    prompt_ids: tuple[int, ...]  # decoder input before the first generated token
    eos_id: int
    pad_id: int
    max_new_tokens: int
    # the model's own generation settings under HF's names (vlmedge.models.generation): the runtime's defaults
    generation: dict[str, Any] = field(default_factory=dict)
    text_prompt_ids: tuple[int, ...] = ()  # what text_encoder reads for this task; empty: the user's question
    image_prefix: bool = False  # text_encoder's output is [image tokens; prompt]: the decoder's mask covers both
    postprocess: str = "text"  # how the answer is read: text, or Florence-2's pure_text / description_with_bboxes / ocr


@dataclass(frozen=True)
class FamilyInfo:
    family: str  # e.g. "shapes-vlm", "blip", "vision-encoder-decoder"
    architecture: str  # the source class, e.g. "BlipForConditionalGeneration"
    dims: ModelDims
    preprocessing: Preprocessing
    tasks: dict[str, TaskSpec] = field(default_factory=dict)
    contract: str = "cross-attention"  # or "prefix": image tokens in the language model's sequence (models.prefix)
    prompt: dict[str, Any] = field(default_factory=dict)  # prefix contract: chat template and image token


class Adapter(Protocol):
    """A family's model seen through the canonical interface (all modules in eval mode, FP32)."""

    info: FamilyInfo
    source: str  # where the model came from (name or directory)

    def vision_encoder(self) -> Any: ...  # nn.Module: pixel_values -> image_states

    def text_encoder(self) -> Any: ...  # nn.Module: question_ids, question_mask, image_states -> encoder_states

    def cross_kv(self) -> Any: ...  # nn.Module: encoder_states -> cross... (every layer's cross-attention K/V)

    def decoder(self) -> Any: ...  # nn.Module: input_ids, attention_mask, position_ids, encoder_mask, past..., cross...
    #                                 -> logits, present... (the prompt after a hidden one-slot past, and every step)

    def tokenizer_json(self) -> str: ...  # Hugging Face `tokenizers` JSON; encode() adds the question's special tokens

    def weight_files(self) -> list: ...  # the checkpoint files, hashed into the bundle's provenance

    def reference_generate(self, task: str, pixel_values, question_ids=None, question_mask=None,
                           max_new_tokens: int = 20, num_beams: int = 1, **generation) -> list[list[int]]: ...
    """The family's own PyTorch generation: generated ids (prompt excluded, EOS kept, no padding).
    `generation` takes further HF `generate` options (length_penalty, eos_token_id, ...)."""
