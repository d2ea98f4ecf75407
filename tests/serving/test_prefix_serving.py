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


def test_decoder_only_chat_completions_equal_the_pipelines_chat(smolvlm, scene_pngs, tmp_path_factory):
    """Several turns and images through the chat template, plain and streamed; a lone image is captioned."""
    import base64

    openai = pytest.importorskip("openai")
    pipe = vlmedge.load(smolvlm)
    (s0, p0), (s1, p1) = scene_pngs[:2]

    def image(png):
        return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}

    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [image(p0), {"type": "text", "text": "how many circles are there ?"}]},
                {"role": "assistant", "content": "two"},
                {"role": "user", "content": [image(p1), {"type": "text", "text": "and in this one ?"}]}]
    local = [{**m, "content": [{"type": "image", "image": s.image} if p.get("type") == "image_url" else p
                               for p, s in zip(m["content"], (s0, s0) if i == 1 else (s1, s1))]}
             if isinstance(m["content"], list) else m for i, m in enumerate(messages)]
    with serve(smolvlm, "--threads", "1", tmp=tmp_path_factory.mktemp("serve-prefix-chat")) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        r = c.chat.completions.create(model="smolvlm", messages=messages, max_tokens=8)
        streamed = c.chat.completions.create(model="smolvlm", messages=messages, max_tokens=8, stream=True)
        text = "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
        caption = c.chat.completions.create(model="smolvlm", messages=[{"role": "user", "content": [image(p0)]}],
                                            max_tokens=8)
        with pytest.raises(openai.BadRequestError, match="images go in user messages"):
            c.chat.completions.create(model="smolvlm", max_tokens=8, messages=[
                *messages, {"role": "assistant", "content": [image(p0)]}, {"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == pipe.chat(local, max_new_tokens=8, num_beams=1) == text
    assert r.usage.prompt_tokens > 20 and r.usage.completion_tokens <= 8
    assert caption.choices[0].message.content == pipe.caption(s0.image, max_new_tokens=8, num_beams=1)


def test_gated_cross_attention_bundle_serves_chat_with_two_images(prefix_bundles, scene_pngs, tmp_path_factory):
    """IDEFICS: two images interleaved with text in one user turn, through the openai client, equal the pipeline;
    the native /v1/vqa too."""
    import base64

    openai = pytest.importorskip("openai")
    path = prefix_bundles("idefics")[2]
    pipe = vlmedge.load(path)
    (s0, p0), (s1, p1) = scene_pngs[:2]

    def image(png):
        return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}

    messages = [{"role": "user", "content": [{"type": "text", "text": "is"}, image(p0), {"type": "text", "text": "like"},
                                             image(p1), {"type": "text", "text": "?"}]}]
    local = [{"role": "user", "content": [{"type": "text", "text": "is"}, {"type": "image", "image": s0.image},
                                          {"type": "text", "text": "like"}, {"type": "image", "image": s1.image},
                                          {"type": "text", "text": "?"}]}]
    q = "what color is the circle ?"
    with serve(path, "--threads", "1", tmp=tmp_path_factory.mktemp("serve-idefics")) as s, s.client() as http:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        r = c.chat.completions.create(model="idefics", messages=messages, max_tokens=8)
        vqa = http.post("/v1/vqa", files={"image": ("s.png", p1)}, data={"question": q, "max_new_tokens": "8"}).json()
    assert r.choices[0].message.content == pipe.chat(local, max_new_tokens=8, num_beams=1)
    assert vqa["text"] == pipe.vqa(s1.image, q, max_new_tokens=8)
