"""Prometheus metrics of one server: requests and errors by kind, latency per stage, batch sizes,
queue depth. Each app has its own registry, so several apps can live in one process (tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# 1 ms .. 30 s: an edge caption is ~10 ms, a queued one under load a few hundred
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
STAGES = ("decode_image", "queue", "preprocess", "encoder", "first_token", "decode", "model", "total")
ERROR_KINDS = ("bad_input", "unauthorized", "not_found", "too_large", "queue_full", "timeout", "unavailable", "internal")


class ServeMetrics:
    """The server's counters, histograms and gauges in their own registry."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("vlmedge_requests", "HTTP requests to /v1 endpoints, by endpoint and status code",
                                ["endpoint", "code"], registry=r)
        self.errors = Counter("vlmedge_errors", "Requests answered with an error, by kind", ["kind"], registry=r)
        self.stage = Histogram("vlmedge_stage_seconds", "Seconds per request in each stage (model stages are the batch's)",
                               ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("vlmedge_batch_size", "Requests per model call", buckets=(1, 2, 4, 8, 16, 32, 64),
                                    registry=r)
        self.queue_depth = Gauge("vlmedge_queue_depth", "Requests admitted and not yet answered (waiting and running)",
                                 registry=r)
        self.ready = Gauge("vlmedge_ready", "1 once the model is loaded and warmed up", registry=r)
        for kind in ERROR_KINDS:  # every kind shows from the start, at 0
            self.errors.labels(kind)
        for stage in STAGES:
            self.stage.labels(stage)

    def render(self) -> bytes:
        return generate_latest(self.registry)
