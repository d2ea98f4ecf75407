import pytest

from vlmedge.data.scenes import scenes
from vlmedge.evaluation.metrics import caption_scores, normalize_answer, vqa_accuracy


@pytest.mark.parametrize("raw, norm", [("Two.", "2"), ("the Red", "red"), ("  YES ", "yes"), ("a circle", "circle"),
                                       ("none", "0"), ("left!", "left")])
def test_vqa_normalisation(raw, norm):
    assert normalize_answer(raw) == norm


def test_vqa_accuracy_uses_the_normalised_answer():
    assert vqa_accuracy(["two", "Yes", "square"], [["2"], ["no"], ["square"]]) == [1.0, 0.0, 1.0]
    assert vqa_accuracy(["red"], [["red", "blue", "red", "red"]]) == [1.0]  # 3 of the annotators agree
    assert vqa_accuracy(["red"], [["red", "blue", "blue", "blue"]]) == [pytest.approx(1 / 3)]


def test_caption_scores():
    refs = [s.caption for s in scenes("val", 0, 50)]
    perfect = caption_scores(refs, [[r] for r in refs])
    assert perfect["exact_match"] == 1.0 and perfect["bleu4"] == pytest.approx(1.0, abs=1e-6) and perfect["cider"] > 5
    shuffled = caption_scores(refs[1:] + refs[:1], [[r] for r in refs])
    assert shuffled["exact_match"] == 0.0 and shuffled["bleu4"] < perfect["bleu4"] and shuffled["cider"] < perfect["cider"]
    empty = caption_scores([""] * len(refs), [[r] for r in refs])
    assert empty["bleu4"] < 0.01
