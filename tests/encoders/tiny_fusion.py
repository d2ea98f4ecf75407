"""Tiny random fusion encoders built to the published checkpoints' architectures (no hub, no weights).

- `vilt-vqa`: dandelin/vilt-b32-finetuned-vqa's choices scaled down: one stream over 16 px patches (32 in
  the checkpoint) and words, 40 text positions, `max_image_length: -1` (every patch kept), a classifier over
  an answer vocabulary with `id2label`, a BERT WordPiece tokenizer (lower case, [CLS] [SEP]),
  ViltImageProcessor (shortest edge to `shortest_edge`, the longer capped at 1333/800 of it, both rounded
  down to `size_divisor`, a batch padded with a pixel mask; ImageNet-standard mean/std, bicubic).
- `vilt-retrieval`: dandelin/vilt-b32-finetuned-coco's head: one image-text matching logit.
- `bridgetower-itm`: BridgeTower/bridgetower-base-itm-mlm's choices scaled down: a RoBERTa text stream and a
  CLIP vision stream joined by co-attention layers over their top layers, a 2-way matching head, a
  byte-level BPE tokenizer (<s> </s>, pad 1), BridgeTowerImageProcessor (shortest edge, centre crop, CLIP mean/std).
- `bridgetower-itc`: BridgeTower/bridgetower-base's contrastive heads (BridgeTowerForContrastiveLearning).

Widths are odd on purpose (BridgeTower's are 64 throughout: its vision heads are width // 64, and its
contrastive head adds text-width embeddings to vision-width features, so the two must agree); weights are perturbed away from init so that outputs differ between inputs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tiny import _corpus, _perturb

VILT_IMAGE, VILT_PATCH = 64, 16
BT_IMAGE, BT_PATCH = 48, 16
ANSWERS = ["yes", "no", "2", "red", "circle", "left", "blue square", "3", "none", "green"]


def bert_tokenizer(out: Path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizer

    core = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    core.train_from_iterator(_corpus(), trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials, show_progress=False))
    tok = BertTokenizer(vocab=core.get_vocab(), do_lower_case=True, model_max_length=40)
    tok.save_pretrained(out)
    return tok


def roberta_tokenizer(out: Path):
    import json

    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer

    core = ByteLevelBPETokenizer()
    core.train_from_iterator(_corpus(), vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                             show_progress=False)
    model = json.loads(core._tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = RobertaTokenizer(vocab=model["vocab"], merges=merges, model_max_length=40)
    tok.save_pretrained(out)
    return tok


def _vilt(out: Path, cls_name: str, seed: int, **head) -> Path:
    import transformers
    from transformers import ViltConfig, ViltImageProcessorPil

    out.mkdir(parents=True, exist_ok=True)
    tok = bert_tokenizer(out)
    cfg = ViltConfig(vocab_size=len(tok), hidden_size=36, num_hidden_layers=2, num_attention_heads=4, intermediate_size=52,
                     image_size=VILT_IMAGE, patch_size=VILT_PATCH, max_position_embeddings=40, max_image_length=-1, **head)
    cfg.architectures = [cls_name]
    torch.manual_seed(seed)
    model = _perturb(getattr(transformers, cls_name)(cfg), std=0.1, seed=seed)
    model.save_pretrained(out)
    ViltImageProcessorPil(size={"shortest_edge": VILT_IMAGE}, size_divisor=VILT_PATCH).save_pretrained(out)
    return out


def build_vilt_vqa(out: Path) -> Path:
    return _vilt(out, "ViltForQuestionAnswering", 3, id2label=dict(enumerate(ANSWERS)),
                 label2id={a: i for i, a in enumerate(ANSWERS)})


def build_vilt_retrieval(out: Path) -> Path:
    return _vilt(out, "ViltForImageAndTextRetrieval", 4)


def _bridgetower(out: Path, cls_name: str, seed: int) -> Path:
    import transformers
    from transformers import BridgeTowerConfig, BridgeTowerImageProcessorPil

    out.mkdir(parents=True, exist_ok=True)
    tok = roberta_tokenizer(out)
    cfg = BridgeTowerConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=52,
                         max_position_embeddings=42, pad_token_id=1, bos_token_id=0, eos_token_id=2),
        vision_config=dict(hidden_size=64, num_hidden_layers=3, patch_size=BT_PATCH, image_size=BT_IMAGE),
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, contrastive_hidden_size=20,
        logit_scale_init_value=2.6592,  # bridgetower-base: exp = 14.3
    )
    cfg.architectures = [cls_name]
    torch.manual_seed(seed)
    model = _perturb(getattr(transformers, cls_name)(cfg), std=0.1, seed=seed)
    model.save_pretrained(out)
    BridgeTowerImageProcessorPil(size={"shortest_edge": BT_IMAGE}, crop_size={"shortest_edge": BT_IMAGE},
                                 size_divisor=BT_PATCH).save_pretrained(out)
    return out


def build_bridgetower_itm(out: Path) -> Path:
    return _bridgetower(out, "BridgeTowerForImageAndTextRetrieval", 5)


def build_bridgetower_itc(out: Path) -> Path:
    return _bridgetower(out, "BridgeTowerForContrastiveLearning", 6)


BUILDERS = {"vilt-vqa": build_vilt_vqa, "vilt-retrieval": build_vilt_retrieval,
            "bridgetower-itm": build_bridgetower_itm, "bridgetower-itc": build_bridgetower_itc}
