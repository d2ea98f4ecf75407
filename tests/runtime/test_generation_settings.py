"""A model's own generation settings travel with the bundle and the runtime applies them as HF does.

1. Each logits processor of the runtime (numpy) equals transformers' own class on random scores
   and sequences, and the whole chain equals the list `generate` builds, in its order.
2. Tiny ViT-GPT2 / ViT-BERT models whose generation_config sets no-repeat n-grams, a repetition
   penalty, bad words, min length, forced and several EOS ids, beams and a length penalty: the
   export validates, the manifest carries the settings, the pipeline's tokens equal HF `generate`
   with the model's own defaults (greedy and beam), the settings change the output, and an option
   passed by the user overrides its default exactly as it does in HF.
3. A hostile `generation` field in a manifest is one line naming it; a manifest without one loads.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from families import _bert_tokenizer, _gpt2_tokenizer, _image_processor, _perturb, _vit
from vlmedge.errors import BundleError, InputError
from vlmedge.runtime.decoding import GenerationConfig, Processors, resolve

V = 29
EOS = [7, 9]


def _hf(name, **kw):
    from transformers.generation import logits_process as lp

    return {
        "repetition_penalty": lambda: lp.RepetitionPenaltyLogitsProcessor(kw["repetition_penalty"]),
        "no_repeat_ngram_size": lambda: lp.NoRepeatNGramLogitsProcessor(kw["no_repeat_ngram_size"]),
        "bad_words_ids": lambda: lp.NoBadWordsLogitsProcessor(kw["bad_words_ids"], EOS),
        "min_length": lambda: lp.MinLengthLogitsProcessor(kw["min_length"], EOS),
        "min_new_tokens": lambda: lp.MinNewTokensLengthLogitsProcessor(kw["prompt"], kw["min_new_tokens"], EOS),
        "forced_bos_token_id": lambda: lp.ForcedBOSTokenLogitsProcessor(kw["forced_bos_token_id"]),
        "forced_eos_token_id": lambda: lp.ForcedEOSTokenLogitsProcessor(kw["max_length"], kw["forced_eos_token_id"]),
        "exponential_decay_length_penalty": lambda: lp.ExponentialDecayLengthPenalty(
            kw["exponential_decay_length_penalty"], EOS, kw["prompt"]),
        "suppress_tokens": lambda: lp.SuppressTokensLogitsProcessor(kw["suppress_tokens"]),
        "begin_suppress_tokens": lambda: lp.SuppressTokensAtBeginLogitsProcessor(kw["begin_suppress_tokens"], kw["prompt"]),
        "remove_invalid_values": lambda: lp.InfNanRemoveLogitsProcessor(),
        "renormalize_logits": lambda: lp.LogitNormalization(),
    }[name]()


CASES = [
    dict(repetition_penalty=1.3), dict(repetition_penalty=0.7),
    dict(no_repeat_ngram_size=1), dict(no_repeat_ngram_size=2), dict(no_repeat_ngram_size=3),
    dict(no_repeat_ngram_size=12),  # longer than every sequence here: nothing banned
    dict(bad_words_ids=[[3], [1, 2], [4, 5, 1], [7], [2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]]),  # [7] is an EOS: kept
    dict(min_length=4), dict(min_new_tokens=3),
    dict(forced_bos_token_id=5), dict(forced_eos_token_id=[7, 8]), dict(forced_eos_token_id=11),
    dict(exponential_decay_length_penalty=[1, 1.5]),
    dict(suppress_tokens=[1, 4]), dict(begin_suppress_tokens=[2, 3]),
    dict(remove_invalid_values=True), dict(renormalize_logits=True),
]


@pytest.mark.parametrize("opts", CASES, ids=lambda o: "-".join(f"{k}={v}"[:28] for k, v in o.items()))
@pytest.mark.parametrize("rows,length,prompt", [(1, 1, 1), (3, 2, 1), (6, 5, 2), (4, 9, 1), (9, 4, 4)])
def test_each_processor_equals_transformers(opts, rows, length, prompt):
    rng = np.random.default_rng(rows * 31 + length)
    seqs = rng.integers(0, 6, (rows, length))  # few distinct ids: repeats and n-gram matches happen
    scores = (rng.normal(size=(rows, V)) * 3).astype(np.float32)
    if "remove_invalid_values" in opts:
        scores[0, :3] = [np.nan, np.inf, -np.inf]
    max_new = length + 1 - prompt  # forced EOS fires at this call (cur_len == max_length - 1)
    s = resolve(GenerationConfig(**opts), {"eos_token_id": EOS}, prompt, max(max_new, 1))
    before = scores.copy()
    got = Processors(s)(seqs, scores)
    assert np.array_equal(scores, before, equal_nan=True)  # the caller's array is not written
    (name,) = opts
    ref = _hf(name, prompt=prompt, max_length=prompt + max(max_new, 1), **opts)
    want = ref(torch.tensor(seqs), torch.tensor(scores)).numpy()
    if name == "renormalize_logits":  # a log-softmax: torch sums in another order (1 ulp)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_array_equal(got, want)


def test_the_chain_equals_generates_own_list_in_its_order():
    """Every setting at once, against the processors `generate` builds for an encoder-decoder model."""
    from transformers import GenerationConfig as HfConfig

    model = _ved_gpt2_model()
    settings = dict(repetition_penalty=1.3, no_repeat_ngram_size=2, bad_words_ids=[[3], [1, 2]], min_length=5,
                    min_new_tokens=2, forced_eos_token_id=[7, 8], exponential_decay_length_penalty=(2, 1.2),
                    suppress_tokens=[4], begin_suppress_tokens=[5], remove_invalid_values=True,
                    renormalize_logits=True, eos_token_id=EOS, max_length=8)
    hf = HfConfig(**settings, decoder_start_token_id=0, pad_token_id=0)
    model._prepare_special_tokens(hf, False, "cpu")
    chain = model._get_logits_processor(hf, input_ids_seq_length=1, device="cpu")
    ours = Processors(resolve(GenerationConfig(**settings), {}, 1, 99))
    rng = np.random.default_rng(0)
    for length in range(1, 8):
        seqs = rng.integers(0, 6, (6, length))
        scores = (rng.normal(size=(6, model.config.decoder.vocab_size)) * 3).astype(np.float32)
        want = chain(torch.tensor(seqs), torch.tensor(scores)).numpy()
        np.testing.assert_allclose(ours(seqs, scores), want, rtol=1e-6, atol=1e-6)


# -- end to end ---------------------------------------------------------------------------------------

def _ved_gpt2_model():
    from transformers import GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel

    dec = GPT2Config(vocab_size=V, n_embd=48, n_layer=2, n_head=3, n_positions=40, add_cross_attention=True,
                     bos_token_id=0, eos_token_id=0)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(_vit(48), dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 0, 0, 0
    torch.manual_seed(0)
    return VisionEncoderDecoderModel(cfg)


def _build_gpt2(out):
    _, vocab = _gpt2_tokenizer(out)
    from transformers import GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel

    dec = GPT2Config(vocab_size=len(vocab), n_embd=48, n_layer=2, n_head=3, n_positions=40, add_cross_attention=True,
                     bos_token_id=0, eos_token_id=0)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(_vit(48), dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 0, 0, 0
    torch.manual_seed(1)
    model = _perturb(VisionEncoderDecoderModel(cfg), std=0.3, seed=1)
    g = model.generation_config
    g.no_repeat_ngram_size, g.repetition_penalty, g.min_length = 2, 1.3, 4
    g.num_beams, g.length_penalty = 3, 0.6
    model.save_pretrained(out)
    _image_processor(out, "vit")
    return out


def _build_bert(out):
    _, ids = _bert_tokenizer(out)
    from transformers import BertConfig, VisionEncoderDecoderConfig, VisionEncoderDecoderModel

    dec = BertConfig(vocab_size=len(ids), hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                     intermediate_size=64, max_position_embeddings=40, is_decoder=True, add_cross_attention=True)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(_vit(48), dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = ids["[CLS]"], ids["[PAD]"], ids["[SEP]"]
    torch.manual_seed(2)
    model = _perturb(VisionEncoderDecoderModel(cfg), std=0.3, seed=2)
    g = model.generation_config
    g.no_repeat_ngram_size, g.max_length = 3, 12
    g.eos_token_id = [ids["[SEP]"], ids["."] if "." in ids else ids[","]]  # several EOS ids
    g.forced_eos_token_id = ids["[SEP]"]
    g.bad_words_ids = [[ids["[PAD]"]], [55, 33]]  # a token and a pair this model produces
    model.save_pretrained(out)
    _image_processor(out, "vit")
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Both models, exported with validation (greedy and beam against HF generate)."""
    from vlmedge.export.exporter import ExportOptions, export_bundle
    from vlmedge.models.registry import load_adapter

    root = tmp_path_factory.mktemp("generation-settings")
    out = {}
    for name, build in (("gpt2", _build_gpt2), ("bert", _build_bert)):
        src = build(root / f"{name}-model")
        adapter = load_adapter(str(src))
        manifest = export_bundle(adapter, "caption", root / name, ExportOptions(validate_images=4))
        out[name] = (adapter, manifest, root / name)
    return out


def _images(n=6, start=70):
    from vlmedge.data.scenes import scenes

    return [s.image for s in scenes("test", start, n)]


def _pixels(adapter, n=6, start=70):
    from vlmedge.export.samples import sample_inputs

    return sample_inputs(adapter, n=n, tasks=["caption"], start=start).pixel_values


def _hf_generate(adapter, px, **kw):
    from vlmedge.models.hf import strip_prompt

    with torch.no_grad():
        out = adapter.model.generate(pixel_values=px, do_sample=False, **kw)
    g = adapter.model.generation_config
    return strip_prompt(out, 1, kw.get("eos_token_id", g.eos_token_id))


def _pipe_ids(pipe, images, **kw):
    return [list(g.ids) for g in pipe.caption(images, return_ids=True, **kw)]


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_manifest_carries_settings_and_export_validated_them(exported, name):
    adapter, manifest, path = exported[name]
    raw = json.loads((path / "manifest.json").read_text())
    gen = raw["tasks"]["caption"]["generation"]
    assert isinstance(gen, dict) and gen["no_repeat_ngram_size"] == adapter.model.generation_config.no_repeat_ngram_size
    tokens = raw["validation"]["tokens"]["caption"]
    assert raw["validation"]["passed"] and tokens["beam"]["agree"] == tokens["images"]


def test_defaults_equal_hf_generate_and_change_the_output(exported):
    from vlmedge.runtime.bundle import load_bundle
    from vlmedge.runtime.pipeline import Pipeline

    adapter, manifest, path = exported["gpt2"]
    pipe, images, px = Pipeline(load_bundle(path)), _images(), _pixels(adapter)
    n = 14
    # the model's defaults: beam-3 with its length penalty, n-grams, repetition penalty, min length
    default = _pipe_ids(pipe, images, max_new_tokens=n)
    assert default == _hf_generate(adapter, px, max_new_tokens=n)
    # greedy: one option overridden, the other defaults kept, on both sides
    greedy = _pipe_ids(pipe, images, max_new_tokens=n, num_beams=1)
    assert greedy == _hf_generate(adapter, px, max_new_tokens=n, num_beams=1)
    # each setting changes the output on some image, and its override matches HF's
    for off in (dict(no_repeat_ngram_size=0), dict(repetition_penalty=1.0), dict(min_length=0), dict(length_penalty=1.0)):
        changed = False
        for beams in (1, 3):
            got = _pipe_ids(pipe, images, max_new_tokens=n, num_beams=beams, **off)
            assert got == _hf_generate(adapter, px, max_new_tokens=n, num_beams=beams, **off), (off, beams)
            changed |= got != (default if beams == 3 else greedy)
        if "no_repeat_ngram_size" in off or "repetition_penalty" in off:
            assert changed, off  # the setting matters, greedy or beam


def test_several_eos_forced_eos_bad_words_and_max_length(exported):
    from vlmedge.runtime.bundle import load_bundle
    from vlmedge.runtime.pipeline import Pipeline

    adapter, manifest, path = exported["bert"]
    pipe, images, px = Pipeline(load_bundle(path)), _images(), _pixels(adapter)
    g = adapter.model.generation_config
    # nothing passed on either side: HF's max_length 12 from the model, forced EOS at its last step
    default = _pipe_ids(pipe, images)
    assert default == _hf_generate(adapter, px)
    assert all(len(r) <= 11 for r in default) and any(len(r) == 11 and r[-1] == g.forced_eos_token_id for r in default)
    beam = _pipe_ids(pipe, images, num_beams=3)
    assert beam == _hf_generate(adapter, px, num_beams=3)
    for off in (dict(no_repeat_ngram_size=0), dict(bad_words_ids=None), dict(eos_token_id=g.eos_token_id[0])):
        hf_off = {k: v for k, v in off.items()}
        ours = {k: ([] if v is None else v) for k, v in off.items()}
        got = _pipe_ids(pipe, images, **ours)
        assert got == _hf_generate(adapter, px, **hf_off), off
        if "eos_token_id" not in off:  # the second EOS may never come up
            assert got != default, off
    # a user's max_new_tokens wins over the model's max_length, as in HF
    longer = _pipe_ids(pipe, images, max_new_tokens=20)
    assert longer == _hf_generate(adapter, px, max_new_tokens=20) and longer != default


def test_user_options_are_checked_in_one_line(exported):
    from vlmedge.runtime.bundle import load_bundle
    from vlmedge.runtime.pipeline import Pipeline

    pipe = Pipeline(load_bundle(exported["bert"][2]))
    for opts, msg in ((dict(repetition_penalty=0.0), "repetition_penalty: expected a finite number in (0"),
                      (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size: expected >= 0"),
                      (dict(bad_words_ids=[[1, "x"]]), "bad_words_ids[0][1]: expected an integer"),
                      (dict(bad_words_ids=[[10**6]]), "bad_words_ids[0]: token id 1000000 is outside the vocabulary"),
                      (dict(eos_token_id=[1, True]), "eos_token_id[1]: expected an integer")):
        with pytest.raises(InputError) as e:
            pipe.caption(_images(1), **opts)
        assert str(e.value).startswith(msg) and "\n" not in str(e.value), str(e.value)


# -- the manifest -------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,msg", [
    ("no_repeat_ngram_size", "3", "tasks.caption.generation.no_repeat_ngram_size: expected an integer"),
    ("no_repeat_ngram_size", -1, "tasks.caption.generation.no_repeat_ngram_size: expected an integer in [0"),
    ("repetition_penalty", 0, "tasks.caption.generation.repetition_penalty: expected a number in (0"),
    ("repetition_penalty", True, "tasks.caption.generation.repetition_penalty: expected a finite number"),
    ("bad_words_ids", [[1], 2], "tasks.caption.generation.bad_words_ids[1]: expected a list"),
    ("bad_words_ids", [[1], [5, 10**5]], "tasks.caption.generation.bad_words_ids[1][1]: token id 100000 is outside"),
    ("eos_token_id", [3, 10**5], "tasks.caption.generation.eos_token_id[1]: token id 100000 is outside"),
    ("forced_eos_token_id", "2", "tasks.caption.generation.forced_eos_token_id: expected a token id or a list"),
    ("early_stopping", "sometimes", "tasks.caption.generation.early_stopping: 'sometimes' is not one of never"),
    ("exponential_decay_length_penalty", [2.5, 1.1], "tasks.caption.generation.exponential_decay_length_penalty[0]"),
    ("generation", [], "tasks.caption.generation: expected an object"),
])
def test_hostile_generation_field_is_one_line(exported, field, value, msg):
    from vlmedge.runtime.bundle import parse_manifest

    raw = json.loads((exported["bert"][2] / "manifest.json").read_text())
    bad = copy.deepcopy(raw)
    if field == "generation":
        bad["tasks"]["caption"]["generation"] = value
    else:
        bad["tasks"]["caption"]["generation"][field] = value
    with pytest.raises(BundleError) as e:
        parse_manifest(bad)
    assert msg in str(e.value) and "\n" not in str(e.value), str(e.value)
    old = copy.deepcopy(raw)
    del old["tasks"]["caption"]["generation"]  # a bundle from before generation settings still loads
    assert "generation" not in parse_manifest(old).tasks["caption"]


def test_settings_the_runtime_cannot_apply_refuse_the_export_in_one_line():
    from vlmedge.errors import ModelLoadError
    from vlmedge.models.generation import generation_defaults

    model = _ved_gpt2_model()
    model.generation_config.num_beam_groups, model.generation_config.diversity_penalty = 2, 0.5
    with pytest.raises(ModelLoadError) as e:
        generation_defaults(model, "m/generation_config.json")
    assert str(e.value).startswith("m/generation_config.json: generation_config.num_beam_groups = 2") and "\n" not in str(e.value)


def test_do_sample_false_is_greedy_and_sampling_with_beams_is_refused_in_one_line(shapes_pipe_for_sampling):
    pipe, image = shapes_pipe_for_sampling  # sampling itself: tests/runtime/test_sampling.py
    assert pipe.caption(image, do_sample=False) == pipe.caption(image)
    with pytest.raises(InputError) as e:
        pipe.caption(image, do_sample=True, num_beams=3)
    assert "do_sample" in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def shapes_pipe_for_sampling(bundles):
    import vlmedge
    from vlmedge.data.scenes import scenes

    return vlmedge.load(bundles["shapes-vlm"][2]), next(scenes("test", 0, 1)).image
