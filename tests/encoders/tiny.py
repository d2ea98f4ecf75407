"""Tiny random dual encoders built to the published checkpoints' architectures (no hub, no weights).

- `clip`: openai/clip-vit-base-patch32's choices scaled down: quick_gelu, pre-LayerNorm ViT with a class
  token and 32 px patches at 224 (here 8 px at 32), the legacy `eos_token_id: 2` (pooling at the highest
  id, which is EOS), a byte-level BPE tokenizer with `</w>` word ends whose last two ids are
  <|startoftext|> and <|endoftext|> (also the pad token), 77 positions, CLIPImageProcessor (shortest edge,
  centre crop, OpenAI mean/std, bicubic).
- `siglip`: google/siglip-base-patch16-224's choices scaled down: gelu_pytorch_tanh, the attention-pooling
  head, 64 text positions pooled at the last one, logit bias, a SentencePiece tokenizer (SiglipTokenizer:
  lower case, punctuation removed, `</s>` as EOS and pad), SiglipImageProcessor (stretch to size, mean/std 0.5).

Widths are odd on purpose; weights are perturbed away from init so that embeddings differ between inputs.
"""

from __future__ import annotations

from pathlib import Path

import torch

IMAGE = 32

CORPUS = [
    "a photo of a red circle.", "a photo of a large blue square!", "two small triangles, left of a cat?",
    "it's 3 o'clock -- isn't it?", "A Photo Of A Green Triangle", "yellow purple orange cyan pink grey",
    "a dog, a cat and a forklift; a person with 42 boxes.", "how many circles are there ? 0 1 2 3 4 5 6 7 8 9",
]


def _perturb(model, std=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "logit" not in name:
                p.add_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def _corpus() -> list[str]:
    from vlmedge.data.scenes import scenes, vocabulary

    return CORPUS + [" ".join(vocabulary())] + [s.caption for s in scenes("train", 0, 50)]


def clip_tokenizer(out: Path):
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    core = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    core.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=420, initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False)
    core.train_from_iterator(_corpus(), trainer)
    import json

    model = json.loads(core.to_str())["model"]
    vocab = dict(model["vocab"])
    for ch in alphabet:  # every byte also as a word end, as CLIP's vocabulary has it
        vocab.setdefault(ch + "</w>", len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    tok.save_pretrained(out)
    return tok


def build_clip(out: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    out.mkdir(parents=True, exist_ok=True)
    tok = clip_tokenizer(out)
    V = len(tok)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=V, hidden_size=36, intermediate_size=52, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=V - 2, eos_token_id=2, pad_token_id=1),
        vision_config=dict(hidden_size=44, intermediate_size=60, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE, patch_size=8, hidden_act="quick_gelu"),
        projection_dim=20, logit_scale_init_value=2.6592,
    )
    torch.manual_seed(0)
    model = _perturb(CLIPModel(cfg))
    with torch.no_grad():
        model.logit_scale.fill_(3.2)  # exp: 24.5, so that probabilities are not all equal
    model.save_pretrained(out)
    CLIPImageProcessorPil(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}).save_pretrained(out)
    return out


def siglip_tokenizer(out: Path):
    import sentencepiece as spm
    from transformers import SiglipTokenizer

    text = out / "corpus.txt"
    text.write_text("\n".join(_corpus() * 4))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(out / "spiece"), vocab_size=90, model_type="unigram", hard_vocab_limit=False,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>",
                                   unk_piece="<unk>", add_dummy_prefix=False, normalization_rule_name="nmt_nfkc",
                                   minloglevel=2)
    text.unlink()
    tok = SiglipTokenizer(vocab_file=str(out / "spiece.model"), model_max_length=64)
    (out / "spiece.vocab").unlink()
    tok.save_pretrained(out)
    return tok


def build_siglip(out: Path) -> Path:
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel

    out.mkdir(parents=True, exist_ok=True)
    tok = siglip_tokenizer(out)
    cfg = SiglipConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=36, intermediate_size=52, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=64, hidden_act="gelu_pytorch_tanh", pad_token_id=1, eos_token_id=1, bos_token_id=None),
        vision_config=dict(hidden_size=36, intermediate_size=52, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE, patch_size=8, hidden_act="gelu_pytorch_tanh"),
    )
    torch.manual_seed(1)
    model = _perturb(SiglipModel(cfg))
    with torch.no_grad():
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-3.0)
    model.save_pretrained(out)
    SiglipImageProcessorPil(size={"height": IMAGE, "width": IMAGE}).save_pretrained(out)
    return out


def siglip2_tokenizer(out: Path):
    """Siglip2Tokenizer (Gemma's byte-fallback BPE, lower-cased, padded on the left) over a vocabulary trained here."""
    import json

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Siglip2Tokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    core = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    core.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(" ", "▁")])
    core.pre_tokenizer = pre_tokenizers.Split(pattern="▁", behavior="merged_with_next")
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    core.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=500, special_tokens=specials + bytes_, show_progress=False))
    model = json.loads(core.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Siglip2Tokenizer(vocab=model["vocab"], merges=merges, model_max_length=64)
    tok.save_pretrained(out)
    return tok


def build_siglip2(out: Path) -> Path:
    """google/siglip2-base-patch16-naflex's choices scaled down: NaFlex (patches of each image's own aspect
    ratio, at most max_num_patches, the position grid resized per image), Gemma's tokenizer padded on the left."""
    from transformers import Siglip2Config, Siglip2ImageProcessorPil, Siglip2Model

    out.mkdir(parents=True, exist_ok=True)
    tok = siglip2_tokenizer(out)
    cfg = Siglip2Config(
        text_config=dict(vocab_size=len(tok), hidden_size=36, intermediate_size=52, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=64, hidden_act="gelu_pytorch_tanh", pad_token_id=0, eos_token_id=1,
                         bos_token_id=2),
        vision_config=dict(hidden_size=36, intermediate_size=52, num_hidden_layers=2, num_attention_heads=4,
                           num_patches=16, patch_size=8, hidden_act="gelu_pytorch_tanh"),
    )
    torch.manual_seed(2)
    model = _perturb(Siglip2Model(cfg))
    with torch.no_grad():
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-3.0)
    model.save_pretrained(out)
    Siglip2ImageProcessorPil(patch_size=8, max_num_patches=24).save_pretrained(out)
    return out


BUILDERS = {"clip": build_clip, "siglip": build_siglip, "siglip2": build_siglip2}
