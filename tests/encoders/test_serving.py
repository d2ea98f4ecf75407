"""`vlmedge serve` with a dual-encoder bundle: POST /v1/embeddings (OpenAI's format, through the openai client
too) and POST /v1/classify, equal to the pipeline in process, batched, with one-line 4xx errors."""

import base64
import io
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "serving"))  # serving_helpers: a real server process

pytest.importorskip("fastapi")


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _data_url(arr) -> str:
    return "data:image/png;base64," + base64.b64encode(_png(arr)).decode()


@pytest.fixture(scope="module")
def server(encoder_bundles, tmp_path_factory):
    from serving_helpers import serve

    with serve(encoder_bundles["siglip"][2], "--max-wait-ms", "300", "--max-batch", "8", tmp=tmp_path_factory.mktemp("serve")) as s:
        yield s


def test_embeddings_of_texts_and_images_equal_the_pipeline(server, encoder_pipes, scene_images):
    pipe = encoder_pipes["siglip"]
    inputs = ["a red circle", _data_url(scene_images[0]), "Two BLUE squares!", _data_url(scene_images[1])]
    with server.client() as c:
        r = c.post("/v1/embeddings", json={"input": inputs, "model": "siglip"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1, 2, 3]
    got = np.array([d["embedding"] for d in body["data"]], np.float32)
    want = np.stack([pipe.embed_texts(inputs[0]), pipe.embed_images(scene_images[0]), pipe.embed_texts(inputs[2]),
                     pipe.embed_images(scene_images[1])])
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert body["usage"]["prompt_tokens"] == int(pipe.text_ids([inputs[0]])[1].sum() + pipe.text_ids([inputs[2]])[1].sum())


def test_the_openai_client_gets_the_same_embeddings(server, encoder_pipes):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    res = client.embeddings.create(model="siglip", input=["a photo of a cat.", "x"])  # the client asks for base64
    got = np.array([d.embedding for d in res.data], np.float32)
    np.testing.assert_allclose(got, encoder_pipes["siglip"].embed_texts(["a photo of a cat.", "x"]), atol=1e-6)
    assert client.models.list().data[0].id == "siglip"


def test_classify_equals_the_pipeline_and_requests_are_batched(server, encoder_pipes, scene_images):
    pipe = encoder_pipes["siglip"]
    labels = ["red circle", "blue square", "green triangle"]

    barrier = threading.Barrier(len(scene_images))

    def ask(arr):  # the requests leave together, so they meet in the batcher's window on a busy machine too
        body = {"image": base64.b64encode(_png(arr)).decode(), "labels": labels, "top_k": 2}
        barrier.wait(30)
        return c.post("/v1/classify", json=body)

    with server.client() as c, ThreadPoolExecutor(len(scene_images)) as ex:
        responses = list(ex.map(ask, scene_images))
    for arr, r in zip(scene_images, responses):
        assert r.status_code == 200, r.text
        want = pipe.classify(arr, labels, top_k=2)
        got = r.json()["labels"]
        assert [g["label"] for g in got] == [w.label for w in want]
        assert [g["score"] for g in got] == pytest.approx([w.score for w in want], abs=1e-6)
    assert max(r.json()["batch_size"] for r in responses) > 1


@pytest.mark.parametrize("path, body, status, words", [
    ("/v1/embeddings", {"input": [[1, 2, 3]]}, 400, "input[0]: expected a string"),
    ("/v1/embeddings", {"input": []}, 400, "input: empty"),
    ("/v1/embeddings", {"input": ["ok", "  "]}, 400, "input[1]: empty text"),
    ("/v1/embeddings", {"input": "data:image/png;base64,@@@"}, 400, "input: not valid base64"),
    ("/v1/embeddings", {"input": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}, 400, "input"),
    ("/v1/embeddings", {"input": "x", "dimensions": 8}, 400, "dimensions: 8"),
    ("/v1/embeddings", {"input": "x", "model": "gpt"}, 404, "is not served here"),
    ("/v1/embeddings", {"input": "x", "temperature": 1}, 400, "temperature: unknown field"),
    ("/v1/classify", {"image": "@@", "labels": ["a"]}, 400, "image: not valid base64"),
    ("/v1/classify", {"image": "", "labels": []}, 400, "labels"),
    ("/v1/classify", {"image": base64.b64encode(b"x").decode(), "labels": ["a", "a"]}, 400, "given twice"),
    ("/v1/classify", {"image": base64.b64encode(b"x").decode(), "labels": ["a"], "template": "a photo"}, 400, "template"),
    ("/v1/caption", {"image": base64.b64encode(b"x").decode()}, 404, "no caption task"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(_png(np.zeros((8, 8, 3), np.uint8))).decode()}},
        {"type": "text", "text": "what is this?"}]}]}, 400, "answers no questions"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(_png(np.zeros((8, 8, 3), np.uint8))).decode()}}]}]},
     400, "does not write captions"),
])
def test_bad_requests_are_one_line_4xx(server, path, body, status, words):
    with server.client() as c:
        r = c.post(path, json=body)
    assert r.status_code == status, r.text
    j = r.json()
    message = j["error"]["message"] if isinstance(j["error"], dict) else j["error"]
    assert words in message and "\n" not in message, message


def test_models_describes_the_dual_encoder(server, encoder_pipes):
    with server.client() as c:
        (m,) = c.get("/v1/models").json()["data"]
    assert m["contract"] == "dual-encoder" and m["dimensions"] == encoder_pipes["siglip"].dim and m["activation"] == "sigmoid"
