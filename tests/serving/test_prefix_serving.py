"""`vlmedge serve` over a decoder-only (prefix contract) bundle: the same endpoints, answers equal to the
in-process pipeline, batched requests equal to one by one, and bad input a one-line 400."""

from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from serving_helpers import png_b64, serve  # noqa: E402

import vlmedge  # noqa: E402


@pytest.fixture(scope="module")
def smolvlm(prefix_bundles):
    return prefix_bundles("smolvlm")[2]


def test_decoder_only_bundle_served_equal_to_in_process(smolvlm, scene_pngs, tmp_path_factory):
    pipe = vlmedge.load(smolvlm)
    images = [s.image for s, _ in scene_pngs[:6]]
    q = "how many small objects are there ?"
    captions = pipe.caption(images, max_new_tokens=8)
    answers = pipe.vqa(images, [q] * len(images), max_new_tokens=8, num_beams=2)
    with serve(smolvlm, "--threads", "1", tmp=tmp_path_factory.mktemp("serve-prefix")) as s, s.client() as c, \
            ThreadPoolExecutor(6) as ex:
        got = list(ex.map(lambda p: c.post("/v1/caption", json={"image": png_b64(p), "max_new_tokens": 8}).json(),
                          [p for _, p in scene_pngs[:6]]))
        got_vqa = list(ex.map(lambda p: c.post("/v1/vqa", files={"image": ("s.png", p)},
                                               data={"question": q, "max_new_tokens": "8", "num_beams": "2"}).json(),
                              [p for _, p in scene_pngs[:6]]))
        empty = c.post("/v1/vqa", files={"image": ("s.png", scene_pngs[0][1])}, data={"question": " "})
        models = c.get("/v1/models").json()["data"][0]
    assert [g["text"] for g in got] == captions
    assert [g["text"] for g in got_vqa] == answers
    assert empty.status_code == 400 and "question" in empty.json()["error"] and "\n" not in empty.json()["error"]
    assert models["family"] == "smolvlm" and models["tasks"] == ["caption", "vqa"]
