"""What the decoder-only families share (the prefix contract): the image becomes a run of tokens in
the language model's own sequence.

Three graphs, and the merge in between done by the runtime in numpy:

    vision_encoder(pixel_values[frames,3,H,W])            -> image_embeds[frames,T,D]  (tower + connector)
    embed(input_ids[batch,seq_len])                        -> inputs_embeds[batch,seq_len,D]
    decoder(inputs_embeds[batch,seq_len,D], attention_mask[batch,total_len], position_ids[batch,seq_len],
            past.{i}.self.key/value[batch,kv_heads,past_len,dh])
        -> logits[batch,V] (last position), present.{i}.self.key/value[batch,kv_heads,total_len,dh]

One decoder graph serves the prompt (seq_len > 1) and every later token (seq_len = 1), so its
weights are stored and loaded once. The prompt runs after a one-slot past that the attention mask
hides (mask 0): a masked key gets exactly zero weight in the softmax, so the logits are those of a
run without it, and no graph ever sees a zero-length past (TensorRT refuses those). TensorRT builds
one engine with two optimisation profiles from this graph (prompt: past_len 1; step: seq_len 1).

Positions come in as an input, computed by the runtime from the attention mask as HF `generate`
does for left-padded batches (cumulative sum of the mask, minus one).

Families whose prompt attends to itself both ways (PaliGemma: the image and the text prefix; Gemma 3:
each image's tokens) take one more decoder input, `block_ids[batch,total_len]`, aligned with the
attention mask: -1 for a token that attends causally, and tokens that share an id >= 0 also see each
other both ways (HF's `block_sequence_ids`). The graph builds "causal or same block" from it, then each
layer kind's window (`BlockPrefixDecoder`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from vlmedge.errors import ModelLoadError, read_json
from vlmedge.models.base import flat_kv, pair_kv

CAPTION_INSTRUCTION = "Describe the image."  # caption's user text when export is given no --prompt


GROUPED = "vlmedge_grouped"
# language models whose eager attention is softmax(QK^T * scale [soft-capped] + mask) V over repeated KV
# heads (Gemma 2 soft-caps the scores with tanh; the others pass no softcap)
GROUPED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen2_vl_text", "qwen2_5_vl_text", "gemma", "gemma2",
                                 "gemma3_text"})


def grouped_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """HF's eager attention without repeating the KV heads: each KV head's query heads are stacked as
    rows of one product, so the graph reads the cache where it lies instead of copying it
    `heads / kv_heads` times at every step."""
    b, heads, s, d = query.shape
    kv = key.shape[1]
    scores = torch.matmul(query.reshape(b, kv, -1, d), key.transpose(2, 3)) * (d ** -0.5 if scaling is None else scaling)
    scores = scores.reshape(b, heads, s, -1)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs.reshape(b, kv, heads // kv * s, -1), value)
    return out.reshape(b, heads, s, d).transpose(1, 2).contiguous(), probs


@contextlib.contextmanager
def grouped(config):
    """`config`'s eager attention as `grouped_attention` while the block runs (language models of
    GROUPED_MODEL_TYPES; others run as they are)."""
    before = config._attn_implementation
    if getattr(config, "model_type", None) not in GROUPED_MODEL_TYPES or before != "eager":
        yield
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(GROUPED, grouped_attention)
    AttentionMaskInterface.register(GROUPED, eager_mask)
    config._attn_implementation = GROUPED
    try:
        yield
    finally:
        config._attn_implementation = before


class PrefixDecoder(nn.Module):
    """The language model over input embeddings with its cache given as graph inputs. Language models
    of GROUPED_MODEL_TYPES run with `grouped_attention` here (HF's reference keeps its eager
    attention: validation compares the two)."""

    inputs = ("inputs_embeds", "attention_mask", "position_ids")  # the graph's inputs before the cache
    position_rows = 1  # position_ids[batch, seq_len]; 3: position_ids[3, batch, seq_len] (M-RoPE)

    def __init__(self, lm: nn.Module, head: nn.Module):
        super().__init__()
        self.lm, self.head = lm, head

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        from transformers.cache_utils import DynamicCache

        with grouped(self.lm.config):
            out = self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                          cache=DynamicCache(pair_kv(past)), use_cache=True, return_dict=True)
        logits = self.head(out.last_hidden_state[:, -1])
        return (logits, *flat_kv((layer.keys, layer.values) for layer in out.cache.layers))


class BlockPrefixDecoder(PrefixDecoder):
    """The decoder of a family whose prompt holds blocks that attend both ways: one more input,
    `block_ids[batch,total_len]` (see the module docstring), from which the graph builds each layer
    kind's additive mask and hands the language model the masks ready (HF's Gemma 2 and Gemma 3 models
    take a {layer kind: mask} mapping).

    `window_over_blocks`: how a sliding layer's window meets the blocks, as the family's HF code composes
    them: True, window AND (causal OR block) (Gemma 3); False, (window AND causal) OR block (PaliGemma).
    `position_offset`: added to the positions the runtime computes (PaliGemma counts from 1).
    `softcap`: the final logits' tanh soft-capping, where the model has one (Gemma 2)."""

    inputs = ("inputs_embeds", "attention_mask", "position_ids", "block_ids")

    def __init__(self, lm: nn.Module, head: nn.Module, window_over_blocks: bool, position_offset: int = 0,
                 softcap: float | None = None):
        super().__init__(lm, head)
        self.window_over_blocks, self.position_offset, self.softcap = window_over_blocks, position_offset, softcap

    def masks(self, inputs_embeds, attention_mask, block_ids):
        S, T = inputs_embeds.shape[1], attention_mask.shape[1]
        q = torch.arange(S, device=inputs_embeds.device) + (T - S)  # the queries' places among the keys
        k = torch.arange(T, device=inputs_embeds.device)
        causal = (k[None, :] <= q[:, None])[None]  # (1, S, T)
        qb = block_ids[:, q, None]  # (B, S, 1): the queries' own blocks (a gather: shape inference follows it)
        same = (qb == block_ids[:, None, :]) & (qb >= 0)  # (B, S, T)
        keep = attention_mask[:, None, :] > 0
        floor = torch.finfo(inputs_embeds.dtype).min

        def additive(allowed):  # (B, 1, S, T): 0 where a key is seen, the dtype's minimum where not (as HF's eager mask)
            return torch.where(allowed & keep, 0.0, floor).to(inputs_embeds.dtype)[:, None]

        config = self.lm.config
        masks = {"full_attention": additive(causal | same)}
        window = getattr(config, "sliding_window", None)
        if window is not None and "sliding_attention" in (getattr(config, "layer_types", None) or ()):
            near = (k[None, :] > q[:, None] - window)[None]
            masks["sliding_attention"] = additive((causal | same) & near if self.window_over_blocks else (causal & near) | same)
        return masks

    def forward(self, inputs_embeds, attention_mask, position_ids, block_ids, *past):
        from transformers.cache_utils import DynamicCache

        masks = self.masks(inputs_embeds, attention_mask, block_ids)
        layered = len(masks) > 1 or getattr(self.lm.config, "layer_types", None) is not None
        with grouped(self.lm.config):
            out = self.lm(inputs_embeds=inputs_embeds, attention_mask=masks if layered else masks["full_attention"],
                          position_ids=position_ids + self.position_offset, cache=DynamicCache(pair_kv(past)),
                          use_cache=True, return_dict=True)
        logits = self.head(out.last_hidden_state[:, -1])
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return (logits, *flat_kv((layer.keys, layer.values) for layer in out.cache.layers))


class Embed(nn.Module):
    def __init__(self, table: nn.Module):
        super().__init__()
        self.table = table

    def forward(self, input_ids):
        return self.table(input_ids)


@torch.no_grad()
def prefix_dims(decoder: nn.Module, width: int, run) -> dict:
    """Layers, KV heads, head size and vocabulary, measured from the decoder's own cache and logits
    after two positions with no past (`run(decoder, width)`; grouped-query caches keep their KV-head count)."""
    probe = run(decoder, width)
    _, heads, _, head_dim = probe[1].shape
    return dict(decoder_layers=(len(probe) - 1) // 2, decoder_heads=int(heads), decoder_head_dim=int(head_dim),
                vocab_size=int(probe[0].shape[-1]))


def chat_template(path: str) -> str | None:
    """The chat template as transformers saves it: chat_template.jinja (transformers 5), or the
    `chat_template` of processor_config.json, chat_template.json or tokenizer_config.json."""
    p = Path(path)
    if (p / "chat_template.jinja").is_file():
        return (p / "chat_template.jinja").read_text()
    for name in ("processor_config.json", "chat_template.json", "tokenizer_config.json"):
        if (p / name).is_file():
            template = read_json(p / name, ModelLoadError).get("chat_template")
            if isinstance(template, str):
                return template
    return None


def processor_settings(path: str) -> tuple[dict, dict]:
    """(image-processor settings, processor settings) as saved: transformers 5's processor_config.json
    (the image processor nested under `image_processor`), or the older preprocessor_config.json."""
    from vlmedge.models.hf import _json_object, image_processor_settings

    p = Path(path)
    image = image_processor_settings(path)
    if image is None:
        raise ModelLoadError(f"{p}: no image-processor settings (processor_config.json with image_processor, or "
                             "preprocessor_config.json); save the processor with the model (processor.save_pretrained)")
    proc = _json_object(p / "processor_config.json") if (p / "processor_config.json").is_file() else {}
    return image, {k: v for k, v in proc.items() if k != "image_processor"}


def special_tokens(tokenizer_dir: str) -> dict[str, str]:
    """The tokenizer's named special tokens (bos_token, eos_token, ...), as chat templates read them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    named = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = getattr(tok, key, None)
        if isinstance(value, str):
            named[key] = value
    return named


def left_pad(rows: list[list[int]], pad: int) -> tuple[Any, Any]:
    """Token rows -> left-padded ids and attention mask (torch), as HF processors pad for generation."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


class HfPrefixAdapter:
    """A Hugging Face decoder-only VLM seen through the prefix contract. A family file gives the
    vision module (tower + connector), the language model and its head, the processor settings, and
    how HF's own `generate` takes a batch of images."""

    architecture = ""
    family = ""

    def __init__(self, source: str, prompt: str | None = None):
        from vlmedge.models.base import FamilyInfo, ModelDims, TaskSpec
        from vlmedge.models.generation import generation_defaults
        from vlmedge.models.hf import load_hf_model, tokenizer_json, weight_files

        import transformers

        self.source = source
        self.model = load_hf_model(getattr(transformers, self.architecture), source)
        self._tokenizer_json = tokenizer_json(source)
        self._weights = weight_files(source)
        template = self.prompt_template()
        image_cfg, proc_cfg = processor_settings(source)
        prep = self.preprocessing(image_cfg, proc_cfg)
        cfg = self.model.config
        tc = cfg.get_text_config(decoder=True)
        generation = generation_defaults(self.generation_model(), f"{source}/generation_config.json")
        eos = generation.get("eos_token_id", tc.eos_token_id)
        eos_first = eos[0] if isinstance(eos, list) else eos
        pad = generation.get("pad_token_id", tc.pad_token_id if tc.pad_token_id is not None else eos_first)
        if eos_first is None:
            raise ModelLoadError(f"{source}/config.json: needs eos_token_id to generate")
        self.eos_id, self.pad_id = int(eos_first), int(pad)
        tokens, width = self.probe_vision(prep)
        if not self.cross_attention and prep.processor["image_tokens"] != tokens:
            raise ModelLoadError(f"{source}: the processor writes {prep.processor['image_tokens']} image tokens per frame, "
                                 f"but the vision encoder gives {tokens}")
        self.image_width = width
        max_pos = int(getattr(tc, "max_position_embeddings", 2048) or 2048)
        lm_width = int(tc.hidden_size) if self.cross_attention else width
        dims = ModelDims(**prefix_dims(self.decoder(), lm_width, self.probe_decoder), encoder_hidden=lm_width,
                         image_tokens=tokens, max_target_len=max_pos)
        image_token = prep.processor.get("prompt_token", prep.processor["image_token"])
        named = special_tokens(source)
        spec = lambda: TaskSpec("vision_encoder", (), self.eos_id, self.pad_id, 32, dict(generation))  # noqa: E731
        self.info = FamilyInfo(
            family=self.family, architecture=self.architecture, dims=dims, preprocessing=prep,
            tasks={"caption": spec(), "vqa": spec()}, contract="prefix",
            prompt={"chat_template": template, "image_token": image_token,
                    "image_token_id": self.image_token_id(), "special_tokens": named,
                    "caption_instruction": prompt or self.caption_instruction, **self.prompt_rules()},
        )

    # -- what a family file gives -----------------------------------------------------------------
    caption_instruction = CAPTION_INSTRUCTION  # caption's text when export is given no --prompt
    # True: the images reach the LM through a cross_kv graph and the decoder's cross-attention (IDEFICS), their
    # placeholders stay tokens of the prompt, and the vision graph's width may differ from the LM's
    cross_attention = False

    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def probe_decoder(self, decoder: nn.Module, width: int):
        """The decoder's outputs after two positions with no past (prefix_dims measures them)."""
        blocks = (torch.full((1, 2), -1),) if "block_ids" in decoder.inputs else ()
        return decoder(torch.zeros(1, 2, width), torch.ones(1, 2, dtype=torch.long), torch.arange(2)[None], *blocks)

    def generation_model(self) -> nn.Module:
        """The model whose generation_config HF's `generate` applies (BLIP-2: its language model's)."""
        return self.model

    def prompt_template(self) -> str:
        """The jinja2 template that turns messages into the prompt's text: the model's chat template."""
        template = chat_template(self.source)
        if template is None:
            raise ModelLoadError(f"{self.source}: no chat template (chat_template.jinja, or chat_template in "
                                 "processor_config.json / tokenizer_config.json); save the processor with the model")
        return template

    def prompt_rules(self) -> dict:
        """More of the manifest's `prompt`: `blocks` (how the runtime writes the decoder's block_ids: "prefix",
        the whole prompt one block; "images", each image's tokens a block) and `add_special_tokens` (False: the
        template writes every special token, the tokenizer none)."""
        return {}

    def preprocessing(self, image_cfg: dict, proc_cfg: dict):
        raise NotImplementedError

    @torch.no_grad()
    def probe_vision(self, prep) -> tuple[int, int]:
        """(image tokens per frame, width) of the vision graph, measured on one blank frame."""
        frames = self.vision_encoder()(torch.zeros(1, 3, prep.height, prep.width))
        frames = frames[0] if isinstance(frames, tuple) else frames  # (features, image_newline): LLaVA-OneVision
        if frames.dim() != 3:
            raise ModelLoadError(f"{self.source}: the vision graph gives {list(frames.shape)}; expected [frames, tokens, width]")
        return int(frames.shape[1]), int(frames.shape[2])

    def vision_encoder(self) -> nn.Module:
        raise NotImplementedError

    def language_model(self) -> tuple[nn.Module, nn.Module]:
        """(the base language model taking inputs_embeds, the LM head)."""
        raise NotImplementedError

    def pixel_inputs(self, inputs: list) -> dict:
        """HF `generate`'s image inputs for a batch: per item, its images (runtime.processors.ImageInput)."""
        raise NotImplementedError

    def reference_inputs(self, ids, mask) -> dict:
        """HF `generate`'s inputs beyond ids, mask and pixels that its processor would give (token_type_ids)."""
        return {}

    # -- the contract ------------------------------------------------------------------------------
    def embed(self) -> nn.Module:
        return Embed(self.model.get_input_embeddings()).eval()

    def decoder(self) -> nn.Module:
        return PrefixDecoder(*self.language_model()).eval()

    def text_encoder(self) -> nn.Module:
        raise NotImplementedError(f"{self.architecture} has no question encoder")

    def tokenizer_json(self) -> str:
        return self._tokenizer_json

    def weight_files(self):
        return self._weights

    @torch.no_grad()
    def reference_generate_prefix(self, inputs: list, rows: list[list[int]], max_new_tokens: int = 20,
                                  num_beams: int = 1, **generation) -> list[list[int]]:
        """HF `generate` on a batch given as each item's images (runtime.processors.ImageInput) and prompt
        ids (image tokens already expanded), left-padded as the processor pads: generated ids, EOS kept."""
        from vlmedge.models.hf import strip_prompt

        ids, mask = left_pad(rows, self.pad_id)
        out = self.model.generate(input_ids=ids, attention_mask=mask, **self.pixel_inputs(inputs), **self.reference_inputs(ids, mask),
                                  max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False, **generation)
        eos = generation.get("eos_token_id", self.info.tasks["caption"].generation.get("eos_token_id", self.eos_id))
        return strip_prompt(out, ids.shape[1], eos)
