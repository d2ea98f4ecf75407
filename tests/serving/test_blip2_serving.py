"""`vlmedge serve` over BLIP-2 / InstructBLIP bundles, whose vision graph reads the question's text too: VQA
answers equal the in-process pipeline with static and in-flight batching (InstructBLIP with Flan-T5, on the
cross-attention contract), and the chat route equals the pipeline's chat (InstructBLIP with Vicuna, on the
prefix contract)."""

from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from serving_helpers import png_b64, serve  # noqa: E402

import vlmedge  # noqa: E402


@pytest.mark.parametrize("batching", ["static", "inflight"])
def test_instructblip_t5_answers_equal_the_pipeline(blip2_t5_bundles, scene_pngs, tmp_path_factory, batching):
    path = blip2_t5_bundles("instructblip-t5")[2]
    pipe = vlmedge.load(path)
    images = [s.image for s, _ in scene_pngs[:4]]
    questions = [f"Question: {q} Answer:" for q in ("what color is the circle ?", "how many squares are there ?",
                                                     "is there a triangle ?", "what is left of the circle ?")]
    want = pipe.vqa(images, questions, max_new_tokens=8)
    captions = pipe.caption(images[:2], max_new_tokens=8)
    with serve(path, "--threads", "1", "--batching", batching, "--max-wait-ms", "50",
               tmp=tmp_path_factory.mktemp("serve-instructblip")) as s, s.client() as c, ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda pq: c.post("/v1/vqa", json={"image": png_b64(pq[0]), "question": pq[1],
                                                             "max_new_tokens": 8}).json(),
                          [(p, q) for (_, p), q in zip(scene_pngs[:4], questions)]))
        got_captions = [c.post("/v1/caption", json={"image": png_b64(p), "max_new_tokens": 8}).json()["text"]
                        for _, p in scene_pngs[:2]]
    assert [g["text"] for g in got] == want
    assert got_captions == captions


def test_instructblip_vicuna_chat_equals_the_pipeline(blip2_bundles, scene_pngs, tmp_path_factory):
    import base64

    openai = pytest.importorskip("openai")
    path = blip2_bundles("instructblip-vicuna")[2]
    pipe = vlmedge.load(path)
    scene, png = scene_pngs[0]
    text = "Question: what color is the circle ? Answer:"
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    with serve(path, "--threads", "1", tmp=tmp_path_factory.mktemp("serve-vicuna")) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        r = c.chat.completions.create(model="instructblip-vicuna", max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}])
    assert r.choices[0].message.content == pipe.vqa(scene.image, text, max_new_tokens=8)
