"""The runtime's tokens equal each family's own PyTorch generation: greedy and beam search, batch 1
and 4 (questions of different lengths), and beam-search options that change the result."""

from collections import Counter

import pytest

from families import FAMILIES
from vlmedge.data.scenes import scenes
from vlmedge.export.samples import sample_inputs
from vlmedge.runtime.bundle import load_bundle
from vlmedge.runtime.pipeline import Pipeline

ALL = [*FAMILIES, "shapes-vlm"]


def _run(pipe, task, images, questions, **gen):
    if task == "vqa":
        return [list(g.ids) for g in pipe.vqa(images, list(questions), return_ids=True, **gen)]
    return [list(g.ids) for g in pipe.caption(images, return_ids=True, **gen)]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("batch", [1, 4])
def test_tokens_equal_pytorch(bundles, name, beams, batch):
    adapter, manifest, path = bundles[name]
    pipe = Pipeline(load_bundle(path))
    start = 40 + batch
    images = [s.image for s in scenes("test", start, batch)]  # the pipeline preprocesses these itself
    for task, spec in manifest.tasks.items():
        s = sample_inputs(adapter, n=batch, tasks=[task], start=start)
        if task == "vqa" and batch > 1:
            assert len(set(s.question_mask.sum(1).tolist())) > 1  # questions of different lengths
        ref = adapter.reference_generate(task, s.pixel_values, s.question_ids, s.question_mask,
                                         max_new_tokens=spec["max_new_tokens"], num_beams=beams)
        got = _run(pipe, task, images, s.questions, num_beams=beams)
        assert got == ref, (task, got, ref)


def _frequent_token(pipe, images, exclude):
    """A token random-weight models produce often: used as EOS so that beams finish early."""
    counts = Counter(t for ids in _run(pipe, "caption", images, None, max_new_tokens=12) for t in ids[1:])
    return next(t for t, _ in counts.most_common() if t not in exclude)


@pytest.mark.parametrize("name", ["vit-gpt2", "blip-caption", "vit-bert"])
@pytest.mark.parametrize("options", [
    dict(num_beams=3),
    dict(num_beams=3, length_penalty=0.0),
    dict(num_beams=4, length_penalty=2.0, early_stopping=True),
    dict(num_beams=2, early_stopping="never", length_penalty=-0.5),
    dict(num_beams=3, min_new_tokens=6),
    dict(num_beams=1, min_new_tokens=6),
])
def test_beam_options_and_early_eos_equal_hf_generate(bundles, name, options):
    adapter, manifest, path = bundles[name]
    pipe = Pipeline(load_bundle(path))
    images = [s.image for s in scenes("test", 60, 4)]
    eos = _frequent_token(pipe, images, exclude=set(manifest.tasks["caption"]["prompt_ids"]))
    s = sample_inputs(adapter, n=4, tasks=["caption"], start=60)
    ref = adapter.reference_generate("caption", s.pixel_values, max_new_tokens=12, eos_token_id=eos, **options)
    got = _run(pipe, "caption", images, None, max_new_tokens=12, eos_token_id=eos, **options)
    assert got == ref
    if options.get("min_new_tokens"):
        assert all(len(r) >= options["min_new_tokens"] and eos not in r[: options["min_new_tokens"]] for r in got)
    else:
        assert any(r[-1] == eos for r in got)  # some hypotheses ended in EOS: the early-stop paths ran


def test_shapes_beam_search_finishes_on_eos(bundles):
    adapter, manifest, path = bundles["shapes-vlm"]
    pipe = Pipeline(load_bundle(path))
    images = [s.image for s in scenes("test", 70, 3)]
    for g in pipe.caption(images, num_beams=4, return_ids=True):
        assert g.ids[-1] == manifest.tasks["caption"]["eos_id"] and g.text == g.text.strip()
