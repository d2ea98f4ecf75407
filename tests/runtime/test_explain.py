"""Attention from the deployed graphs (return_attention, `vlmedge explain`) on the shipped reference model:
- each token's attention equals the PyTorch module's own cross-attention probabilities (the last query
  row of the pass that chose it), caption and VQA, and the question encoder's attention to the image;
- the explain decoder's logits are the production decoder's, and plain captioning never opens it;
- a manifest whose explain graph reads another graph's weights, or was changed, is refused;
- the CLI writes one PNG per token, the strip, attention.npz and tokens.json, and refuses bad input in one line.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch

import vlmedge
from vlmedge.data.scenes import pick_questions, scenes
from vlmedge.errors import BundleError, InputError
from vlmedge.runtime.bundle import load_bundle


@pytest.fixture(scope="module")
def world():
    return list(scenes("test", 40, 3))


def _module_attention(model, run):
    """Every cross-attention call of the module's decoder while `run()` decodes: per step, [layers, heads, positions]
    of its last query (batch row 0)."""
    calls = []
    layers = model.decoder.layers
    for layer in layers:
        original = layer.cross_attn.attend

        def attend(x, k, v, bias=None, original=original):
            out, probs = original(x, k, v, bias)
            calls.append(probs[0, :, -1].numpy())
            return out, probs

        layer.cross_attn.attend = attend
    try:
        ids = run()
    finally:
        for layer in layers:
            del layer.cross_attn.attend
    return ids, np.stack(calls).reshape(-1, len(layers), *calls[0].shape)


def test_caption_and_vqa_attention_equal_the_modules(ort_pipe, shipped, world):
    model, tok = shipped
    for s in world:
        px = torch.from_numpy(ort_pipe.images([s.image]))
        e = ort_pipe.caption(s.image, return_attention=True)
        ids, want = _module_attention(model, lambda: model.caption(px)[0].tolist())
        assert list(e.ids) == ids[: len(e.ids)] and e.text == ort_pipe.caption(s.image)
        np.testing.assert_allclose(e.attention, want[: len(e.ids)], atol=1e-4, rtol=1e-3)
        assert e.heatmaps().shape == (len(e.ids), 8, 8) and e.grid == {"leading": 0, "rows": 8, "cols": 8}
        assert e.tokens == tuple(tok.id_to_token(i) for i in e.ids)

        q = pick_questions(s)[0].text
        qids, qmask = ort_pipe.question_ids([q])
        a = ort_pipe.vqa(s.image, q, return_attention=True)
        answer, want = _module_attention(model, lambda: model.answer(px, torch.from_numpy(qids), torch.from_numpy(qmask))[0].tolist())
        assert list(a.ids) == answer[: len(a.ids)]
        np.testing.assert_allclose(a.attention, want[: len(a.ids)], atol=1e-4, rtol=1e-3)
        with torch.no_grad():
            _, image_attention = model.question.forward_with_attention(torch.from_numpy(qids), torch.from_numpy(qmask),
                                                                       model.encode_image(px))
        np.testing.assert_allclose(a.image_attention, np.stack([p[0].numpy() for p in image_attention]), atol=1e-4, rtol=1e-3)
        composed = a.heatmaps()  # answer -> question positions -> patches
        assert composed.shape == (len(a.ids), 8, 8)
        np.testing.assert_allclose(composed.reshape(len(a.ids), -1).sum(-1), 1.0, atol=1e-4)


def test_batch_equals_one_by_one_and_beams(ort_pipe, world):
    images = [s.image for s in world]
    batched = ort_pipe.caption(images, return_attention=True)
    for img, b in zip(images, batched):
        one = ort_pipe.caption(img, return_attention=True)
        assert one.ids == b.ids
        np.testing.assert_allclose(one.attention, b.attention, atol=1e-5)
    beams = ort_pipe.caption(images[0], return_attention=True, num_beams=3)
    assert beams.ids == ort_pipe.caption(images[0], return_ids=True, num_beams=3).ids
    assert beams.attention.shape[0] == len(beams.ids)
    for reduce in ("mean", "last", "max"):
        assert np.isfinite(beams.heatmaps(reduce)).all()
    with pytest.raises(InputError, match="reduce"):
        beams.heatmaps("median")
    with pytest.raises(InputError, match="return_attention: expected True or False"):
        ort_pipe.caption(images[0], return_attention="yes")


def test_explain_logits_are_the_production_logits_and_plain_caption_never_opens_them(shapes, world):
    bundle = load_bundle(shapes)
    pipe = vlmedge.load(shapes)
    pipe.caption([s.image for s in world])
    assert not [n for n in pipe.backend.sessions if n.endswith("_explain")]
    pipe.caption(world[0].image, return_attention=True)
    assert "decoder_explain" in pipe.backend.sessions

    spec = bundle.manifest.graphs["decoder"]
    explain = bundle.manifest.explain["graphs"]["decoder"]
    assert explain.data == spec.data and explain.data_sha256 == spec.data_sha256  # the weights are read in place
    assert (shapes / explain.file).stat().st_size < (shapes / spec.file).stat().st_size * 1.1
    prod = ort.InferenceSession(str(shapes / spec.file))
    expl = ort.InferenceSession(str(shapes / explain.file))
    rng = np.random.default_rng(0)
    B, P, T, S = 2, 3, 4, 64
    heads, dh = spec.inputs[4].shape[1], spec.inputs[4].shape[3]
    feeds = {"input_ids": rng.integers(0, 30, (B, T)), "attention_mask": np.ones((B, P + T), np.int64),
             "position_ids": np.tile(np.arange(P, P + T), (B, 1)), "encoder_mask": np.ones((B, S), np.int64)}
    for t in spec.inputs[4:]:
        n = S if t.name.startswith("cross.") else P
        feeds[t.name] = rng.standard_normal((B, heads, n, dh)).astype(np.float32)
    a, b = prod.run(None, feeds), expl.run(None, feeds)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    assert b[-1].shape == (B, bundle.manifest.dims["decoder_layers"], heads, S)


def test_hostile_explain_entries_are_refused(shapes, tmp_path):
    def broken(edit):
        out = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        shutil.copytree(shapes, out)
        m = json.loads((out / "manifest.json").read_text())
        edit(m, out)
        (out / "manifest.json").write_text(json.dumps(m))
        return out

    def other_weights(m, out):
        m["explain"]["graphs"]["decoder"]["data_file"] = "vision_encoder.onnx.data"
        m["explain"]["graphs"]["decoder"]["data_sha256"] = m["graphs"]["vision_encoder"]["data_sha256"]

    with pytest.raises(BundleError, match="explain.graphs.decoder.data_file.*not the weights file of graphs.decoder"):
        load_bundle(broken(other_weights))
    with pytest.raises(BundleError, match="explain.graphs.decoder.file"):
        load_bundle(broken(lambda m, out: m["explain"]["graphs"]["decoder"].update(file="decoder.onnx")))
    with pytest.raises(BundleError, match="explain.graphs.decoder.outputs"):
        load_bundle(broken(lambda m, out: m["explain"]["graphs"]["decoder"]["outputs"].pop()))
    with pytest.raises(BundleError, match="decoder_explain.onnx: sha256 does not match"):
        load_bundle(broken(lambda m, out: (out / "decoder_explain.onnx").write_bytes(b"x" * 10)))
    with pytest.raises(BundleError, match="explain.image_grid"):
        load_bundle(broken(lambda m, out: m["explain"].update(image_grid={"leading": 1, "rows": 8, "cols": 8})))
    # a bundle without explain graphs captions as before, and says why it cannot return attention
    no_explain = broken(lambda m, out: m.pop("explain"))
    pipe = vlmedge.load(no_explain)
    img = next(iter(scenes("test", 0, 1))).image
    assert pipe.caption(img)
    with pytest.raises(InputError, match="no explain graphs"):
        pipe.caption(img, return_attention=True)


def test_explain_cli(shapes, tmp_path, world):
    from vlmedge.cli import main
    from PIL import Image

    img = tmp_path / "scene.png"
    Image.fromarray(world[0].image).save(img)
    assert main(["explain", str(shapes), str(img), "--out", str(tmp_path / "x")]) == 0
    meta = json.loads((tmp_path / "x" / "tokens.json").read_text())
    pngs = sorted(p.name for p in (tmp_path / "x").glob("token-*.png"))
    assert len(pngs) == len(meta["ids"]) == len(meta["tokens"]) and (tmp_path / "x" / "tokens.png").is_file()
    with np.load(tmp_path / "x" / "attention.npz") as z:
        assert z["heatmaps"].shape == (len(meta["ids"]), 8, 8) and z["attention"].shape[0] == len(meta["ids"])
    assert main(["explain", str(shapes), str(img), "--question", "what color is the circle ?", "--out", str(tmp_path / "q")]) == 0
    with np.load(tmp_path / "q" / "attention.npz") as z:
        assert z["image_attention"].ndim == 4
    # bad input: one line, non-zero, nothing written
    assert main(["explain", str(shapes), str(img), "--out", str(tmp_path / "x")]) != 0  # exists, no --force
    assert main(["explain", str(shapes), str(img), "--reduce", "median", "--out", str(tmp_path / "r")]) != 0
    assert main(["explain", str(shapes), str(tmp_path / "missing.png"), "--out", str(tmp_path / "m")]) != 0
    assert not (tmp_path / "r").exists() and not (tmp_path / "m").exists()
