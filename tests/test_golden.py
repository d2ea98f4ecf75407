"""The shipped reference model, end to end on the test split: the accuracy users are promised."""

import pytest

from vlmedge.evaluation.scene_eval import evaluate_torch_model, evaluation_set

# Floors for the shipped checkpoint on 1,000 test scenes (the README's table has the measured values).
FLOORS = {
    "caption_exact_match": 0.90,
    "bleu4": 0.95,
    "non_relational": 0.95,
    "relational": 0.80,
    "relational_hard": 0.75,
}


@pytest.fixture(scope="module")
def report(shipped):
    model, tok = shipped
    return evaluate_torch_model(model, tok, evaluation_set("test", 1000))


def test_the_test_split_is_large_enough(report):
    assert report["caption"]["n"] >= 500 and report["vqa"]["n"] >= 2000


def test_captioning(report):
    assert report["caption"]["exact_match"] >= FLOORS["caption_exact_match"]
    assert report["caption"]["bleu4"] >= FLOORS["bleu4"]


def test_vqa(report):
    v = report["vqa"]
    assert v["non_relational"]["accuracy"] >= FLOORS["non_relational"]
    assert v["by_type"]["relational"]["accuracy"] >= FLOORS["relational"]


def test_relational_questions_that_elimination_cannot_answer(report):
    hard = report["vqa"]["relational_hard"]
    assert hard["n"] >= 300
    assert hard["accuracy"] >= FLOORS["relational_hard"]
    assert hard["accuracy"] > hard["chance"] + 0.2
