"""SigLIP's SentencePiece tokenizer (transformers' SiglipTokenizer, no fast version) as `tokenizers` JSON.

SiglipTokenizer does, per text: put "▁" before it, canonicalise (lower case, ASCII punctuation removed,
runs of whitespace to one space, stripped), then SentencePiece (its own normaliser, the Unigram model,
no dummy prefix: the unk-prefix trick strips it) and `</s>` at the end. The same steps as `tokenizers`
components: a normaliser sequence (Prepend, Lowercase, Replace, Strip, the model's precompiled
charsmap), Metaspace without a prefix, the Unigram pieces and scores, and a template adding `</s>`.
Export validation checks the result against the original on tricky texts.
"""

from __future__ import annotations

import string

from vlmedge.errors import ModelLoadError, first_line


def convert(slow):
    """A loaded SiglipTokenizer -> an equivalent `tokenizers.Tokenizer`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    try:
        from sentencepiece import sentencepiece_model_pb2 as spm_pb2

        proto = spm_pb2.ModelProto()
        with open(slow.vocab_file, "rb") as f:
            proto.ParseFromString(f.read())
    except Exception as e:
        raise ModelLoadError(f"{slow.vocab_file}: cannot read the SentencePiece model ({first_line(e)}); "
                             "exporting SigLIP's tokenizer needs sentencepiece and protobuf") from None
    if proto.trainer_spec.model_type != 1:  # 1: UNIGRAM
        raise ModelLoadError(f"{slow.vocab_file}: a SentencePiece model of type {proto.trainer_spec.model_type}; "
                             "vlmedge converts SigLIP's Unigram models")
    vocab = [(p.piece, p.score) for p in proto.pieces]
    tok = Tokenizer(models.Unigram(vocab, unk_id=proto.trainer_spec.unk_id, byte_fallback=proto.trainer_spec.byte_fallback))
    steps = [normalizers.Prepend("▁")]
    if getattr(slow, "do_lower_case", True):
        steps.append(normalizers.Lowercase())
    steps += [normalizers.Replace(Regex("[" + "".join("\\" + c for c in string.punctuation) + "]"), ""),
              normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    charsmap = proto.normalizer_spec.precompiled_charsmap
    if charsmap:
        steps.append(normalizers.Precompiled(charsmap))
    steps.append(normalizers.Replace(Regex(" {2,}"), " "))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    eos = str(slow.eos_token)
    tok.add_special_tokens([AddedToken(str(t), special=True, normalized=False)
                            for t in (slow.pad_token, slow.unk_token, slow.eos_token) if t is not None])
    tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B {eos}",
                                                       special_tokens=[(eos, slow.eos_token_id)])
    return tok
