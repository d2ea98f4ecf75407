"""Serving: the runtime's pipeline behind an HTTP API, with dynamic batching, on one device
(`vlmedge serve`) or many (Ray Serve), and captioning of folders too large for one run (Ray Data).

This layer sits above `vlmedge.runtime`; nothing below it knows it is being served. Importing it
is light: FastAPI, uvicorn, prometheus_client and Ray load only in the modules that need them
(the `serve` and `ray` extras).
"""

from vlmedge.serving.options import ServeOptions

__all__ = ["ServeOptions"]
