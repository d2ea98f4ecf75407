"""ViLT and BridgeTower (fusion encoders) seen through the fusion contract.

A fusion encoder reads an image and a text together and ends in a head: ViLT runs one transformer
over patches and words; BridgeTower runs a text stream (RoBERTa) and an image stream (CLIP ViT) joined
by co-attention layers over their top layers. The contract is one graph from pixels and text to the
head's output, exactly the model's `logits`:

    fusion(pixel_values[batch,3,height,width], pixel_mask[batch,height,width] (ViLT only),
           input_ids[batch,text_len], attention_mask[batch,text_len]) -> logits

What the logits mean is the head's, recorded in the manifest's `tasks`:
- `vqa` (ViltForQuestionAnswering): logits[batch, answers]; an answer's score is its sigmoid, as Hugging
  Face's VQA pipeline gives it; the answer vocabulary (`id2label`) is in the manifest.
- `match`, score `logit` (ViltForImageAndTextRetrieval: logits[batch,1], index 0;
  BridgeTowerForImageAndTextRetrieval: logits[batch,2], index 1): the logit HF's model cards read as the
  image-text matching score.
- `match`, score `contrastive` (BridgeTowerForContrastiveLearning): logits[batch,3,embed] are the
  normalised text, image and cross-modal embeddings; the score is exp(logit_scale) * text . image, the
  diagonal of the model's text-to-image logits.

ViLT's patch embedding (`ViltEmbeddings.visual_embed`) gathers the valid patches of each image with
data-dependent sizes and fills the rest with randomly sampled padding patches (`torch.multinomial`);
neither traces. Padding patches are masked out of attention, so which ones fill the sequence never
changes an output: `vilt_visual_embed` below keeps every patch of the padded grid, masked, and computes
each image's interpolated position grid as two small interpolation matrices, which traces with the image
height and width dynamic. A checkpoint with a positive `max_image_length` (sampling a subset of valid
patches, at random) is refused: no graph can equal it.

ViLT's token type ids are all zero for one question and are made inside the graph; BridgeTower's text
embedding does not read them, nor its pixel mask (its images are centre-cropped to one size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from vlmedge.errors import ModelLoadError
from vlmedge.models.dual_encoder import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, STANDARD_MEAN, STANDARD_STD, _load_tokenizer
from vlmedge.models.hf import _PIL_RESAMPLE, image_processor_settings, load_hf_model, settings_file, weight_files

CONTRACT = "fusion"
# config.json "architectures"[0] -> (family, task, score)
ARCHITECTURES = {
    "ViltForQuestionAnswering": ("vilt", "vqa", "sigmoid"),
    "ViltForImageAndTextRetrieval": ("vilt", "match", "logit"),
    "BridgeTowerForImageAndTextRetrieval": ("bridgetower", "match", "logit"),
    "BridgeTowerForContrastiveLearning": ("bridgetower", "match", "contrastive"),
}
LONGER_OVER_SHORTER = 1333 / 800  # both processors cap the longer edge at this multiple of the shorter (COCO's 800 x 1333)


@dataclass(frozen=True)
class FusionInfo:
    """What export and the runtime need to know about a fusion encoder, normalised once."""

    family: str  # vilt, bridgetower
    architecture: str
    task: str  # vqa or match
    head: dict[str, Any]  # the manifest's tasks[task]: labels (vqa); score, index, logit_scale (match)
    vocab_size: int
    text_len: int  # the longest input_ids (special tokens included)
    pad_id: int
    patch_size: int
    logits_shape: tuple[int, ...]  # the logits' shape after the batch axis
    preprocessing: dict[str, Any]  # resample, mean, std, rescale, shortest_edge, longest_edge, size_divisor[, crop_height, crop_width]
    pixel_mask: bool  # whether the graph reads a pixel mask (ViLT: images of a batch padded to the largest)
    contract: str = CONTRACT
    tasks: dict = field(default_factory=dict)  # (no generation tasks: what generic code may ask of an adapter)


def _interpolation_weights(n: torch.Tensor, size: int, grid: int) -> torch.Tensor:
    """(B,) valid lengths -> (B, size, grid): row i < n of each is the bilinear (align_corners=True) weights
    that `F.interpolate(..., size=n)` gives output i over the `grid` source positions; rows >= n are zero
    (the padding HF adds after interpolating)."""
    i = torch.arange(size, device=n.device, dtype=torch.float32)[None]  # (1, size)
    nf = n.to(torch.float32)[:, None]  # (B, 1)
    scale = torch.where(nf > 1, (grid - 1) / (nf - 1).clamp(min=1), torch.zeros_like(nf))
    src = i * scale  # (B, size)
    i0 = src.floor().clamp(max=grid - 1)
    i1 = (i0 + 1).clamp(max=grid - 1)
    lam = (src - i0).clamp(0, 1)
    positions = torch.arange(grid, device=n.device, dtype=torch.float32)
    w = (1 - lam)[..., None] * (i0[..., None] == positions).float() + lam[..., None] * (i1[..., None] == positions).float()
    return w * (i < nf).float()[..., None]


def vilt_visual_embed(emb: nn.Module, config, pixel_values: torch.Tensor, pixel_mask: torch.Tensor):
    """ViltEmbeddings.visual_embed without its sampling (module docstring): every patch of the padded grid,
    masked, each image's position grid interpolated to its own valid rows and columns.
    -> image embeddings (B, 1 + h*w, D) with the class token first, and their mask (B, 1 + h*w)."""
    p = int(config.patch_size)
    x = emb.patch_embeddings(pixel_values)  # (B, D, h, w)
    B, D, h, w = x.shape
    # HF interpolates the pixel mask to the patch grid (nearest); with sides that are multiples of the patch
    # (the processor's), that is the mask at each patch's top-left pixel
    mask = pixel_mask[:, ::p, ::p].long()  # (B, h, w)
    rows, cols = mask[:, :, 0].sum(1), mask[:, 0, :].sum(1)  # (B,) valid patch rows, columns
    g = int(config.image_size) // p
    grid = emb.position_embeddings[0, 1:, :].transpose(0, 1).reshape(D, g, g)  # (D, g, g)
    wr, wc = _interpolation_weights(rows, h, g), _interpolation_weights(cols, w, g)  # (B, h, g), (B, w, g)
    pos = torch.einsum("bip,dpq,bjq->bijd", wr, grid, wc).reshape(B, h * w, D)
    x = x.flatten(2).transpose(1, 2) + pos  # (B, h*w, D)
    cls = emb.cls_token.expand(B, -1, -1) + emb.position_embeddings[:, :1, :]
    x = torch.cat([cls, x], dim=1)
    mask = torch.cat([torch.ones(B, 1, dtype=torch.long, device=mask.device), mask.flatten(1)], dim=1)
    return x, mask


class ViltFusion(nn.Module):
    """pixel_values, pixel_mask, input_ids, attention_mask -> the head's logits (ViltFor*)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, pixel_mask, input_ids, attention_mask):  # (B,3,H,W), (B,H,W), (B,T), (B,T)
        image_embeds, image_mask = vilt_visual_embed(self.model.vilt.embeddings, self.model.config, pixel_values, pixel_mask)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids),
                          image_embeds=image_embeds, pixel_mask=image_mask).logits


class BridgeTowerFusion(nn.Module):
    """pixel_values, input_ids, attention_mask -> the head's logits (BridgeTowerFor*)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, input_ids, attention_mask):  # (B,3,S,S), (B,T), (B,T)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits


class FusionAdapter:
    """A ViltForQuestionAnswering, ViltForImageAndTextRetrieval, BridgeTowerForImageAndTextRetrieval or
    BridgeTowerForContrastiveLearning directory, as the fusion contract's one graph."""

    def __init__(self, source: str, prompt: str | None = None):
        import transformers

        from vlmedge.models.registry import architecture_of

        self.source = source
        arch = architecture_of(Path(source))
        if arch not in ARCHITECTURES:
            raise ModelLoadError(f"{source}: {arch} is not a fusion encoder ({', '.join(ARCHITECTURES)})")
        if prompt:
            raise ModelLoadError(f"{source}: a fusion encoder takes no prompt (--prompt)")
        family, task, score = ARCHITECTURES[arch]
        self.family = family
        self.model = load_hf_model(getattr(transformers, arch), source)
        self._tokenizer = _load_tokenizer(source)
        cfg = self.model.config
        pad_id = self._tokenizer.pad_token_id
        if pad_id is None:
            raise ModelLoadError(f"{source}: the tokenizer has no pad token")
        text_cfg = cfg if family == "vilt" else cfg.text_config
        positions = int(text_cfg.max_position_embeddings)
        if family == "bridgetower":  # RoBERTa's positions start after the padding index
            positions -= int(text_cfg.pad_token_id) + 1
        limit = getattr(self._tokenizer, "model_max_length", None)
        text_len = min(positions, int(limit)) if isinstance(limit, int) and limit > 1 else positions
        vision = cfg if family == "vilt" else cfg.vision_config
        patch = int(vision.patch_size)
        if family == "vilt" and int(getattr(cfg, "max_image_length", -1) or -1) > 0:
            raise ModelLoadError(f"{source}: max_image_length {cfg.max_image_length} samples image patches at random; "
                                 "vlmedge exports ViLT with every patch kept (max_image_length -1, as the fine-tuned checkpoints)")
        prep = _preprocessing(source, family, patch, int(vision.image_size))
        if task == "vqa":
            labels = [str(cfg.id2label[i]) for i in range(int(cfg.num_labels))]
            head: dict[str, Any] = {"activation": "sigmoid", "labels": labels}
            shape: tuple[int, ...] = (len(labels),)
        elif score == "logit":
            n = 1 if family == "vilt" else 2
            head, shape = {"score": "logit", "index": n - 1}, (n,)
        else:
            scale = float(self.model.logit_scale.detach().float().exp())
            if not math.isfinite(scale):
                raise ModelLoadError(f"{source}: logit scale {scale} is not finite")
            head, shape = {"score": "contrastive", "logit_scale": scale}, (3, int(cfg.contrastive_hidden_size))
        self.info = FusionInfo(
            family=family, architecture=arch, task=task, head=head, vocab_size=int(text_cfg.vocab_size), text_len=text_len,
            pad_id=int(pad_id), patch_size=patch, logits_shape=shape, preprocessing=prep, pixel_mask=family == "vilt",
        )

    def fusion(self) -> nn.Module:
        return (ViltFusion if self.family == "vilt" else BridgeTowerFusion)(self.model).eval()

    def hf_tokenizer(self):
        return self._tokenizer

    def tokenizer_json(self) -> str:
        """The tokenizer as `tokenizers` JSON, without padding or truncation (the runtime sets both from the manifest)."""
        from tokenizers import Tokenizer

        if not getattr(self._tokenizer, "is_fast", False):
            raise ModelLoadError(f"{self.source}: the tokenizer has no fast (tokenizers) form")
        tok = Tokenizer.from_str(self._tokenizer.backend_tokenizer.to_str())
        tok.no_padding()
        tok.no_truncation()
        return tok.to_str()

    def weight_files(self) -> list:
        return weight_files(self.source)


def _preprocessing(path: str, family: str, patch: int, image_size: int) -> dict[str, Any]:
    """The image processor's settings as saved (else the family's defaults). Both resize the shorter edge to
    `shortest_edge`, capping the longer at 1333/800 of it, both rounded down to `size_divisor`; ViLT pads a
    batch to its largest image with a pixel mask, BridgeTower centre-crops to one square size."""
    cfg = image_processor_settings(path) or {}
    where = settings_file(path) or Path(path)
    vilt = family == "vilt"
    if cfg.get("do_rescale") is False or cfg.get("do_normalize") is False or cfg.get("do_resize") is False:
        raise ModelLoadError(f"{where}: vlmedge reads image processors that resize, rescale and normalise")
    size = cfg.get("size", {"shortest_edge": 384 if vilt else 288})
    if isinstance(size, int):
        size = {"shortest_edge": size}
    if not isinstance(size, dict) or "shortest_edge" not in size:
        raise ModelLoadError(f"{where}: image size {size!r:.60} is not a layout vlmedge reads (shortest_edge)")
    short = int(size["shortest_edge"])
    divisor = int(cfg.get("size_divisor", 32))
    prep: dict[str, Any] = {
        "resample": _PIL_RESAMPLE.get(cfg.get("resample"), "bicubic"),
        "mean": [float(x) for x in cfg.get("image_mean", STANDARD_MEAN if vilt else OPENAI_CLIP_MEAN)],
        "std": [float(x) for x in cfg.get("image_std", STANDARD_STD if vilt else OPENAI_CLIP_STD)],
        "rescale": float(cfg.get("rescale_factor", 1 / 255)),
        "shortest_edge": short, "longest_edge": int(LONGER_OVER_SHORTER * short), "size_divisor": divisor,
    }
    if vilt:
        if cfg.get("do_pad") is False:
            raise ModelLoadError(f"{where}: ViLT without padding (do_pad false) gives a batch of unequal images")
        if divisor % patch:
            raise ModelLoadError(f"{where}: size_divisor {divisor} is not a multiple of the model's {patch} px patches")
        return prep
    crop = cfg.get("crop_size", {"shortest_edge": short})
    if cfg.get("do_center_crop") is False or not isinstance(crop, dict):
        raise ModelLoadError(f"{where}: BridgeTower without its centre crop gives images of any size")
    side = int(crop.get("shortest_edge") or crop.get("height") or 0)
    if (side, side) != (int(crop.get("height", side)), int(crop.get("width", side))) or side != image_size:
        raise ModelLoadError(f"{where}: crop size {crop!r:.60} differs from the model's {image_size}x{image_size} images")
    prep.update(crop_height=side, crop_width=side)
    return prep
