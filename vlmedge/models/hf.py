"""What the Hugging Face families share: loading with clear errors, tokenizer and processor
settings, and the decoder wrappers that hand HF's own cache the precomputed K/V.

The decoder graphs call the original decoder module (BLIP's text decoder, GPT-2, BERT, MBart, TrOCR)
with an `EncoderDecoderCache` built from the graph's inputs. A cache whose cross-attention part is
filled marks every layer as updated, so the HF attention reads the given cross K/V instead of
projecting the encoder states again: the projections run once per sequence, in `cross_kv`.

One `decoder` graph serves the prompt and every later token (its weights are stored and loaded
once): the prompt runs after a one-slot past that the attention mask hides, and positions come in
as an input, since the model would count the hidden slot (`HfDecoder`).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from vlmedge.errors import ModelLoadError, first_line, read_json
from vlmedge.models.base import Preprocessing, flat_kv, pair_kv

_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _cache_kv(cache) -> tuple[list, list]:
    s = [(layer.keys, layer.values) for layer in cache.self_attention_cache.layers]
    c = [(layer.keys, layer.values) for layer in cache.cross_attention_cache.layers]
    return s, c


class HfDecoderInit(nn.Module):
    """Runs the prompt: last-position logits, self K/V of the prompt, cross K/V of every layer."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.dec = decoder

    def forward(self, input_ids, encoder_states, encoder_mask):
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        out = self.dec(input_ids=input_ids, encoder_hidden_states=encoder_states, encoder_attention_mask=encoder_mask,
                       cache=EncoderDecoderCache(DynamicCache(), DynamicCache()), use_cache=True,
                       logits_to_keep=1, return_dict=True)
        s, c = _cache_kv(out.cache)
        return (out.logits[:, -1], *flat_kv(s), *flat_kv(c))


class HfDecoder(nn.Module):
    """The cross-attention contract's one decoder graph: `input_ids` [B, S] after the cached self K/V
    (`past`, P >= 1 slots; `attention_mask` [B, P + S] hides the slots that hold nothing), at
    `position_ids` [B, S], with the cross K/V that `HfCrossKV` computed. Last-position logits and
    the self K/V [B, H, P + S, D] for the next call."""

    def __init__(self, decoder: nn.Module, layers: int):
        super().__init__()
        self.dec = decoder
        self.n = layers

    def forward(self, input_ids, attention_mask, position_ids, encoder_mask, *kv):
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        n = self.n
        pairs = pair_kv(kv)
        cache = EncoderDecoderCache(DynamicCache(pairs[:n]), DynamicCache(pairs[n:]))
        # The decoder layers run cross-attention only when encoder states are given; with the
        # cache filled they use them for nothing but batch size, length and dtype of the mask.
        stand_in = encoder_mask[:, :, None].to(kv[0].dtype)
        with given_positions(self.dec, position_ids) as extra:
            out = self.dec(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=stand_in,
                           encoder_attention_mask=encoder_mask, cache=cache, use_cache=True, logits_to_keep=1,
                           return_dict=True, **extra)
        s, _ = _cache_kv(out.cache)
        return (out.logits[:, -1], *flat_kv(s))


class HfCrossKV(nn.Module):
    """Every layer's cross-attention K/V of the encoder states, once per sequence. The decoder runs one
    start token to get them; the export keeps only what the K/V depend on (the K/V projections)."""

    def __init__(self, decoder: nn.Module, start_id: int):
        super().__init__()
        self.init = HfDecoderInit(decoder)
        self.start_id = start_id

    def forward(self, encoder_states):
        ids = torch.full(encoder_states.shape[:1] + (1,), self.start_id, dtype=torch.long, device=encoder_states.device)
        mask = torch.ones(encoder_states.shape[:2], dtype=torch.long, device=encoder_states.device)
        out = self.init(ids, encoder_states, mask)
        return out[1 + (len(out) - 1) // 2 :]


@contextmanager
def given_positions(decoder: nn.Module, positions: torch.Tensor):
    """Make `decoder` embed `positions` [B, S] instead of counting from its cache length. Decoders
    that take `position_ids` get them (GPT-2, BERT, BLIP: the kwargs yielded); BART-style learned
    tables (BART, MBart, TrOCR) and TrOCR's sinusoidal table, which count from the cache, are
    patched for the call."""
    patched = []
    for m in decoder.modules():
        kind = type(m).__name__
        if kind.endswith("LearnedPositionalEmbedding") and hasattr(m, "offset"):
            patched.append((m, lambda *a, m=m, **k: nn.Embedding.forward(m, positions + m.offset)))
        elif kind.endswith("SinusoidalPositionalEmbedding") and hasattr(m, "padding_idx") and hasattr(m, "weights"):
            # TrOCR: position i of an unpadded sequence is padding_idx + 1 + i
            patched.append((m, lambda *a, m=m, **k: m.weights.index_select(0, (positions + m.padding_idx + 1).reshape(-1))
                            .reshape(*positions.shape, -1).detach()))
    for m, forward in patched:
        m.forward = forward
    try:
        yield {} if patched else {"position_ids": positions}
    finally:
        for m, _ in patched:
            del m.forward


def load_hf_model(cls, path: str):
    """from_pretrained with local files only; any failure is one line naming the directory.

    Eager attention everywhere: torch.export fails on the SDPA attention of BEiT and Swin vision
    encoders, some decoders (TrOCR) have no SDPA version, and eager gives HF's tokens all the same."""
    p = Path(path)
    weights = sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin"))
    if not weights:
        raise ModelLoadError(f"{p}: no weights (*.safetensors or *.bin) next to config.json")
    try:
        model = cls.from_pretrained(str(p), local_files_only=True, attn_implementation="eager")
    except Exception as e:
        raise ModelLoadError(f"{p}: weights fail to load as {cls.__name__} ({first_line(e)[:300]})") from None
    return restore_sinusoidal_tables(model).float().eval()


def restore_sinusoidal_tables(model: nn.Module) -> nn.Module:
    """Recompute position tables that `from_pretrained` leaves on the meta device.

    TrOCR's sinusoidal positions (`use_learned_position_embeddings=False`) keep their table in a plain
    attribute, neither parameter nor buffer; transformers 5.x builds models on the meta device and never
    materialises it, so the model as loaded fails with "Cannot copy out of meta tensor"."""
    for m in model.modules():
        table = getattr(m, "weights", None)
        if isinstance(table, torch.Tensor) and table.is_meta and hasattr(m, "get_embedding"):
            m.weights = m.get_embedding(table.shape[0], m.embedding_dim, m.padding_idx)
    return model


@torch.no_grad()
def vision_dims(source: str, vision: nn.Module, prep: Preprocessing) -> tuple[int, int]:
    """(tokens, width) of the vision graph's output, measured on an image at the native size."""
    out = vision(torch.zeros(1, 3, prep.height, prep.width))
    if out.dim() != 3:
        raise ModelLoadError(f"{source}: the vision encoder gives a {out.dim()}-D output {list(out.shape)}; "
                             "vlmedge needs [batch, tokens, width] (ViT, DeiT, BEiT, Swin, DonutSwin)")
    return int(out.shape[1]), int(out.shape[2])


@torch.no_grad()
def decoder_dims(decoder_init: nn.Module, start_id: int, encoder_states: torch.Tensor) -> dict:
    """Decoder layers, heads, head size and vocabulary, measured from the decoder's own cache and logits
    after one token (config names differ by family and some mean the encoder's: MBart's num_hidden_layers)."""
    mask = torch.ones(encoder_states.shape[:2], dtype=torch.long)
    logits, *kv = decoder_init(torch.tensor([[start_id]]), encoder_states, mask)
    layers = len(kv) // 4  # self K, V and cross K, V per layer
    _, heads, _, head_dim = kv[0].shape
    return dict(decoder_layers=layers, decoder_heads=int(heads), decoder_head_dim=int(head_dim),
                vocab_size=int(logits.shape[-1]))


def tokenizer_json(path: str) -> str:
    """The model directory's tokenizer in `tokenizers` JSON (the fast tokenizer's backend)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"{path}: no usable tokenizer ({first_line(e)[:200]})") from None
    if not getattr(tok, "is_fast", False):
        raise ModelLoadError(f"{path}: the tokenizer has no fast (tokenizers) version to export")
    return tok.backend_tokenizer.to_str()


def weight_files(path: str) -> list[Path]:
    p = Path(path)
    return sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin"))


def image_size(size) -> tuple[int, int]:
    """A config's `image_size` (an int, or [height, width] as DonutSwin has it) as (height, width)."""
    if isinstance(size, (list, tuple)):
        return int(size[0]), int(size[1])
    return int(size), int(size)


def image_processor_settings(path: str) -> dict | None:
    """The image processor's settings as saved: transformers 5's processor_config.json (nested under
    `image_processor`), else the older preprocessor_config.json; None where neither holds them. Every
    family reads its settings through this (the decoder-only ones through models.prefix.processor_settings)."""
    where = settings_file(path)
    if where is None:
        return None
    cfg = _json_object(where)
    return cfg["image_processor"] if where.name == "processor_config.json" else cfg


def settings_file(path: str) -> Path | None:
    """The file image_processor_settings reads (for messages), or None."""
    p = Path(path)
    nested = p / "processor_config.json"
    if nested.is_file() and isinstance(_json_object(nested).get("image_processor"), dict):
        return nested
    return p / "preprocessor_config.json" if (p / "preprocessor_config.json").is_file() else None


def _json_object(path: Path) -> dict:
    cfg = read_json(path, ModelLoadError)
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def processor_type(cfg: dict) -> str:
    """The image processor's class name as saved (older checkpoints name a feature extractor), or ""."""
    return str(cfg.get("image_processor_type") or cfg.get("feature_extractor_type") or "")


def preprocessing(path: str, size: tuple[int, int], default_mean, default_std, default_resample: str) -> Preprocessing:
    """From the saved image-processor settings where present (image_processor_settings), else the family's
    processor defaults. `size` is the model's (height, width), from its config."""
    cfg = image_processor_settings(path) or {}
    where = settings_file(path) or Path(path)
    given = cfg.get("size", list(size))
    if isinstance(given, dict):
        h, w = given.get("height", size[0]), given.get("width", size[1])
    elif processor_type(cfg).startswith("Donut") and isinstance(given, list):
        w, h = image_size(given)  # Donut's processor reads a size list as [width, height]
    else:
        h, w = image_size(given)
    if (h, w) != tuple(size):
        raise ModelLoadError(f"{where}: image size {h}x{w} differs from the model's {size[0]}x{size[1]}")
    resample = _PIL_RESAMPLE.get(cfg.get("resample"), default_resample)
    mean = tuple(float(x) for x in cfg.get("image_mean", default_mean))
    std = tuple(float(x) for x in cfg.get("image_std", default_std))
    rescale = float(cfg.get("rescale_factor", 1.0 / 255.0))
    return Preprocessing(height=h, width=w, resample=resample, mean=mean, std=std, rescale=rescale)


def strip_prompt(ids: torch.Tensor, prompt_len: int, eos_id: int | list[int]) -> list[list[int]]:
    """HF generate's output rows -> generated ids up to and including the first EOS (one id or several)."""
    eos = set(eos_id) if isinstance(eos_id, (list, tuple)) else {eos_id}
    rows = []
    for r in ids[:, prompt_len:].tolist():
        end = next((i for i, t in enumerate(r) if t in eos), None)
        rows.append(r if end is None else r[: end + 1])
    return rows
