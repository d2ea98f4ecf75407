"""In-flight batching: rows that join a running decode batch and leave it get the tokens a call of
their own gives, greedy and sampled, with captions and with VQA questions of different lengths."""

import numpy as np
import pytest

from vlmedge.data.scenes import make_scene, questions_for
from vlmedge.runtime.bundle import load_bundle
from vlmedge.runtime.inflight import Inflight
from vlmedge.runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def pipe(shapes):
    return Pipeline(load_bundle(shapes))


def _drive(pipe, task, arrivals, options):
    """Run requests through one Inflight batch: arrivals[k] joins before step k (a list of
    (key, image, question)); a row leaves as soon as it ends. Returns key -> generated ids."""
    spec = pipe.manifest.tasks[task]
    fl, done, k = Inflight(pipe.backend, pipe.layers), {}, 0
    settings = pipe.settings(task, pipe._config(task, options))
    while k < len(arrivals) or len(fl):
        joining = arrivals[k] if k < len(arrivals) else []
        if joining:
            px = pipe.images([im for _, im, _ in joining])
            q = pipe.question_ids([qq for _, _, qq in joining]) if task == "vqa" else None
            states, mask = pipe.encode(task, px, q)
            fl.add([key for key, _, _ in joining], states, mask, spec["prompt_ids"], [settings] * len(joining),
                   [options.get("seed")] * len(joining))
        k += 1
        ended = [r for r in fl.rows if r.finished]
        done.update({r.key: r.generated for r in ended})
        fl.remove([r.key for r in ended])
        fl.step()
        ended = [r for r in fl.rows if r.finished]
        done.update({r.key: r.generated for r in ended})
        fl.remove([r.key for r in ended])
    return done


@pytest.mark.parametrize("options", [{}, {"do_sample": True, "top_k": 20, "temperature": 1.3, "seed": 7}])
def test_captions_joining_and_leaving_equal_calls_of_their_own(pipe, options):
    images = [make_scene(i).pil() for i in range(6)]
    alone = [list(pipe.caption(im, return_ids=True, **options).ids) for im in images]
    arrivals = [[(0, images[0], None)], [], [(1, images[1], None), (2, images[2], None)], [], [], [],
                [(3, images[3], None)], [(4, images[4], None), (5, images[5], None)]]
    got = _drive(pipe, "caption", arrivals, options)
    assert [got[i] for i in range(6)] == alone
    assert len({len(ids) for ids in alone}) > 1  # rows of different lengths left at different steps


def test_questions_of_different_lengths_share_the_batch(pipe):
    scenes = [make_scene(100 + i) for i in range(5)]
    pairs = [(s.pil(), q.text) for s in scenes for q in [qs[0] for qs in questions_for(s).values() if qs][:2]]
    qs = [q for _, q in pairs]
    assert len({len(pipe.question_ids([q])[0][0]) for q in qs}) > 1
    alone = [list(pipe.vqa(im, q, return_ids=True).ids) for im, q in pairs]
    arrivals = [[(i, *pairs[i])] for i in range(len(pairs))]
    got = _drive(pipe, "vqa", arrivals, {})
    assert [got[i] for i in range(len(pairs))] == alone


def test_a_row_that_leaves_early_frees_its_place(pipe):
    spec = pipe.manifest.tasks["caption"]
    fl = Inflight(pipe.backend, pipe.layers)
    settings = pipe.settings("caption")
    px = pipe.images([make_scene(i).pil() for i in range(3)])
    fl.add(["a", "b", "c"], *pipe.encode("caption", px), spec["prompt_ids"], [settings] * 3)
    for _ in range(3):
        fl.step()
    fl.remove(["b"])
    assert [r.key for r in fl.rows] == ["a", "c"] and fl.attention.shape[0] == 2
    assert all(np.asarray(pipe.backend.to_host(v)).shape[0] == 2 for v in fl.cache)
    fl.remove(["a", "c"])
    assert len(fl) == 0 and fl.step() == {}
