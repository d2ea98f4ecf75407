"""Saving and loading the reference model: model.safetensors + config.json + tokenizer.json.

Loading checks every file before building anything, and checks every tensor's name and shape
against the config, so a corrupt file or a mismatched config is one clear error naming the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vlmedge.errors import ModelLoadError, first_line, read_json

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"
BUILTIN_DIR = Path(__file__).parent / "weights"
BUILTIN_MODELS = {"shapes-vlm": BUILTIN_DIR / "shapes-vlm", "shapes-smolvlm": BUILTIN_DIR / "shapes-smolvlm",
                  "shapes-clip": BUILTIN_DIR / "shapes-clip"}
# built-in models saved as Hugging Face directories (model, processor, chat template), exported by their family's adapter
HF_BUILTINS = {"shapes-smolvlm": "SmolVLMForConditionalGeneration", "shapes-clip": "CLIPModel"}


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A built-in model's name or a directory holding the three files."""
    s = str(name_or_path)
    if s in HF_BUILTINS:
        raise ModelLoadError(f"{s}: a Hugging Face model ({HF_BUILTINS[s]}); it runs through its bundle "
                             f"(vlmedge.load({s!r}), vlmedge demo --model {s})")
    if s in BUILTIN_MODELS:
        return BUILTIN_MODELS[s]
    p = Path(s)
    if not p.exists():
        raise ModelLoadError(
            f"{s}: no such model: expected a built-in name ({', '.join(BUILTIN_MODELS)}) or a model directory"
        )
    if not p.is_dir():
        raise ModelLoadError(f"{s}: expected a model directory holding {CONFIG}, {WEIGHTS} and {TOKENIZER}")
    return p


def save_pretrained(model, tokenizer, out_dir: Path) -> None:
    """Write the three files into out_dir through the crash-safe writer (the directory appears whole)."""
    from safetensors.torch import save_file

    from vlmedge.outdir import OutputDir

    with OutputDir(out_dir, force=True, label="model directory") as w:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(w.path / WEIGHTS), metadata={"format": "pt"})
        (w.path / CONFIG).write_text(json.dumps({"model_type": "shapes-vlm", **model.config.to_dict()}, indent=2) + "\n")
        tokenizer.save(str(w.path / TOKENIZER))
        w.commit()


def load_config(model_dir: Path):
    from vlmedge.models.shapes_vlm import ShapesVLMConfig

    path = model_dir / CONFIG
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing model config")
    raw = read_json(path, ModelLoadError)
    if not isinstance(raw, dict) or raw.pop("model_type", None) != "shapes-vlm":
        raise ModelLoadError(f"{path}: expected a shapes-vlm config (\"model_type\": \"shapes-vlm\")")
    try:
        return ShapesVLMConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: {e}") from None


def load_tokenizer(model_dir: Path):
    from tokenizers import Tokenizer

    path = model_dir / TOKENIZER
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing tokenizer")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception subclasses for bad JSON
        raise ModelLoadError(f"{path}: not a valid tokenizers file ({first_line(e)})") from None


def load_pretrained(name_or_path: str | os.PathLike):
    """(model in eval mode, tokenizer) from a built-in name or a directory; clear errors otherwise."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from vlmedge.models.shapes_vlm import ShapesVLM

    model_dir = resolve_model_dir(name_or_path)
    cfg = load_config(model_dir)
    tokenizer = load_tokenizer(model_dir)
    if tokenizer.get_vocab_size() != cfg.vocab_size:
        raise ModelLoadError(
            f"{model_dir / TOKENIZER}: {tokenizer.get_vocab_size()} tokens, but {CONFIG} says vocab_size={cfg.vocab_size}"
        )
    wpath = model_dir / WEIGHTS
    if not wpath.is_file():
        raise ModelLoadError(f"{wpath}: missing weights")
    try:
        state = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"{wpath}: not a readable safetensors file ({e})") from None
    with torch.device("cpu"):
        model = ShapesVLM(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ModelLoadError(f"{wpath}: weights do not match {CONFIG} ({what})")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ModelLoadError(
                f"{wpath}: tensor {k} has shape {tuple(state[k].shape)}, {CONFIG} implies {tuple(v.shape)}"
            )
    model.load_state_dict(state)
    model.eval()
    return model, tokenizer
