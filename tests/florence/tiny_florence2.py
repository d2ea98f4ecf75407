"""A tiny random Florence-2 written as a `save_pretrained` directory (no hub): DaViT vision tower at
odd sizes, a BART language model of width 48 with 3 heads, a byte-level BPE tokenizer that holds
the image token, the region tokens and the 1000 `<loc_N>` tokens the processor parses."""

from __future__ import annotations

from pathlib import Path

import torch

IMAGE = 56  # not a multiple of 32: DaViT's strided convolutions pad
PROMPTS = (
    "What is the text in the image?", "What is the text in the image, with regions?",
    "What does the image describe?", "Describe in detail what is shown in the image.",
    "Describe with a paragraph what is shown in the image.",
    "Locate the objects with category name in the image.",
    "Locate the objects in the image, with their descriptions.",
)
WORDS = "a small large red green blue circle square triangle left right of the and text car cat sign"
REGION_TOKENS = ("<od>", "</od>", "<ocr>", "</ocr>", "<poly>", "</poly>", "<sep>")


def tokenizer(out: Path):
    """Byte-level BPE as BART's, trained on the task prompts; specials at BART's ids 0..3."""
    import json
    import tempfile

    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
    from transformers import BartTokenizer

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(list(PROMPTS) + [WORDS] * 3, trainer)
    with tempfile.TemporaryDirectory() as d:
        vocab_file, merges_file = core.model.save(d)
        vocab = json.loads(Path(vocab_file).read_text())
        merges = [tuple(line.split()) for line in Path(merges_file).read_text().splitlines()[1:] if line]
    tok = BartTokenizer(vocab=vocab, merges=merges, extra_special_tokens={"image_token": "<image>"})
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in REGION_TOKENS])
    tok.add_tokens([AddedToken(f"<loc_{i}>", special=False, normalized=False) for i in range(1000)])
    tok.save_pretrained(out)
    return tok


def florence2(out: Path, seed: int = 0) -> Path:
    """Write the model, tokenizer, image processor and processor to `out`; returns `out`."""
    from transformers import (BartConfig, CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration,
                              Florence2Processor, Florence2VisionConfig, GenerationConfig)

    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer(out)
    vocab = len(tok)
    vision = Florence2VisionConfig(
        depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1], patch_prenorm=[False, True],
        embed_dim=[24, 48], num_heads=[3, 3], num_groups=[3, 3], window_size=3, drop_path_rate=0.0,
        projection_dim=48, max_position_embeddings=16, max_temporal_embeddings=4,
    )
    text = BartConfig(
        vocab_size=vocab, d_model=48, encoder_layers=2, decoder_layers=1, encoder_attention_heads=3,
        decoder_attention_heads=3, encoder_ffn_dim=72, decoder_ffn_dim=72, max_position_embeddings=160,
        bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2,
        scale_embedding=False, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )
    cfg = Florence2Config(vision_config=vision, text_config=text, image_token_id=tok.image_token_id)
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # far from init, so that tokens depend on the image
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.3 if "vision" in name or "projector" in name else 0.15))
    model.generation_config = GenerationConfig(
        decoder_start_token_id=2, bos_token_id=0, eos_token_id=2, pad_token_id=1, forced_bos_token_id=0,
        forced_eos_token_id=2, num_beams=3, no_repeat_ngram_size=3, early_stopping=True, max_length=20,
    )
    model.save_pretrained(out)
    with torch.no_grad():
        n = model.get_image_features(torch.zeros(1, 3, IMAGE, IMAGE)).pooler_output.shape[1]
    images = CLIPImageProcessor(size={"height": IMAGE, "width": IMAGE}, do_center_crop=False, resample=3,
                                image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    images.image_seq_length = n
    images.save_pretrained(out)  # preprocessor_config.json, as published checkpoints have it
    Florence2Processor(images, tok, post_processor_config=POST_PROCESSOR_CONFIG).save_pretrained(out)
    return out


POST_PROCESSOR_CONFIG = {  # as published checkpoints' processor_config.json has it
    "ocr": {"AREA_THRESHOLD": 0.0, "PATTERN": r"(.+?)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>"},
    "pure_text": {}, "description_with_bboxes": {}, "bboxes": {}, "phrase_grounding": {"FILTER_BY_BLACK_LIST": True},
    "description_with_polygons": {}, "polygons": {}, "description_with_bboxes_or_polygons": {},
}
