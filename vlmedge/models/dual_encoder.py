"""CLIP, SigLIP and SigLIP 2 (dual encoders) seen through the dual-encoder contract.

A dual encoder maps an image and a text into one embedding space; zero-shot classification and
retrieval are dot products there. The contract has two graphs, each ending where the model's own
`forward` ends before the logits: the projected, L2-normalised embedding.

    image_encoder(pixel_values[batch,3,H,W]) -> image_embeds[batch,D]
    text_encoder(input_ids[batch,text_len], attention_mask[batch,text_len]) -> text_embeds[batch,D]

and the numbers that turn similarities into logits: `logits = scale * text @ image.T + bias`, with
scale = exp(logit_scale) (CLIP, SigLIP) and bias (SigLIP; 0 for CLIP), read once here. CLIP's label
probabilities are a softmax over the labels, SigLIP's a sigmoid per label (each label on its own).

How text is fed differs and is recorded in the manifest: CLIP pads to the longest text (its
pooling reads the EOS position), SigLIP always pads to its 64 positions (its pooling reads the last
position, as it was trained), both truncating to the context length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from vlmedge.errors import ModelLoadError, first_line
from vlmedge.models.hf import _PIL_RESAMPLE, image_processor_settings, load_hf_model, settings_file, weight_files

CONTRACT = "dual-encoder"
# config.json "architectures"[0] -> (family, label activation)
ARCHITECTURES = {"CLIPModel": ("clip", "softmax"), "SiglipModel": ("siglip", "sigmoid"), "Siglip2Model": ("siglip2", "sigmoid")}
OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
STANDARD_MEAN, STANDARD_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class DualEncoderInfo:
    """What export and the runtime need to know about a dual encoder, normalised once."""

    family: str  # clip, siglip
    architecture: str  # CLIPModel, SiglipModel
    embed_dim: int  # width of image_embeds and text_embeds
    vocab_size: int
    text_len: int  # the text model's positions: the longest input_ids
    pad_to_max: bool  # True: texts are padded to text_len (SigLIP); False: to the longest in the batch (CLIP)
    pad_id: int
    activation: str  # how logits become label probabilities: softmax (over labels) or sigmoid (per label)
    logit_scale: float  # exp(logit_scale): multiplies the cosine similarity
    logit_bias: float  # added after scaling (SigLIP); 0.0 for CLIP
    preprocessing: dict[str, Any]  # height, width, resample, mean, std, rescale; shortest_edge: resize then centre crop
    template: str = "a photo of a {}."  # the default prompt for a label
    padding_side: str = "right"  # where padding goes (SigLIP 2's Gemma tokenizer pads on the left)
    contract: str = CONTRACT
    tasks: dict = field(default_factory=dict)  # (no generation tasks: what generic code may ask of an adapter)


class ImageEncoder(nn.Module):
    """pixel_values -> image_embeds: the model's image features, projected and L2-normalised."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):  # (B, 3, H, W) -> (B, D)
        e = self.model.get_image_features(pixel_values=pixel_values).pooler_output
        return e / e.pow(2).sum(-1, keepdim=True).sqrt()  # as the model's forward normalises (sqrt of the sum of squares)


class NaflexImageEncoder(nn.Module):
    """SigLIP 2 (NaFlex): patches of an image resized to its own aspect ratio, padded to a fixed count ->
    image_embeds. The position grid is resized per image inside the model, from `spatial_shapes`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, pixel_attention_mask, spatial_shapes):  # (B, N, 3*p*p), (B, N), (B, 2) -> (B, D)
        e = self.model.get_image_features(pixel_values=pixel_values, pixel_attention_mask=pixel_attention_mask,
                                          spatial_shapes=spatial_shapes).pooler_output
        return e / e.pow(2).sum(-1, keepdim=True).sqrt()


class TextEncoder(nn.Module):
    """input_ids, attention_mask -> text_embeds: the model's text features, projected and L2-normalised."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):  # (B, T), (B, T) -> (B, D)
        e = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return e / e.pow(2).sum(-1, keepdim=True).sqrt()


class DualEncoderAdapter:
    """A CLIPModel, SiglipModel or Siglip2Model directory, as the dual-encoder contract's two graphs. `prompt`
    (export's --prompt) is the default template a label is put into, e.g. "a photo of a {}."."""

    def __init__(self, source: str, prompt: str | None = None):
        import transformers

        from vlmedge.models.registry import architecture_of

        self.source = source
        arch = architecture_of(Path(source))
        if arch not in ARCHITECTURES:
            raise ModelLoadError(f"{source}: {arch} is not a dual encoder ({', '.join(ARCHITECTURES)})")
        family, activation = ARCHITECTURES[arch]
        self.family = family
        self.model = load_hf_model(getattr(transformers, arch), source)
        self._tokenizer = _load_tokenizer(source)
        cfg = self.model.config
        text_len = int(cfg.text_config.max_position_embeddings)
        pad_id = self._tokenizer.pad_token_id
        if pad_id is None:
            raise ModelLoadError(f"{source}: the tokenizer has no pad token")
        scale = float(self.model.logit_scale.detach().float().exp().reshape(-1)[0])
        bias = float(self.model.logit_bias.detach().float().reshape(-1)[0]) if hasattr(self.model, "logit_bias") else 0.0
        if not (math.isfinite(scale) and math.isfinite(bias)):
            raise ModelLoadError(f"{source}: logit scale {scale} or bias {bias} is not finite")
        with torch.no_grad():
            if family == "siglip2":
                prep = _naflex_preprocessing(source, cfg.vision_config)
            else:
                prep = _preprocessing(source, family, int(cfg.vision_config.image_size))
            from vlmedge.runtime.embedding import image_inputs

            probe = image_inputs([np.zeros((20, 30, 3), np.uint8)], prep)
            dim = self.image_encoder()(*(torch.from_numpy(v) for v in probe.values())).shape[-1]
        prompt = prompt or "a photo of a {}."
        rest = prompt.replace("{}", "")
        if prompt.count("{}") != 1 or "{" in rest or "}" in rest:
            raise ModelLoadError(f"--prompt {prompt!r}: a dual encoder's prompt is a template with {{}} where the label goes")
        self.info = DualEncoderInfo(
            family=family, architecture=arch, embed_dim=int(dim), vocab_size=int(cfg.text_config.vocab_size),
            text_len=text_len, pad_to_max=family != "clip", pad_id=int(pad_id), activation=activation,
            logit_scale=scale, logit_bias=bias, preprocessing=prep, template=prompt,
            padding_side=str(getattr(self._tokenizer, "padding_side", "right")),
        )

    def image_encoder(self) -> nn.Module:
        return (NaflexImageEncoder if self.family == "siglip2" else ImageEncoder)(self.model).eval()

    def text_encoder(self) -> nn.Module:
        return TextEncoder(self.model).eval()

    def hf_tokenizer(self):
        return self._tokenizer

    def tokenizer_json(self) -> str:
        """The tokenizer as `tokenizers` JSON, without padding or truncation (the runtime sets both from the manifest)."""
        from tokenizers import Tokenizer

        if getattr(self._tokenizer, "is_fast", False):
            tok = Tokenizer.from_str(self._tokenizer.backend_tokenizer.to_str())
        else:
            from vlmedge.models.siglip_tokenizer import convert

            tok = convert(self._tokenizer)
        tok.no_padding()
        tok.no_truncation()
        return tok.to_str()

    def weight_files(self) -> list:
        return weight_files(self.source)


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"{path}: no usable tokenizer ({first_line(e)[:200]})") from None


def _preprocessing(path: str, family: str, image_size: int) -> dict[str, Any]:
    """The image processor's settings as saved (else the family's defaults): CLIP resizes the shortest edge
    and centre-crops; SigLIP resizes straight to height x width. Both rescale by 1/255 and standardise."""
    cfg = image_processor_settings(path) or {}
    where = settings_file(path) or Path(path)
    clip = family == "clip"
    mean = tuple(float(x) for x in cfg.get("image_mean", OPENAI_CLIP_MEAN if clip else STANDARD_MEAN))
    std = tuple(float(x) for x in cfg.get("image_std", OPENAI_CLIP_STD if clip else STANDARD_STD))
    prep: dict[str, Any] = {"resample": _PIL_RESAMPLE.get(cfg.get("resample"), "bicubic"), "mean": list(mean),
                            "std": list(std), "rescale": float(cfg.get("rescale_factor", 1 / 255))}
    if cfg.get("do_rescale") is False or cfg.get("do_normalize") is False or cfg.get("do_resize") is False:
        raise ModelLoadError(f"{where}: vlmedge reads image processors that resize, rescale and normalise")
    size = cfg.get("size", {"shortest_edge": image_size} if clip else {"height": image_size, "width": image_size})
    crop = cfg.get("crop_size", {"height": image_size, "width": image_size})
    if isinstance(size, int):
        size = {"shortest_edge": size} if clip else {"height": size, "width": size}
    center = cfg.get("do_center_crop", clip)
    if isinstance(size, dict) and "shortest_edge" in size:
        if not center:
            raise ModelLoadError(f"{where}: resizing the shortest edge without a centre crop gives images of any shape")
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        prep.update(height=int(crop["height"]), width=int(crop["width"]), shortest_edge=int(size["shortest_edge"]))
    elif isinstance(size, dict) and "height" in size and "width" in size and not center:
        prep.update(height=int(size["height"]), width=int(size["width"]))
    else:
        raise ModelLoadError(f"{where}: image size {size!r:.60} with do_center_crop {center} is not a layout vlmedge reads")
    if (prep["height"], prep["width"]) != (image_size, image_size):
        raise ModelLoadError(f"{where}: images of {prep['height']}x{prep['width']} differ from the model's {image_size}x{image_size}")
    return prep


def _naflex_preprocessing(path: str, vision_cfg) -> dict[str, Any]:
    """SigLIP 2's image processor (NaFlex): resize keeping the aspect ratio to at most `max_num_patches`
    patches of `patch_size`, rescale, standardise, cut into patches, pad to `max_num_patches`."""
    cfg = image_processor_settings(path) or {}
    where = settings_file(path) or Path(path)
    patch = int(cfg.get("patch_size", vision_cfg.patch_size))
    if patch != int(vision_cfg.patch_size):
        raise ModelLoadError(f"{where}: patch_size {patch} differs from the model's {vision_cfg.patch_size}")
    if cfg.get("do_rescale") is False or cfg.get("do_normalize") is False:
        raise ModelLoadError(f"{where}: vlmedge reads image processors that rescale and normalise")
    return {"resample": _PIL_RESAMPLE.get(cfg.get("resample"), "bilinear"),
            "mean": [float(x) for x in cfg.get("image_mean", STANDARD_MEAN)], "std": [float(x) for x in cfg.get("image_std", STANDARD_STD)],
            "rescale": float(cfg.get("rescale_factor", 1 / 255)), "patch_size": patch,
            "max_num_patches": int(cfg.get("max_num_patches", 256))}
