"""Adapters of Hugging Face `Blip2ForConditionalGeneration` and `InstructBlipForConditionalGeneration`
whose language model is decoder-only (OPT, as BLIP-2's checkpoints; Llama, as InstructBLIP's Vicuna ones), on the
prefix contract.

The vision graph is the whole image side: the ViT, the Q-Former whose `num_query_tokens` learned queries
cross-attend to it, and the projection to the LM's width; its output, one row per query, replaces the
prompt's `<image>` tokens. InstructBLIP's Q-Former also reads the instruction (tokenised by its own BERT
tokenizer, bundled as a second tokenizer file): its vision graph takes `qformer_input_ids` and
`qformer_attention_mask` beside the pixels (the manifest's `prompt.vision_text` names that tokenizer, its
hash and the two inputs).

The processor (`Blip2Processor`, `InstructBlipProcessor`) writes `num_query_tokens` `<image>` tokens, then
the text as the tokenizer encodes it (OPT's writes `</s>` as BOS first). There is no chat template: the
bundle carries that rule as a template vlmedge writes (PROMPT_TEMPLATE). Captioning with no prompt is
HF's `generate(pixel_values)`: the image tokens and BOS alone, so BLIP-2's caption instruction is the BOS
token itself; VQA is the text as given, in BLIP-2's format "Question: {q} Answer:".

The Vicuna checkpoints' Llama tokenizer writes `<s>` as BOS, OPT's `</s>`; either way the template writes the
image tokens, then the tokenizer's BOS and the text. OPT's learned positions are offset by 2 inside the model (`OPTLearnedPositionalEmbedding`); the graph
takes the positions HF `generate` computes from the attention mask (cumulative sum minus one) and the
model adds the offset. The processor pads a batch's text before it puts the image tokens in front, so its
rows hold padding between the image and the text; the runtime left-pads whole rows instead: the same
tokens at the same positions, the padding masked either way.

HF's `generate` of these models hands generation to the language model, whose generation_config is built
from `text_config` (the top model's generation_config.json is not read by it): that is what the bundle's
tasks carry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from vlmedge.errors import ModelLoadError, read_json
from vlmedge.models.base import Preprocessing
from vlmedge.models.paligemma import fixed_preprocessing
from vlmedge.models.prefix import HfPrefixAdapter

OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
QFORMER_TOKENIZER = "qformer_tokenizer.json"  # InstructBLIP's second tokenizer, in the bundle
DECODER_LMS = ("opt", "llama")  # the published checkpoints' decoder-only LMs: OPT (BLIP-2), Vicuna (InstructBLIP)

# Blip2Processor's prompt as a template: one user turn with one image; the image's placeholder, BOS, the text.
# A text that is BOS alone is the caption's prompt (HF generate with no input_ids: the image tokens and BOS).
PROMPT_TEMPLATE = (
    "{% if messages | length != 1 or messages[0]['role'] != 'user' %}"
    "{{ raise_exception('BLIP-2 takes one prompt (a single user turn), not a conversation') }}{% endif %}"
    "{% if messages[0]['content'] | selectattr('type', 'equalto', 'image') | list | length != 1 %}"
    "{{ raise_exception('BLIP-2 takes one image per prompt') }}{% endif %}"
    "{{ '<image>' }}{% set text = namespace(value='') %}"
    "{% for part in messages[0]['content'] %}{% if part['type'] == 'text' %}{% set text.value = text.value + part['text'] %}"
    "{% endif %}{% endfor %}{% if text.value != bos_token %}{{ bos_token }}{% endif %}{{ text.value }}"
)


class _Vision(nn.Module):
    """ViT -> Q-Former (queries cross-attending to every patch row) -> projection: [frames, queries, D]."""

    def __init__(self, model):
        super().__init__()
        self.tower, self.qformer, self.projection = model.vision_model, model.qformer, model.language_projection
        self.queries = model.query_tokens

    def forward(self, pixel_values):
        image = self.tower(pixel_values, return_dict=True).last_hidden_state
        queries = self.queries.expand(image.shape[0], -1, -1)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=image,
                           encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long), return_dict=True)
        return self.projection(out.last_hidden_state)


class _InstructVision(_Vision):
    """InstructBLIP's: the Q-Former also reads the instruction's ids (its own tokenizer's) beside the queries;
    the queries' rows are the output."""

    def forward(self, pixel_values, qformer_input_ids, qformer_attention_mask):
        image = self.tower(pixel_values, return_dict=True).last_hidden_state
        queries = self.queries.expand(image.shape[0], -1, -1)
        mask = torch.cat([torch.ones(queries.shape[:-1], dtype=torch.long), qformer_attention_mask], 1)
        out = self.qformer(input_ids=qformer_input_ids, attention_mask=mask, query_embeds=queries,
                           encoder_hidden_states=image, encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long),
                           return_dict=True)
        return self.projection(out.last_hidden_state[:, : queries.shape[1]])


class Blip2Adapter(HfPrefixAdapter):
    architecture = "Blip2ForConditionalGeneration"
    family = "blip2"

    def __init__(self, source: str, prompt: str | None = None):
        cfg = read_json(Path(source) / "config.json", ModelLoadError)
        text = (cfg.get("text_config") if isinstance(cfg, dict) else None) or {}
        if not isinstance(cfg, dict) or cfg.get("use_decoder_only_language_model") is False \
                or text.get("model_type", "opt") not in DECODER_LMS:
            raise ModelLoadError(f"{source}: {self.architecture} with a {text.get('model_type', 'seq2seq')} language model; "
                                 "vlmedge exports the OPT and Llama (Vicuna) decoder-only variants and the T5 ones")
        super().__init__(source, prompt)
        self._check_bos()

    @property
    def caption_instruction(self) -> str:  # the caption's prompt: the image tokens and BOS (see the module docstring)
        from vlmedge.models.prefix import special_tokens

        bos = special_tokens(self.source).get("bos_token")
        if bos is None:
            raise ModelLoadError(f"{self.source}: the tokenizer names no bos_token, which BLIP-2's prompt writes after the image tokens")
        return bos

    def _check_bos(self) -> None:
        """The template writes BOS after the image tokens, where the processor's tokenizer call puts it: the
        tokenizer must write exactly that BOS (the text config's, which HF generate's caption prompt uses)."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(self._tokenizer_json)
        bos = self.model.config.text_config.bos_token_id
        probe = tok.encode("Question").ids
        if tok.encode("Question", add_special_tokens=False).ids != probe[1:] or probe[:1] != [bos]:
            raise ModelLoadError(f"{self.source}: the tokenizer does not write the language model's BOS ({bos}) alone before "
                                 "the text, as the BLIP-2 prompt rule expects")

    def generation_model(self):
        return self.model.language_model  # whose generation_config HF's generate applies

    def prompt_template(self) -> str:
        return PROMPT_TEMPLATE

    def prompt_rules(self) -> dict:
        return {"add_special_tokens": False}

    def preprocessing(self, image_cfg: dict, proc_cfg: dict) -> Preprocessing:
        where = f"{self.source}/processor_config.json"
        size = image_cfg.get("size") or {}
        if not (isinstance(size, dict) and isinstance(size.get("height"), int) and isinstance(size.get("width"), int)):
            raise ModelLoadError(f"{where}: BLIP's image processor resizes to {{height, width}}; got size {size!r:.60}")
        cfg = self.model.config
        tokens = proc_cfg.get("num_query_tokens")
        if tokens != cfg.num_query_tokens:
            raise ModelLoadError(f"{where}: num_query_tokens {tokens!r:.20}, but the model has {cfg.num_query_tokens} queries; "
                                 "save the processor with the model (transformers >= 4.47 writes one <image> per query)")
        return fixed_preprocessing(
            {"image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD, **image_cfg}, size["height"], size["width"],
            {"image_tokens": int(tokens), "image_token": "<image>"})

    def vision_encoder(self) -> nn.Module:
        return _Vision(self.model).eval()

    def language_model(self):
        lm = self.model.language_model  # OPTForCausalLM (its decoder) or LlamaForCausalLM (its model)
        return lm.get_decoder(), lm.get_output_embeddings()

    def pixel_inputs(self, inputs: list) -> dict:
        return {"pixel_values": torch.from_numpy(np.concatenate([img.frames for item in inputs for img in item]))}


class InstructBlipAdapter(Blip2Adapter):
    """InstructBLIP: as BLIP-2, and the Q-Former reads the prompt's text (the processor hands the same text to
    its BERT tokenizer, saved in qformer_tokenizer/): the vision graph takes its ids and mask, the bundle
    carries that tokenizer (prompt.vision_text). HF's generate needs that text, so the caption has an
    instruction of its own."""

    architecture = "InstructBlipForConditionalGeneration"
    family = "instructblip"
    caption_instruction = "A short image description:"  # LAVIS's InstructBLIP caption prompt

    def __init__(self, source: str, prompt: str | None = None):
        from transformers import AutoTokenizer

        try:
            self.qformer_tokenizer = AutoTokenizer.from_pretrained(str(Path(source) / "qformer_tokenizer"), local_files_only=True)
        except Exception as e:
            raise ModelLoadError(f"{source}/qformer_tokenizer: InstructBLIP's Q-Former tokenizer does not load ({e})") from None
        if not getattr(self.qformer_tokenizer, "is_fast", False):
            raise ModelLoadError(f"{source}/qformer_tokenizer: no fast (tokenizers) version to export")
        super().__init__(source, prompt)
        # the Q-Former numbers the text's positions from 0 (the queries have none)
        self.info.prompt["vision_text"] = {"tokenizer": QFORMER_TOKENIZER, "inputs": ["qformer_input_ids", "qformer_attention_mask"],
                                           "max_length": int(self.model.config.qformer_config.max_position_embeddings)}

    def vision_text_tokenizer_json(self) -> str:
        return self.qformer_tokenizer.backend_tokenizer.to_str()

    @torch.no_grad()
    def probe_vision(self, prep) -> tuple[int, int]:
        ids = torch.tensor(self.qformer_tokenizer("probe")["input_ids"])[None]
        frames = self.vision_encoder()(torch.zeros(1, 3, prep.height, prep.width), ids, torch.ones_like(ids))
        return int(frames.shape[1]), int(frames.shape[2])

    def vision_encoder(self) -> nn.Module:
        return _InstructVision(self.model).eval()

    def pixel_inputs(self, inputs: list) -> dict:
        """The pixels and, per image, the Q-Former's ids and mask of its prompt's text (right-padded, as the
        processor pads with BERT's tokenizer)."""
        images = [img for item in inputs for img in item]
        width = max(len(img.text_ids) for img in images)
        ids = torch.zeros((len(images), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, img in enumerate(images):
            ids[i, : len(img.text_ids)], mask[i, : len(img.text_ids)] = torch.tensor(img.text_ids), 1
        return {**super().pixel_inputs(inputs), "qformer_input_ids": ids, "qformer_attention_mask": mask}
