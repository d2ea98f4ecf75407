"""Adapter of Hugging Face `VisionEncoderDecoderModel`: any transformers vision encoder with a
[batch, tokens, width] output (ViT, DeiT, BEiT, Swin, DonutSwin) and a causal decoder with
cross-attention (GPT-2, BERT/RoBERTa, TrOCR, BART/MBart `ForCausalLM`): ViT-GPT2 captioners, TrOCR,
Donut, Nougat. Captioning only.

The vision graph includes `enc_to_dec_proj` when the model's own forward applies it (widths differ
and the decoder has no `cross_attention_hidden_size`), so the decoder graphs see the states its
cross-attention was trained on. Encoder length and width, decoder layers, heads and head size are
measured by running the modules, never derived from config fields. Donut's and Nougat's processors
fit the image into the model's size and pad it (resize_mode fit_pad), as their Pillow backends do.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn

from vlmedge.errors import ModelLoadError
from vlmedge.models.base import FamilyInfo, ModelDims, Preprocessing, TaskSpec
from vlmedge.models.generation import generation_defaults
from vlmedge.models.hf import (
    HfCrossKV, HfDecoder, HfDecoderInit, decoder_dims, image_processor_settings, image_size, load_hf_model, preprocessing,
    processor_type, settings_file, strip_prompt, tokenizer_json, vision_dims, weight_files,
)


def fit_pad(source: str, prep: Preprocessing) -> Preprocessing:
    """Donut's and Nougat's processors keep the aspect ratio and pad (runtime.preprocess.fit_pad): `prep` with
    the settings their Pillow backends read. Settings that would not give the model's size are refused."""
    cfg = image_processor_settings(source) or {}
    kind = processor_type(cfg)
    nougat = kind.startswith("Nougat")
    if not (nougat or kind.startswith("Donut")):
        return prep
    where = settings_file(source)
    off = [k for k in ("do_resize", "do_thumbnail", "do_pad") if not cfg.get(k, True)]
    if off or cfg.get("do_center_crop"):
        why = f"{', '.join(off)} false" if off else "do_center_crop true"
        raise ModelLoadError(f"{where}: {kind} with {why} does not give the model's {prep.height}x{prep.width} input; "
                             "vlmedge reads it with do_resize, do_thumbnail and do_pad true and no centre crop")
    return replace(
        prep, resize_mode="fit_pad", align_long_axis=bool(cfg.get("do_align_long_axis", False)),
        crop_margin=bool(cfg.get("do_crop_margin", True)) if nougat else None,
        # Nougat shrinks with bicubic and reducing_gap 2; Donut with its own filter, bicubic where that is 0 (nearest)
        thumbnail_resample="bicubic" if nougat or cfg.get("resample") == 0 else None,
        thumbnail_reducing_gap=2.0 if nougat else None,
    )


class _Vision(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.encoder = model.encoder
        projects = (model.encoder.config.hidden_size != model.decoder.config.hidden_size
                    and getattr(model.decoder.config, "cross_attention_hidden_size", None) is None)
        self.proj = model.enc_to_dec_proj if projects else None

    def forward(self, pixel_values):
        h = self.encoder(pixel_values=pixel_values).last_hidden_state
        return h if self.proj is None else self.proj(h)


class VisionEncoderDecoderAdapter:
    architecture = "VisionEncoderDecoderModel"

    def __init__(self, source: str, prompt: str | None = None):
        from transformers import VisionEncoderDecoderModel

        if prompt:
            raise ModelLoadError(f"{source}: prompts are not supported for VisionEncoderDecoderModel")
        self.source = source
        self.model = load_hf_model(VisionEncoderDecoderModel, source)
        self._tokenizer_json = tokenizer_json(source)
        cfg, gen = self.model.config, self.model.generation_config
        ec, dc = cfg.encoder, cfg.decoder
        start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else gen.decoder_start_token_id
        eos = gen.eos_token_id if gen.eos_token_id is not None else cfg.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else gen.pad_token_id
        missing = [n for n, v in (("decoder_start_token_id", start), ("eos_token_id", eos), ("pad_token_id", pad)) if v is None]
        if missing:
            raise ModelLoadError(f"{source}/config.json: needs {', '.join(missing)} to generate")
        if getattr(ec, "image_size", None) is None:
            raise ModelLoadError(f"{source}/config.json: encoder {ec.model_type} has no image_size")
        self.start_id, self.eos_id, self.pad_id = int(start), int(eos), int(pad)
        max_pos = getattr(dc, "max_position_embeddings", None) or getattr(dc, "n_positions", 1024)
        prep = preprocessing(source, image_size(ec.image_size), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
        prep = fit_pad(source, prep)
        tokens, width = vision_dims(source, self.vision_encoder(), prep)
        dims = ModelDims(
            **decoder_dims(HfDecoderInit(self.model.decoder), self.start_id, torch.zeros(1, tokens, width)),
            encoder_hidden=width, image_tokens=tokens, max_target_len=max_pos,
        )
        self.info = FamilyInfo(
            family="vision-encoder-decoder", architecture=f"{self.architecture}({ec.model_type}, {dc.model_type})",
            dims=dims, preprocessing=prep,
            tasks={"caption": TaskSpec("vision_encoder", (self.start_id,), self.eos_id, self.pad_id, min(30, max_pos - 1),
                                       generation_defaults(self.model, f"{source}/generation_config.json"))},
        )

    def vision_encoder(self) -> nn.Module:
        return _Vision(self.model).eval()

    def text_encoder(self) -> nn.Module:
        raise NotImplementedError("VisionEncoderDecoderModel has no question encoder")

    def cross_kv(self) -> nn.Module:
        return HfCrossKV(self.model.decoder, self.start_id).eval()

    def decoder(self) -> nn.Module:
        return HfDecoder(self.model.decoder, self.info.dims.decoder_layers).eval()

    def tokenizer_json(self) -> str:
        return self._tokenizer_json

    def weight_files(self):
        return weight_files(self.source)

    @torch.no_grad()
    def reference_generate(self, task, pixel_values, question_ids=None, question_mask=None, max_new_tokens=20, num_beams=1,
                           **generation):
        out = self.model.generate(pixel_values=pixel_values, max_new_tokens=max_new_tokens, num_beams=num_beams,
                                  do_sample=False, decoder_start_token_id=self.start_id, **generation)
        return strip_prompt(out, 1, generation.get("eos_token_id", self.info.tasks["caption"].generation.get("eos_token_id", self.eos_id)))
