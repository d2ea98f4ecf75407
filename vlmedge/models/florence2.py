"""Adapter of Hugging Face `Florence2ForConditionalGeneration`: a DaViT vision tower and projector
make image tokens; a BART encoder reads [image tokens; task prompt]; a BART decoder cross-attends
to its output. Every task is a prompt for the BART encoder, so every task (captions too) runs
through the `text_encoder` graph, and the decoder's mask covers the image tokens and the prompt
(`TaskSpec.image_prefix`).

The task prompts are the sentences `Florence2Processor` substitutes for the task tokens, framed as
it frames them (`<s>` prompt `</s>`, no other special tokens), stored as ids in the manifest.
Region tasks answer with `<loc_N>` tokens; the runtime turns them into boxes (runtime.florence2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from vlmedge.errors import ModelLoadError, read_json
from vlmedge.models.base import FamilyInfo, ModelDims, TaskSpec
from vlmedge.models.generation import generation_defaults
from vlmedge.models.hf import (
    HfCrossKV, HfDecoder, image_processor_settings, load_hf_model, preprocessing, settings_file, strip_prompt,
    tokenizer_json, weight_files,
)

# task token -> (the prompt Florence2Processor builds for it, how its answer is post-processed)
TASK_PROMPTS = {
    "<CAPTION>": ("What does the image describe?", "pure_text"),
    "<DETAILED_CAPTION>": ("Describe in detail what is shown in the image.", "pure_text"),
    "<MORE_DETAILED_CAPTION>": ("Describe with a paragraph what is shown in the image.", "pure_text"),
    "<OCR>": ("What is the text in the image?", "pure_text"),
    "<OD>": ("Locate the objects with category name in the image.", "description_with_bboxes"),
    "<OCR_WITH_REGION>": ("What is the text in the image, with regions?", "ocr"),
    "<DENSE_REGION_CAPTION>": ("Locate the objects in the image, with their descriptions.", "description_with_bboxes"),
}
_OCR_PATTERN = r"(.+?)" + r"<loc_(\d+)>" * 8


class _Vision(nn.Module):
    """pixel_values -> projected image tokens (B, N, D): the DaViT tower and the projector."""

    def __init__(self, model):
        super().__init__()
        self.model = model.model

    def forward(self, pixel_values):
        return self.model.get_image_features(pixel_values).pooler_output


class _PromptEncoder(nn.Module):
    """BART encoder over [image tokens; prompt embeddings] with mask [1 ... 1; prompt mask]."""

    def __init__(self, model):
        super().__init__()
        self.embed = model.model.get_input_embeddings()
        self.encoder = model.model.language_model.encoder

    def forward(self, question_ids, question_mask, image_states):
        embeds = torch.cat([image_states, self.embed(question_ids).to(image_states.dtype)], dim=1)
        image_mask = torch.ones(image_states.shape[:2], dtype=question_mask.dtype, device=question_mask.device)
        mask = torch.cat([image_mask, question_mask], dim=1)
        return self.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state


@dataclass
class _LmOutput:
    logits: torch.Tensor
    cache: object


class _DecoderLM(nn.Module):
    """The BART decoder and the LM head as one module with the causal-LM interface HfDecoder and HfCrossKV use."""

    def __init__(self, model):
        super().__init__()
        self.decoder = model.model.language_model.decoder
        self.lm_head = model.lm_head

    def forward(self, input_ids, encoder_hidden_states, encoder_attention_mask, cache, use_cache=True,
                logits_to_keep=1, return_dict=True, attention_mask=None):
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=encoder_hidden_states,
                           encoder_attention_mask=encoder_attention_mask, cache=cache, use_cache=use_cache)
        return _LmOutput(self.lm_head(out.last_hidden_state[:, -logits_to_keep:]), out.cache)


def _post_config(source: str) -> dict:
    from pathlib import Path

    path = Path(source) / "processor_config.json"
    return (read_json(path, ModelLoadError).get("post_processor_config") or {}) if path.is_file() else {}


class Florence2Adapter:
    architecture = "Florence2ForConditionalGeneration"

    def __init__(self, source: str, prompt: str | None = None):
        from tokenizers import Tokenizer
        from transformers import Florence2ForConditionalGeneration

        if prompt:
            raise ModelLoadError(f"{source}: Florence-2 is prompted by its tasks ({', '.join(TASK_PROMPTS)}), not by --prompt")
        self.source = source
        self.model = load_hf_model(Florence2ForConditionalGeneration, source)
        self._tokenizer_json = tokenizer_json(source)
        tok = Tokenizer.from_str(self._tokenizer_json)
        gen, tc = self.model.generation_config, self.model.config.text_config
        start = gen.decoder_start_token_id if gen.decoder_start_token_id is not None else tc.decoder_start_token_id
        eos = gen.eos_token_id if gen.eos_token_id is not None else tc.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        bos, pad = tc.bos_token_id, tc.pad_token_id
        missing = [n for n, v in (("decoder_start_token_id", start), ("eos_token_id", eos), ("bos_token_id", bos),
                                  ("pad_token_id", pad)) if v is None]
        if missing:
            raise ModelLoadError(f"{source}/config.json: text_config needs {', '.join(missing)} to generate")
        self.start_id, self.eos_id, self.bos_id, self.pad_id = int(start), int(eos), int(bos), int(pad)

        with torch.no_grad():  # facts from the traced modules, not from config formulas
            size = self._image_size(source)
            image = self.vision_encoder()(torch.zeros(1, 3, *size))
        dec = self.model.model.language_model.decoder
        attn = dec.layers[0].self_attn
        max_pos = dec.embed_positions.num_embeddings - getattr(dec.embed_positions, "offset", 0)
        enc_pos = self.model.model.language_model.encoder.embed_positions
        enc_max = enc_pos.num_embeddings - getattr(enc_pos, "offset", 0)
        self.image_tokens = int(image.shape[1])
        if enc_max <= self.image_tokens + 2:
            raise ModelLoadError(f"{source}: the language encoder's {enc_max} positions leave no room for a prompt "
                                 f"after {self.image_tokens} image tokens")
        self.task_ids = {t: (self.bos_id, *tok.encode(text, add_special_tokens=False).ids, self.eos_id)
                         for t, (text, _) in TASK_PROMPTS.items()}
        dims = ModelDims(
            decoder_layers=len(dec.layers), decoder_heads=int(attn.num_heads), decoder_head_dim=int(attn.head_dim),
            vocab_size=int(self.model.lm_head.out_features), encoder_hidden=int(image.shape[-1]),
            image_tokens=self.image_tokens, max_target_len=int(max_pos),
            max_question_len=int(enc_max - self.image_tokens),
        )
        prep = preprocessing(source, size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic")
        post = _post_config(source)
        ocr = post.get("ocr") or {}
        if ocr.get("AREA_THRESHOLD", 0.0) or ocr.get("PATTERN") not in (None, _OCR_PATTERN):
            raise ModelLoadError(f"{source}/processor_config.json: post_processor_config.ocr differs from Florence-2's "
                                 "(AREA_THRESHOLD 0, the eight-location PATTERN); vlmedge reads OCR regions only that way")
        # the checkpoint's own length limit where it sets one (max_length counts the decoder start), else
        # the 1024 new tokens Florence-2's model cards generate with
        set_here = gen.to_diff_dict()
        max_new = gen.max_new_tokens or (gen.max_length - 1 if "max_length" in set_here else 1024)
        generation = generation_defaults(self.model, f"{source}/generation_config.json")
        tasks = {t: TaskSpec("text_encoder", (self.start_id,), self.eos_id, self.pad_id, min(max_new, max_pos - 1),
                             generation, text_prompt_ids=self.task_ids[t], image_prefix=True, postprocess=kind)
                 for t, (_, kind) in TASK_PROMPTS.items()}
        self.info = FamilyInfo(family="florence2", architecture=self.architecture, dims=dims, preprocessing=prep,
                               tasks=tasks)

    @staticmethod
    def _image_size(source: str) -> tuple[int, int]:
        """The processor's size: Florence-2's config holds none, and vlmedge never guesses one."""
        cfg = image_processor_settings(source)
        if cfg is None:
            raise ModelLoadError(f"{source}: no image-processor settings (processor_config.json with image_processor, "
                                 "or preprocessor_config.json) to take Florence-2's input size from; "
                                 "save the processor with the model")
        where = settings_file(source)
        size = cfg.get("size")
        if size is None:
            raise ModelLoadError(f"{where}: the image processor has no size, which Florence-2's input size is read from")
        if not isinstance(size, dict) or not {"height", "width"} <= set(size):
            raise ModelLoadError(f"{where}: size must be {{'height': H, 'width': W}}, got {size!r:.60}")
        if size["height"] != size["width"]:
            raise ModelLoadError(f"{where}: vlmedge supports square Florence-2 inputs, got {size['height']}x{size['width']}")
        return int(size["height"]), int(size["width"])

    def vision_encoder(self) -> nn.Module:
        return _Vision(self.model).eval()

    def text_encoder(self) -> nn.Module:
        return _PromptEncoder(self.model).eval()

    def cross_kv(self) -> nn.Module:
        return HfCrossKV(_DecoderLM(self.model), self.start_id).eval()

    def decoder(self) -> nn.Module:
        return HfDecoder(_DecoderLM(self.model), self.info.dims.decoder_layers).eval()

    def tokenizer_json(self) -> str:
        return self._tokenizer_json

    def weight_files(self):
        return weight_files(self.source)

    @torch.no_grad()
    def reference_generate(self, task, pixel_values, question_ids=None, question_mask=None, max_new_tokens=20,
                           num_beams=None, **generation):
        """HF generate as Florence2Processor feeds it ([image tokens; task prompt] as input_ids), with the
        checkpoint's generation settings except those passed."""
        B = pixel_values.shape[0]
        image_id = self.model.config.image_token_id
        ids = torch.tensor([[image_id] * self.image_tokens + list(self.task_ids[task])] * B)
        eos = generation.get("eos_token_id", self.eos_id)
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values,
                                  max_new_tokens=max_new_tokens, do_sample=False,
                                  **({} if num_beams is None else {"num_beams": num_beams}), **generation)
        return strip_prompt(out, 1, eos)
