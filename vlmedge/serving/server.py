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


def header_capped_h11():
    """uvicorn's h11 protocol answering a request whose header block is over the limit (h11's
    max_incomplete_event_size) with 431 in one line rather than a bare 400."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderCappedH11(H11Protocol):
        def handle_events(self) -> None:
            self._status = 400
            receive = self.conn.next_event

            def next_event():
                try:
                    return receive()
                except h11.RemoteProtocolError as e:
                    self._status = e.error_status_hint
                    raise

            self.conn.next_event = next_event
            try:
                super().handle_events()
            finally:
                del self.conn.next_event

        def send_400_response(self, msg: str) -> None:
            if getattr(self, "_status", 400) != 431:
                return super().send_400_response(msg)
            body = b'{"error": "request headers: over the size limit", "kind": "too_large"}'
            for event in (h11.Response(status_code=431, reason=b"Request Header Fields Too Large",
                                       headers=[(b"content-type", b"application/json"), (b"connection", b"close")]),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return HeaderCappedH11


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
                            timeout_graceful_shutdown=int(options.timeout_s) + 5, server_header=False,
                            http=header_capped_h11(), h11_max_incomplete_event_size=options.max_header_bytes)
    server = uvicorn.Server(config)
    name = pipeline.bundle.path if pipeline is not None else options.bundle
    log(f"serving {name} on http://{'[' + host + ']' if ':' in host else host}:{port} "
        f"(max batch {options.max_batch}, max wait {options.max_wait_ms:g} ms, queue {options.max_queue}); "
        "API docs at /docs; Ctrl-C to stop")
    server.run()
