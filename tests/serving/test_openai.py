"""`vlmedge serve` through the official `openai` client: plain and streamed chat completions equal to the
in-process pipeline, sampling, stop strings, usage, errors as the client's own exceptions, auth, the
queue limit, concurrent streams, and a client that leaves mid-stream."""

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
from serving_helpers import png_b64, serve  # noqa: E402

KEY = "sk-test-vlmedge"
Q = "what color is the circle ?"


def url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def user(png: bytes, text: str | None = None) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url(png)}}]
    if text is not None:
        parts.append({"type": "text", "text": text})
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def server(shapes, tmp_path_factory):
    with serve(shapes, "--threads", "1", "--api-key-env", "VLMEDGE_TEST_KEY", "--max-batch", "8",
               env={"VLMEDGE_TEST_KEY": KEY}, tmp=tmp_path_factory.mktemp("serve-openai")) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    yield c
    c.close()


@pytest.fixture(scope="module")
def name(client):
    return client.models.list().data[0].id


def test_models_list_is_openais_with_the_bundles_brief(server, client, name, shapes):
    models = client.models.list()
    assert [m.id for m in models.data] == [name] == [shapes.name]
    m = models.data[0]
    assert m.object == "model" and isinstance(m.created, int) and m.owned_by == "vlmedge"
    assert m.model_extra["family"] == "shapes-vlm" and m.model_extra["tasks"] == ["caption", "vqa"]
    assert client.models.retrieve(name).id == name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    with server.client() as c:  # the API docs hold the chat route and its body
        body = c.get("/openapi.json").json()["paths"]["/v1/chat/completions"]["post"]["requestBody"]
        assert "messages" in body["content"]["application/json"]["schema"]["properties"]


def test_plain_answers_equal_the_in_process_pipeline(client, name, pipe, scene_pngs):
    for scene, png in scene_pngs[:4]:
        r = client.chat.completions.create(model=name, messages=user(png, Q))
        assert r.choices[0].message.content == pipe.vqa(scene.image, Q)
        assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "stop"
        assert r.object == "chat.completion" and r.model == name and r.id.startswith("chatcmpl-")
        u = r.usage
        assert u.completion_tokens == len(pipe.vqa(scene.image, Q, return_ids=True).ids) and u.prompt_tokens > 10
        assert u.total_tokens == u.prompt_tokens + u.completion_tokens
        caption = client.chat.completions.create(model=name, messages=user(png))  # no text: the caption
        assert caption.choices[0].message.content == pipe.caption(scene.image) == scene.caption
    short = client.chat.completions.create(model=name, messages=user(scene_pngs[0][1]), max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert short.choices[0].message.content == pipe.caption(scene_pngs[0][0].image, max_new_tokens=3)
    newer = client.chat.completions.create(model=name, messages=user(scene_pngs[0][1]), max_completion_tokens=3)
    assert newer.choices[0].message.content == short.choices[0].message.content


def test_follow_up_turns_ask_about_the_last_image(client, name, pipe, scene_pngs):
    (s0, p0), (s1, p1) = scene_pngs[:2]
    messages = [{"role": "system", "content": "You describe images."}, *user(p0), {"role": "assistant", "content": "..."},
                *user(p1, "what"), {"role": "assistant", "content": "..."}, {"role": "user", "content": Q}]
    r = client.chat.completions.create(model=name, messages=messages)
    assert r.choices[0].message.content == pipe.vqa(s1.image, Q)


def test_streamed_answer_joins_to_the_plain_one(client, name, pipe, scene_pngs):
    scene, png = scene_pngs[2]
    chunks = list(client.chat.completions.create(model=name, messages=user(png), stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == pipe.caption(scene.image)
    pieces = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 3 and chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(pipe.caption(scene.image, return_ids=True).ids)
    assert all(c.usage is None for c in chunks[:-1]) and len({c.id for c in chunks}) == 1
    plain = list(client.chat.completions.create(model=name, messages=user(png, Q), stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in plain) == pipe.vqa(scene.image, Q)
    assert all(getattr(c, "usage", None) is None for c in plain)


def test_sampling_is_seeded_and_equals_the_pipelines(client, name, pipe, scene_pngs):
    scene, png = scene_pngs[3]
    kw = dict(model=name, messages=user(png), temperature=1.8, seed=7, max_tokens=12)
    a = client.chat.completions.create(**kw).choices[0].message.content
    assert client.chat.completions.create(**kw).choices[0].message.content == a
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw))
    assert streamed == a
    assert a == pipe.caption(scene.image, do_sample=True, temperature=1.8, top_k=0, seed=7, max_new_tokens=12)
    greedy = client.chat.completions.create(model=name, messages=user(png), temperature=0)
    assert greedy.choices[0].message.content == pipe.caption(scene.image)


def test_stop_strings_end_the_answer(client, name, pipe, scene_pngs):
    scene, png = scene_pngs[0]
    caption = pipe.caption(scene.image)
    word = caption.split()[3]
    r = client.chat.completions.create(model=name, messages=user(png), stop=[word, "zzz"])
    assert r.choices[0].message.content == caption[: caption.index(word)].strip()
    assert r.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=name, messages=user(png), stop=word, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == r.choices[0].message.content


def test_concurrent_streams_get_their_own_answers(client, name, pipe, scene_pngs):
    def stream(i):
        scene, png = scene_pngs[i]
        out = client.chat.completions.create(model=name, messages=user(png), stream=True)
        return "".join(c.choices[0].delta.content or "" for c in out)

    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(stream, [4, 5, 6, 7]))
    assert got == [pipe.caption(scene_pngs[i][0].image) for i in (4, 5, 6, 7)]
    assert len(set(got)) > 1


@pytest.mark.parametrize("kw, param, words", [
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]}]),
     "messages.0.content.0.image_url.url", "not fetched"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools", "not supported"),
    (dict(response_format={"type": "json_object"}), "response_format", "not supported"),
    (dict(n=2), "n", "one choice"),
    (dict(logprobs=True), "logprobs", "not supported"),
    (dict(temperature=3), "temperature", "less than or equal to 2"),
    (dict(max_tokens=0), "max_tokens", "greater than or equal to 1"),
    (dict(max_tokens=500), "max_new_tokens", "over this bundle's limit"),
    (dict(messages=[{"role": "user", "content": "hello"}]), "messages", "no image"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%"}}]}]),
     None, "not valid base64"),
    (dict(extra_body={"num_beams": 3}), "num_beams", "unknown parameter of chat completions"),
])
def test_bad_requests_raise_bad_request_error_naming_the_parameter(client, name, scene_pngs, kw, param, words):
    kw = {"model": name, "messages": user(scene_pngs[0][1]), **kw}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**kw)
    err = e.value.body
    assert e.value.status_code == 400 and err["type"] == "invalid_request_error"
    assert words in err["message"] and "\n" not in err["message"], err
    if param:
        assert param.replace(".", "")[:8] in (err["param"] or "").replace(".", "").replace("[", "").replace("]", "") \
            or param in err["message"], err


def test_unknown_model_and_wrong_key(server, client, name, scene_pngs):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=user(scene_pngs[0][1]))
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=name, messages=user(scene_pngs[0][1]))
    assert e.value.body["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_a_client_leaving_mid_stream_frees_its_place(shapes, scene_pngs, tmp_path):
    """--max-queue 1: a client that reads one event and leaves gives its place back; the server goes on.
    (That its row stops decoding at once: tests/serving/test_streams.py, where it can be timed.)"""
    body = {"image": png_b64(scene_pngs[0][1]), "stream": True, "min_new_tokens": 45, "max_new_tokens": 45}
    with serve(shapes, "--max-queue", "1", "--threads", "1", tmp=tmp_path) as s, s.client() as c:
        for _ in range(5):
            with c.stream("POST", "/v1/caption", json=body) as r:
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                assert next(r.iter_lines()).startswith("data: ")
            deadline = time.monotonic() + 5
            while (depth := _depth(c)) != 0:
                assert time.monotonic() < deadline, depth
                time.sleep(0.01)
        r2 = c.post("/v1/caption", json={"image": png_b64(scene_pngs[1][1])})
        assert r2.status_code == 200 and r2.json()["text"] == scene_pngs[1][0].caption
        with c.stream("POST", "/v1/caption", json=body) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1]["done"] and "".join(e.get("text", "") for e in events[:-1]) == events[-1]["text"]
        assert len(events[-1]["ids"]) == 45


def _depth(c) -> int:
    from prometheus_client.parser import text_string_to_metric_families

    families = text_string_to_metric_families(c.get("/metrics").text)
    return int(next(f for f in families if f.name == "vlmedge_queue_depth").samples[0].value)


def test_full_queue_is_rate_limit_error(shapes, scene_pngs, tmp_path):
    """--max-queue 1 held by a slow request: the openai client raises RateLimitError, with Retry-After."""
    slow = {"image": png_b64(scene_pngs[0][1]), "num_beams": 8, "min_new_tokens": 45, "max_new_tokens": 45}
    with serve(shapes, "--max-queue", "1", "--max-batch", "1", "--threads", "1", tmp=tmp_path) as s, \
            s.client() as h, ThreadPoolExecutor(1) as ex:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        error = None
        for _ in range(20):  # the slow request holds the place for about 0.1 s: try while it does
            busy = ex.submit(h.post, "/v1/caption", json=slow)
            while _depth(h) == 0 and not busy.done():
                time.sleep(0.001)
            try:
                c.chat.completions.create(model="shapes-vlm", messages=user(scene_pngs[1][1]))
            except openai.RateLimitError as e:
                error = e
            assert busy.result().status_code == 200
            if error is not None:
                break
        assert error is not None and int(error.response.headers["retry-after"]) >= 1
        assert error.body["type"] == "rate_limit_error" and error.body["code"] == "rate_limit_exceeded"
        assert c.chat.completions.create(model="shapes-vlm", messages=user(scene_pngs[1][1])).choices[0].message.content
