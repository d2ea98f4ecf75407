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
        ended = [r for r in fl.live if r.finished]
        done.update({r.key: r.generated for r in ended})
        fl.remove([r.key for r in ended])
        fl.step()
        ended = [r for r in fl.live if r.finished]
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


@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_joiners_over_vacant_rows_equal_calls_of_their_own(pipe, task):
    """As the server runs it: at most three rows, a waiting request joins as soon as a row is free,
    over the vacant row of one that left. Each request forces its own length; VQA questions come
    shortest first, so joiners widen the batch."""
    scenes = [make_scene(300 + i) for i in range(6)]
    if task == "caption":
        requests = [(s.pil(), None) for s in scenes]
    else:
        requests = [(s.pil(), qs[0].text) for s in scenes for qs in list(questions_for(s).values())[:2] if qs]
        requests.sort(key=lambda r: len(pipe.question_ids([r[1]])[0][0]))  # later joiners widen the batch
    lengths = [{"min_new_tokens": n, "max_new_tokens": n} for n in (3 + 5 * i % 11 for i in range(len(requests)))]
    call = pipe.caption if task == "caption" else pipe.vqa
    alone = [list(call(im, *([q] if q else []), return_ids=True, **n).ids) for (im, q), n in zip(requests, lengths)]
    assert len({len(ids) for ids in alone}) > 2
    spec = pipe.manifest.tasks[task]
    fl, done, waiting, over_vacant = Inflight(pipe.backend, pipe.layers), {}, list(range(len(requests))), 0
    while waiting or len(fl):
        joining = waiting[:3 - len(fl)]
        if joining:
            waiting = waiting[len(joining):]
            over_vacant += min(len(joining), sum(r is None for r in fl.rows))
            q = pipe.question_ids([requests[i][1] for i in joining]) if task == "vqa" else None
            states, mask = pipe.encode(task, pipe.images([requests[i][0] for i in joining]), q)
            settings = [pipe.settings(task, pipe._config(task, lengths[i])) for i in joining]
            fl.add(joining, states, mask, spec["prompt_ids"], settings)
        fl.step()
        for r in [r for r in fl.live if r.finished]:
            done[r.key] = r.generated
            fl.remove([r.key])
    assert [done[i] for i in range(len(requests))] == alone
    assert over_vacant >= 2


def test_a_row_that_leaves_early_frees_its_place(pipe):
    """A row that leaves is vacant until a joiner is written over it (no copy of the batch); the joiner
    still gets the tokens of a call of its own, and a batch mostly vacant is compacted."""
    spec = pipe.manifest.tasks["caption"]
    fl = Inflight(pipe.backend, pipe.layers)
    settings = pipe.settings("caption")
    images = [make_scene(200 + i).pil() for i in range(4)]
    alone = list(pipe.caption(images[3], return_ids=True).ids)
    px = pipe.images(images[:3])
    fl.add(["a", "b", "c"], *pipe.encode("caption", px), spec["prompt_ids"], [settings] * 3)
    for _ in range(3):
        fl.step()
    fl.remove(["b"])
    assert len(fl) == 2 and [r.key for r in fl.live] == ["a", "c"]
    cache = [pipe.backend.to_host(v) for v in fl.cache]
    fl.add(["d"], *pipe.encode("caption", pipe.images(images[3:])), spec["prompt_ids"], [settings])
    assert [r and r.key for r in fl.rows] == ["a", "d", "c"]  # in the vacant row's place
    assert all(np.shares_memory(a, pipe.backend.to_host(b)) for a, b in zip(cache, fl.cache))  # not a copy
    while not fl.rows[1].finished:
        fl.step()
    assert fl.rows[1].generated == alone
    fl.remove(["a", "c"])
    fl.step()  # two of three rows vacant: compacted before the step
    assert [r.key for r in fl.rows] == ["d"] and fl.attention.shape[0] == 1
    assert all(np.asarray(pipe.backend.to_host(v)).shape[0] == 1 for v in fl.cache)
    fl.remove(["d"])
    assert len(fl) == 0 and fl.rows == [] and fl.step() == {}
