"""A real `vlmedge serve` process on a free localhost port, and the in-process pipeline to compare with."""

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

import vlmedge  # noqa: E402
from vlmedge.data.scenes import scenes  # noqa: E402


@pytest.fixture(scope="module")
def shapes():
    """The session's bundle of the shipped model."""
    return "/tmp/serve-bundle"  # DEV
    return bundles["shapes-vlm"][2]


@pytest.fixture(scope="module")
def pipe(shapes):
    """That bundle in this process: what the server's answers must equal."""
    return vlmedge.load(shapes)


@pytest.fixture(scope="module")
def scene_pngs():
    """Test scenes and their PNG bytes."""
    out = []
    for s in scenes("test", 300, 8):
        buf = io.BytesIO()
        s.pil().save(buf, "PNG")
        out.append((s, buf.getvalue()))
    return out


def png_b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `vlmedge serve` child process; `url` is its base URL."""

    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log

    def client(self, **kw) -> "httpx.Client":
        return httpx.Client(base_url=self.url, timeout=60, **kw)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@contextmanager
def serve(bundle, *args: str, env: dict | None = None, tmp: Path):
    """Start `vlmedge serve BUNDLE ARGS` on a free 127.0.0.1 port, wait until /readyz, stop it after."""
    port = free_port()
    log = tmp / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "vlmedge.cli", "serve", str(bundle), "--host", "127.0.0.1", "--port", str(port), *args]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vlmedge serve exited with {proc.returncode}: {log.read_text()}")
            try:
                if httpx.get(server.url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vlmedge serve not ready after 60 s: {log.read_text()}")
            time.sleep(0.1)
        yield server
    finally:
        server.stop()
