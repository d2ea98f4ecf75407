"""The runtime's embeddings, tokens, pixels and label probabilities against Hugging Face's, on the tiny
CLIP and SigLIP (tests/encoders/tiny.py) as `from_pretrained` loads them."""

import numpy as np
import pytest
from PIL import Image

FAMILIES = ("clip", "siglip", "siglip2")
TRICKY = [
    "a photo of a cat.", "A PHOTO OF A CAT!", "  spaced   out\ttext\n", "it's 3 o'clock -- isn't it?", "ÉCOLE café ½ ﬁ",
    "red,blue;green", "", "x", " ".join(["a large green square and"] * 30),  # past both context lengths
]


@pytest.fixture(scope="module")
def hf(encoder_models):
    """name -> (model, tokenizer, image processor), loaded as a user of transformers loads them."""
    import torch
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    torch.set_num_threads(2)
    return {n: (AutoModel.from_pretrained(p).eval(), AutoTokenizer.from_pretrained(p), AutoImageProcessor.from_pretrained(p))
            for n, p in encoder_models.items()}


def _odd_images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((50, 37), (31, 90), (32, 32), (200, 128))] \
        + [Image.fromarray(rng.integers(0, 256, (40, 60, 4), dtype=np.uint8), "RGBA"), Image.fromarray(rng.integers(0, 256, (45, 45), dtype=np.uint8), "L")]


def _texts(name):
    """TRICKY, less the empty text for SigLIP 2 (its tokenizer adds no special tokens: no tokens, refused)."""
    return [t for t in TRICKY if t or name != "siglip2"]


def _hf_text(name, tok, texts, max_length):
    kw = dict(padding="max_length", max_length=64) if name.startswith("siglip") else dict(padding=True, max_length=max_length)
    return tok(texts, truncation=True, return_tensors="pt", **kw)


def _norm(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("name", FAMILIES)
def test_pixels_equal_the_image_processor(name, hf, encoder_pipes, scene_images):
    _, _, proc = hf[name]
    images = _odd_images() + [Image.fromarray(a) for a in scene_images[:2]]
    pipe = encoder_pipes[name]
    for img in images:
        if name == "siglip2" and img.mode != "RGB":
            continue  # Siglip2ImageProcessor does not convert RGBA or greyscale (it fails on them); the runtime does
        ref = proc(images=img, return_tensors="np")
        got = pipe.image_inputs([img])
        assert set(got) == set(ref.keys()) - {"num_patches"}  # (SigLIP 2: also the mask and the patch grid)
        for key, value in got.items():
            np.testing.assert_allclose(value, ref[key], atol=1e-5, rtol=0)
    if name == "siglip2":  # NaFlex keeps each image's aspect ratio: the grids differ
        assert len({tuple(pipe.image_inputs([i])["spatial_shapes"][0]) for i in images}) >= 3


@pytest.mark.parametrize("name", FAMILIES)
def test_tokens_equal_the_tokenizer_on_tricky_text(name, hf, encoder_pipes):
    _, tok, _ = hf[name]
    pipe = encoder_pipes[name]
    ref = _hf_text(name, tok, _texts(name), pipe.manifest.tokenizer["max_length"])
    ids, mask = pipe.text_ids(_texts(name))
    np.testing.assert_array_equal(ids, ref["input_ids"].numpy())
    np.testing.assert_array_equal(mask, ref["attention_mask"].numpy())
    assert ids.shape[1] == pipe.manifest.dims["text_len"]  # the long text was truncated to the context length
    for text in TRICKY[:3]:  # one at a time too (CLIP pads to the longest of a batch)
        ref = _hf_text(name, tok, [text], pipe.manifest.tokenizer["max_length"])
        np.testing.assert_array_equal(pipe.text_ids([text])[0], ref["input_ids"].numpy())


@pytest.mark.parametrize("name", FAMILIES)
def test_embeddings_equal_hf_within_1e_5(name, hf, encoder_pipes, scene_images):
    import torch

    model, tok, proc = hf[name]
    pipe = encoder_pipes[name]
    images = [Image.fromarray(a) for a in scene_images] + _odd_images()[:3]
    with torch.no_grad():
        ref_img = _norm(model.get_image_features(**proc(images=images, return_tensors="pt")).pooler_output.numpy())
        ref_txt = _norm(model.get_text_features(**_hf_text(name, tok, _texts(name), pipe.manifest.tokenizer["max_length"])).pooler_output.numpy())
    got_img, got_txt = pipe.embed_images(images), pipe.embed_texts(_texts(name))
    assert got_img.shape == ref_img.shape and got_img.dtype == np.float32
    np.testing.assert_allclose(got_img, ref_img, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_txt, ref_txt, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got_img, axis=-1), 1.0, atol=1e-5)
    assert np.abs(got_img[0] - got_img[1]).max() > 1e-3  # the images are told apart (a test that can fail)


@pytest.mark.parametrize("name", FAMILIES)
def test_probabilities_equal_hf_zero_shot_pipeline(name, hf, encoder_pipes, scene_images):
    from transformers import pipeline

    model, tok, proc = hf[name]
    clf = pipeline("zero-shot-image-classification", model=model, tokenizer=tok, image_processor=proc)
    labels = ["red circle", "blue square", "green triangle", "a cat", "Forklift!"]
    pipe = encoder_pipes[name]
    for arr in scene_images[:3]:
        img = Image.fromarray(arr)
        ref = {r["label"]: r["score"] for r in clf(img, candidate_labels=labels, hypothesis_template="a photo of a {}.")}
        got = pipe.classify(img, labels)
        assert [g.label for g in got] == sorted(labels, key=lambda x: -ref[x])
        for g in got:
            assert abs(g.score - ref[g.label]) < 1e-5, (g, ref[g.label])
    if name == "clip":  # softmax: the labels' probabilities sum to 1; SigLIP's sigmoids do not
        assert abs(sum(g.score for g in got) - 1) < 1e-5
    else:
        assert abs(sum(g.score for g in got) - 1) > 1e-3


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_equal_the_model_forward(name, hf, encoder_pipes, scene_images):
    import torch

    model, tok, proc = hf[name]
    pipe = encoder_pipes[name]
    images = [Image.fromarray(a) for a in scene_images[:4]]
    texts = ["a photo of a red circle.", "two blue squares"]
    with torch.no_grad():
        ref = model(**_hf_text(name, tok, texts, 77), **proc(images=images, return_tensors="pt")).logits_per_image.numpy()
    got = pipe.logits(pipe.embed_images(images), pipe.embed_texts(texts))
    np.testing.assert_allclose(got, ref, atol=1e-4 * max(1, np.abs(ref).max()), rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_batch_equals_one_by_one(name, encoder_pipes, scene_images):
    pipe = encoder_pipes[name]
    imgs = scene_images + [np.asarray(i.convert("RGB")) for i in _odd_images()] * 3  # 24: more than one batch of 16
    batched = pipe.embed_images(imgs)
    assert batched.shape == (len(imgs), pipe.dim)
    for i in (0, 5, 17, len(imgs) - 1):
        np.testing.assert_allclose(pipe.embed_images(imgs[i]), batched[i], atol=1e-6, rtol=0)
    texts = _texts(name)
    batched = pipe.embed_texts(texts)
    for i, t in enumerate(texts):
        np.testing.assert_allclose(pipe.embed_texts(t), batched[i], atol=1e-6, rtol=0)
    labels = ["red circle", "blue square", "green triangle"]
    many = pipe.classify(imgs[:3], labels)
    for img, row in zip(imgs[:3], many):
        one = pipe.classify(img, labels)
        assert [x.label for x in one] == [x.label for x in row]
        np.testing.assert_allclose([x.score for x in one], [x.score for x in row], atol=1e-6)
    top = pipe.classify(imgs[0], labels, top_k=2)
    assert [x.label for x in top] == [x.label for x in many[0][:2]]


@pytest.mark.parametrize("call, message", [
    (lambda p: p.classify("missing.png", ["a"]), "missing.png"),
    (lambda p: p.classify(np.zeros((8, 8, 3), np.uint8), []), "labels: empty"),
    (lambda p: p.classify(np.zeros((8, 8, 3), np.uint8), "cat"), "labels: expected a list"),
    (lambda p: p.classify(np.zeros((8, 8, 3), np.uint8), ["cat", "cat"]), "given twice"),
    (lambda p: p.classify(np.zeros((8, 8, 3), np.uint8), ["cat", " "]), "label 1"),
    (lambda p: p.classify(np.zeros((8, 8, 3), np.uint8), ["cat"], template="a photo"), "template"),
    (lambda p: p.classify(np.zeros((8, 8, 3), np.uint8), ["cat"], template="{} and {}"), "template"),
    (lambda p: p.classify(np.zeros((8, 8, 3), np.uint8), ["cat"], top_k=0), "top_k"),
    (lambda p: p.embed_texts([3]), "text 0: expected a string"),
    (lambda p: p.embed_texts(["ok", "bad \ud800"]), "text 1: not valid Unicode"),
    (lambda p: p.embed_images([np.zeros((8, 8, 3), np.uint8), object()]), "image 1"),
    (lambda p: p.caption(np.zeros((8, 8, 3), np.uint8)), "does not write captions"),
])
def test_bad_input_is_one_clear_line(call, message, encoder_pipes):
    from vlmedge.errors import InputError

    with pytest.raises(InputError) as e:
        call(encoder_pipes["clip"])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_text_without_tokens_is_refused(encoder_pipes):
    from vlmedge.errors import InputError

    with pytest.raises(InputError, match="text 1: '' gives no tokens"):
        encoder_pipes["siglip2"].embed_texts(["a cat", ""])


def test_empty_lists_give_empty_results(encoder_pipes):
    pipe = encoder_pipes["siglip"]
    assert pipe.embed_images([]).shape == (0, pipe.dim) and pipe.embed_texts([]).shape == (0, pipe.dim)
    assert pipe.classify([], ["a"]) == []


def test_the_runtime_imports_no_heavy_module(encoder_bundles):
    import subprocess
    import sys

    path = encoder_bundles["siglip"][2]
    heavy = ("torch", "transformers", "onnx", "pymilvus", "vlmedge.export", "sentencepiece")
    code = ("import numpy as np, sys, vlmedge, vlmedge.cli; "
            f"p = vlmedge.load({str(path)!r}); p.classify(np.zeros((20, 30, 3), np.uint8), ['a', 'b']); p.embed_texts('x'); "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
