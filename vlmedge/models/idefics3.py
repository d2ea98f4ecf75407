"""Adapter of Hugging Face `Idefics3ForConditionalGeneration` and `SmolVLMForConditionalGeneration`
(SmolVLM, SmolVLM2): a SigLIP vision tower over square tiles, the connector (pixel shuffle by
`scale_factor`, then a linear projection) and a Llama-style LM.

The processor splits an image into tiles of the tower's size plus a global image (see
vlmedge.runtime.processors) and writes each tile's tokens between markers; every tile is a full
square, so the tower never sees padding and its patch mask is all ones.
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
    """Tower + connector over full tiles. HF's embeddings bucketize each frame's patch grid under its
    mask; for a full tile that gives the same positions for every frame, computed here once by the
    model's own embedding code and kept as a constant (the tracer turns the bucketize into a gather
    that fails past the traced batch)."""

    def __init__(self, model):
        super().__init__()
        self.tower, self.connector = model.model.vision_model, model.model.connector
        emb = self.tower.embeddings
        side = emb.num_patches_per_side
        size = side * emb.patch_size
        with torch.no_grad():  # the model's positions for a full tile: feed zeros, subtract the patch embedding of zeros
            full = torch.ones(1, side, side, dtype=torch.bool)
            zeros = torch.zeros(1, 3, size, size)
            pos = emb(zeros, full) - emb.patch_embedding(zeros).flatten(2).transpose(1, 2)
        self.register_buffer("positions", pos, persistent=False)

    def forward(self, pixel_values):
        emb = self.tower.embeddings
        h = emb.patch_embedding(pixel_values).flatten(2).transpose(1, 2) + self.positions
        h = self.tower.post_layernorm(self.tower.encoder(inputs_embeds=h).last_hidden_state)
        return self.connector(h)


class Idefics3Adapter(HfPrefixAdapter):
    architecture = "Idefics3ForConditionalGeneration"
    family = "idefics3"

    def preprocessing(self, image_cfg: dict, proc_cfg: dict) -> Preprocessing:
        where = f"{self.source}/processor_config.json"
        size, tile = image_cfg.get("size") or {}, image_cfg.get("max_image_size") or {}
        if not isinstance(size, dict) or "longest_edge" not in size or not isinstance(tile, dict) or "longest_edge" not in tile:
            raise ModelLoadError(f"{where}: expected size and max_image_size with longest_edge, as the "
                                 f"{self.architecture} processor saves them; got size {size!r:.40}, max_image_size {tile!r:.40}")
        vision = self.model.config.vision_config
        if int(tile["longest_edge"]) != int(vision.image_size):
            raise ModelLoadError(f"{where}: tiles of {tile['longest_edge']} px, but the vision tower takes "
                                 f"{vision.image_size} px images")
        t = int(tile["longest_edge"])
        tokens = int(proc_cfg.get("image_seq_len") or ((t // vision.patch_size) ** 2) // self.model.config.scale_factor ** 2)
        return Preprocessing(
            height=t, width=t, resample=_PIL_RESAMPLE.get(image_cfg.get("resample"), "lanczos"),
            mean=tuple(float(x) for x in image_cfg.get("image_mean", (0.5, 0.5, 0.5))),
            std=tuple(float(x) for x in image_cfg.get("image_std", (0.5, 0.5, 0.5))),
            rescale=float(image_cfg.get("rescale_factor", 1 / 255)),
            processor={"kind": "idefics3", "tile": t, "longest_edge": int(size["longest_edge"]),
                       "split": bool(image_cfg.get("do_image_splitting", True)), "image_tokens": tokens,
                       "image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                       "global_image_token": "<global-img>"},
        )

    def vision_encoder(self) -> nn.Module:
        return _Vision(self.model).eval()

    def language_model(self):
        return self.model.model.text_model, self.model.lm_head

    def pixel_inputs(self, inputs: list) -> dict:
        frames = [torch.from_numpy(np.concatenate([img.frames for img in item])) for item in inputs]
        n = max(f.shape[0] for f in frames)
        _, c, h, w = frames[0].shape
        px = torch.zeros(len(frames), n, c, h, w)
        mask = torch.zeros(len(frames), n, h, w, dtype=torch.long)
        for i, f in enumerate(frames):
            px[i, : f.shape[0]] = f
            mask[i, : f.shape[0]] = 1
        return {"pixel_values": px, "pixel_attention_mask": mask}


class SmolVLMAdapter(Idefics3Adapter):
    architecture = "SmolVLMForConditionalGeneration"
    family = "smolvlm"
