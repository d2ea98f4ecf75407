"""`vlmedge serve` over real HTTP: answers equal the in-process pipeline's, batching, auth, limits,
metrics and a graceful stop."""

import io
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from serving_helpers import png_b64, serve  # noqa: E402


@pytest.fixture(scope="module")
def server(shapes, tmp_path_factory):
    """One server for the tests that need no special limits."""
    with serve(shapes, "--max-pixels", "100000", "--max-body-mb", "0.5", "--threads", "1",
               tmp=tmp_path_factory.mktemp("serve")) as s:
        yield s


def _metrics(client) -> dict:
    """name -> list of (labels, value) from /metrics, parsed as Prometheus text."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: dict = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_answers_equal_the_in_process_pipeline(server, pipe, scene_pngs):
    images = [s.image for s, _ in scene_pngs]
    captions = pipe.caption(images, return_ids=True)
    beams = pipe.caption(images[:3], num_beams=3)
    q = "how many small objects are there ?"
    answers = pipe.vqa(images, [q] * len(images))

    def caption(i):  # alternate JSON and multipart bodies
        png = scene_pngs[i][1]
        if i % 2:
            return c.post("/v1/caption", json={"image": png_b64(png), "return_ids": True})
        return c.post("/v1/caption", files={"image": ("s.png", png, "image/png")}, data={"return_ids": "true"})

    with server.client() as c, ThreadPoolExecutor(8) as ex:
        got = [r.json() for r in ex.map(caption, range(len(images)))]
        got_beams = [c.post("/v1/caption", json={"image": png_b64(p), "num_beams": 3}).json()["text"]
                     for _, p in scene_pngs[:3]]
        got_vqa = list(ex.map(lambda p: c.post("/v1/vqa", files={"image": ("s.png", p)}, data={"question": q}).json(),
                              [p for _, p in scene_pngs]))
        models = c.get("/v1/models").json()["data"][0]
    assert [g["text"] for g in got] == [g.text for g in captions]
    assert [g["ids"] for g in got] == [list(g.ids) for g in captions]
    assert got_beams == beams
    assert [g["text"] for g in got_vqa] == answers and "ids" not in got_vqa[0]
    assert set(got[0]["timings_ms"]) >= {"queue", "decode_image", "preprocess", "encoder", "first_token", "decode", "total"}
    assert models["family"] == "shapes-vlm" and models["tasks"] == ["caption", "vqa"] and models["max_batch"] == 16


def test_concurrent_requests_are_batched_and_options_grouped_apart(server, pipe, scene_pngs):
    images = [s.image for s, _ in scene_pngs]
    greedy = pipe.caption(images)
    beam = pipe.caption(images, num_beams=2)
    jobs = [(i, b) for i in range(len(images)) for b in (1, 2)] * 2

    def post(job):
        i, b = job
        return c.post("/v1/caption", json={"image": png_b64(scene_pngs[i][1]), "num_beams": b}).json()

    with server.client() as c, ThreadPoolExecutor(32) as ex:
        calls_before = _metrics(c)["vlmedge_batch_size_count"][0][1]
        got = list(ex.map(post, jobs))
        calls = _metrics(c)["vlmedge_batch_size_count"][0][1] - calls_before
    assert [g["text"] for g in got] == [(greedy if b == 1 else beam)[i] for i, b in jobs]
    # requests that arrived together shared model calls: greedy ones the in-flight batch, beam ones a batch
    for beams in (1, 2):
        assert max(g["batch_size"] for g, (_, b) in zip(got, jobs) if b == beams) > 1
    assert calls > 0


def test_bad_input_is_400_with_one_line(server, scene_pngs):
    png = scene_pngs[0][1]
    big = io.BytesIO()
    Image.fromarray(np.zeros((400, 400, 3), np.uint8)).save(big, "PNG")  # 160,000 pixels > --max-pixels 100000
    cases = [
        ({"files": {"image": ("x.png", b"not an image")}}, "/v1/caption", "image: not an image Pillow can read"),
        ({"json": {"image": png_b64(png[: len(png) // 2])}}, "/v1/caption", "image: truncated or corrupt image"),
        ({"json": {"image": png_b64(big.getvalue())}}, "/v1/caption",
         "image: image is 400x400 = 160,000 pixels, over the limit of 100,000 (max_pixels)"),
        ({"json": {"image": "%%%"}}, "/v1/caption", "image: not valid base64"),
        ({"json": {"image": png_b64(png), "question": " "}}, "/v1/vqa", "question: empty; expected a question in words"),
        ({"json": {"image": png_b64(png), "question": "red " * 40}}, "/v1/vqa",
         "question: 40 tokens, over the model's maximum of 32 (dims.max_question_len); shorten it"),
        ({"json": {"image": png_b64(png)}}, "/v1/vqa", "question: missing"),
        ({"json": {"image": png_b64(png), "beams": 3}}, "/v1/caption", "beams: unknown field"),
        ({"json": {"image": png_b64(png), "num_beams": 0}}, "/v1/caption", "num_beams: "),
        ({"json": {"image": png_b64(png), "max_new_tokens": 500}}, "/v1/caption", "max_new_tokens: 500 is over this bundle's limit"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, "/v1/caption", "body: not valid JSON"),
    ]
    with server.client() as c:
        for kw, path, message in cases:
            r = c.post(path, **kw)
            assert r.status_code == 400, (message, r.text)
            err = r.json()["error"]
            assert err.startswith(message) and "\n" not in err, err
        assert c.post("/v1/caption", json={"image": png_b64(png)}).status_code == 200  # the server is fine after


def test_oversize_body_is_413(server, scene_pngs):
    blob = b"\0" * 600_000  # --max-body-mb 0.5
    with server.client() as c:
        r = c.post("/v1/caption", files={"image": ("x.png", blob)})
        assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]

        def chunks():  # no Content-Length: counted as it streams in
            for _ in range(10):
                yield b"\0" * 100_000

        r = c.post("/v1/caption", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert c.post("/v1/caption", json={"image": png_b64(scene_pngs[0][1])}).status_code == 200


def test_metrics_parse_as_prometheus_text(server, scene_pngs):
    with server.client() as c:
        before = _metrics(c)
        c.post("/v1/caption", json={"image": png_b64(scene_pngs[0][1])})
        c.post("/v1/caption", json={"image": "!"})
        m = _metrics(c)

    def value(metrics, name, **labels):
        return sum(v for lb, v in metrics.get(name, []) if all(lb.get(k) == x for k, x in labels.items()))

    assert value(m, "vlmedge_requests_total", endpoint="caption", code="200") == value(before, "vlmedge_requests_total", endpoint="caption", code="200") + 1
    assert value(m, "vlmedge_errors_total", kind="bad_input") == value(before, "vlmedge_errors_total", kind="bad_input") + 1
    for stage in ("queue", "encoder", "decode", "total"):
        assert value(m, "vlmedge_stage_seconds_count", stage=stage) >= 1
    assert value(m, "vlmedge_batch_size_count") >= 1
    assert "vlmedge_queue_depth" in m and value(m, "vlmedge_ready") == 1


def test_api_key(shapes, scene_pngs, tmp_path):
    body = {"image": png_b64(scene_pngs[0][1])}
    with serve(shapes, "--api-key-env", "VLMEDGE_TEST_KEY", env={"VLMEDGE_TEST_KEY": "s3cret"}, tmp=tmp_path) as s:
        with s.client() as c:
            r = c.post("/v1/caption", json=body)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "\n" not in r.json()["error"]
            assert c.post("/v1/caption", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert c.get("/metrics").status_code == 401 and c.get("/v1/models").status_code == 401
            assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200  # probes stay open
            r = c.post("/v1/caption", json=body, headers={"Authorization": "Bearer s3cret"})
            assert r.status_code == 200 and r.json()["text"] == scene_pngs[0][0].caption


def test_full_queue_is_429_then_requests_succeed_again(shapes, scene_pngs, tmp_path):
    body = {"image": png_b64(scene_pngs[0][1]), "num_beams": 4, "min_new_tokens": 40, "max_new_tokens": 40}
    with serve(shapes, "--max-queue", "2", "--max-batch", "1", tmp=tmp_path) as s, s.client() as c:
        with ThreadPoolExecutor(12) as ex:
            rs = list(ex.map(lambda _: c.post("/v1/caption", json=body), range(12)))
        codes = sorted(r.status_code for r in rs)
        assert set(codes) == {200, 429} and codes.count(200) >= 2, codes
        full = next(r for r in rs if r.status_code == 429)
        assert int(full.headers["retry-after"]) >= 1 and full.json()["kind"] == "queue_full"
        ok = [c.post("/v1/caption", json=body) for _ in range(3)]  # room again once the queue drains
        assert [r.status_code for r in ok] == [200, 200, 200]
        assert _metrics(c)["vlmedge_queue_depth"][0][1] == 0


def test_request_timeout_is_504_and_the_server_stays_up(shapes, scene_pngs, tmp_path):
    slow = {"image": png_b64(scene_pngs[0][1]), "num_beams": 8, "min_new_tokens": 40, "max_new_tokens": 40}
    with serve(shapes, "--timeout", "0.01", tmp=tmp_path) as s, s.client() as c:
        r = c.post("/v1/caption", json=slow)
        assert r.status_code == 504 and r.json()["kind"] == "timeout"
    with serve(shapes, "--timeout", "5", tmp=tmp_path) as s, s.client() as c:
        assert c.post("/v1/caption", json={"image": png_b64(scene_pngs[0][1])}).status_code == 200


def test_sigterm_drains_requests_in_flight(shapes, scene_pngs, tmp_path):
    body = {"image": png_b64(scene_pngs[1][1]), "num_beams": 4, "min_new_tokens": 30, "max_new_tokens": 30}
    with serve(shapes, "--max-batch", "1", tmp=tmp_path) as s:
        with s.client() as c, ThreadPoolExecutor(6) as ex:
            futures = [ex.submit(c.post, "/v1/caption", json=body) for _ in range(6)]
            deadline = time.monotonic() + 10
            while (depth := _metrics(c)["vlmedge_queue_depth"][0][1]) < 6 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert depth == 6  # all six admitted, at most one of them answered yet (max batch 1)
            assert s.stop() in (0, -15)  # uvicorn re-raises SIGTERM once it has drained
            rs = [f.result() for f in futures]
        assert [r.status_code for r in rs] == [200] * 6
        assert len({r.json()["text"] for r in rs}) == 1


def test_the_event_loop_answers_while_the_model_runs(server, scene_pngs):
    slow = {"image": png_b64(scene_pngs[2][1]), "num_beams": 8, "min_new_tokens": 45, "max_new_tokens": 45}
    with server.client() as c, ThreadPoolExecutor(4) as ex:
        futures = [ex.submit(c.post, "/v1/caption", json=slow) for _ in range(4)]  # two batches of 2 x 8 beams
        while _metrics(c)["vlmedge_queue_depth"][0][1] < 4:
            time.sleep(0.002)
        time.sleep(0.02)
        assert c.get("/healthz").status_code == 200 and c.get("/v1/models").status_code == 200
        assert not all(f.done() for f in futures)  # answered while the model was busy with them
        assert [f.result().status_code for f in futures] == [200] * 4
