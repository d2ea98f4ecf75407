"""The server's settings, shared by `vlmedge serve`, the ASGI app and the Ray Serve deployment."""

from __future__ import annotations

import os
from dataclasses import dataclass

from vlmedge.errors import InputError

DEFAULT_SERVE_MAX_PIXELS = 16_000_000  # a decoded RGB image of this size is 48 MB; the queue holds decoded images


@dataclass(frozen=True)
class ServeOptions:
    """What the app serves and its limits. Memory is bounded by max_queue x max_pixels x 3 bytes
    of decoded images plus max_queue x max_body_bytes of request bodies."""

    bundle: str  # bundle directory, engine directory or built-in model name
    device: str = "cpu"
    max_batch: int = 16  # images per model call (beams count against the bundle's batch range too)
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for companions
    max_queue: int = 64  # requests admitted at once (waiting and running); more get 429
    max_body_bytes: int = 20 * 1024 * 1024
    max_header_bytes: int = 32 * 1024  # request line and headers together; more gets 431
    max_pixels: int = DEFAULT_SERVE_MAX_PIXELS
    timeout_s: float = 30.0  # a request not answered by then gets 504
    api_key: str | None = None  # bearer token required on /v1/* and /metrics; None: no auth
    threads: int | None = None  # ONNX Runtime intra-op threads (None: its default)
    shared_threads: bool = True  # one ONNX Runtime thread pool for all graphs (a process that only serves)
    workers: int = 1  # model calls running at once (one is right for one device)
    model_name: str | None = None  # the id /v1/models reports (default: the bundle's directory name)
    batching: str = "static"  # or "inflight": each batch runs to its end, or rows join the running batch between steps

    def check(self) -> None:
        """Refuse settings that cannot work, one line naming the option."""
        for name, low in (("max_batch", 1), ("max_queue", 1), ("max_body_bytes", 1), ("max_header_bytes", 1024), ("max_pixels", 1), ("workers", 1)):
            if getattr(self, name) < low:
                raise InputError(f"--{name.replace('_', '-')}: expected >= {low}, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise InputError(f"--max-wait-ms: expected >= 0, got {self.max_wait_ms}")
        if self.batching not in ("inflight", "static"):
            raise InputError(f"--batching: expected inflight or static, got {self.batching!r}")
        if self.timeout_s <= 0:
            raise InputError(f"--timeout: expected > 0 seconds, got {self.timeout_s}")


def api_key_from_env(var: str | None) -> str | None:
    """The API key held by environment variable `var` (keys never go on a command line, where `ps` shows them)."""
    if not var:
        return None
    key = os.environ.get(var, "")
    if not key.strip():
        raise InputError(f"--api-key-env: environment variable {var} is not set or empty; set it to the API key")
    return key.strip()
