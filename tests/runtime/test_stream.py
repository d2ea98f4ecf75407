"""Streaming: text pieces as tokens are decoded, never splitting a multi-byte character or a word,
joining to the whole answer; `pipe.stream` on both pipeline kinds and `vlmedge caption --stream`."""

import subprocess
import sys

import pytest

import vlmedge
from vlmedge.data.scenes import scenes
from vlmedge.errors import InputError
from vlmedge.runtime.pipeline import TextStream

TEXT = ["a small red circle is left of the big cube", "héllo wörld, naïve café", "日本語のテキストです 東京",
        "emoji 😀🎉 and ZWJ 👩‍👩‍👧 family", "unbelievably tokenization-heavy hyphenated-words"]


def _tokenizers():
    """Tokenizers trained here on TEXT, small enough that words and characters split over several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    byte_bpe = Tokenizer(models.BPE())
    byte_bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_bpe.decoder = decoders.ByteLevel()
    byte_bpe.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    wordpiece.decoder = decoders.WordPiece(prefix="##")
    wordpiece.train_from_iterator(TEXT, trainers.WordPieceTrainer(vocab_size=120, special_tokens=["[UNK]"]))
    sentencepiece = Tokenizer(models.BPE(byte_fallback=True))
    sentencepiece.pre_tokenizer = pre_tokenizers.Metaspace()
    sentencepiece.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    sentencepiece.train_from_iterator(TEXT, trainers.BpeTrainer(
        vocab_size=300, special_tokens=[f"<0x{b:02X}>" for b in range(256)], limit_alphabet=40))
    return {"byte-level BPE": byte_bpe, "WordPiece": wordpiece, "SentencePiece with byte fallback": sentencepiece}


@pytest.mark.parametrize("kind", ["byte-level BPE", "WordPiece", "SentencePiece with byte fallback"])
def test_pieces_never_split_a_character_or_a_word_and_join_to_the_text(kind):
    tok = _tokenizers()[kind]
    decode = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731  (byte tokens are "special" here)
    split_somewhere = False
    for text in TEXT:
        ids = tok.encode(text).ids
        whole = decode(ids).strip()
        stream = TextStream(decode)
        pieces = [stream.push(ids[:n]) for n in range(1, len(ids) + 1)] + [stream.push(ids, final=True)]
        pieces = [p for p in pieces if p]
        assert "".join(pieces) == whole, (kind, pieces)
        assert all("\ufffd" not in p for p in pieces)
        sent = ""
        for p in pieces[:-1]:
            sent += p
            nxt = whole[len(sent)]
            assert nxt.isspace() or "\u2e80" <= sent[-1], (kind, text, sent)  # a piece ends at a word's end
        split_somewhere |= any(len(decode([i])) and "\ufffd" in decode([i]) for i in ids)
    if kind != "WordPiece":
        assert split_somewhere  # the case this test is for: tokens that hold part of a character


@pytest.fixture(scope="module")
def pipe_images(bundles):
    return vlmedge.load(bundles["shapes-vlm"][2]), [s.image for s in scenes("test", 10, 4)]


def test_stream_joins_to_the_caption_and_the_answer(pipe_images):
    pipe, images = pipe_images
    q = "what color is the circle ?"
    for img in images:
        pieces = list(pipe.stream(img))
        assert "".join(pieces) == pipe.caption(img) and len(pieces) > 2
        assert "".join(pipe.stream(img, q)) == pipe.vqa(img, q)
        sampled = dict(do_sample=True, temperature=1.5, seed=4, max_new_tokens=10)
        assert "".join(pipe.stream(img, **sampled)) == pipe.caption(img, **sampled)


def test_stream_refuses_beams_and_bad_input_before_the_first_piece(pipe_images):
    pipe, images = pipe_images
    for kw, message in ((dict(num_beams=3), "num_beams: 3; token by token"), (dict(max_new_tokens=0), "max_new_tokens"),
                        (dict(question=" "), "question 0: empty")):
        with pytest.raises(InputError) as e:
            pipe.stream(images[0], **kw)  # raises at the call, not at the first next()
        assert str(e.value).startswith(message) and "\n" not in str(e.value)
    with pytest.raises(InputError, match="^image 0"):
        pipe.stream(b"not an image")


def test_a_stream_left_early_leaves_the_pipeline_usable(pipe_images):
    pipe, images = pipe_images
    it = pipe.stream(images[0])
    first = next(it)
    it.close()
    assert pipe.caption(images[0]).startswith(first)


def test_decoder_only_stream_joins_to_caption_vqa_and_chat(prefix_bundles):
    pipe = vlmedge.load(prefix_bundles("smolvlm")[2])
    img = next(scenes("test", 0, 1)).image
    q = "how many circles are there ?"
    assert "".join(pipe.stream(img, max_new_tokens=8)) == pipe.caption(img, max_new_tokens=8)
    assert "".join(pipe.stream(img, q, max_new_tokens=8)) == pipe.vqa(img, q, max_new_tokens=8)
    messages = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": q}]},
                {"role": "assistant", "content": "two"},
                {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "and squares ?"}]}]
    sampled = dict(do_sample=True, seed=1, max_new_tokens=8)
    assert "".join(pipe.stream_chat(messages, max_new_tokens=8)) == pipe.chat(messages, max_new_tokens=8)
    assert "".join(pipe.stream_chat(messages, **sampled)) == pipe.chat(messages, **sampled)
    with pytest.raises(InputError, match="^num_beams: 2; token by token"):
        pipe.stream(img, num_beams=2)


def test_caption_stream_prints_the_caption(pipe_images, bundles, tmp_path):
    pipe, _ = pipe_images
    scene = next(scenes("test", 20, 1))
    scene.pil().save(tmp_path / "s.png")
    cmd = [sys.executable, "-m", "vlmedge.cli", "caption", str(bundles["shapes-vlm"][2]), str(tmp_path / "s.png"), "--stream"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == pipe.caption(scene.image) + "\n"
    r = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--stream" in r.stderr and "Traceback" not in r.stderr
    q = "what color is the circle ?"
    r = subprocess.run([*cmd[:3], "vqa", *cmd[4:6], q, "--stream"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == pipe.vqa(scene.image, q) + "\n", r.stderr
