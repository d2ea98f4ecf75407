"""Adapters of Hugging Face BLIP: `BlipForConditionalGeneration` (captioning, optionally after a
text prompt such as "a picture of") and `BlipForQuestionAnswering` (VQA).

As in BLIP's own `generate`: the decoder starts with the text config's bos token ([DEC]); a
caption prompt is tokenised, its [CLS] replaced by [DEC] and its final [SEP] dropped; decoding
stops at [SEP]. For VQA the question encoder (BERT with cross-attention to the image) encodes
"[CLS] question [SEP]" and the answer decoder cross-attends to its states.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vlmedge.errors import ModelLoadError
from vlmedge.models.base import FamilyInfo, ModelDims, TaskSpec
from vlmedge.models.generation import generation_defaults
from vlmedge.models.hf import (
    HfCrossKV, HfDecoder, HfDecoderInit, decoder_dims, image_size, load_hf_model, preprocessing, strip_prompt,
    tokenizer_json, vision_dims, weight_files,
)

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class _Vision(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.vision_model = model.vision_model

    def forward(self, pixel_values):
        return self.vision_model(pixel_values=pixel_values).last_hidden_state


class _Question(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.text_encoder = model.text_encoder

    def forward(self, question_ids, question_mask, image_states):
        image_mask = torch.ones(image_states.shape[:2], dtype=torch.long, device=image_states.device)
        return self.text_encoder(input_ids=question_ids, attention_mask=question_mask, encoder_hidden_states=image_states,
                                 encoder_attention_mask=image_mask, return_dict=True).last_hidden_state


class _BlipBase:
    architecture = ""
    task = ""

    def __init__(self, source: str, model_cls, prompt: str | None = None):
        self.source = source
        self.model = load_hf_model(model_cls, source)
        self._tokenizer_json = tokenizer_json(source)
        cfg = self.model.config
        tc, vc = cfg.text_config, cfg.vision_config
        self.eos_id, self.pad_id, self.bos_id = tc.sep_token_id, tc.pad_token_id, tc.bos_token_id
        if None in (self.eos_id, self.pad_id, self.bos_id):
            raise ModelLoadError(f"{source}/config.json: text_config needs bos_token_id, sep_token_id and pad_token_id")
        self.prompt_ids = self._prompt_ids(prompt)
        self._check()
        prep = preprocessing(source, image_size(vc.image_size), _CLIP_MEAN, _CLIP_STD, "bicubic")
        tokens, width = vision_dims(source, self.vision_encoder(), prep)
        states = torch.zeros(1, tokens, width)
        if self.task == "vqa":  # the answer decoder reads the question encoder's states
            with torch.no_grad():
                q = torch.tensor([[self.bos_id]])
                states = self.text_encoder()(q, torch.ones_like(q), states)
        dims = ModelDims(
            **decoder_dims(HfDecoderInit(self.model.text_decoder), self.bos_id, states), encoder_hidden=int(states.shape[-1]),
            image_tokens=tokens, max_target_len=tc.max_position_embeddings,
            max_question_len=tc.max_position_embeddings if self.task == "vqa" else 0,
        )
        max_new = min(30 if self.task == "caption" else 10, dims.max_target_len - len(self.prompt_ids))
        encoder = "vision_encoder" if self.task == "caption" else "text_encoder"
        self.info = FamilyInfo(
            family="blip", architecture=self.architecture, dims=dims, preprocessing=prep,
            tasks={self.task: TaskSpec(encoder, self.prompt_ids, self.eos_id, self.pad_id, max_new, generation_defaults(
                self.model.text_decoder, f"{source}/generation_config.json", eos_token_id=self.eos_id, pad_token_id=self.pad_id))},
        )

    def _check(self) -> None:
        """Refuse configs the family's own generate() cannot run (one line)."""

    def _prompt_ids(self, prompt: str | None) -> tuple[int, ...]:
        if not prompt:
            return (self.bos_id,)
        from tokenizers import Tokenizer

        ids = Tokenizer.from_str(self._tokenizer_json).encode(prompt).ids
        return (self.bos_id, *ids[1:-1])  # generate(): [CLS] -> [DEC], trailing [SEP] dropped

    def vision_encoder(self) -> nn.Module:
        return _Vision(self.model).eval()

    def cross_kv(self) -> nn.Module:
        return HfCrossKV(self.model.text_decoder, self.bos_id).eval()

    def decoder(self) -> nn.Module:
        return HfDecoder(self.model.text_decoder, self.info.dims.decoder_layers).eval()

    def tokenizer_json(self) -> str:
        return self._tokenizer_json

    def weight_files(self):
        return weight_files(self.source)


class BlipCaptionAdapter(_BlipBase):
    architecture = "BlipForConditionalGeneration"
    task = "caption"

    def __init__(self, source: str, prompt: str | None = None):
        from transformers import BlipForConditionalGeneration

        super().__init__(source, BlipForConditionalGeneration, prompt)

    def text_encoder(self) -> nn.Module:
        raise NotImplementedError("BlipForConditionalGeneration has no question encoder")

    @torch.no_grad()
    def reference_generate(self, task, pixel_values, question_ids=None, question_mask=None, max_new_tokens=20, num_beams=1,
                           **generation):
        B = pixel_values.shape[0]
        # generate() replaces the first id by [DEC] and drops the last: give it "[CLS] prompt [SEP]"
        ids = torch.tensor([[0, *self.prompt_ids[1:], self.eos_id]] * B)
        eos = generation.pop("eos_token_id", self.eos_id)
        text_config = self.model.config.text_config
        saved, text_config.sep_token_id = text_config.sep_token_id, eos  # BLIP's generate() stops on [SEP]
        try:
            out = self.model.generate(pixel_values=pixel_values, input_ids=ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False, **generation)
        finally:
            text_config.sep_token_id = saved
        return strip_prompt(out, len(self.prompt_ids), eos)


class BlipVqaAdapter(_BlipBase):
    architecture = "BlipForQuestionAnswering"
    task = "vqa"

    def __init__(self, source: str, prompt: str | None = None):
        from transformers import BlipForQuestionAnswering

        if prompt:
            raise ModelLoadError(f"{source}: a text prompt applies to captioning, not to BlipForQuestionAnswering")
        super().__init__(source, BlipForQuestionAnswering)

    def _check(self) -> None:
        tc, vc = self.model.config.text_config, self.model.config.vision_config
        if tc.hidden_size != vc.hidden_size:
            # the answer decoder's cross-attention is sized for image states but reads question states
            raise ModelLoadError(f"{self.source}/config.json: BLIP VQA needs text and vision hidden sizes equal "
                                 f"({tc.hidden_size} != {vc.hidden_size})")

    def text_encoder(self) -> nn.Module:
        return _Question(self.model).eval()

    @torch.no_grad()
    def reference_generate(self, task, pixel_values, question_ids=None, question_mask=None, max_new_tokens=10, num_beams=1,
                           **generation):
        out = self.model.generate(input_ids=question_ids, pixel_values=pixel_values, attention_mask=question_mask,
                                  max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False, **generation)
        return strip_prompt(out, 1, generation.get("eos_token_id", self.eos_id))
