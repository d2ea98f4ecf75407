"""Caption and VQA metrics with the COCO / VQA definitions.

BLEU-4 and CIDEr(-D) come from pycocoevalcap's pure-Python scorers (the COCO caption evaluation
code); VQA answers are normalised as the official VQA evaluation does (case, punctuation, number
words to digits, articles, contractions) before they are compared.
"""

from __future__ import annotations

import contextlib
import io
import re
from typing import Mapping, Sequence

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                 "wont": "won't", "whats": "what's", "thats": "that's", "its": "it's", "im": "i'm"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_answer(answer: str) -> str:
    """The VQA evaluation's answer normalisation."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or re.search(_COMMA_STRIP, text) is not None:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD_STRIP.sub("", text)
    words = []
    for w in text.split():
        w = _NUMBERS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> list[float]:
    """Per-question VQA accuracy: min(#matching reference answers / 3, 1) after normalisation.

    With one reference answer per question (the scene world) this is exact match after normalisation.
    """
    out = []
    for pred, refs in zip(predictions, answers, strict=True):
        p = normalize_answer(pred)
        matches = sum(normalize_answer(r) == p for r in refs)
        out.append(min(1.0, matches / min(3, len(refs))))
    return out


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> Mapping[str, float]:
    """Exact match, BLEU-4 and CIDEr of whitespace-tokenised, lower-cased captions."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if not predictions:
        return {"exact_match": 0.0, "bleu4": 0.0, "cider": 0.0}
    norm = lambda s: " ".join(s.lower().split())  # noqa: E731
    res = {i: [norm(p) or "<empty>"] for i, p in enumerate(predictions)}
    gts = {i: [norm(r) for r in refs] for i, refs in enumerate(references)}
    with contextlib.redirect_stdout(io.StringIO()):  # the scorers print their internals
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        cider, _ = Cider().compute_score(gts, res)
    exact = sum(res[i][0] in gts[i] for i in res) / len(res)
    return {"exact_match": exact, "bleu4": float(bleu[3]), "cider": float(cider)}
