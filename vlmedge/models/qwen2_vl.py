"""Adapters of Hugging Face `Qwen2VLForConditionalGeneration` (Qwen2-VL 2B / 7B / 72B) and
`Qwen2_5_VLForConditionalGeneration` (Qwen2.5-VL 3B / 7B / 32B / 72B), and their fine-tunes: dynamic
resolution, a ViT with 2D rotary positions over patches (Qwen2.5-VL: most layers attending within
windows), 2x2 patch merging into a Qwen2 LM that reads M-RoPE positions (temporal, height, width).

What the tracer cannot follow is computed in numpy by the runtime and passed in
(vlmedge.runtime.processors, vlmedge.runtime.prefix):
- the image as patches (`smart_resize`, then patches flattened in merge-block order, as the processor
  does) and their grid (HF's image_grid_thw);
- the vision graph's other inputs: each patch's (row, col) for the 2D rotary embedding
  (`vision_position_ids[patches, 2]`) and its image (`vision_segment_ids[patches]`, HF's cu_seqlens as
  one id per patch; the graph lets a patch attend to its own segment only), so several images run in one
  call; Qwen2.5-VL's patches go in window order (HF's window_index) with `vision_window_ids[patches]` for
  its window layers (HF's cu_window_seqlens), and its output rows are put back in order in numpy;
- the decoder's `position_ids[3, batch, seq_len]` as `get_rope_index` writes them (text positions on
  all three rows; an image's tokens at (t, row, col) offsets after the text before it; the text after
  it from the largest of those plus one), and at every step the next position, the prompt's largest
  plus one and counting (HF's rope_deltas).

The vision graph's output is one image embedding per placeholder token, `image_embeds[image_tokens, D]`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from vlmedge.errors import ModelLoadError
from vlmedge.models.base import Preprocessing
from vlmedge.models.hf import _PIL_RESAMPLE
from vlmedge.models.prefix import HfPrefixAdapter, PrefixDecoder


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class _Vision(nn.Module):
    """The vision tower and merger over the patches of one or more images, a patch attending within its
    segment only (HF splits the sequence at cu_seqlens instead, which the tracer cannot follow)."""

    def __init__(self, model):
        super().__init__()
        self.tower = model.model.visual

    def attention(self, attn, x, cos, sin, mask):
        n = x.shape[0]
        q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # (N, heads, dh)
        c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
        q, k = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (heads, N, dh)
        scores = torch.matmul(q, k.transpose(1, 2)) * attn.scaling + mask
        out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32), v)
        return attn.proj(out.transpose(0, 1).reshape(n, -1))

    @staticmethod
    def patch_embed(embed, pixel_values):
        """HF's Conv3d over each patch, whose kernel is the patch itself: one product of the flattened
        patches (channel, frame, row, column: the processor's order) with the flattened kernel, which
        ONNX Runtime runs as one GEMM (its Conv3d took a tenth of the tower's time)."""
        w = embed.proj.weight  # (embed_dim, channels, frames, patch, patch)
        h = pixel_values.reshape(-1, w[0].numel()).to(w.dtype) @ w.reshape(w.shape[0], -1).t()
        return h if embed.proj.bias is None else h + embed.proj.bias

    @staticmethod
    def mask(segments, dtype):
        """(patches, patches) additive: 0 within a segment, the dtype's minimum across segments."""
        return torch.where(segments[:, None] == segments[None, :], 0.0, torch.finfo(dtype).min).to(dtype)

    def forward(self, pixel_values, vision_position_ids, vision_segment_ids, vision_window_ids=None):
        t = self.tower
        full = set(getattr(t, "fullatt_block_indexes", ()))  # Qwen2.5-VL: the layers that see the whole image
        h = self.patch_embed(t.patch_embed, pixel_values)  # (patches, embed_dim)
        cos, sin = t.rotary_pos_emb(h, vision_position_ids)
        image_mask = self.mask(vision_segment_ids, h.dtype)
        window_mask = None if vision_window_ids is None else self.mask(vision_window_ids, h.dtype)
        for i, blk in enumerate(t.blocks):
            mask = image_mask if window_mask is None or i in full else window_mask
            h = h + self.attention(blk.attn, blk.norm1(h), cos, sin, mask)
            h = h + blk.mlp(blk.norm2(h))
        return t.merger(h)  # (patches / merge^2, width), in the order of the patches


class MropeDecoder(PrefixDecoder):
    """The decoder with M-RoPE positions: `position_ids[3, batch, seq_len]`."""

    position_rows = 3


class Qwen2VLAdapter(HfPrefixAdapter):
    architecture = "Qwen2VLForConditionalGeneration"
    family = "qwen2-vl"

    def preprocessing(self, image_cfg: dict, proc_cfg: dict) -> Preprocessing:
        where = f"{self.source}/processor_config.json"
        vision = self.model.config.vision_config
        size = image_cfg.get("size") or {}
        lo = image_cfg.get("min_pixels") or (size.get("shortest_edge") if isinstance(size, dict) else None)
        hi = image_cfg.get("max_pixels") or (size.get("longest_edge") if isinstance(size, dict) else None)
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 < lo <= hi):
            raise ModelLoadError(f"{where}: expected min_pixels / max_pixels (size shortest_edge / longest_edge), got {size!r:.80}")
        patch = int(image_cfg.get("patch_size") or vision.patch_size)
        merge = int(image_cfg.get("merge_size") or vision.spatial_merge_size)
        temporal = int(image_cfg.get("temporal_patch_size") or vision.temporal_patch_size)
        if (patch, merge, temporal) != (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size):
            raise ModelLoadError(f"{where}: patches of {patch} px, merge {merge}, temporal {temporal}, but the vision tower "
                                 f"takes {vision.patch_size}, {vision.spatial_merge_size}, {vision.temporal_patch_size}")
        factor = patch * merge
        tokens = max(1, hi // (factor * factor))  # the most placeholder tokens one image takes
        window = getattr(vision, "window_size", 0) // merge // patch if hasattr(vision, "fullatt_block_indexes") else 0
        return Preprocessing(
            height=patch, width=patch, resample=_PIL_RESAMPLE.get(image_cfg.get("resample"), "bicubic"),
            mean=tuple(float(x) for x in image_cfg.get("image_mean", (0.48145466, 0.4578275, 0.40821073))),
            std=tuple(float(x) for x in image_cfg.get("image_std", (0.26862954, 0.26130258, 0.27577711))),
            rescale=float(image_cfg.get("rescale_factor", 1 / 255)),
            processor={"kind": "qwen2_vl", "image_tokens": tokens, "image_token": "<|image_pad|>", "patch_size": patch,
                       "merge_size": merge, "temporal_patch_size": temporal, "min_pixels": lo, "max_pixels": hi,
                       **({"window": window} if window else {})})

    @torch.no_grad()
    def probe_vision(self, prep) -> tuple[int, int]:
        """The vision graph on one image of the smallest grid (merge x merge patches): one token, its width."""
        from vlmedge.runtime.processors import ImageInput, vision_feeds

        p = prep.processor
        merge, n = p["merge_size"], p["merge_size"] ** 2
        dim = 3 * p["temporal_patch_size"] * p["patch_size"] ** 2
        feeds, _ = vision_feeds([ImageInput(np.zeros((n, dim), np.float32), "", grid=(1, merge, merge))], merge, p.get("window", 0))
        out = self.vision_encoder()(*(torch.from_numpy(v) for v in feeds.values()))
        if out.dim() != 2 or out.shape[0] != 1:
            raise ModelLoadError(f"{self.source}: the vision graph gives {list(out.shape)} for {n} patches; expected [1, width]")
        return int(p["image_tokens"]), int(out.shape[1])

    def vision_encoder(self) -> nn.Module:
        return _Vision(self.model).eval()

    def language_model(self):
        return self.model.model.language_model, self.model.lm_head

    def decoder(self) -> nn.Module:
        return MropeDecoder(*self.language_model()).eval()

    def pixel_inputs(self, inputs: list) -> dict:
        images = [img for item in inputs for img in item]
        return {"pixel_values": torch.from_numpy(np.concatenate([img.frames for img in images])),
                "image_grid_thw": torch.tensor([img.grid for img in images])}

    def reference_inputs(self, ids, mask) -> dict:
        """The processor's mm_token_type_ids: 1 at the image's placeholder tokens."""
        return {"mm_token_type_ids": (ids == int(self.model.config.image_token_id)).int()}


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    architecture = "Qwen2_5_VLForConditionalGeneration"
    family = "qwen2.5-vl"
