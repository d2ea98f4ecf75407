"""Tiny random-weight models of every supported Hugging Face family, built from configs (no hub).

Each builder writes a `save_pretrained` directory (weights, config, tokenizer, image processor)
whose vocabulary is the scene world's, so questions and prompts tokenise to real words.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from vlmedge.data.scenes import vocabulary

IMAGE = 32


def _perturb(model, std=0.15, seed=0):
    """Random weights far enough from init that outputs vary between images (not all EOS)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def _bert_tokenizer(out: Path):
    from transformers import BertTokenizerFast

    words = [w for w in vocabulary() if w not in {",", "?"}]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", ",", "?", *words]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(out / "vocab.txt"), do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.save_pretrained(out)
    return tok, {t: i for i, t in enumerate(vocab)}


def _gpt2_tokenizer(out: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0}
    for w in vocabulary():
        vocab[w] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.save_pretrained(out)
    return tok, vocab


def _blip_config(ids: dict, text_hidden: int, vision_hidden: int):
    from transformers import BlipConfig

    return BlipConfig(
        text_config=dict(vocab_size=len(ids) + 2, hidden_size=text_hidden, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, bos_token_id=ids["[DEC]"],
                         sep_token_id=ids["[SEP]"], pad_token_id=ids["[PAD]"], eos_token_id=ids["[SEP]"]),
        vision_config=dict(hidden_size=vision_hidden, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=IMAGE, patch_size=8),
    )


def _image_processor(out: Path, kind: str):
    from transformers import BlipImageProcessor, ViTImageProcessor

    cls = BlipImageProcessor if kind == "blip" else ViTImageProcessor
    cls(size={"height": IMAGE, "width": IMAGE}).save_pretrained(out)


def _blip(out: Path, architecture: str, vision_hidden: int) -> Path:
    import transformers

    _, ids = _bert_tokenizer(out)
    torch.manual_seed(0)
    model = getattr(transformers, architecture)(_blip_config(ids, 32, vision_hidden))
    _perturb(model).save_pretrained(out)
    _image_processor(out, "blip")
    return out


def blip_caption(out: Path) -> Path:
    return _blip(out, "BlipForConditionalGeneration", 48)  # widths differ: cross-attention sized for the image


def blip_vqa(out: Path) -> Path:
    return _blip(out, "BlipForQuestionAnswering", 32)  # BLIP VQA needs equal widths


def _vit(hidden: int):
    from transformers import ViTConfig

    return ViTConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                     image_size=IMAGE, patch_size=8)


def vit_gpt2(out: Path) -> Path:
    from transformers import GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel

    _, vocab = _gpt2_tokenizer(out)
    dec = GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=4, n_positions=64, add_cross_attention=True,
                     bos_token_id=0, eos_token_id=0)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(_vit(48), dec)  # widths differ: enc_to_dec_proj
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 0, 0, 0
    torch.manual_seed(0)
    _perturb(VisionEncoderDecoderModel(cfg)).save_pretrained(out)
    _image_processor(out, "vit")
    return out


def vit_bert(out: Path) -> Path:
    from transformers import BertConfig, VisionEncoderDecoderConfig, VisionEncoderDecoderModel

    _, ids = _bert_tokenizer(out)
    dec = BertConfig(vocab_size=len(ids), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64, is_decoder=True, add_cross_attention=True)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(_vit(32), dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = ids["[CLS]"], ids["[PAD]"], ids["[SEP]"]
    torch.manual_seed(0)
    _perturb(VisionEncoderDecoderModel(cfg)).save_pretrained(out)
    _image_processor(out, "vit")
    return out


# name -> (architecture it covers, builder, task)
FAMILIES: dict[str, tuple[str, Callable[[Path], Path], str]] = {
    "blip-caption": ("BlipForConditionalGeneration", blip_caption, "caption"),
    "blip-vqa": ("BlipForQuestionAnswering", blip_vqa, "vqa"),
    "vit-gpt2": ("VisionEncoderDecoderModel", vit_gpt2, "caption"),
    "vit-bert": ("VisionEncoderDecoderModel", vit_bert, "caption"),
}
