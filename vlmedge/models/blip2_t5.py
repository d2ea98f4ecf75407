"""Adapters of Hugging Face `Blip2ForConditionalGeneration` and `InstructBlipForConditionalGeneration` whose
language model is Flan-T5 (an encoder-decoder), on the cross-attention contract, in the prompt-encoder form
Florence-2 uses: the T5 encoder reads the image's query embeddings and the text, the T5 decoder cross-attends to
its output.

- `vision_encoder`: the ViT, the Q-Former whose `num_query_tokens` queries cross-attend to it, the projection to
  T5's width: [batch, queries, d_model] (models.blip2's module, shared with the OPT variants).
- `text_encoder`: the T5 encoder over the processor's `input_ids` with the query embeddings in place of its
  `<image>` tokens (what HF's generate does with `masked_scatter`) -> [batch, queries + text, d_model].
- `cross_kv`, `decoder`: the T5 decoder (HfCrossKV, HfDecoder) and the LM head, the decoder output rescaled only
  where the checkpoint asks for it (`scale_decoder_outputs`: original T5, not Flan-T5).

Where the image rows go. The processor writes `num_query_tokens` `<image>` tokens, then the text as the T5
tokenizer encodes it (the text, `</s>`), and pads on the right. The bundle's tokenizer carries that rule: it is
the model's tokenizer with a post-processor that writes the `<image>` tokens first, so the runtime's question ids
and mask are the processor's `input_ids` and `attention_mask` row for row, and the decoder's encoder mask is the
question mask as the runtime makes it. (The other way, `image_prefix` as Florence-2's task prompts have it, puts
the image rows in front of the question; the runtime applies it to a task's own prompt only, not to a user's
question.)

Captioning: HF's `generate(pixel_values)` with no text fails for a T5 language model (it starts from
`text_config.bos_token_id`, which T5 has not); the caption is the empty text, as LAVIS's BLIP-2 T5 captions
(`prompt=""`): the image tokens and `</s>`, the processor's `text=""` (`--prompt` gives another text). VQA is
the text as given, in BLIP-2's format "Question: {q} Answer:".

InstructBLIP's Q-Former also reads the text (the caption instruction, or the question), tokenised by its own
BERT tokenizer: its vision graph takes `qformer_input_ids` and `qformer_attention_mask` beside the pixels, and the
bundle carries that tokenizer (the manifest's `prompt.vision_text`, as on the prefix contract, with the caption's
text under `texts`). The runtime feeds it each question's ids, or the caption instruction's.

T5 attention scales nothing and has no position embeddings: the decoder's self-attention adds a bias bucketed
from relative positions, which `_DecoderLM` computes from the given `position_ids` and the cache's mask (HF
computes them from cache indices; the hidden slot shifts both alike, so the biases are equal).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from vlmedge.errors import ModelLoadError, read_json
from vlmedge.models.base import FamilyInfo, ModelDims, TaskSpec
from vlmedge.models.blip2 import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, QFORMER_TOKENIZER, _InstructVision, _Vision
from vlmedge.models.generation import generation_defaults
from vlmedge.models.hf import (
    HfCrossKV, HfDecoder, HfDecoderInit, decoder_dims, image_processor_settings, load_hf_model, preprocessing,
    settings_file, strip_prompt, tokenizer_json, weight_files,
)

INSTRUCT_CAPTION = "A short image description:"  # LAVIS's InstructBLIP caption prompt
MAX_NEW_TOKENS = 32  # the runtime's default length, as the prefix families have it
TEXT_LIMIT = 512  # T5's positions are relative and unbounded: the length Flan-T5's tokenizer declares, where it declares none


def is_t5(source: str) -> bool:
    """Whether a BLIP-2 / InstructBLIP directory's language model is T5 (the registry dispatches on it)."""
    cfg = read_json(Path(source) / "config.json", ModelLoadError)
    text = (cfg.get("text_config") if isinstance(cfg, dict) else None) or {}
    return isinstance(text, dict) and text.get("model_type") == "t5"


class _PromptEncoder(nn.Module):
    """The T5 encoder over the processor's row: token embeddings, the query embeddings at the `<image>` tokens
    (the bundle's tokenizer writes them first, one per query), the mask as given."""

    def __init__(self, model, image_token_id: int):
        super().__init__()
        self.embed = model.language_model.get_input_embeddings()
        self.encoder = model.language_model.encoder
        self.image_token_id = image_token_id

    def forward(self, question_ids, question_mask, image_states):
        embeds = self.embed(question_ids)
        is_image = (question_ids == self.image_token_id)[..., None]
        # the k-th <image> of a row takes the k-th query's row (masked_scatter's order); clamped, an extra <image>
        # the user typed reads the last query rather than past the end
        index = (torch.cumsum(is_image[..., 0].long(), 1) - 1).clamp(0, image_states.shape[1] - 1)
        rows = torch.gather(image_states, 1, index[..., None].expand(-1, -1, image_states.shape[-1]))
        embeds = torch.where(is_image, rows.to(embeds.dtype), embeds)
        return self.encoder(inputs_embeds=embeds, attention_mask=question_mask).last_hidden_state


@dataclass
class _LmOutput:
    logits: torch.Tensor
    cache: object


class _DecoderLM(nn.Module):
    """The T5 decoder and LM head with the causal-LM interface HfDecoder and HfCrossKV use. Given `position_ids`
    (the decoder graph), the self-attention's relative-position bias is bucketed from them and from the positions
    of the cache's slots (the count of filled slots before each, from `attention_mask`)."""

    def __init__(self, model):
        super().__init__()
        lm = model.language_model
        self.decoder, self.lm_head = lm.decoder, lm.lm_head
        self.scale = lm.model_dim ** -0.5 if getattr(lm.config, "scale_decoder_outputs", False) else None
        self.biased = self.decoder.block[0].layer[0].SelfAttention  # the one layer with relative_attention_bias

    def forward(self, input_ids, encoder_hidden_states, encoder_attention_mask, cache, use_cache=True,
                logits_to_keep=1, return_dict=True, attention_mask=None, position_ids=None):
        patched = position_ids is not None and attention_mask is not None
        if patched:
            bias = self._bias(position_ids, attention_mask)
            self.biased.compute_bias = lambda *a, **k: bias
        try:
            out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=encoder_hidden_states,
                               encoder_attention_mask=encoder_attention_mask, cache=cache, use_cache=use_cache)
        finally:
            if patched:
                del self.biased.compute_bias
        h = out.last_hidden_state[:, -logits_to_keep:]
        return _LmOutput(self.lm_head(h * self.scale if self.scale is not None else h), out.cache)

    def _bias(self, positions, attention_mask):
        """[B, heads, S, P + S]: T5's decoder bias of key position minus query position."""
        attn = self.biased
        keys = torch.cumsum(attention_mask, 1) - 1  # [B, P + S]: a filled slot's position; hidden slots are masked
        relative = keys[:, None, :] - positions[:, :, None]
        bucket = attn._relative_position_bucket(relative, bidirectional=False, num_buckets=attn.relative_attention_num_buckets,
                                                max_distance=attn.relative_attention_max_distance)
        return attn.relative_attention_bias(bucket).permute(0, 3, 1, 2)


class Blip2T5Adapter:
    """BLIP-2 with Flan-T5: caption (the empty text, or --prompt) and vqa (the text as given)."""

    architecture = "Blip2ForConditionalGeneration"
    family = "blip2-t5"
    caption_text = ""  # LAVIS's caption prompt for BLIP-2 T5
    image_grid = False  # the vision graph gives the Q-Former's queries, not patches: no heatmap grid (docs/explain.md)

    def __init__(self, source: str, prompt: str | None = None):
        import transformers
        from tokenizers import Tokenizer

        self.source = source
        self.model = load_hf_model(getattr(transformers, self.architecture), source)
        cfg = self.model.config
        lm = self.model.language_model
        if not lm.config.is_encoder_decoder:
            raise ModelLoadError(f"{source}: {self.architecture} with a {lm.config.model_type} language model that is not "
                                 "an encoder-decoder; vlmedge exports its T5 variants on the cross-attention contract")
        if getattr(cfg, "image_token_id", None) is None:
            raise ModelLoadError(f"{source}/config.json: no image_token_index; save the model with transformers >= 4.47, "
                                 "whose processor writes one <image> per query")
        self.queries = int(cfg.num_query_tokens)
        self.image_token_id = int(cfg.image_token_id)
        self._check_processor(source)
        self._tokenizer_json = self._with_image_tokens(tokenizer_json(source))
        tok = Tokenizer.from_str(self._tokenizer_json)

        gen = generation_defaults(lm, f"{source}/generation_config.json")  # HF's generate hands over to the LM
        missing = [k for k in ("decoder_start_token_id", "eos_token_id", "pad_token_id") if gen.get(k) is None]
        if missing:
            raise ModelLoadError(f"{source}/config.json: text_config needs {', '.join(missing)} to generate")
        eos = gen["eos_token_id"]
        self.start_id, self.pad_id = int(gen["decoder_start_token_id"]), int(gen["pad_token_id"])
        self.eos_id = int(eos[0] if isinstance(eos, list) else eos)

        size = self._image_size(source, cfg.vision_config.image_size)
        prep = preprocessing(source, size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "bicubic")
        self.caption_text = prompt if prompt is not None else self.caption_text
        with torch.no_grad():  # facts from the traced modules, not from config formulas
            image = self.vision_encoder()(*self.vision_args(torch.zeros(1, 3, *size), [self.caption_text]))
            caption_ids = tok.encode(self.caption_text).ids
            ids = torch.tensor([caption_ids])
            states = self.text_encoder()(ids, torch.ones_like(ids), image)
            measured = decoder_dims(HfDecoderInit(_DecoderLM(self.model)), self.start_id, states)
        if int(image.shape[1]) != self.queries:
            raise ModelLoadError(f"{source}: the vision side gives {image.shape[1]} rows for {self.queries} query tokens")
        limit = self._text_limit(source)
        dims = ModelDims(**measured, encoder_hidden=int(states.shape[-1]), image_tokens=self.queries,
                         max_target_len=limit, max_question_len=self.queries + limit)
        spec = lambda **kw: TaskSpec("text_encoder", (self.start_id,), self.eos_id, self.pad_id, MAX_NEW_TOKENS,  # noqa: E731
                                     dict(gen), **kw)
        tasks = {"caption": spec(text_prompt_ids=tuple(caption_ids)), "vqa": spec()}
        self.info = FamilyInfo(family=self.family, architecture=self.architecture, dims=dims, preprocessing=prep, tasks=tasks)

    # -- checks and the bundle's tokenizer --------------------------------------------------------
    def _check_processor(self, source: str) -> None:
        path = Path(source) / "processor_config.json"
        cfg = read_json(path, ModelLoadError) if path.is_file() else {}
        tokens = cfg.get("num_query_tokens") if isinstance(cfg, dict) else None
        if tokens != self.queries:
            raise ModelLoadError(f"{path}: num_query_tokens {tokens!r:.20}, but the model has {self.queries} queries; "
                                 "save the processor with the model (transformers >= 4.47 writes one <image> per query)")

    def _with_image_tokens(self, tokenizer: str) -> str:
        """The model's tokenizer with the processor's rule: `num_query_tokens` `<image>` tokens before the text
        (and before what the tokenizer's own post-processor writes around it)."""
        from tokenizers import Tokenizer, processors

        tok = Tokenizer.from_str(tokenizer)
        name = tok.id_to_token(self.image_token_id)
        if name is None or tok.token_to_id(name) != self.image_token_id:
            raise ModelLoadError(f"{self.source}: the tokenizer has no token for image_token_id {self.image_token_id}")
        before = " ".join([name] * self.queries)
        images = processors.TemplateProcessing(single=f"{before} $A", pair=f"{before} $A $B",
                                               special_tokens=[(name, self.image_token_id)])
        plain = tok.encode("Question", add_special_tokens=True).ids
        tok.post_processor = images if tok.post_processor is None else processors.Sequence([tok.post_processor, images])
        if tok.encode("Question").ids != [self.image_token_id] * self.queries + plain:
            raise ModelLoadError(f"{self.source}: the tokenizer does not take the image tokens before its text")
        return tok.to_str()

    @staticmethod
    def _image_size(source: str, model_size) -> tuple[int, int]:
        cfg = image_processor_settings(source) or {}
        size = cfg.get("size") or {}
        if not (isinstance(size, dict) and isinstance(size.get("height"), int) and isinstance(size.get("width"), int)):
            raise ModelLoadError(f"{settings_file(source) or source}: BLIP's image processor resizes to {{height, width}}; "
                                 f"got size {size!r:.60}")
        if (size["height"], size["width"]) != (model_size, model_size):
            raise ModelLoadError(f"{settings_file(source)}: image size {size['height']}x{size['width']} differs from the "
                                 f"vision model's {model_size}x{model_size}")
        return size["height"], size["width"]

    @staticmethod
    def _text_limit(source: str) -> int:
        path = Path(source) / "tokenizer_config.json"
        cfg = read_json(path, ModelLoadError) if path.is_file() else {}
        limit = cfg.get("model_max_length") if isinstance(cfg, dict) else None
        return int(limit) if isinstance(limit, int) and 1 < limit <= 1 << 16 else TEXT_LIMIT

    # -- graphs --------------------------------------------------------------------------------------
    def vision_encoder(self) -> nn.Module:
        return _Vision(self.model).eval()

    def vision_args(self, pixel_values, texts) -> tuple:
        """The vision graph's inputs for these pixels and each row's text (BLIP-2's reads the pixels alone)."""
        return (pixel_values,)

    def text_encoder(self) -> nn.Module:
        return _PromptEncoder(self.model, self.image_token_id).eval()

    def cross_kv(self) -> nn.Module:
        return HfCrossKV(_DecoderLM(self.model), self.start_id).eval()

    def decoder(self) -> nn.Module:
        return HfDecoder(_DecoderLM(self.model), self.info.dims.decoder_layers).eval()

    def tokenizer_json(self) -> str:
        return self._tokenizer_json

    def weight_files(self):
        return weight_files(self.source)

    # -- the reference -------------------------------------------------------------------------------
    def hf_extra(self, texts: list[str]) -> dict:
        """What HF's generate takes beside the pixels and input_ids for rows of these texts (InstructBLIP: the
        Q-Former's ids and mask)."""
        return {}

    @torch.no_grad()
    def reference_generate(self, task, pixel_values, question_ids=None, question_mask=None, max_new_tokens=20,
                           num_beams=1, texts=None, **generation):
        """HF generate on the processor's inputs (the caption's text for caption; `question_ids`, the processor's
        input_ids, and `texts`, the questions, for vqa), with the language model's generation settings except
        those passed."""
        B = pixel_values.shape[0]
        if question_ids is None:
            question_ids = torch.tensor([list(self.info.tasks[task].text_prompt_ids)] * B)
            question_mask = torch.ones_like(question_ids)
            texts = [self.caption_text] * B
        out = self.model.generate(pixel_values=pixel_values, input_ids=question_ids, attention_mask=question_mask,
                                  max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                                  **self.hf_extra(list(texts or [])), **generation)
        return strip_prompt(out, 1, generation.get("eos_token_id", self.eos_id))


class InstructBlipT5Adapter(Blip2T5Adapter):
    """InstructBLIP with Flan-T5: caption with LAVIS's instruction (or --prompt) and vqa (the text as given), each
    read by both the Q-Former (its BERT ids, fed to the vision graph) and the T5 encoder."""

    architecture = "InstructBlipForConditionalGeneration"
    family = "instructblip-t5"
    caption_text = INSTRUCT_CAPTION

    def __init__(self, source: str, prompt: str | None = None):
        from transformers import AutoTokenizer

        try:
            self.qformer = AutoTokenizer.from_pretrained(str(Path(source) / "qformer_tokenizer"), local_files_only=True)
        except Exception as e:
            raise ModelLoadError(f"{source}/qformer_tokenizer: InstructBLIP's Q-Former tokenizer does not load ({e})") from None
        if not getattr(self.qformer, "is_fast", False):
            raise ModelLoadError(f"{source}/qformer_tokenizer: no fast (tokenizers) version to export")
        text = prompt if prompt is not None else self.caption_text
        if not text.strip():
            raise ModelLoadError(f"{source}: InstructBLIP's Q-Former reads the caption instruction; --prompt must not be empty")
        limit = self._qformer_limit(source)
        if len(self.qformer(text)["input_ids"]) > limit:
            raise ModelLoadError(f"{source}: the caption instruction is over the Q-Former's {limit} positions")
        super().__init__(source, prompt)
        self.info.prompt["vision_text"] = {"tokenizer": QFORMER_TOKENIZER, "inputs": ["qformer_input_ids", "qformer_attention_mask"],
                                           "max_length": limit, "texts": {"caption": self.caption_text}}

    @staticmethod
    def _qformer_limit(source: str) -> int:
        cfg = read_json(Path(source) / "config.json", ModelLoadError)
        return int(((cfg.get("qformer_config") or {}).get("max_position_embeddings")) or 512)

    def vision_text_tokenizer_json(self) -> str:
        return self.qformer.backend_tokenizer.to_str()

    def vision_encoder(self) -> nn.Module:
        return _InstructVision(self.model).eval()

    def qformer_rows(self, texts: list[str]) -> tuple:
        """The Q-Former's ids and mask of these texts, right-padded (as the processor pads with BERT's tokenizer)."""
        rows = [self.qformer(t)["input_ids"] for t in texts]
        width = max(map(len, rows))
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        return ids, mask

    def vision_args(self, pixel_values, texts) -> tuple:
        return (pixel_values, *self.qformer_rows(list(texts)))

    def hf_extra(self, texts: list[str]) -> dict:
        ids, mask = self.qformer_rows(texts)
        return {"qformer_input_ids": ids, "qformer_attention_mask": mask}
