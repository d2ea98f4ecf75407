"""Adapter of Hugging Face `LlavaForConditionalGeneration` (LLaVA 1.5 and its fine-tunes): a CLIP
(or SigLIP) vision tower, a hidden layer of it chosen by `vision_feature_layer` (CLS dropped under
the "default" strategy), an MLP projector to the language model's width, and a Llama-style LM.

The image processor is CLIP's (shortest edge, centre crop); the processor writes one `<image>`
placeholder per image token, (crop / patch)^2 of them (+ CLS under "full").
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from vlmedge.errors import ModelLoadError
from vlmedge.models.base import Preprocessing
from vlmedge.models.hf import _PIL_RESAMPLE
from vlmedge.models.prefix import HfPrefixAdapter


class _Vision(nn.Module):
    """vision tower -> the chosen hidden layer(s) -> projector: image embeddings in the LM's width."""

    def __init__(self, model, layer, strategy: str):
        super().__init__()
        self.tower, self.projector = model.model.vision_tower, model.model.multi_modal_projector
        self.layers = [layer] if isinstance(layer, int) else list(layer)
        self.drop_cls = strategy == "default"

    def forward(self, pixel_values):
        hidden = self.tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
        chosen = [hidden[i][:, 1:] if self.drop_cls else hidden[i] for i in self.layers]
        return self.projector(chosen[0] if len(chosen) == 1 else torch.cat(chosen, -1))


def _hw(value, where: str) -> tuple[int, int]:
    if isinstance(value, dict) and "height" in value and "width" in value:
        return int(value["height"]), int(value["width"])
    if isinstance(value, dict) and "shortest_edge" in value:
        return int(value["shortest_edge"]), int(value["shortest_edge"])
    if isinstance(value, int):
        return value, value
    raise ModelLoadError(f"{where}: crop_size {value!r:.60} is not a size vlmedge reads")


def clip_preprocessing(image_cfg: dict, height: int, width: int, processor: dict) -> Preprocessing:
    """Preprocessing with CLIP's defaults (bicubic, OpenAI CLIP mean and std) where the saved settings are silent."""
    return Preprocessing(
        height=height, width=width, resample=_PIL_RESAMPLE.get(image_cfg.get("resample"), "bicubic"),
        mean=tuple(float(x) for x in image_cfg.get("image_mean", (0.48145466, 0.4578275, 0.40821073))),
        std=tuple(float(x) for x in image_cfg.get("image_std", (0.26862954, 0.26130258, 0.27577711))),
        rescale=float(image_cfg.get("rescale_factor", 1 / 255)), processor=processor,
    )


class LlavaAdapter(HfPrefixAdapter):
    architecture = "LlavaForConditionalGeneration"
    family = "llava"

    def preprocessing(self, image_cfg: dict, proc_cfg: dict) -> Preprocessing:
        where = f"{self.source}/processor_config.json"
        size = image_cfg.get("size") or {}
        short = size.get("shortest_edge") if isinstance(size, dict) else size
        if not isinstance(short, int) or image_cfg.get("do_center_crop") is False:
            raise ModelLoadError(f"{where}: LLaVA's image processor resizes the shortest edge and centre-crops; "
                                 f"this one has size {size!r:.60} and do_center_crop {image_cfg.get('do_center_crop')}")
        h, w = _hw(image_cfg.get("crop_size") or short, where)
        cfg = self.model.config
        strategy = proc_cfg.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy
        patch = proc_cfg.get("patch_size") or cfg.vision_config.patch_size
        extra = proc_cfg.get("num_additional_image_tokens", 1)
        tokens = (h // patch) * (w // patch) + extra - (1 if strategy == "default" else 0)
        return clip_preprocessing(image_cfg, h, w, {"kind": "clip", "shortest_edge": int(short), "image_tokens": int(tokens),
                                                    "image_token": proc_cfg.get("image_token", "<image>")})

    def vision_encoder(self) -> nn.Module:
        cfg = self.model.config
        return _Vision(self.model, cfg.vision_feature_layer, cfg.vision_feature_select_strategy).eval()

    def language_model(self):
        return self.model.model.language_model, self.model.lm_head

    def pixel_inputs(self, inputs: list) -> dict:
        return {"pixel_values": torch.from_numpy(np.concatenate([img.frames for item in inputs for img in item]))}
