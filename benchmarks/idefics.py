"""IDEFICS (gated cross-attention) on the CPU: export of the tiny IDEFICS, and an IDEFICS against HF `generate`.

1. Export time (per graph) and bundle size of the tiny random `idefics` of the test suite (tests/families.py
   IDEFICS_FAMILIES), default options (validation on 8 scenes included).
2. An IDEFICS of HuggingFaceM4/idefics-9b-instruct's shape scaled down to under 300 M parameters, random weights
   from configs (torch.manual_seed(0)): the vision tower at 224 px and 14 px patches (257 rows), 12 layers of width
   768 (the checkpoint: 32 of 1280); the perceiver resampler with the checkpoint's 64 latents, 3 layers of 12 heads
   of 64 (the checkpoint: 6 of 16 x 96); a LLaMA LM of 12 layers of width 768 with a gated cross-attention layer
   before every 4th (the checkpoint: 32 of 4096, every 4th) over LLaMA's 32,000-token vocabulary plus IDEFICS's 2
   additional ids, untied head. The tokenizer and processor are the test suite's (`_idefics_tokenizer`, IDEFICS's
   image processor at 224 px).
   Batch 1, greedy, a VQA question in the instruct format and `--new-tokens` tokens (`min_new_tokens` forces the
   count on both sides): time to first token and per token of vlmedge (ONNX Runtime, CPU) against HF `generate`
   (eager and SDPA) on the same pixels, prompt ids and image mask, and vlmedge INT4 weight-only against FP32; the
   measuring loop is benchmarks/prefix_families.py's `against_hf` (rounds alternate the contenders after a
   warm-up, 2 threads each; a PyTorch probe marks the quiet rounds; the per-token floor from the read bandwidth).
   HF's `generate` keeps the vision tower's states between steps but runs the perceiver and every gated layer's
   key and value projections again at each step; vlmedge projects them once per prompt (`cross_kv`).

Run:  .venv/bin/python benchmarks/idefics.py [--work /work/bench/idefics] [--rounds 8] [--skip-tiny] [--json PATH]
The model, its bundle and the INT4 variant are made once in --work and reused.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from blip2 import SIDE, measure  # noqa: E402


def build_idefics(out: Path) -> int:
    """HuggingFaceM4/idefics-9b-instruct's architecture scaled down (see the module docstring); returns its parameter count."""
    import torch
    from families import _idefics_tokenizer
    from transformers import IdeficsConfig, IdeficsForVisionText2Text, IdeficsImageProcessorPil, IdeficsProcessor

    tok, vocab = _idefics_tokenizer()
    cfg = IdeficsConfig(
        vocab_size=32000, additional_vocab_size=2, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
        num_attention_heads=12, cross_layer_interval=4, max_position_embeddings=2048, rms_norm_eps=1e-6,
        alpha_initializer="ones", alpha_type="float", use_resampler=True, tie_word_embeddings=False,
        bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<unk>"],
        vision_config=dict(embed_dim=768, image_size=SIDE, patch_size=14, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=64, resampler_depth=3, resampler_n_heads=12,
                              resampler_head_dim=64))
    torch.manual_seed(0)
    model = IdeficsForVisionText2Text(cfg).eval()
    model.save_pretrained(out)
    IdeficsProcessor(IdeficsImageProcessorPil(image_size=SIDE), tok).save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def main(argv=None) -> int:
    from families import IDEFICS_FAMILIES

    return measure(argv, __doc__, "/work/bench/idefics", IDEFICS_FAMILIES, "idefics-scaled", build_idefics, "idefics",
                   "IDEFICS-shaped")


if __name__ == "__main__":
    sys.exit(main())
