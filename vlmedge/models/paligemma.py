"""Adapter of Hugging Face `PaliGemmaForConditionalGeneration` (PaliGemma, PaliGemma 2 and their
fine-tunes): a SigLIP tower without its head (every patch a token), a linear projector to the language
model's width, and a Gemma (PaliGemma) or Gemma 2 (PaliGemma 2) language model.

PaliGemma is a prefix-LM: the image tokens and the text prefix attend to each other both ways, the
generated suffix causally. Its decoder graph takes `block_ids` (vlmedge.models.prefix): the runtime
writes 0 for every prompt token (one block) and -1 for each generated one. Positions count from 1; the
graph adds the 1.

There is no chat template: the processor writes `<image>` once per image token, BOS, the text as given
and a newline (`PaliGemmaProcessor`), and the tokenizer adds nothing. The bundle carries that rule as a
template vlmedge writes (PROMPT_TEMPLATE), so `vqa(image, "answer en what is it ?")` is the processor's
`processor(images=image, text="answer en what is it ?")`, and `caption()` is "caption en" by default.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from vlmedge.errors import ModelLoadError
from vlmedge.models.base import Preprocessing
from vlmedge.models.hf import _PIL_RESAMPLE
from vlmedge.models.prefix import BlockPrefixDecoder, HfPrefixAdapter

# PaliGemmaProcessor's prompt as a template: one user turn, its images' placeholders, BOS, its text, "\n"
PROMPT_TEMPLATE = (
    "{% if messages | length != 1 or messages[0]['role'] != 'user' %}"
    "{{ raise_exception('PaliGemma takes one prompt (a single user turn), not a conversation') }}{% endif %}"
    "{% for part in messages[0]['content'] %}{% if part['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "{{ bos_token }}{% for part in messages[0]['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{{ '\n' }}"
)


class _Vision(nn.Module):
    """SigLIP tower (last hidden state) -> linear projector: image embeddings in the LM's width."""

    def __init__(self, model):
        super().__init__()
        self.tower, self.projector = model.model.vision_tower, model.model.multi_modal_projector

    def forward(self, pixel_values):
        return self.projector(self.tower(pixel_values).last_hidden_state)


def fixed_preprocessing(image_cfg: dict, height: int, width: int, processor: dict, resample: str = "bicubic") -> Preprocessing:
    """SigLIP's processor: resize to height x width (aspect not kept), rescale, normalise (defaults: `resample`
    where the saved settings are silent, SigLIP's bicubic; mean and std 0.5)."""
    return Preprocessing(
        height=height, width=width, resample=_PIL_RESAMPLE.get(image_cfg.get("resample"), resample),
        mean=tuple(float(x) for x in image_cfg.get("image_mean", (0.5, 0.5, 0.5))),
        std=tuple(float(x) for x in image_cfg.get("image_std", (0.5, 0.5, 0.5))),
        rescale=float(image_cfg.get("rescale_factor", 1 / 255)), processor={"kind": "fixed", **processor},
    )


class PaliGemmaAdapter(HfPrefixAdapter):
    architecture = "PaliGemmaForConditionalGeneration"
    family = "paligemma"
    caption_instruction = "caption en"

    def prompt_template(self) -> str:
        return PROMPT_TEMPLATE

    def prompt_rules(self) -> dict:
        return {"blocks": "prefix", "add_special_tokens": False}

    def preprocessing(self, image_cfg: dict, proc_cfg: dict) -> Preprocessing:
        where = f"{self.source}/processor_config.json"
        size = image_cfg.get("size") or {}
        if not (isinstance(size, dict) and isinstance(size.get("height"), int) and isinstance(size.get("width"), int)):
            raise ModelLoadError(f"{where}: PaliGemma's image processor resizes to {{height, width}}; got size {size!r:.60}")
        vision = self.model.config.vision_config
        if (size["height"], size["width"]) != (vision.image_size, vision.image_size):
            raise ModelLoadError(f"{where}: images of {size['height']}x{size['width']} px, but the vision tower takes "
                                 f"{vision.image_size} px")
        tokens = image_cfg.get("image_seq_length") or proc_cfg.get("image_seq_length") or (vision.image_size // vision.patch_size) ** 2
        return fixed_preprocessing(image_cfg, size["height"], size["width"], {"image_tokens": int(tokens), "image_token": "<image>"})

    def vision_encoder(self) -> nn.Module:
        return _Vision(self.model).eval()

    def language_model(self):
        return self.model.model.language_model, self.model.lm_head

    def decoder(self) -> nn.Module:
        text = self.model.config.get_text_config()
        return BlockPrefixDecoder(*self.language_model(), window_over_blocks=False, position_offset=1,
                                  softcap=getattr(text, "final_logit_softcapping", None)).eval()

    def pixel_inputs(self, inputs: list) -> dict:
        return {"pixel_values": torch.from_numpy(np.concatenate([img.frames for item in inputs for img in item]))}

    def reference_inputs(self, ids, mask) -> dict:
        """HF `generate`'s extra inputs for prompt ids: the processor's token_type_ids (0: the prompt)."""
        return {"token_type_ids": torch.zeros_like(ids)}
