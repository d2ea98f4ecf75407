"""Adapter of Hugging Face `LlavaOnevisionForConditionalGeneration` (LLaVA-OneVision, e.g.
llava-onevision-qwen2-0.5b-ov): a SigLIP tower over a base image and the tiles of an "anyres" grid,
an MLP projector, a Qwen2 LM.

The vision graph is the tower (at `vision_feature_layer`) and the projector, per frame; it also
outputs the model's `image_newline` embedding. What the model does next with an image's frames
(reassemble the grid, remove the padding, downsample past `anyres_max_N` tiles, a newline after each
row, the base image first) depends on the image's size, so the runtime does it in numpy
(vlmedge.runtime.processors.pack), where it can be read and tested.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from vlmedge.errors import ModelLoadError
from vlmedge.models.base import Preprocessing
from vlmedge.models.llava import _Vision as _LlavaVision
from vlmedge.models.llava import clip_preprocessing
from vlmedge.models.prefix import HfPrefixAdapter


class _Vision(nn.Module):
    def __init__(self, model, layer, strategy: str):
        super().__init__()
        self.features = _LlavaVision(model, layer, strategy)
        self.newline = model.model.image_newline

    def forward(self, pixel_values):
        return self.features(pixel_values), self.newline * 1.0  # a graph output, not an initializer


class LlavaOnevisionAdapter(HfPrefixAdapter):
    architecture = "LlavaOnevisionForConditionalGeneration"
    family = "llava-onevision"

    def preprocessing(self, image_cfg: dict, proc_cfg: dict) -> Preprocessing:
        where = f"{self.source}/processor_config.json"
        cfg = self.model.config
        size = image_cfg.get("size") or {}
        if not (isinstance(size, dict) and size.get("height") and size.get("height") == size.get("width")):
            raise ModelLoadError(f"{where}: expected a square size {{height, width}} for the anyres tiles, got {size!r:.60}")
        tile = int(size["height"])
        if tile != cfg.vision_config.image_size:
            raise ModelLoadError(f"{where}: tiles of {tile} px, but the vision tower takes {cfg.vision_config.image_size} px")
        strategy = proc_cfg.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy
        if strategy != "full":
            raise ModelLoadError(f"{where}: vision_feature_select_strategy {strategy!r}; vlmedge supports LLaVA-OneVision's "
                                 "'full' (SigLIP has no CLS token)")
        ratio = proc_cfg.get("vision_aspect_ratio") or cfg.vision_aspect_ratio
        if not (isinstance(ratio, str) and ratio.startswith("anyres_max_") and ratio[11:].isdigit()):
            raise ModelLoadError(f"{where}: vision_aspect_ratio {ratio!r} is not anyres_max_N")
        pinpoints = image_cfg.get("image_grid_pinpoints") or cfg.image_grid_pinpoints
        if [list(map(int, p)) for p in pinpoints] != [list(map(int, p)) for p in cfg.image_grid_pinpoints]:
            raise ModelLoadError(f"{where}: image_grid_pinpoints differ from the model's config.json")
        tokens = int(proc_cfg.get("num_image_tokens") or (tile // cfg.vision_config.patch_size) ** 2)
        return clip_preprocessing(image_cfg, tile, tile, {
            "kind": "anyres", "image_tokens": tokens, "image_token": proc_cfg.get("image_token", "<image>"),
            "grid_pinpoints": [[int(h), int(w)] for h, w in pinpoints], "max_tiles": int(ratio[11:])})

    def vision_encoder(self) -> nn.Module:
        cfg = self.model.config
        return _Vision(self.model, cfg.vision_feature_layer, cfg.vision_feature_select_strategy).eval()

    def language_model(self):
        return self.model.model.language_model, self.model.lm_head

    def pixel_inputs(self, inputs: list) -> dict:
        images = [img for item in inputs for img in item]
        n = max(len(img.frames) for img in images)
        _, c, h, w = images[0].frames.shape
        px = np.zeros((len(images), n, c, h, w), np.float32)
        for i, img in enumerate(images):
            px[i, : len(img.frames)] = img.frames
        return {"pixel_values": torch.from_numpy(px), "image_sizes": torch.tensor([img.size for img in images]),
                "batch_num_images": torch.tensor([len(item) for item in inputs])}
