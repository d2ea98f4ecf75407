"""The built-in reference VLM, `shapes-vlm`: a small model with the anatomy of BLIP.

- a ViT patch encoder over the image (2-D sin-cos positions, so distances are easy to read);
- a BLIP-style question encoder: self-attention over the question, cross-attention to the image;
- one causal decoder with self- and cross-attention that writes captions (cross-attending to the
  image states, started by [CAP]) and answers (cross-attending to the question states, started
  by [ANS]).

Attention takes keys/values from outside, so self-attention K/V can be cached across steps and
cross-attention K/V computed once per sequence; generation with and without the cache gives the
same tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

NEG_INF = -1e4  # additive mask value: finite and safe in FP16 (exp underflows to exactly 0)


@dataclass(frozen=True)
class ShapesVLMConfig:
    vocab_size: int
    image_size: int = 64
    patch_size: int = 8
    d_model: int = 128
    n_heads: int = 4
    vision_layers: int = 4
    text_layers: int = 3
    decoder_layers: int = 3
    mlp_ratio: int = 4
    max_question_len: int = 32
    max_target_len: int = 48
    pad_id: int = 0
    caption_start_id: int = 2
    answer_start_id: int = 3
    eos_id: int = 4
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ShapesVLMConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}")
        d = dict(d)
        for k in ("image_mean", "image_std"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) fixed 2-D sin-cos position table: half the channels code y, half x."""
    assert dim % 4 == 0
    omega = 1.0 / (100.0 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4)))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")

    def code(p: torch.Tensor) -> torch.Tensor:
        a = p.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([a.sin(), a.cos()], dim=1)

    return torch.cat([code(ys), code(xs)], dim=1).float()


class Attention(nn.Module):
    """Multi-head attention whose keys/values are projected separately, so they can be cached."""

    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d // n_heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._heads(self.key(x)), self._heads(self.value(x))  # 2 x (B, nh, S, hs)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.attend(x, k, v, bias)[0]

    def attend(self, x, k, v, bias=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Output (B, T, D) and attention probabilities (B, nh, T, S)."""
        B, T, D = x.shape
        q = self._heads(self.query(x))  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (B, nh, T, S)
        if bias is not None:
            att = att + bias
        probs = att.softmax(dim=-1)
        y = probs @ v  # (B, nh, T, hs)
        return self.out(y.transpose(1, 2).reshape(B, T, D)), probs


class MLP(nn.Module):
    def __init__(self, d: int, ratio: int):
        super().__init__()
        self.fc1 = nn.Linear(d, d * ratio)
        self.fc2 = nn.Linear(d * ratio, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-LN block: self-attention, optional cross-attention, MLP."""

    def __init__(self, cfg: ShapesVLMConfig, cross: bool):
        super().__init__()
        d = cfg.d_model
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, cfg.n_heads)
        self.ln_cross = nn.LayerNorm(d) if cross else None
        self.cross_attn = Attention(d, cfg.n_heads) if cross else None
        self.ln2 = nn.LayerNorm(d)
        self.mlp = MLP(d, cfg.mlp_ratio)

    def forward(self, x, bias=None, context=None, context_bias=None):
        return self.forward_with_attention(x, bias, context, context_bias)[0]

    def forward_with_attention(self, x, bias=None, context=None, context_bias=None):
        """Also returns the cross-attention probabilities (B, nh, T, S), or None without cross-attention."""
        h = self.ln1(x)
        x = x + self.attn(h, *self.attn.project_kv(h), bias)
        probs = None
        if self.cross_attn is not None:
            y, probs = self.cross_attn.attend(self.ln_cross(x), *self.cross_attn.project_kv(context), context_bias)
            x = x + y
        return x + self.mlp(self.ln2(x)), probs


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ShapesVLMConfig):
        super().__init__()
        d = cfg.d_model
        self.ln1 = nn.LayerNorm(d)
        self.self_attn = Attention(d, cfg.n_heads)
        self.ln2 = nn.LayerNorm(d)
        self.cross_attn = Attention(d, cfg.n_heads)
        self.ln3 = nn.LayerNorm(d)
        self.mlp = MLP(d, cfg.mlp_ratio)

    def forward(self, x, self_bias, past_kv, cross_kv, cross_bias):
        """x: (B, T, D); past_kv: cached (B, nh, P, hs) pair or None -> (x, present (B, nh, P+T, hs) pair)."""
        h = self.ln1(x)
        k, v = self.self_attn.project_kv(h)
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        x = x + self.self_attn(h, k, v, self_bias)
        x = x + self.cross_attn(self.ln2(x), *cross_kv, cross_bias)
        return x + self.mlp(self.ln3(x)), (k, v)


def _padding_bias(mask: torch.Tensor) -> torch.Tensor:
    """(B, S) 1/0 key mask -> (B, 1, 1, S) additive bias."""
    return (1.0 - mask.to(torch.float32))[:, None, None, :] * NEG_INF


def _causal_bias(T: int, P: int, device) -> torch.Tensor:
    """(1, 1, T, P+T): query t sees keys up to P+t."""
    q = torch.arange(T, device=device)[:, None] + P
    kpos = torch.arange(P + T, device=device)[None, :]
    return torch.where(kpos <= q, 0.0, NEG_INF)[None, None]


class VisionEncoder(nn.Module):
    def __init__(self, cfg: ShapesVLMConfig):
        super().__init__()
        grid = cfg.image_size // cfg.patch_size
        self.patch = nn.Conv2d(3, cfg.d_model, cfg.patch_size, stride=cfg.patch_size)
        self.pos = nn.Parameter(sincos_2d(grid, cfg.d_model)[None])  # (1, N, D)
        self.layers = nn.ModuleList(EncoderLayer(cfg, cross=False) for _ in range(cfg.vision_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch(pixel_values).flatten(2).transpose(1, 2) + self.pos  # (B, N, D)
        for layer in self.layers:
            x = layer(x)
        return self.ln_f(x)


class QuestionEncoder(nn.Module):
    def __init__(self, cfg: ShapesVLMConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_question_len, cfg.d_model)
        self.layers = nn.ModuleList(EncoderLayer(cfg, cross=True) for _ in range(cfg.text_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def forward(self, question_ids, question_mask, image_states) -> torch.Tensor:
        return self.forward_with_attention(question_ids, question_mask, image_states)[0]

    def forward_with_attention(self, question_ids, question_mask, image_states):
        """States (B, Q, D) and every layer's cross-attention to the image, each (B, nh, Q, N)."""
        Q = question_ids.shape[1]
        x = self.tok(question_ids) + self.pos(torch.arange(Q, device=question_ids.device))[None]
        bias = _padding_bias(question_mask)
        attention = []
        for layer in self.layers:
            x, probs = layer.forward_with_attention(x, bias, image_states, None)
            attention.append(probs)
        return self.ln_f(x), attention


class TextDecoder(nn.Module):
    def __init__(self, cfg: ShapesVLMConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_target_len, cfg.d_model)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def cross_kv(self, encoder_states: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention K/V of every layer, computed once per sequence."""
        return [layer.cross_attn.project_kv(encoder_states) for layer in self.layers]

    def forward(self, input_ids, cross_kv, encoder_mask, past=None, last_only: bool = False, positions=None,
                attention_mask=None):
        """input_ids (B, T) after `past` (P cached positions) -> logits (B, T or 1, V), present K/V.
        `positions` (B, T) replace the count from P and `attention_mask` (B, P + T) hides cached slots
        (the exported decoder runs the prompt after a hidden one-slot past)."""
        B, T = input_ids.shape
        P = 0 if past is None else past[0][0].shape[2]
        pos = torch.arange(P, P + T, device=input_ids.device)[None] if positions is None else positions
        x = self.tok(input_ids) + self.pos(pos)
        self_bias = _causal_bias(T, P, input_ids.device) if T > 1 else None
        if attention_mask is not None:
            keys = _padding_bias(attention_mask)
            self_bias = keys if self_bias is None else self_bias + keys
        cross_bias = _padding_bias(encoder_mask)
        present = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, self_bias, None if past is None else past[i], cross_kv[i], cross_bias)
            present.append(kv)
        if last_only:  # export: the runtime only needs the next token's logits
            x = x[:, -1:]
        return self.lm_head(self.ln_f(x)), present


class ShapesVLM(nn.Module):
    def __init__(self, cfg: ShapesVLMConfig):
        super().__init__()
        self.config = cfg
        self.vision = VisionEncoder(cfg)
        self.question = QuestionEncoder(cfg)
        self.decoder = TextDecoder(cfg)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        if isinstance(m, Attention):
            # Query/key projections start large enough that attention logits are O(1): lookups
            # (a question word finding its object) leave the uniform-attention plateau sooner.
            for proj in (m.query, m.key):
                nn.init.normal_(proj.weight, std=1.0 / math.sqrt(proj.in_features))

    # encoder side --------------------------------------------------------------------------
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision(pixel_values)  # (B, N, D)

    def encode_question(self, question_ids, question_mask, image_states) -> torch.Tensor:
        return self.question(question_ids, question_mask, image_states)  # (B, Q, D)

    def loss(self, encoder_states, encoder_mask, target_ids) -> torch.Tensor:
        """Teacher-forced cross entropy of target_ids ([start] w1 .. wn [EOS] [PAD]..)."""
        logits, _ = self.decoder(target_ids[:, :-1], self.decoder.cross_kv(encoder_states), encoder_mask)
        labels = target_ids[:, 1:].masked_fill(target_ids[:, 1:] == self.config.pad_id, -100)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)

    # generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, encoder_states, encoder_mask, start_id: int, max_new_tokens: int = 40, use_cache: bool = True) -> torch.Tensor:
        """Greedy decoding; returns (B, T) generated ids without the start token, [PAD] after [EOS]."""
        cfg = self.config
        B = encoder_states.shape[0]
        max_new_tokens = min(max_new_tokens, cfg.max_target_len - 1)
        cross_kv = self.decoder.cross_kv(encoder_states)
        seq = torch.full((B, 1), start_id, dtype=torch.long, device=encoder_states.device)
        done = torch.zeros(B, dtype=torch.bool, device=encoder_states.device)
        past = None
        for _ in range(max_new_tokens):
            if use_cache:
                logits, past = self.decoder(seq[:, -1:] if past is not None else seq, cross_kv, encoder_mask, past)
            else:
                logits, _ = self.decoder(seq, cross_kv, encoder_mask)
            nxt = logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, cfg.pad_id), nxt)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            done |= nxt == cfg.eos_id
            if bool(done.all()):
                break
        return seq[:, 1:]

    @torch.no_grad()
    def beam_search(self, encoder_states, encoder_mask, start_id: int, max_new_tokens: int, num_beams: int,
                    length_penalty: float = 1.0) -> list[list[int]]:
        """Beam search as Hugging Face `generate(num_beams=k)` does it (early_stopping=False), one
        sequence at a time and without a cache: generated ids of the best hypothesis, EOS kept."""
        cfg, k = self.config, num_beams
        max_new_tokens = min(max_new_tokens, cfg.max_target_len - 1)
        results = []
        for b in range(encoder_states.shape[0]):
            cross = self.decoder.cross_kv(encoder_states[b : b + 1])
            mask = encoder_mask[b : b + 1]
            beams: list[tuple[float, list[int]]] = [(0.0, [start_id])]  # (sum of log-probs, ids)
            finished: list[tuple[float, list[int]]] = []  # (length-normalised score, ids)
            for step in range(max_new_tokens):
                ids = torch.tensor([seq for _, seq in beams])
                n = len(beams)
                logits, _ = self.decoder(ids, [(ck.expand(n, -1, -1, -1), cv.expand(n, -1, -1, -1)) for ck, cv in cross],
                                         mask.expand(n, -1))
                logp = torch.log_softmax(logits[:, -1].float(), -1)
                total = (logp + torch.tensor([s for s, _ in beams])[:, None]).flatten()
                top = torch.topk(total, 2 * k)
                running = []
                for rank, (score, idx) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
                    src, tok = divmod(idx, logp.shape[-1])
                    seq = beams[src][1] + [tok]
                    if tok == cfg.eos_id or step + 1 == max_new_tokens:
                        if rank < k:  # only the top k candidates may finish
                            finished.append((score / (step + 1) ** length_penalty, seq))
                    elif len(running) < k:
                        running.append((score, seq))
                finished = sorted(finished, key=lambda f: -f[0])[:k]
                beams = running
                best_possible = beams[0][0] / (step + 1) ** length_penalty if beams else -math.inf
                if not beams or (len(finished) == k and best_possible <= finished[-1][0]):
                    break
            results.append(finished[0][1][1:])
        return results

    @torch.no_grad()
    def caption(self, pixel_values, max_new_tokens: int = 40, use_cache: bool = True) -> torch.Tensor:
        states = self.encode_image(pixel_values)
        mask = torch.ones(states.shape[:2], dtype=torch.long, device=states.device)
        return self.generate(states, mask, self.config.caption_start_id, max_new_tokens, use_cache)

    @torch.no_grad()
    def answer(self, pixel_values, question_ids, question_mask, max_new_tokens: int = 4, use_cache: bool = True) -> torch.Tensor:
        states = self.encode_question(question_ids, question_mask, self.encode_image(pixel_values))
        return self.generate(states, question_mask, self.config.answer_start_id, max_new_tokens, use_cache)
