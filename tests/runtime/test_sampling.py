"""Sampling in the runtime: each warper equals transformers' own on the same scores, the chain runs in
`generate`'s order, draws follow the warped distribution, and a seed makes them reproducible."""

import numpy as np
import pytest

from vlmedge.errors import InputError
from vlmedge.runtime.decoding import GenerationConfig, Processors, draw, generators, min_p, resolve, temperature, top_k, top_p

torch = pytest.importorskip("torch")
lp = pytest.importorskip("transformers.generation.logits_process")


def _scores(rows=6, vocab=97, seed=0, spread=3.0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, vocab)) * spread).astype(np.float32)
    x[0, :5] = -np.inf  # rows already masked by a processor
    return x


def _hf(warper, scores):
    return warper(torch.zeros((len(scores), 1), dtype=torch.long), torch.from_numpy(scores.copy())).numpy()


def _same(ours, theirs):
    assert np.array_equal(np.isneginf(ours), np.isneginf(theirs))
    finite = np.isfinite(theirs)
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-6, atol=0)


@pytest.mark.parametrize("t", [0.05, 0.7, 1.0, 1.3, 20.0])
def test_temperature_equals_transformers(t):
    s = _scores(seed=1)
    _same(temperature(s, t), _hf(lp.TemperatureLogitsWarper(t), s))


@pytest.mark.parametrize("k", [1, 2, 10, 50, 97, 500])
@pytest.mark.parametrize("keep", [1, 3])
def test_top_k_equals_transformers(k, keep):
    s = _scores(seed=2)
    _same(top_k(s, k, keep), _hf(lp.TopKLogitsWarper(k, min_tokens_to_keep=keep), s))


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("keep", [1, 2])
def test_top_p_equals_transformers(p, keep):
    for seed, spread in ((3, 3.0), (4, 0.5), (5, 8.0)):
        s = _scores(seed=seed, spread=spread)
        _same(top_p(s, p, keep), _hf(lp.TopPLogitsWarper(p, min_tokens_to_keep=keep), s))


@pytest.mark.parametrize("p", [0.0, 0.01, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("keep", [1, 4])
def test_min_p_equals_transformers(p, keep):
    for seed, spread in ((6, 3.0), (7, 0.5)):
        s = _scores(seed=seed, spread=spread)
        _same(min_p(s, p, keep), _hf(lp.MinPLogitsWarper(p, min_tokens_to_keep=keep), s))


def _settings(**opts):
    return resolve(GenerationConfig(**opts), {"eos_token_id": 2}, 3, 10, 97)


def test_the_chain_equals_generates_own_warpers_in_its_order():
    """repetition penalty, then temperature, top_k, top_p, min_p, then renormalize, as generate builds them."""
    s = _scores(seed=8)
    seqs = np.array([[1, 7, 9]] * len(s))
    opts = dict(do_sample=True, temperature=0.7, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.3,
                renormalize_logits=True)
    ours = Processors(_settings(**opts))(seqs, s)
    chain = lp.LogitsProcessorList([lp.RepetitionPenaltyLogitsProcessor(1.3), lp.TemperatureLogitsWarper(0.7),
                                    lp.TopKLogitsWarper(40), lp.TopPLogitsWarper(0.9), lp.MinPLogitsWarper(0.02),
                                    lp.LogitNormalization()])
    theirs = chain(torch.from_numpy(seqs), torch.from_numpy(s.copy())).numpy()
    _same(ours, theirs)


def test_sampling_defaults_are_generates_top_k_50_and_greedy_ignores_the_warpers():
    s = _scores(seed=9)
    seqs = np.array([[1, 7, 9]] * len(s))
    _same(Processors(_settings(do_sample=True))(seqs, s), _hf(lp.TopKLogitsWarper(50), s))
    assert Processors(_settings(temperature=0.5, top_k=3, top_p=0.5))(seqs, s) is s  # do_sample off: nothing to do


def test_draws_follow_the_warped_distribution():
    """80,000 seeded draws of an 8-token distribution warped by top_p: each token's frequency within
    5 standard errors of its probability, and a dropped token never drawn."""
    scores = np.log(np.array([[0.30, 0.25, 0.15, 0.10, 0.08, 0.06, 0.04, 0.02]], dtype=np.float32))
    warped = top_p(temperature(scores, 0.8), 0.95)
    probs = np.exp(warped - warped.max()) / np.exp(warped - warped.max()).sum()
    assert np.isneginf(warped).sum() >= 1
    n = 80_000
    rng = np.random.default_rng(1234)
    got = draw(np.repeat(warped, n, 0), [rng] * n)
    freq = np.bincount(got, minlength=8) / n
    se = np.sqrt(probs[0] * (1 - probs[0]) / n)
    assert np.all(np.abs(freq - probs[0]) <= 5 * se + 1e-12), (freq, probs[0])
    assert freq[np.isneginf(warped[0])].sum() == 0
    chi2 = (((freq - probs[0]) ** 2 / np.where(probs[0] > 0, probs[0], 1)) * n).sum()
    assert chi2 < 27.9  # chi-square, 7 degrees of freedom at p = 0.0002


def test_a_row_with_nothing_left_takes_its_argmax_and_rows_draw_independently():
    s = np.full((2, 5), -np.inf, dtype=np.float32)
    s[1, 3] = 0
    assert draw(s, generators(0, 2)).tolist()[1] == 3
    a = [g.random() for g in generators(7, 3)]
    assert a == [g.random() for g in generators(7, 3)] and len(set(a)) == 3
    assert [g.random() for g in generators(7, 1)] == a[:1]  # row 0 draws the same alone or in a batch


@pytest.fixture(scope="module")
def pipe_image(bundles):
    import vlmedge
    from vlmedge.data.scenes import scenes

    return vlmedge.load(bundles["shapes-vlm"][2]), [s.image for s in scenes("test", 0, 3)]


def test_sampling_through_the_pipeline(pipe_image):
    pipe, images = pipe_image
    hot = dict(do_sample=True, temperature=3.0, top_k=0, max_new_tokens=12)
    a = pipe.caption(images[0], seed=11, return_ids=True, **hot)
    assert pipe.caption(images[0], seed=11, return_ids=True, **hot) == a  # same seed, same tokens
    assert len({pipe.caption(images[0], seed=s, **hot) for s in range(6)}) > 1  # other seeds, other draws
    assert pipe.caption(images, seed=11, return_ids=True, **hot)[0] == a  # row 0 as alone
    greedy = pipe.caption(images)
    assert pipe.caption(images, do_sample=True, top_k=1) == greedy  # one token left: the likeliest
    assert pipe.vqa(images, "how many circles are there ?", do_sample=True, temperature=1e-3, seed=3) == \
        pipe.vqa(images, "how many circles are there ?")


@pytest.mark.parametrize("opts, message", [
    (dict(do_sample=True, temperature=0), "temperature: expected a finite number in (0"),
    (dict(do_sample=True, temperature=float("nan")), "temperature:"),
    (dict(do_sample=True, top_p=1.5), "top_p: expected a finite number in [0"),
    (dict(do_sample=True, min_p=-0.1), "min_p:"),
    (dict(do_sample=True, top_k=True), "top_k: expected an integer"),
    (dict(do_sample=True, top_k=2.0), "top_k: expected an integer"),
    (dict(do_sample=True, seed=-1), "seed: expected >= 0"),
    (dict(do_sample=True, seed=1 << 64), "seed: expected <= "),
    (dict(do_sample="yes"), "do_sample: expected True or False"),
    (dict(do_sample=True, num_beams=2), "do_sample: sampling draws one sequence per item"),
])
def test_bad_sampling_options_are_refused_in_one_line(pipe_image, opts, message):
    pipe, images = pipe_image
    with pytest.raises(InputError) as e:
        pipe.caption(images[0], **opts)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
