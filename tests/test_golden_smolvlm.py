"""The shipped decoder-only reference model (`shapes-smolvlm`, SmolVLM's architecture), end to end on the
test split through the runtime: exported by its built-in name, then captions and answers from its bundle."""

import pytest

from vlmedge.evaluation.scene_eval import evaluate_pipeline, evaluation_set

# Floors on 1,000 test scenes (README and benchmarks/RESULTS.md have the measured values).
FLOORS = {"bleu4": 0.95, "vqa": 0.95, "caption_exact_match": 0.95}  # measured: 0.9964, 97.4%, 98.4%


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    import os

    import vlmedge

    os.environ["VLMEDGE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        pipe = vlmedge.load("shapes-smolvlm")
    finally:
        del os.environ["VLMEDGE_CACHE"]
    assert pipe.manifest.contract == "prefix" and pipe.manifest.validation["passed"]
    return evaluate_pipeline(pipe, evaluation_set("test", 1000))


def test_captioning(report):
    assert report["caption"]["n"] >= 500
    assert report["caption"]["bleu4"] >= FLOORS["bleu4"]
    assert report["caption"]["exact_match"] >= FLOORS["caption_exact_match"]


def test_vqa(report):
    assert report["vqa"]["n"] >= 2000
    assert report["vqa"]["accuracy"] >= FLOORS["vqa"]
