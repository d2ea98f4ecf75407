"""Helpers for the serving tests: a real `vlmedge serve` process on a free localhost port."""

import base64
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx


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
