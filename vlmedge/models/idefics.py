"""Adapter of Hugging Face `IdeficsForVisionText2Text` (IDEFICS, the open Flamingo) on the prefix contract
with gated cross-attention.

IDEFICS keeps the image out of the language model's sequence: each image is one `<image>` token in the
text, and every `cross_layer_interval`-th LLaMA layer is preceded by a gated cross-attention layer that
reads the image's tokens (the vision tower's, resampled by a perceiver to a fixed number of latents).
Four graphs:

    vision_encoder(pixel_values[frames,3,H,W])  -> image_embeds[frames,latents,Dv]  (tower + perceiver resampler)
    cross_kv(image_embeds[batch,image_len,Dv])  -> cross.{j}.key/value[batch,heads,image_len,dh]  (one per gated layer)
    embed(input_ids[batch,seq_len])              -> inputs_embeds[batch,seq_len,D]  (the decoupled table: ids past
                                                    the base vocabulary read the additional embeddings)
    decoder(inputs_embeds, attention_mask, position_ids, cross_mask[batch,seq_len,image_len],
            past.{i}.self.key/value, cross.{j}.key/value) -> logits[batch,V+additional], present.{i}.self.key/value

The cross K/V are projected once per prompt (HF projects them again at every step) and fed to every decoder
call. A row's images sit one after another along `image_len` (`latents` rows each; a batch's rows with
fewer images are padded with zero rows that their mask hides). `cross_mask` says which image rows each
query token sees: the runtime writes it from the prompt ids as `IdeficsProcessor` does (each token sees the
latest `<image>` before it, none before the first image and none after an EOS until the next image), and
every generated token sees what the prompt's last token saw, as HF's `generate` carries it. A token that
sees no image gets a zero cross-attention output (HF's `cross_attention_gate`).

IDEFICS checkpoints carry no chat template: the bundle carries the instruct models' prompt format as a
template vlmedge writes (PROMPT_TEMPLATE), equal to what the processor writes for
`["User:", image, "text<end_of_utterance>", "\\nAssistant:"]`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from vlmedge.errors import ModelLoadError
from vlmedge.models.base import Preprocessing, flat_kv, pair_kv
from vlmedge.models.blip2 import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from vlmedge.models.paligemma import fixed_preprocessing
from vlmedge.models.prefix import HfPrefixAdapter, chat_template

# The instruct checkpoints' turns (HuggingFaceM4/idefics-9b-instruct's model card): "User:" or "Assistant:", the
# parts in order (a run of images written as IdeficsProcessor writes it: <fake><image><fake><image><fake>), then
# <end_of_utterance> and a newline; the generation prompt "Assistant:". BOS first, as the processor writes it.
PROMPT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User:' }}{% elif message['role'] == 'assistant' %}{{ 'Assistant:' }}{% endif %}"
    "{% set run = namespace(image=false) %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{% if not run.image %}{{ '<fake_token_around_image>' }}{% endif %}"
    "{{ '<image><fake_token_around_image>' }}{% set run.image = true %}"
    "{% else %}{{ part['text'] }}{% set run.image = false %}{% endif %}{% endfor %}"
    "{{ '<end_of_utterance>\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
MAX_IMAGES = 8  # images one prompt may hold (the cross_kv and decoder graphs' image_len axis: latents each)


class _Vision(nn.Module):
    """The vision tower's last hidden state (every patch and CLS), resampled by the perceiver when the model
    has one: [frames, latents, Dv]."""

    def __init__(self, model):
        super().__init__()
        self.tower = model.model.vision_model
        self.resampler = model.model.perceiver_resampler if model.config.use_resampler else None

    def forward(self, pixel_values):
        states = self.tower(pixel_values=pixel_values).last_hidden_state
        return states if self.resampler is None else self.resampler(states)


class _CrossKV(nn.Module):
    """Each gated layer's cross-attention keys and values of the images' tokens (keys RMS-normed per head
    where the model has q/k layer norms): cross.0.key, cross.0.value, cross.1.key, ..."""

    def __init__(self, model):
        super().__init__()
        self.layers = nn.ModuleList(block.cross_attn for block in model.model.gated_cross_attn_layers)

    def forward(self, image_embeds):
        b, n, _ = image_embeds.shape
        out = []
        for attn in self.layers:
            k = attn.k_proj(image_embeds).view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)
            v = attn.v_proj(image_embeds).view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)
            out += [attn.k_layer_norm(k) if attn.qk_layer_norms else k, v]
        return tuple(out)


class _Embed(nn.Module):
    """IDEFICS's decoupled embedding without data-dependent indexing: both tables read (ids clamped into
    each), the additional one's rows chosen where an id is past the base vocabulary."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, input_ids):
        n = self.table.num_embeddings
        base = nn.functional.embedding(input_ids.clamp(max=n - 1), self.table.weight)
        if self.table.num_additional_embeddings == 0:
            return base
        extra = self.table.additional_embedding(
            (input_ids - n).clamp(min=0, max=self.table.num_additional_embeddings - 1))
        return torch.where((input_ids >= n)[..., None], extra, base)


class IdeficsDecoder(nn.Module):
    """The LLaMA decoder with its gated cross-attention layers, reading precomputed cross K/V.

    Each gated layer is run as HF's `IdeficsGatedCrossAttentionLayer` runs it (RMS norm, cross-attention with
    eager softmax, output zeroed for tokens that see no image, tanh(alpha)-gated residual; then the gated MLP),
    with the keys and values given instead of projected from the image states."""

    inputs = ("inputs_embeds", "attention_mask", "position_ids", "cross_mask")
    position_rows = 1

    def __init__(self, model):
        super().__init__()
        self.model, self.head = model.model, model.lm_head
        self.cross_layers = len(model.model.gated_cross_attn_layers)

    def _gated(self, block, h, keys, values, additive, gate):
        attn = block.cross_attn
        residual = h
        x = block.input_layernorm(h)
        b, s, _ = x.shape
        q = attn.q_proj(x).view(b, s, attn.num_heads, attn.head_dim).transpose(1, 2)
        if attn.qk_layer_norms:
            q = attn.q_layer_norm(q)
        scores = torch.matmul(q, keys.transpose(-1, -2)) * attn.scaling + additive
        probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        x = attn.o_proj(torch.matmul(probs, values).transpose(1, 2).reshape(b, s, -1))
        x = x.masked_fill(~gate[:, :, None], 0.0)
        h = residual + block.act_cross_attn(block.alpha_cross_attn) * x
        residual = h
        x = block.mlp(block.post_attention_layernorm(h))
        return residual + block.act_dense(block.alpha_dense) * x

    def forward(self, inputs_embeds, attention_mask, position_ids, cross_mask, *past):  # the cache, then the cross K/V
        from transformers.cache_utils import DynamicCache
        from transformers.masking_utils import create_causal_mask

        m = self.model
        layers = len(m.layers)
        past, cross = past[: 2 * layers], past[2 * layers:]
        cache = DynamicCache(pair_kv(past))
        causal = create_causal_mask(config=m.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                    cache=cache, position_ids=position_ids)
        seen = cross_mask > 0
        floor = torch.finfo(inputs_embeds.dtype).min
        additive = torch.where(seen, 0.0, floor).to(inputs_embeds.dtype)[:, None]  # (B, 1, S, image_len)
        gate = seen.any(dim=-1)  # (B, S): the token sees some image
        h = inputs_embeds
        for idx, layer in enumerate(m.layers):
            if idx % m.cross_layer_interval == 0:
                j = idx // m.cross_layer_interval
                h = self._gated(m.gated_cross_attn_layers[j], h, cross[2 * j], cross[2 * j + 1], additive, gate)
            h = layer(h, attention_mask=causal, position_ids=position_ids, cache=cache)
        logits = self.head(m.norm(h)[:, -1])
        return (logits, *flat_kv((layer.keys, layer.values) for layer in cache.layers))


class IdeficsAdapter(HfPrefixAdapter):
    architecture = "IdeficsForVisionText2Text"
    family = "idefics"
    cross_attention = True  # the image reaches the LM through cross_kv and gated layers, not as prompt rows

    def __init__(self, source: str, prompt: str | None = None):
        super().__init__(source, prompt)
        cfg = self.model.config
        if cfg.num_hidden_layers % cfg.cross_layer_interval:  # HF's IdeficsModel would miss a gated layer too
            raise ModelLoadError(f"{source}/config.json: num_hidden_layers {cfg.num_hidden_layers} is not a multiple of "
                                 f"cross_layer_interval {cfg.cross_layer_interval}")
        eos = self.model.config.eos_token_id
        self.info.prompt["cross_attention"] = {"reset_token_id": int(eos if eos is not None else self.eos_id),
                                               "max_images": MAX_IMAGES}

    def image_token_id(self) -> int:
        from tokenizers import Tokenizer

        token = Tokenizer.from_str(self._tokenizer_json).token_to_id("<image>")
        if token is None:
            raise ModelLoadError(f"{self.source}: the tokenizer has no <image> token, which IDEFICS's prompt writes per image")
        return int(token)

    def prompt_template(self) -> str:
        return chat_template(self.source) or PROMPT_TEMPLATE

    def prompt_rules(self) -> dict:
        return {"add_special_tokens": False}

    def preprocessing(self, image_cfg: dict, proc_cfg: dict) -> Preprocessing:
        where = f"{self.source}/processor_config.json"
        size = image_cfg.get("size") or {}
        if not (isinstance(size, dict) and isinstance(size.get("height"), int) and isinstance(size.get("width"), int)):
            side = image_cfg.get("image_size")
            if not isinstance(side, int):
                raise ModelLoadError(f"{where}: IDEFICS's image processor resizes to image_size; got size {size!r:.60}")
            size = {"height": side, "width": side}
        return fixed_preprocessing({"image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD, **image_cfg},
                                   size["height"], size["width"], {"image_tokens": 1, "image_token": "<image>"})

    def vision_encoder(self) -> nn.Module:
        return _Vision(self.model).eval()

    def cross_kv(self) -> nn.Module:
        return _CrossKV(self.model).eval()

    def embed(self) -> nn.Module:
        return _Embed(self.model.model.embed_tokens).eval()

    def decoder(self) -> nn.Module:
        return IdeficsDecoder(self.model).eval()

    def probe_decoder(self, decoder: nn.Module, width: int):
        """The decoder after two positions with no past and one image of blank cross K/V (prefix_dims)."""
        heads, dh = self.model.config.num_attention_heads, self.model.config.hidden_size // self.model.config.num_attention_heads
        cross = [torch.zeros(1, heads, 3, dh) for _ in range(2 * decoder.cross_layers)]
        past = [torch.zeros(1, heads, 0, dh) for _ in range(2 * len(self.model.model.layers))]
        return decoder(torch.zeros(1, 2, self.model.config.hidden_size), torch.ones(1, 2, dtype=torch.long),
                       torch.arange(2)[None], torch.ones(1, 2, 3, dtype=torch.long), *past, *cross)

    def pixel_inputs(self, inputs: list) -> dict:
        """HF's pixel_values [batch, images, 3, H, W], zero frames where a row has fewer images (as the processor pads)."""
        most = max(1, max(len(item) for item in inputs))
        first = next((img.frames for item in inputs for img in item), None)
        shape = first.shape[1:] if first is not None else (3, self.info.preprocessing.height, self.info.preprocessing.width)
        px = np.zeros((len(inputs), most, *shape), np.float32)
        for i, item in enumerate(inputs):
            for j, img in enumerate(item):
                px[i, j] = img.frames[0]
        return {"pixel_values": torch.from_numpy(px)}

    def reference_inputs(self, ids, mask) -> dict:
        """The processor's image_attention_mask of these ids, by IdeficsProcessor's own functions."""
        from transformers.models.idefics.processing_idefics import (image_attention_mask_for_packed_input_ids,
                                                                     incremental_to_binary_attention_mask)

        class _Tok:  # what those functions read of a tokenizer
            eos_token_id = self.info.prompt["cross_attention"]["reset_token_id"]

            @staticmethod
            def convert_tokens_to_ids(token):
                return self.info.prompt["image_token_id"]

        images = int((ids == self.info.prompt["image_token_id"]).sum(1).max())
        incremental, _ = image_attention_mask_for_packed_input_ids(ids.clone(), _Tok, "pt")
        return {"image_attention_mask": incremental_to_binary_attention_mask(incremental, "pt", num_classes=max(1, images))}
