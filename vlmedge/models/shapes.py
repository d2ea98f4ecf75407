"""Adapter of the built-in reference model (`shapes-vlm`) to the canonical graphs."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from vlmedge.models.base import FamilyInfo, ModelDims, Preprocessing, TaskSpec, flat_kv, pair_kv
from vlmedge.models.checkpoint import TOKENIZER, load_pretrained, resolve_model_dir
from vlmedge.models.generation import generation_defaults
from vlmedge.models.shapes_vlm import ShapesVLM


class _Vision(nn.Module):
    def __init__(self, m: ShapesVLM):
        super().__init__()
        self.m = m

    def forward(self, pixel_values):
        return self.m.encode_image(pixel_values)


class _Text(nn.Module):
    def __init__(self, m: ShapesVLM):
        super().__init__()
        self.m = m

    def forward(self, question_ids, question_mask, image_states):
        return self.m.encode_question(question_ids, question_mask, image_states)


class _CrossKV(nn.Module):
    def __init__(self, m: ShapesVLM):
        super().__init__()
        self.dec = m.decoder

    def forward(self, encoder_states):
        return tuple(flat_kv(self.dec.cross_kv(encoder_states)))  # computed once, handed to every step


class _Decoder(nn.Module):
    def __init__(self, m: ShapesVLM):
        super().__init__()
        self.dec = m.decoder
        self.n = len(m.decoder.layers)

    def forward(self, input_ids, attention_mask, position_ids, encoder_mask, *kv):
        past, cross = pair_kv(kv[: 2 * self.n]), pair_kv(kv[2 * self.n :])
        logits, present = self.dec(input_ids, cross, encoder_mask, past, last_only=True, positions=position_ids,
                                   attention_mask=attention_mask)
        return (logits[:, -1], *flat_kv(present))


class ShapesAdapter:
    """The reference model: captioning (decoder over image states) and VQA (over question states)."""

    def __init__(self, name_or_path: str | Path = "shapes-vlm"):
        self.source = str(name_or_path)
        self.model_dir = resolve_model_dir(name_or_path)
        self.model, self.tokenizer = load_pretrained(name_or_path)
        c = self.model.config
        dims = ModelDims(
            decoder_layers=c.decoder_layers, decoder_heads=c.n_heads, decoder_head_dim=c.head_dim,
            vocab_size=c.vocab_size, encoder_hidden=c.d_model, image_tokens=c.num_patches,
            max_target_len=c.max_target_len, max_question_len=c.max_question_len,
        )
        prep = Preprocessing(height=c.image_size, width=c.image_size, resample="bicubic", mean=c.image_mean, std=c.image_std)
        generation = generation_defaults(self.model)
        self.info = FamilyInfo(
            family="shapes-vlm", architecture="ShapesVLM", dims=dims, preprocessing=prep,
            tasks={
                "caption": TaskSpec("vision_encoder", (c.caption_start_id,), c.eos_id, c.pad_id, 40, generation),
                "vqa": TaskSpec("text_encoder", (c.answer_start_id,), c.eos_id, c.pad_id, 4, generation),
            },
        )

    def vision_encoder(self) -> nn.Module:
        return _Vision(self.model).eval()

    def text_encoder(self) -> nn.Module:
        return _Text(self.model).eval()

    def cross_kv(self) -> nn.Module:
        return _CrossKV(self.model).eval()

    def decoder(self) -> nn.Module:
        return _Decoder(self.model).eval()

    def weight_files(self) -> list[Path]:
        return [self.model_dir / "model.safetensors"]

    def tokenizer_json(self) -> str:
        return (self.model_dir / TOKENIZER).read_text()

    @torch.no_grad()
    def reference_generate(self, task, pixel_values, question_ids=None, question_mask=None, max_new_tokens=20,
                           num_beams=1, length_penalty=1.0):
        m, c = self.model, self.model.config
        with torch.no_grad():
            if task == "caption":
                states = m.encode_image(pixel_values)
                mask = torch.ones(states.shape[:2], dtype=torch.long)
            else:
                states = m.encode_question(question_ids, question_mask, m.encode_image(pixel_values))
                mask = question_mask
        start = c.caption_start_id if task == "caption" else c.answer_start_id
        if num_beams > 1:
            return m.beam_search(states, mask, start, max_new_tokens, num_beams, length_penalty)
        rows = m.generate(states, mask, start, max_new_tokens).tolist()
        return [r[: r.index(c.eos_id) + 1] if c.eos_id in r else r for r in rows]
