"""A model's own generation settings, as the bundle carries them to the runtime.

`generation_defaults(model)` reads a Hugging Face model's `generation_config` (which transformers
fills from the model config when the checkpoint has no generation_config.json) and returns the
settings that change greedy or beam-search output, under HF's names, as plain JSON values. The
exporter writes them into manifest.json `tasks.<task>.generation`; the runtime applies them as
logits processors in HF's order (vlmedge.runtime.decoding).

Settings that only matter when sampling (temperature, top_k, ...) are left out: the runtime is
deterministic. Settings that would change the output but that the runtime does not implement
(constraints, diverse beam groups, classifier-free guidance, ...) refuse the export in one line
naming the setting, rather than letting the bundle silently decode differently from the model.
"""

from __future__ import annotations

from typing import Any

from vlmedge.errors import ModelLoadError

# what the runtime applies, under HF's names
SUPPORTED = (
    "decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id",
    "max_length", "max_new_tokens", "min_length", "min_new_tokens",
    "num_beams", "length_penalty", "early_stopping",
    "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "renormalize_logits",
)

# settings that change greedy / beam output and are not implemented: (name, value that means "off")
UNSUPPORTED = (
    ("num_beam_groups", 1), ("diversity_penalty", 0.0), ("constraints", None), ("force_words_ids", None),
    ("sequence_bias", None), ("guidance_scale", 1.0), ("watermarking_config", None), ("stop_strings", None),
    ("encoder_repetition_penalty", 1.0), ("encoder_no_repeat_ngram_size", 0), ("num_return_sequences", 1),
    ("token_healing", False), ("penalty_alpha", None), ("dola_layers", None), ("forced_decoder_ids", None),
)


def _plain(value: Any) -> Any:
    """Tuples and numpy / torch scalars -> JSON values."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def generation_defaults(model: Any, where: str = "", **fixed: Any) -> dict[str, Any]:
    """The settings of `model.generation_config` (HF's names) that the runtime applies; `fixed`
    overrides some (what the family's own `generate` passes explicitly, e.g. BLIP's eos_token_id).
    Raises ModelLoadError naming a setting that would change the output but is not implemented."""
    gen = getattr(model, "generation_config", None)
    cfg = getattr(model, "config", None)
    values: dict[str, Any] = {}
    if gen is not None:
        values = {k: v for k, v in gen.to_dict().items() if v is not None}
    if cfg is not None:  # where HF reads the model config: the special ids generate() falls back to
        dec = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
        for key in ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
            if values.get(key) is None:
                for source in (cfg, dec):
                    if getattr(source, key, None) is not None:
                        values[key] = getattr(source, key)
                        break
    values.update({k: v for k, v in fixed.items() if v is not None})
    where = f"{where}: " if where else ""
    for name, off in UNSUPPORTED:
        value = values.get(name)
        if value is not None and value != off and not (off is None and value in ([], {}, False)):
            raise ModelLoadError(f"{where}generation_config.{name} = {_plain(value)!r:.60} changes the generated "
                                 f"tokens and the vlmedge runtime does not implement it; unset it to export")
    out = {k: _plain(values[k]) for k in SUPPORTED if values.get(k) is not None}
    if out.get("bad_words_ids") == []:
        del out["bad_words_ids"]
    return out
