"""Running the app: uvicorn on one device, or a Ray Serve deployment across many."""

from __future__ import annotations

import ipaddress
from typing import Callable, Optional

from vlmedge.errors import InputError
from vlmedge.runtime.pipeline import Pipeline
from vlmedge.serving.options import ServeOptions


def is_loopback(host: str) -> bool:
    """True for 127.0.0.1, ::1, localhost: addresses only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def missing_extra(e: ImportError, extra: str) -> InputError:
    """One line saying which extra to install for a server (FastAPI, uvicorn, Ray are optional)."""
    return InputError(f"vlmedge serve needs {e.name}, which is not installed: pip install 'vlmedge[{extra}]'")


def serve_uvicorn(options: ServeOptions, host: str, port: int, pipeline: Optional[Pipeline] = None,
                  log: Callable[[str], None] = print) -> None:
    """Serve until SIGINT/SIGTERM; requests in flight are answered before the process exits."""
    try:
        import uvicorn

        from vlmedge.serving.app import create_app
    except ImportError as e:
        raise missing_extra(e, "serve") from None
    app = create_app(options, pipeline)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(options.timeout_s) + 5, server_header=False)
    server = uvicorn.Server(config)
    name = pipeline.bundle.path if pipeline is not None else options.bundle
    log(f"serving {name} on http://{'[' + host + ']' if ':' in host else host}:{port} "
        f"(max batch {options.max_batch}, max wait {options.max_wait_ms:g} ms, queue {options.max_queue}); "
        "API docs at /docs; Ctrl-C to stop")
    server.run()
