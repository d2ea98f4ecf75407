"""vlmedge.load(): inputs of every kind, batching, threads, options and their errors."""

import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

import vlmedge
from vlmedge.data.scenes import pick_questions, scenes
from vlmedge.errors import BundleError, InputError
from vlmedge.runtime.decoding import Timings


@pytest.fixture(scope="module")
def world():
    scs = list(scenes("test", 100, 12))
    return scs, [pick_questions(s)[0] for s in scs]


def test_reference_model_through_the_runtime_is_accurate(ort_pipe, world):
    scs, qs = world
    caps = ort_pipe.caption([s.image for s in scs])
    answers = ort_pipe.vqa([s.image for s in scs], [q.text for q in qs])
    assert sum(c == s.caption for c, s in zip(caps, scs)) >= 11
    assert sum(a == q.answer for a, q in zip(answers, qs)) >= 10


def test_paths_pil_and_arrays_give_the_same_caption(ort_pipe, world, tmp_path):
    s = world[0][0]
    path = tmp_path / "scene.png"
    s.pil().save(path)
    assert ort_pipe.caption(str(path)) == ort_pipe.caption(path) == ort_pipe.caption(s.pil()) == ort_pipe.caption(s.image)
    assert isinstance(ort_pipe.caption(s.image), str) and isinstance(ort_pipe.caption([s.image]), list)


def test_batch_size_does_not_change_results(ort_pipe, world):
    images = [s.image for s in world[0]]
    assert ort_pipe.caption(images, batch_size=5) == ort_pipe.caption(images, batch_size=1) == ort_pipe.caption(images)


def test_vqa_pairs_and_broadcasts(ort_pipe, world):
    scs, qs = world
    img = scs[0].image
    texts = [q.text for q in pick_questions(scs[0])]
    one_by_one = [ort_pipe.vqa(img, t) for t in texts]
    assert ort_pipe.vqa(img, texts) == one_by_one
    assert ort_pipe.vqa([img] * len(texts), texts) == one_by_one
    assert ort_pipe.vqa([s.image for s in scs[:3]], texts[0]) == [ort_pipe.vqa(s.image, texts[0]) for s in scs[:3]]
    with pytest.raises(InputError, match="3 images but 2 questions"):
        ort_pipe.vqa([img] * 3, texts[:2])


def test_one_pipeline_serves_many_threads(ort_pipe, world):
    scs, qs = world
    expected = [(ort_pipe.caption(s.image), ort_pipe.vqa(s.image, q.text)) for s, q in zip(scs, qs)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda sq: (ort_pipe.caption(sq[0].image), ort_pipe.vqa(sq[0].image, sq[1].text)), zip(scs * 3, qs * 3)))
    assert got == expected * 3


def test_return_ids_and_timings(ort_pipe, world):
    t = Timings()
    g = ort_pipe.caption(world[0][0].image, return_ids=True, timings=t)
    assert g.ids[-1] == ort_pipe.manifest.tasks["caption"]["eos_id"] and g.text == ort_pipe.decode(g.ids)
    assert t.encoder > 0 and t.first_token > 0 and len(t.tokens) == len(g.ids) - 1


def test_generation_limits(ort_pipe, world):
    img = world[0][0].image
    assert len(ort_pipe.caption(img, max_new_tokens=3, return_ids=True).ids) == 3
    with pytest.raises(InputError, match="max_new_tokens: 60 is over this bundle.s limit of 47"):
        ort_pipe.caption(img, max_new_tokens=60)
    with pytest.raises(InputError, match="num_beams"):
        ort_pipe.caption(img, num_beams=0)
    with pytest.raises(InputError, match="unexpected keyword argument 'typical_p'"):
        ort_pipe.caption(img, typical_p=0.7)


def test_question_errors(ort_pipe, world):
    img = world[0][0].image
    with pytest.raises(InputError, match="question 1: empty"):
        ort_pipe.vqa([img, img], ["what color is the circle ?", " "])
    with pytest.raises(InputError, match="over the model's maximum of 32"):
        ort_pipe.vqa(img, " ".join(["what"] * 40))


def test_missing_task_and_device_fallback(tmp_path, bundles, world, monkeypatch):
    import onnxruntime

    # an onnxruntime without the CUDA provider (as the CPU wheel), whatever this machine has
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    msgs = []
    p = vlmedge.load(bundles["vit-gpt2"][2], device="cuda", warn=msgs.append)
    assert p.backend.name == "onnxruntime/CPUExecutionProvider"
    assert msgs and "CUDAExecutionProvider is not available" in msgs[0]
    with pytest.raises(InputError, match="has no vqa task"):
        p.vqa(world[0][0].image, "what color is the circle ?")
    with pytest.raises(InputError, match="--device: 'tpu'"):
        vlmedge.load(bundles["vit-gpt2"][2], device="tpu")


def test_corrupt_onnx_with_matching_hash_is_a_bundle_error(shapes, tmp_path):
    import json

    from vlmedge.runtime.bundle import sha256_file

    d = tmp_path / "b"
    shutil.copytree(shapes, d)
    g = d / "decoder.onnx"
    g.write_bytes(g.read_bytes()[:1000])
    m = json.loads((d / "manifest.json").read_text())
    m["graphs"]["decoder"]["sha256"] = sha256_file(g)
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="decoder.onnx: onnxruntime cannot load this graph"):
        vlmedge.load(d)
