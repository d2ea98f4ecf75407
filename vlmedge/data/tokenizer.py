"""The word-level tokenizer of the scene world, in Hugging Face `tokenizers` format."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from vlmedge.data.scenes import vocabulary

PAD, UNK, CAP, ANS, EOS = "[PAD]", "[UNK]", "[CAP]", "[ANS]", "[EOS]"
SPECIAL_TOKENS = (PAD, UNK, CAP, ANS, EOS)  # ids 0..4, in this order


def build_tokenizer() -> Tokenizer:
    """Special tokens first (ids 0-4), then every word of the world, sorted."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in vocabulary():
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # "object?" -> "object", "?"
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok
