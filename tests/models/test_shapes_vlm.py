import numpy as np
import torch

from vlmedge.data.scenes import pick_questions, scenes
from vlmedge.data.tokenizer import build_tokenizer
from vlmedge.models.checkpoint import BUILTIN_MODELS
from vlmedge.models.shapes_vlm import ShapesVLM, ShapesVLMConfig
from vlmedge.runtime.preprocess import normalize
from vlmedge.training.batches import pad


def _inputs(model, tok, n=12, split="test"):
    cfg = model.config
    scs = list(scenes(split, 0, n))
    px = torch.from_numpy(normalize(np.stack([s.image for s in scs]), cfg.image_mean, cfg.image_std))
    qs = [pick_questions(s)[-1] for s in scs]  # relational where the scene has one
    ids = pad([tok.encode(q.text).ids for q in qs], cfg.pad_id)
    return px, ids, (ids != cfg.pad_id).long()


def _check_cache_equivalence(model, tok):
    px, ids, mask = _inputs(model, tok)
    with torch.no_grad():
        a = model.caption(px, use_cache=True)
        b = model.caption(px, use_cache=False)
        assert torch.equal(a, b)
        a = model.answer(px, ids, mask, use_cache=True)
        b = model.answer(px, ids, mask, use_cache=False)
        assert torch.equal(a, b)
    return a


def test_cached_and_uncached_generation_agree_on_the_shipped_model(shipped):
    model, tok = shipped
    _check_cache_equivalence(model, tok)


def test_cached_and_uncached_generation_agree_on_random_weights():
    tok = build_tokenizer()
    torch.manual_seed(0)
    model = ShapesVLM(ShapesVLMConfig(vocab_size=tok.get_vocab_size(), d_model=64, vision_layers=1, text_layers=1, decoder_layers=2)).eval()
    with torch.no_grad():  # make the output long and varied: no early EOS
        model.decoder.lm_head.weight[model.config.eos_id] = -1.0
    px, _, _ = _inputs(model, tok, n=4)
    a = model.caption(px, max_new_tokens=20, use_cache=True)
    assert a.shape[1] == 20 and len(set(a.flatten().tolist())) > 3
    assert torch.equal(a, model.caption(px, max_new_tokens=20, use_cache=False))


def test_batched_answers_equal_one_by_one(shipped):
    model, tok = shipped
    px, ids, mask = _inputs(model, tok, n=6)
    batched = model.answer(px, ids, mask)
    for i in range(len(px)):
        n = int(mask[i].sum())
        single = model.answer(px[i : i + 1], ids[i : i + 1, :n], mask[i : i + 1, :n])
        assert single[0, : batched.shape[1]].tolist()[: single.shape[1]] == batched[i, : single.shape[1]].tolist()


def test_shipped_checkpoint_is_small_and_complete():
    d = BUILTIN_MODELS["shapes-vlm"]
    files = {p.name: p.stat().st_size for p in d.iterdir()}
    assert set(files) >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert sum(files.values()) <= 25 * 1024 * 1024
