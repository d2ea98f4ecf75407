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


# ---------------------------------------------------------------------------------------------------
# Tiny models built to the architecture and config choices of published checkpoints: the same classes,
# flags and layer-count relations, at odd small sizes (3 heads, width 48, images not multiples of 32).


def _roberta_tokenizer(out: Path):
    """A tokenizer with the RoBERTa / XLM-R special ids that TrOCR, Donut and Nougat use:
    <s>=0, <pad>=1, </s>=2, <unk>=3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for w in vocabulary():
        vocab[w] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.save_pretrained(out)
    return tok, vocab


def _processor(out: Path, cls_name: str, height: int, width: int, **kw):
    import transformers

    getattr(transformers, cls_name)(size={"height": height, "width": width}, **kw).save_pretrained(out)


def _save_ved(out: Path, enc, dec, start: int, pad: int, eos: int, generation: dict, seed: int, std: float,
              perturb_seed: int = 0) -> Path:
    """Init with `seed`, then perturb by `std` (seeds and std chosen so that captions differ between
    test scenes for greedy and beam search)."""
    from transformers import VisionEncoderDecoderConfig, VisionEncoderDecoderModel

    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = start, pad, eos
    torch.manual_seed(seed)
    model = VisionEncoderDecoderModel(cfg)
    for k, v in generation.items():
        setattr(model.generation_config, k, v)
    _perturb(model, std=std, seed=perturb_seed).save_pretrained(out)
    return out


def ckpt_vit_gpt2(out: Path) -> Path:
    """nlpconnect/vit-gpt2-image-captioning: ViT + GPT-2 with cross-attention, equal widths (no
    projection); start, pad and EOS are all <|endoftext|>."""
    from transformers import GPT2Config, ViTConfig

    _, vocab = _gpt2_tokenizer(out)
    enc = ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96, image_size=40,
                    patch_size=8)
    dec = GPT2Config(vocab_size=len(vocab), n_embd=48, n_layer=3, n_head=3, n_positions=64, add_cross_attention=True,
                     bos_token_id=0, eos_token_id=0)
    _save_ved(out, enc, dec, 0, 0, 0, {}, seed=1, std=0.3, perturb_seed=1)
    _processor(out, "ViTImageProcessor", 40, 40)
    return out


def _blip_ckpt(out: Path, architecture: str, vision_hidden: int, vision_layers: int, vision_heads: int) -> Path:
    import transformers
    from transformers import BlipConfig

    _, ids = _bert_tokenizer(out)
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(ids) + 2, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=3, max_position_embeddings=64, bos_token_id=ids["[DEC]"],
                         sep_token_id=ids["[SEP]"], pad_token_id=ids["[PAD]"], eos_token_id=ids["[SEP]"]),
        vision_config=dict(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
                           num_attention_heads=vision_heads, image_size=40, patch_size=8),
    )
    torch.manual_seed(2)
    _perturb(getattr(transformers, architecture)(cfg), seed=2).save_pretrained(out)
    _processor(out, "BlipImageProcessor", 40, 40)
    return out


def ckpt_blip_caption_base(out: Path) -> Path:
    """Salesforce/blip-image-captioning-base: ViT-B vision (768) and BERT text (768): equal widths."""
    return _blip_ckpt(out, "BlipForConditionalGeneration", 48, 2, 3)


def ckpt_blip_caption_large(out: Path) -> Path:
    """Salesforce/blip-image-captioning-large: ViT-L vision (1024 wide, twice the layers) and a 768-wide
    text decoder whose cross-attention reads 1024-wide image states."""
    return _blip_ckpt(out, "BlipForConditionalGeneration", 60, 4, 3)


def ckpt_blip_vqa_base(out: Path) -> Path:
    """Salesforce/blip-vqa-base: question encoder and answer decoder, all 768 wide."""
    return _blip_ckpt(out, "BlipForQuestionAnswering", 48, 2, 3)


def _trocr_decoder(vocab: dict, d_model: int, cross: int, learned: bool, scale: bool):
    from transformers import TrOCRConfig

    return TrOCRConfig(vocab_size=len(vocab), d_model=d_model, decoder_layers=3, decoder_attention_heads=3,
                       decoder_ffn_dim=2 * d_model, max_position_embeddings=64, activation_function="relu",
                       use_learned_position_embeddings=learned, scale_embedding=scale, layernorm_embedding=True,
                       cross_attention_hidden_size=cross, is_decoder=True, add_cross_attention=True,
                       decoder_start_token_id=2, bos_token_id=0, pad_token_id=1, eos_token_id=2)


def ckpt_trocr_small(out: Path) -> Path:
    """microsoft/trocr-small-printed: DeiT encoder (class + distillation token, 384 wide) and a narrower
    TrOCR decoder (256) whose cross-attention reads the encoder width (cross_attention_hidden_size, no
    projection); scaled embeddings, embedding LayerNorm; decoding starts at </s>."""
    from transformers import DeiTConfig

    _, vocab = _roberta_tokenizer(out)
    enc = DeiTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96, image_size=40,
                     patch_size=8)
    dec = _trocr_decoder(vocab, 36, 48, learned=False, scale=True)
    _save_ved(out, enc, dec, 2, 1, 2, {}, seed=3, std=0.5)
    _processor(out, "ViTImageProcessor", 40, 40, resample=2)
    return out


def ckpt_trocr_base(out: Path) -> Path:
    """microsoft/trocr-base-printed: a BEiT-initialised ViT encoder (768, no qkv bias) and a wider
    TrOCR decoder (1024) with learned positions, cross-attending to the 768-wide states."""
    from transformers import ViTConfig

    _, vocab = _roberta_tokenizer(out)
    enc = ViTConfig(hidden_size=36, num_hidden_layers=2, num_attention_heads=3, intermediate_size=72, image_size=40,
                    patch_size=8, qkv_bias=False)
    dec = _trocr_decoder(vocab, 48, 36, learned=True, scale=False)
    _save_ved(out, enc, dec, 2, 1, 2, {}, seed=4, std=0.3)
    _processor(out, "ViTImageProcessor", 40, 40, resample=2)
    return out


def _donut_like(out: Path, image: tuple[int, int], window: int, generation: dict, seed: int) -> Path:
    from transformers import DonutSwinConfig, MBartConfig

    _, vocab = _roberta_tokenizer(out)
    enc = DonutSwinConfig(image_size=list(image), patch_size=4, embed_dim=24, depths=[1, 2], num_heads=[3, 3],
                          window_size=window, drop_path_rate=0.0)
    # MBartForCausalLM as the decoder: encoder_layers (what num_hidden_layers means for MBart) differs
    # from decoder_layers, as in the checkpoints (12 and 4)
    dec = MBartConfig(vocab_size=len(vocab), d_model=48, encoder_layers=4, decoder_layers=2, encoder_attention_heads=3,
                      decoder_attention_heads=3, encoder_ffn_dim=96, decoder_ffn_dim=96, max_position_embeddings=64,
                      scale_embedding=True, is_decoder=True, add_cross_attention=True, bos_token_id=0, pad_token_id=1,
                      eos_token_id=2, forced_eos_token_id=2)
    _save_ved(out, enc, dec, 0, 1, 2, generation, seed=seed, std=0.3, perturb_seed=1)
    _processor(out, "DonutImageProcessor", *image, do_align_long_axis=False)
    return out


def ckpt_donut_base(out: Path) -> Path:
    """naver-clova-ix/donut-base: DonutSwin (non-square [2560, 1920], hierarchical: fewer tokens than
    patches) and MBartForCausalLM (4 decoder layers against 12 encoder layers in its config); forced EOS."""
    return _donut_like(out, (44, 36), 3, {"forced_eos_token_id": 2}, seed=5)


def ckpt_nougat_small(out: Path) -> Path:
    """facebook/nougat-small: DonutSwin ([896, 672]) and MBartForCausalLM; forced EOS and no-repeat n-grams."""
    return _donut_like(out, (52, 36), 3, {"forced_eos_token_id": 2, "no_repeat_ngram_size": 3}, seed=6)


# name -> (published checkpoint mirrored, builder, task)
CHECKPOINTS: dict[str, tuple[str, Callable[[Path], Path], str]] = {
    "vit-gpt2-image-captioning": ("nlpconnect/vit-gpt2-image-captioning", ckpt_vit_gpt2, "caption"),
    "blip-image-captioning-base": ("Salesforce/blip-image-captioning-base", ckpt_blip_caption_base, "caption"),
    "blip-image-captioning-large": ("Salesforce/blip-image-captioning-large", ckpt_blip_caption_large, "caption"),
    "blip-vqa-base": ("Salesforce/blip-vqa-base", ckpt_blip_vqa_base, "vqa"),
    "trocr-small-printed": ("microsoft/trocr-small-printed", ckpt_trocr_small, "caption"),
    "trocr-base-printed": ("microsoft/trocr-base-printed", ckpt_trocr_base, "caption"),
    "donut-base": ("naver-clova-ix/donut-base", ckpt_donut_base, "caption"),
    "nougat-small": ("facebook/nougat-small", ckpt_nougat_small, "caption"),
}


def convnext_gpt2(out: Path) -> Path:
    """A ConvNeXt encoder (its output is a [B, C, H, W] feature map) with a GPT-2 decoder: refused.
    transformers itself cannot build this pair without `hidden_size` on the encoder config (ConvNeXt
    has `hidden_sizes`), and its forward hands the 4-D map to the decoder unflattened."""
    from transformers import ConvNextConfig, GPT2Config

    _, vocab = _gpt2_tokenizer(out)
    enc = ConvNextConfig(hidden_sizes=[24, 48], depths=[1, 1], num_stages=2, image_size=40, hidden_size=48)
    dec = GPT2Config(vocab_size=len(vocab), n_embd=48, n_layer=1, n_head=3, n_positions=64, add_cross_attention=True,
                     bos_token_id=0, eos_token_id=0)
    _save_ved(out, enc, dec, 0, 0, 0, {}, seed=7, std=0.1)
    _processor(out, "ConvNextImageProcessor", 40, 40)
    return out


# ---------------------------------------------------------------------------------------------------
# Decoder-only families (the prefix contract): saved as transformers 5 saves them, processor included
# (processor_config.json with the image processor nested inside, chat_template.jinja, tokenizer.json).

SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == 'image' %}"
    "{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
LLAVA_TEMPLATE = (  # llava-hf/llava-1.5-7b-hf's, with the tokenizer's BOS written by the tokenizer
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _chat_tokenizer(out: Path, bos: str, eos: str, special: list[str], add_bos: bool):
    """A word-level tokenizer over the scene world with a chat model's special tokens; `add_bos`: its
    post-processor writes BOS (Llama's), else the chat template does (SmolVLM's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in ["<unk>", bos, eos, *special, "User", "Assistant", "USER", "ASSISTANT", "Describe", "the", "image", ".", ":",
              *vocabulary()]:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    if add_bos:
        core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos, pad_token="<unk>", unk_token="<unk>",
                                  extra_special_tokens=special)
    tok.save_pretrained(out)
    return tok, vocab


def _save_processor(out: Path, processor_class: str, image_processor, chat_template: str, **fields):
    """processor_config.json as transformers 5 writes it (image processor nested), and chat_template.jinja."""
    import json

    image = image_processor.to_dict()
    (out / "processor_config.json").write_text(json.dumps({"processor_class": processor_class, "image_processor": image,
                                                           **fields}, indent=2))
    (out / "chat_template.jinja").write_text(chat_template)


def _idefics3_like(out: Path, architecture: str, processor_class: str, seed: int) -> Path:
    """HuggingFaceTB/SmolVLM-256M-Instruct's shape: SigLIP tower over square tiles, pixel shuffle x2 (3x3 here,
    as SmolVLM's 512 px / 16 px patches / scale 4), a Llama LM with grouped-query attention (3 query heads over 1
    KV head), tied embeddings, <end_of_utterance> as EOS; the processor splits images into tiles + a global image."""
    import transformers
    from transformers import SmolVLMImageProcessorPil

    special = ["<fake_token_around_image>", "<image>", "<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    _, vocab = _chat_tokenizer(out, "<|im_start|>", "<end_of_utterance>", special, add_bos=False)
    cfg_cls = getattr(transformers, architecture.replace("ForConditionalGeneration", "Config"))
    cfg = cfg_cls(
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3, image_size=36,
                           patch_size=6),
        text_config=dict(model_type="llama", vocab_size=len(vocab), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=True,
                         rms_norm_eps=1e-5, bos_token_id=vocab["<|im_start|>"], eos_token_id=vocab["<end_of_utterance>"],
                         pad_token_id=vocab["<unk>"]),
        image_token_id=vocab["<image>"], scale_factor=3, tie_word_embeddings=True, pad_token_id=vocab["<unk>"])
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(cfg)
    model.generation_config.eos_token_id = [vocab["<end_of_utterance>"]]
    model.generation_config.pad_token_id = vocab["<unk>"]
    _perturb(model, std=0.2, seed=seed).save_pretrained(out)
    ip = SmolVLMImageProcessorPil(size={"longest_edge": 72}, max_image_size={"longest_edge": 36})
    _save_processor(out, processor_class, ip, SMOLVLM_TEMPLATE, image_seq_len=4)
    return out


def smolvlm(out: Path) -> Path:
    return _idefics3_like(out, "SmolVLMForConditionalGeneration", "SmolVLMProcessor", seed=3)


def idefics3(out: Path) -> Path:
    return _idefics3_like(out, "Idefics3ForConditionalGeneration", "Idefics3Processor", seed=4)


def llava(out: Path) -> Path:
    """llava-hf/llava-1.5-7b-hf's shape: a CLIP tower read at its second-to-last layer, CLS dropped ("default"),
    a two-layer GELU projector, a Llama LM (4 query heads over 2 KV heads here), the tokenizer's BOS, the
    USER/ASSISTANT template; CLIP preprocessing (shortest edge, centre crop)."""
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration

    _, vocab = _chat_tokenizer(out, "<s>", "</s>", ["<image>"], add_bos=True)
    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=40, intermediate_size=80, num_hidden_layers=3,
                           num_attention_heads=4, image_size=30, patch_size=6, projection_dim=40),
        text_config=dict(model_type="llama", vocab_size=len(vocab), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
                         bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<unk>"]),
        image_token_id=vocab["<image>"], vision_feature_layer=-2, vision_feature_select_strategy="default",
        pad_token_id=vocab["<unk>"])
    torch.manual_seed(5)
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = vocab["<unk>"]
    _perturb(model, std=0.2, seed=5).save_pretrained(out)
    ip = CLIPImageProcessorPil(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    _save_processor(out, "LlavaProcessor", ip, LLAVA_TEMPLATE, patch_size=6, vision_feature_select_strategy="default",
                    num_additional_image_tokens=1, image_token="<image>")
    return out


# name -> (architecture it covers, builder, task)
PREFIX_FAMILIES: dict[str, tuple[str, Callable[[Path], Path], str]] = {
    "smolvlm": ("SmolVLMForConditionalGeneration", smolvlm, "all"),
    "idefics3": ("Idefics3ForConditionalGeneration", idefics3, "all"),
    "llava": ("LlavaForConditionalGeneration", llava, "all"),
}


LLAVA_ONEVISION_TEMPLATE = (  # llava-hf/llava-onevision-qwen2-0.5b-ov-hf's (Qwen2 turns, images before the text)
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] }}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def llava_onevision(out: Path) -> Path:
    """llava-hf/llava-onevision-qwen2-0.5b-ov-hf's shape: a SigLIP tower (no CLS, "full"), anyres tiles from a grid of
    pinpoints plus a base image, unpadding, `anyres_max_N` downsampling (N = 2 here, so 2x2 grids are downsampled),
    a newline embedding per row, a Qwen2 LM with grouped-query attention (4 query heads over 2 KV heads) and no BOS."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessorPil

    _, vocab = _chat_tokenizer(out, "<|endoftext|>", "<|im_end|>", ["<|im_start|>", "<image>", "<video>", "user", "assistant"],
                               add_bos=False)
    tile = 30
    pinpoints = [[tile * r, tile * c] for r in (1, 2, 3) for c in (1, 2, 3)]
    cfg = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=40, intermediate_size=80, num_hidden_layers=2,
                           num_attention_heads=4, image_size=tile, patch_size=6, vision_use_head=False),
        text_config=dict(model_type="qwen2", vocab_size=len(vocab), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
                         eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<|endoftext|>"], bos_token_id=None),
        image_token_index=vocab["<image>"], video_token_index=vocab["<video>"], image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_2", vision_feature_select_strategy="full", vision_feature_layer=-1,
        tie_word_embeddings=True)
    torch.manual_seed(6)
    model = LlavaOnevisionForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = [vocab["<|im_end|>"]]
    model.generation_config.pad_token_id = vocab["<|endoftext|>"]
    _perturb(model, std=0.2, seed=6).save_pretrained(out)
    ip = LlavaOnevisionImageProcessorPil(size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints)
    _save_processor(out, "LlavaOnevisionProcessor", ip, LLAVA_ONEVISION_TEMPLATE, num_image_tokens=25,
                    vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_2", image_token="<image>")
    return out


PREFIX_FAMILIES["llava-onevision"] = ("LlavaOnevisionForConditionalGeneration", llava_onevision, "all")


# ---------------------------------------------------------------------------------------------------
# Families whose prompt holds blocks that attend both ways (tests/export/test_block_families.py): PaliGemma
# (a prefix-LM: no chat template, the processor writes the prompt and all of it is one block) and Gemma 3.


def _gemma_tokenizer(out: Path, special: list[str], words: list[str], named: dict[str, str] | None = None):
    """A word-level tokenizer over the scene world with Gemma's special ids (<pad>=0, <eos>=1, <bos>=2,
    <unk>=3), a post-processor that writes <bos> (as Gemma's tokenizer.json does), and "\\n" / "\\n\\n" as
    tokens of their own (Gemma's vocabulary has them; prompts end with or hold them). `named`: special tokens the
    processor reads by name (Gemma 3's boi_token, eoi_token, image_token)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in ["<pad>", "<eos>", "<bos>", "<unk>", *special, "\n", "\n\n", *words, *vocabulary()]:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    core.add_tokens([AddedToken("\n\n", normalized=False), AddedToken("\n", normalized=False)])
    core.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>", extra_special_tokens=named or special)
    tok.save_pretrained(out)
    return tok, vocab


def _paligemma_like(out: Path, text: dict, seed: int) -> Path:
    """A PaliGemma of `text` (a Gemma or Gemma 2 config): a SigLIP tower without its head (last hidden state,
    every patch a token), a linear projector to the LM's width, tied embeddings (Gemma's, scaled by the square
    root of the width), the <loc>/<seg> tokens, positions from 1; SigLIP's processor (30 px here, 0.5 / 0.5)
    saved as PaliGemmaProcessor saves it (image_seq_length in the image processor), no chat template."""
    import json

    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipImageProcessorPil

    extra = [f"<loc{i:0>4}>" for i in range(1024)] + [f"<seg{i:0>3}>" for i in range(128)]
    _, vocab = _gemma_tokenizer(out, ["<image>"], ["caption", "en", "es", "answer", *extra])
    image, patch = 30, 6
    cfg = PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=40, intermediate_size=80, num_hidden_layers=2,
                           num_attention_heads=4, image_size=image, patch_size=patch, vision_use_head=False),
        text_config=dict(vocab_size=len(vocab), hidden_size=48, max_position_embeddings=1024,
                         hidden_activation="gelu_pytorch_tanh", pad_token_id=0, eos_token_id=1, bos_token_id=2, **text),
        image_token_index=vocab["<image>"], projection_dim=48, hidden_size=48, vocab_size=len(vocab),
        tie_word_embeddings=True, pad_token_id=0)
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(cfg)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 1, 0
    _perturb(model, std=0.2, seed=seed).save_pretrained(out)
    ip = SiglipImageProcessorPil(size={"height": image, "width": image}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    image_cfg = {**ip.to_dict(), "image_seq_length": (image // patch) ** 2, "image_processor_type": "SiglipImageProcessor"}
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "PaliGemmaProcessor",
                                                           "image_processor": image_cfg}, indent=2))
    return out


def paligemma(out: Path) -> Path:
    """google/paligemma-3b-pt-224's shape: a Gemma LM with multi-query attention (4 query heads over 1 KV
    head), head size set apart from width / heads, GeGLU, (1 + w) RMS norms; no windows, no soft-capping."""
    text = dict(model_type="gemma", intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=1, head_dim=16)
    return _paligemma_like(out, text, seed=8)


def paligemma2(out: Path) -> Path:
    """google/paligemma2-3b-pt-224's shape: a Gemma 2 LM (alternating sliding-window and global layers,
    grouped-query attention: 4 query heads over 2 KV heads, head size set apart from width / heads,
    query_pre_attn_scalar = head size, attention logits soft-capped at 50, final logits at 30, GeGLU, (1 + w)
    RMS norms before and after each block). The window (16) is shorter than any prompt, so the sliding layers'
    window is exercised in the prompt, whose block reaches past it, and in the steps after it."""
    text = dict(model_type="gemma2", intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
                attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    return _paligemma_like(out, text, seed=7)


# name -> (architecture it covers, builder, task): prefix-LMs, no chat template
PREFIX_LM_FAMILIES: dict[str, tuple[str, Callable[[Path], Path], str]] = {
    "paligemma2": ("PaliGemmaForConditionalGeneration", paligemma2, "all"),
    "paligemma": ("PaliGemmaForConditionalGeneration", paligemma, "all"),
}


GEMMA3_TEMPLATE = (  # google/gemma-3-4b-it's (the system turn folded into the first user turn, images as <start_of_image>)
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n{%- if messages[0]['content'] is string -%}\n"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n{%- else -%}\n"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n{%- endif -%}\n"
    "{%- set loop_messages = messages[1:] -%}\n{%- else -%}\n{%- set first_user_prefix = \"\" -%}\n"
    "{%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n{%- endif -%}\n"
    "{%- if (message['role'] == 'assistant') -%}\n{%- set role = \"model\" -%}\n{%- else -%}\n"
    "{%- set role = message['role'] -%}\n{%- endif -%}\n"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "{%- if message['content'] is string -%}\n{{ message['content'] | trim }}\n"
    "{%- elif message['content'] is iterable -%}\n{%- for item in message['content'] -%}\n"
    "{%- if item['type'] == 'image' -%}\n{{ '<start_of_image>' }}\n{%- elif item['type'] == 'text' -%}\n"
    "{{ item['text'] | trim }}\n{%- endif -%}\n{%- endfor -%}\n{%- else -%}\n"
    "{{ raise_exception(\"Invalid content type\") }}\n{%- endif -%}\n{{ '<end_of_turn>\n' }}\n{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n{{'<start_of_turn>model\n'}}\n{%- endif -%}\n"
)


def gemma3(out: Path) -> Path:
    """google/gemma-3-4b-it's shape: a SigLIP tower without its head, its patches average-pooled to
    `mm_tokens_per_image` (6x6 patches to 3x3 here, as 64x64 to 16x16), RMS-normed and projected; each image
    written as "\\n\\n<start_of_image>" + soft tokens + "<end_of_image>\\n\\n", its soft tokens attending to each
    other both ways; a Gemma 3 LM: five sliding-window layers to one global (window 8 here, shorter than an
    image's run and than every prompt), local and global rotary bases (the global one linearly scaled), q/k
    norms, query_pre_attn_scalar, grouped-query attention (4 query heads over 2 KV heads), Gemma's scaled
    embeddings, tied; <end_of_turn> and <eos> end a turn; the tokenizer writes BOS, and so does the template."""
    import json

    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil

    special = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    _, vocab = _gemma_tokenizer(out, special, ["user", "model"], named={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                                                        "image_token": "<image_soft_token>"})
    image, patch, tokens = 36, 6, 9
    cfg = Gemma3Config(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=40, intermediate_size=80, num_hidden_layers=2,
                           num_attention_heads=4, image_size=image, patch_size=patch, vision_use_head=False),
        text_config=dict(vocab_size=len(vocab), hidden_size=48, intermediate_size=96, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                         sliding_window=8, max_position_embeddings=1024,
                         rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                                          "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
                         pad_token_id=0, eos_token_id=1, bos_token_id=2),
        mm_tokens_per_image=tokens, boi_token_index=vocab["<start_of_image>"], eoi_token_index=vocab["<end_of_image>"],
        image_token_index=vocab["<image_soft_token>"], tie_word_embeddings=True)
    torch.manual_seed(9)
    model = Gemma3ForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = [1, vocab["<end_of_turn>"]]
    model.generation_config.pad_token_id = 0
    _perturb(model, std=0.2, seed=9)
    with torch.no_grad():  # smaller embeddings: the layers, not the tied table's echo of the last token, pick the next
        model.model.language_model.embed_tokens.weight.mul_(0.2)
    model.save_pretrained(out)
    ip = Gemma3ImageProcessorPil(size={"height": image, "width": image}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                 do_pan_and_scan=False)
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "Gemma3Processor", "image_seq_length": tokens,
                                                           "image_processor": ip.to_dict()}, indent=2))
    (out / "chat_template.jinja").write_text(GEMMA3_TEMPLATE)
    return out


# name -> (architecture it covers, builder, task): every family whose prompt holds blocks that attend both ways
BLOCK_FAMILIES: dict[str, tuple[str, Callable[[Path], Path], str]] = {**PREFIX_LM_FAMILIES,
                                                                      "gemma3": ("Gemma3ForConditionalGeneration", gemma3, "all")}


QWEN2_VL_TEMPLATE = (  # Qwen/Qwen2-VL-2B-Instruct's (images and videos counted off, a default system turn)
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or "
    "'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' "
    "or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def qwen2_vl(out: Path) -> Path:
    """Qwen/Qwen2-VL-2B-Instruct's shape: a ViT over 6 px patches here (14 in the checkpoint) with a temporal patch of 2
    (an image is its own second frame), 2D rotary positions, 2x2 patch merging into the LM's width; a Qwen2 LM with
    M-RoPE (three position rows; mrope_section split of the head, [2, 3, 3] here as [16, 24, 24] of 128), grouped-query
    attention (3 query heads over 1 KV head), tied embeddings, no BOS; dynamic resolution: smart_resize between
    min_pixels and max_pixels (4 to 16 merged tokens here), so images of different sizes have different grids."""
    import json

    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    special = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    _, vocab = _chat_tokenizer(out, "<|endoftext|>", "<|im_end|>", special + ["system", "user", "assistant", "You", "are", "a",
                                                                             "helpful", "assistant."], add_bos=False)
    patch, merge = 6, 2
    cfg = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=48, num_heads=4, mlp_ratio=2, patch_size=patch,
                           spatial_merge_size=merge, temporal_patch_size=2, hidden_act="quick_gelu"),
        text_config=dict(vocab_size=len(vocab), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1_000_000.0},
                         bos_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|im_end|>"],
                         pad_token_id=vocab["<|endoftext|>"]),
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"], tie_word_embeddings=True)
    torch.manual_seed(10)
    model = Qwen2VLForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = [vocab["<|im_end|>"], vocab["<|endoftext|>"]]
    model.generation_config.pad_token_id = vocab["<|endoftext|>"]
    _perturb(model, std=0.2, seed=10).save_pretrained(out)
    factor = patch * merge
    ip = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=merge, temporal_patch_size=2,
                                  size={"shortest_edge": 4 * factor * factor, "longest_edge": 16 * factor * factor})
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor",
                                                           "image_processor": ip.to_dict()}, indent=2))
    (out / "chat_template.jinja").write_text(QWEN2_VL_TEMPLATE)
    return out


# name -> (architecture it covers, builder, task): M-RoPE and dynamic resolution (tests/export/test_mrope_families.py)
MROPE_FAMILIES: dict[str, tuple[str, Callable[[Path], Path], str]] = {
    "qwen2-vl": ("Qwen2VLForConditionalGeneration", qwen2_vl, "all"),
}


def qwen2_5_vl(out: Path) -> Path:
    """Qwen/Qwen2.5-VL-3B-Instruct's shape: as Qwen2-VL, with a vision tower of RMS norms and SwiGLU MLPs whose layers
    attend within windows of merged tokens (window_size 24 px here: 2x2 merged tokens, as 112 px are 4x4 of 28) except
    the full-attention layers (`fullatt_block_indexes`, every second layer here as every eighth in the checkpoint), the
    patches reordered window by window and the merged tokens put back; an `out_hidden_size` projection to the LM."""
    import json

    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    special = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    _, vocab = _chat_tokenizer(out, "<|endoftext|>", "<|im_end|>", special + ["system", "user", "assistant", "You", "are", "a",
                                                                             "helpful", "assistant."], add_bos=False)
    patch, merge = 6, 2
    cfg = Qwen2_5_VLConfig(
        vision_config=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=48, patch_size=patch,
                           spatial_merge_size=merge, temporal_patch_size=2, window_size=24, fullatt_block_indexes=[1, 3],
                           hidden_act="silu"),
        text_config=dict(vocab_size=len(vocab), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1_000_000.0},
                         bos_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|im_end|>"],
                         pad_token_id=vocab["<|endoftext|>"]),
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"], tie_word_embeddings=True)
    torch.manual_seed(11)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = [vocab["<|im_end|>"], vocab["<|endoftext|>"]]
    model.generation_config.pad_token_id = vocab["<|endoftext|>"]
    _perturb(model, std=0.2, seed=11).save_pretrained(out)
    factor = patch * merge
    ip = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=merge, temporal_patch_size=2,
                                  size={"shortest_edge": 4 * factor * factor, "longest_edge": 16 * factor * factor})
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2_5_VLProcessor",
                                                           "image_processor": ip.to_dict()}, indent=2))
    (out / "chat_template.jinja").write_text(QWEN2_VL_TEMPLATE)
    return out


MROPE_FAMILIES["qwen2.5-vl"] = ("Qwen2_5_VLForConditionalGeneration", qwen2_5_vl, "all")


# ---------------------------------------------------------------------------------------------------
# BLIP-2 and InstructBLIP with an OPT language model (tests/export/test_blip2_families.py): a vision tower,
# a Q-Former whose query tokens cross-attend to it, a projection to the LM's width; the processor writes one
# <image> per query token before the text's own BOS.


def _opt_tokenizer(out: Path):
    """A word-level tokenizer over the scene world with OPT's special ids (<s>=0, <pad>=1, </s>=2, <unk>=3), a
    post-processor that writes </s> as BOS (OPT's tokenizer does), "\\n" a token of its own (blip2-opt's EOS), and
    <image> added last as a special token (id 50265 in the checkpoints)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in ["<s>", "<pad>", "</s>", "<unk>", "\n", "Question", "Answer", ":", *vocabulary()]:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    core.add_tokens([AddedToken("\n", normalized=False)])
    core.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", vocab["</s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.add_tokens([AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
    tok.save_pretrained(out)
    return tok, {**vocab, "<image>": len(vocab)}


def _vicuna_tokenizer(out: Path):
    """A word-level tokenizer over the scene world with Llama's special ids (<unk>=0, <s>=1, </s>=2), a post-processor
    that writes <s> as BOS (Llama's does), padding with <unk> (Vicuna's), and <image> added last as a special token
    (as InstructBLIP-Vicuna's processor adds it)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in ["<unk>", "<s>", "</s>", "Question", "Answer", ":", *vocabulary()]:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<unk>",
                                  unk_token="<unk>")
    tok.add_tokens([AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
    tok.save_pretrained(out)
    return tok, {**vocab, "<image>": len(vocab)}


def _blip2_like(out: Path, architecture: str, seed: int, lm: str = "opt") -> Path:
    """Salesforce/blip2-opt-2.7b's shape (InstructBLIP: Salesforce/instructblip-vicuna-7b's, with OPT): a ViT with
    q/k/v bias and no CLS pooling head in use (every patch and CLS a row), a Q-Former whose every second layer
    cross-attends to it (cross_attention_frequency 2), `num_query_tokens` queries (6 here, 32 in the checkpoints),
    a linear projection to an OPT LM (learned positions offset by 2, pre-LayerNorm, ReLU, tied embeddings); EOS "\\n"
    in the text config (50118 in blip2-opt); BLIP's image processor (bicubic, OpenAI CLIP mean and std). InstructBLIP's
    Q-Former also reads the instruction, tokenised by its own BERT tokenizer (saved in qformer_tokenizer/).
    `lm` "llama": Salesforce/instructblip-vicuna-7b's language model, a Llama (untied head, <s> BOS, EOS </s>)."""
    import transformers
    from transformers import BlipImageProcessorPil

    tok, vocab = _opt_tokenizer(out) if lm == "opt" else _vicuna_tokenizer(out)
    image, patch, queries = 30, 6, 6
    instruct = architecture.startswith("InstructBlip")
    cfg_cls = getattr(transformers, architecture.replace("ForConditionalGeneration", "Config"))
    cfg = cfg_cls(
        vision_config=dict(hidden_size=40, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, image_size=image,
                           patch_size=patch, qkv_bias=True),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            cross_attention_frequency=2, encoder_hidden_size=40, max_position_embeddings=64,
                            **({"vocab_size": len(_bert_vocab())} if instruct else {})),
        text_config=dict(model_type="opt", vocab_size=len(vocab), hidden_size=48, ffn_dim=96, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=48, pad_token_id=1,
                         bos_token_id=2, eos_token_id=vocab["\n"], tie_word_embeddings=True) if lm == "opt" else
        dict(model_type="llama", vocab_size=len(vocab), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6, pad_token_id=0,
             bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
        num_query_tokens=queries, image_token_index=vocab["<image>"], use_decoder_only_language_model=True)
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(cfg)
    _perturb(model, std=0.2, seed=seed)
    with torch.no_grad():  # EOS where the random model would say "how" (sometimes, mid-answer): answers end apart
        table = model.get_output_embeddings().weight  # OPT's tied: the embeddings' rows too
        eos = vocab["\n"] if lm == "opt" else vocab["</s>"]
        table[eos] = table[vocab["how"]] * 1.1
    model.save_pretrained(out)
    ip = BlipImageProcessorPil(size={"height": image, "width": image})
    if instruct:
        from transformers import InstructBlipProcessor

        qtok, _ = _bert_tokenizer(out / "qformer_tokenizer")
        InstructBlipProcessor(ip, tok, qtok, num_query_tokens=queries).save_pretrained(out)
    else:
        from transformers import Blip2Processor

        Blip2Processor(ip, tok, num_query_tokens=queries).save_pretrained(out)
    return out


def _bert_vocab() -> list[str]:
    words = [w for w in vocabulary() if w not in {",", "?"}]
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", ",", "?", *words]


def blip2_opt(out: Path) -> Path:
    return _blip2_like(out, "Blip2ForConditionalGeneration", seed=12)


def instructblip_opt(out: Path) -> Path:
    return _blip2_like(out, "InstructBlipForConditionalGeneration", seed=13)


def instructblip_vicuna(out: Path) -> Path:
    return _blip2_like(out, "InstructBlipForConditionalGeneration", seed=15, lm="llama")


# name -> (architecture it covers, builder, task)
BLIP2_FAMILIES: dict[str, tuple[str, Callable[[Path], Path], str]] = {
    "blip2-opt": ("Blip2ForConditionalGeneration", blip2_opt, "all"),
    "instructblip-opt": ("InstructBlipForConditionalGeneration", instructblip_opt, "all"),
    "instructblip-vicuna": ("InstructBlipForConditionalGeneration", instructblip_vicuna, "all"),
}


# ---------------------------------------------------------------------------------------------------
# BLIP-2 and InstructBLIP with a Flan-T5 language model (tests/export/test_blip2_t5_families.py), on the
# cross-attention contract: the same vision side as above, a T5 encoder over [query embeddings; text], a T5
# decoder cross-attending to it.


def _t5_tokenizer(out: Path):
    """A word-level tokenizer over the scene world with T5's special ids (<pad>=0, </s>=1, <unk>=2), a
    post-processor that writes </s> after the text (T5's does), no BOS, and <image> added last as a special token
    (id 32100 in the Flan-T5 checkpoints, inside their padded 32128-row vocabulary)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in ["<pad>", "</s>", "<unk>", "Question", "Answer", ":", "A", "short", "image", "description", *vocabulary()]:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                  model_max_length=512)
    tok.add_tokens([AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
    tok.save_pretrained(out)
    return tok, {**vocab, "<image>": len(vocab)}


def _blip2_t5_like(out: Path, architecture: str, seed: int, eos_like: str) -> Path:
    """Salesforce/blip2-flan-t5-xl's shape (InstructBLIP: Salesforce/instructblip-flan-t5-xl's): the vision side of
    _blip2_like with 8 queries (32 in the checkpoints; neither count is a square grid of patches), a projection to a
    Flan-T5 (T5 v1.1: gated-GELU feed-forward, RMS LayerNorm, relative position buckets in the first layer of each
    stack, no attention scaling; tie_word_embeddings False, so no rescaling of the decoder output, and an LM head of
    its own: transformers 5 ties T5's head to the embeddings unless the checkpoint holds two different tables, as
    Flan-T5's does), the vocabulary padded past the tokenizer's as Flan-T5's is; decoder start = pad 0, EOS 1."""
    import transformers
    from transformers import BlipImageProcessorPil

    tok, vocab = _t5_tokenizer(out)
    image, patch, queries = 30, 6, 8
    instruct = architecture.startswith("InstructBlip")
    cfg_cls = getattr(transformers, architecture.replace("ForConditionalGeneration", "Config"))
    cfg = cfg_cls(
        vision_config=dict(hidden_size=40, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, image_size=image,
                           patch_size=patch, qkv_bias=True),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            cross_attention_frequency=2, encoder_hidden_size=40, max_position_embeddings=64,
                            **({"vocab_size": len(_bert_vocab())} if instruct else {})),
        text_config=dict(model_type="t5", vocab_size=len(vocab) + 5, d_model=48, d_kv=12, d_ff=96, num_layers=2,
                         num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
                         relative_attention_max_distance=20, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
        num_query_tokens=queries, image_token_index=vocab["<image>"], use_decoder_only_language_model=False)
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(cfg)
    lm = model.language_model
    lm.lm_head.weight = torch.nn.Parameter(lm.lm_head.weight.detach().clone())  # Flan-T5's own LM head, not the embeddings
    _perturb(model, std=0.2, seed=seed)
    with torch.no_grad():  # EOS where the random model would say `eos_like` (sometimes, mid-answer): answers end apart
        lm.lm_head.weight[vocab["</s>"]] = lm.lm_head.weight[vocab[eos_like]] * 1.1
    model.save_pretrained(out)
    ip = BlipImageProcessorPil(size={"height": image, "width": image})
    if instruct:
        from transformers import InstructBlipProcessor

        qtok, _ = _bert_tokenizer(out / "qformer_tokenizer")
        InstructBlipProcessor(ip, tok, qtok, num_query_tokens=queries).save_pretrained(out)
    else:
        from transformers import Blip2Processor

        Blip2Processor(ip, tok, num_query_tokens=queries).save_pretrained(out)
    return out


def blip2_t5(out: Path) -> Path:
    return _blip2_t5_like(out, "Blip2ForConditionalGeneration", seed=20, eos_like="red")


def instructblip_t5(out: Path) -> Path:
    return _blip2_t5_like(out, "InstructBlipForConditionalGeneration", seed=20, eos_like="blue")


# name -> (architecture it covers, builder, task)
BLIP2_T5_FAMILIES: dict[str, tuple[str, Callable[[Path], Path], str]] = {
    "blip2-t5": ("Blip2ForConditionalGeneration", blip2_t5, "all"),
    "instructblip-t5": ("InstructBlipForConditionalGeneration", instructblip_t5, "all"),
}


# ---------------------------------------------------------------------------------------------------
# IDEFICS (Flamingo): gated cross-attention on the prefix contract (tests/export/test_idefics.py).


def idefics(out: Path) -> Path:
    """HuggingFaceM4/idefics-9b-instruct's shape: a CLIP-like vision tower (every patch and CLS) resampled by a
    perceiver (5 latents here, 64 in the checkpoint), a LLaMA LM with a gated cross-attention layer before every
    second layer (every fourth in the checkpoint; tanh-gated, alpha_type "float"), decoupled embeddings and LM head
    (<fake_token_around_image> and <image> are the two additional ids past the base vocabulary), untied head;
    <end_of_utterance> a special token of the base vocabulary; IdeficsProcessor with its image processor (bicubic
    resize to image_size, OpenAI CLIP mean and std); no chat template (vlmedge writes the instruct format)."""
    from transformers import IdeficsConfig, IdeficsForVisionText2Text, IdeficsImageProcessorPil, IdeficsProcessor

    tok, vocab = _idefics_tokenizer()
    cfg = IdeficsConfig(
        vocab_size=len(vocab), additional_vocab_size=2, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, cross_layer_interval=2, max_position_embeddings=512, rms_norm_eps=1e-6,
        alpha_initializer="ones", alpha_type="float", use_resampler=True, tie_word_embeddings=False,
        bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<unk>"],
        vision_config=dict(embed_dim=40, image_size=30, patch_size=6, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=80),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=5, resampler_depth=2, resampler_n_heads=2,
                              resampler_head_dim=12))
    torch.manual_seed(14)
    model = IdeficsForVisionText2Text(cfg)
    _perturb(model, std=0.2, seed=14)
    with torch.no_grad():  # EOS where the random model would say "large" (sometimes, mid-answer): answers end apart
        model.lm_head.weight[vocab["</s>"]] = model.lm_head.weight[vocab[IDEFICS_EOS_LIKE]] * 1.1
    model.save_pretrained(out)
    IdeficsProcessor(IdeficsImageProcessorPil(image_size=30), tok).save_pretrained(out)
    return out


def _idefics_tokenizer():
    """A word-level tokenizer over the scene world with IDEFICS's special tokens: <fake_token_around_image> and
    <image> added last (the decoupled embedding's two additional ids), <end_of_utterance> in the base vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in ["<unk>", "<s>", "</s>", "<end_of_utterance>", "User", "Assistant", ":", "Describe", "the", "image", ".",
              *vocabulary()]:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<unk>",
                                  unk_token="<unk>", extra_special_tokens=["<end_of_utterance>"])
    tok.add_tokens([AddedToken("<fake_token_around_image>", normalized=False, special=True),
                    AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
    return tok, vocab


IDEFICS_EOS_LIKE = "large"

# name -> (architecture it covers, builder, task); exported by conftest's prefix_bundles like PREFIX_FAMILIES
IDEFICS_FAMILIES: dict[str, tuple[str, Callable[[Path], Path], str]] = {
    "idefics": ("IdeficsForVisionText2Text", idefics, "all"),
}
