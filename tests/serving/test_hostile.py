"""`vlmedge serve` against hostile clients: a body trickled a byte at a time holds no queue place and gets
408 at the request deadline, a header block over the cap gets 431, JSON nested too deep or a number too
long is a 400 (not a 500), and true is not a count."""

import json
import socket
import time

import pytest

pytest.importorskip("fastapi")
from serving_helpers import png_b64, serve  # noqa: E402


@pytest.fixture(scope="module")
def server(shapes, tmp_path_factory):
    with serve(shapes, "--max-queue", "1", "--timeout", "2", "--threads", "1",
               tmp=tmp_path_factory.mktemp("serve-hostile")) as s:
        yield s


def _connect(server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _status(sock: socket.socket) -> tuple[int, bytes]:
    """The status and the whole answer of a response that closes its connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return int(data.split(b" ", 2)[1]), data


def test_a_trickled_body_holds_no_place_and_gets_408(server, scene_pngs):
    """--max-queue 1 and two clients sending their bodies a byte at a time: others are answered meanwhile."""
    body = json.dumps({"image": png_b64(scene_pngs[0][1])}).encode()
    slow = [_connect(server) for _ in range(2)]
    t0 = time.monotonic()
    for s in slow:
        s.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
    with server.client() as c:
        for i in range(3):
            for s in slow:
                s.sendall(body[5 + i : 6 + i])
            r = c.post("/v1/caption", json={"image": png_b64(scene_pngs[1][1])})
            assert r.status_code == 200, r.text
            time.sleep(0.2)
    for s in slow:
        code, raw = _status(s)
        assert code == 408 and b"not received within 2 s" in raw
        s.close()
    assert time.monotonic() - t0 < 8


def test_headers_over_the_cap_get_431(server):
    with _connect(server) as s:  # sent whole
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
        code, raw = _status(s)
    assert code == 431 and b"request headers" in raw
    with _connect(server) as s:  # a header block that keeps coming: refused once past the cap, not read to its end
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        sent = 0
        try:
            for sent in range(300):  # 300 KB, as a slow client sends it
                s.sendall(b"X-H%d: %s\r\n" % (sent, b"a" * 1000))
                time.sleep(0.002)
        except OSError:  # the server answered and closed the connection
            pass
        try:
            code, raw = _status(s)
        except ConnectionResetError:  # its answer was lost to our writes after it closed
            code, raw = None, b""
    assert sent < 299 and (code is None or code == 431), (sent, raw[:200])
    with server.client() as c:
        assert c.get("/healthz", headers={"X-Ok": "a" * 8000}).status_code == 200


@pytest.mark.parametrize("path", ["/v1/caption", "/v1/chat/completions"])
def test_deep_json_and_long_numbers_are_400(server, scene_pngs, path):
    deep = b"[" * 10_000 + b"]" * 10_000
    long = b'{"image": "' + png_b64(scene_pngs[0][1]).encode() + b'", "max_new_tokens": ' + b"9" * 5000 + b"}"
    with server.client() as c:
        for body, words in ((deep, "nested too deep"), (long, "too long")):
            r = c.post(path, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            message = err["message"] if isinstance(err, dict) else err
            assert words in message and "\n" not in message


def test_true_is_not_a_count(server, scene_pngs):
    with server.client() as c:
        for field in ("num_beams", "max_new_tokens", "min_new_tokens", "top_k", "seed"):
            r = c.post("/v1/caption", json={"image": png_b64(scene_pngs[0][1]), field: True})
            assert r.status_code == 400 and r.json()["error"].startswith(f"{field}: ") and "true" in r.json()["error"], r.text
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
