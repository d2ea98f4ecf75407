"""A backend wrapper that keeps host copies of the feeds of every graph run: the decoding loop's
real inputs, step by step. Calibration records them to compute activation ranges; `compare` to
run every bundle's graphs on the same real inputs."""

from __future__ import annotations

from typing import Callable

import numpy as np

from vlmedge.runtime.backends import Backend

Feeds = dict[str, np.ndarray]


class RecordingBackend:
    def __init__(self, backend: Backend, keep_step: Callable[[int], bool] = lambda i: True):
        """`keep_step(i)` says whether the i-th token step of the decoder (from 0) is recorded; every
        other call (the prompt, the encoders) always is."""
        self.backend, self.keep_step = backend, keep_step
        self.name = backend.name
        self.feeds: list[tuple[str, Feeds]] = []  # (graph, feeds) in call order
        self._steps = 0

    def by_graph(self) -> dict[str, list[Feeds]]:
        out: dict[str, list[Feeds]] = {}
        for graph, feeds in self.feeds:
            out.setdefault(graph, []).append(feeds)
        return out

    def _record(self, graph: str, feeds) -> None:
        if graph == "decoder_step" or (graph == "decoder" and _tokens(feeds) == 1):  # a token step
            self._steps += 1
            if not self.keep_step(self._steps - 1):
                return
        self.feeds.append((graph, {k: np.array(self.backend.to_host(v)) for k, v in feeds.items()}))

    def run(self, graph, feeds, keep=()):
        self._record(graph, feeds)
        return self.backend.run(graph, feeds, keep)

    def prepare(self, graph, fixed, keep=()):
        runner = self.backend.prepare(graph, fixed, keep)

        def call(feeds):
            self._record(graph, {**fixed, **feeds})
            return runner(feeds)

        return call

    def to_host(self, value):
        return self.backend.to_host(value)

    def take(self, value, rows):
        return self.backend.take(value, rows)


def _tokens(feeds) -> int:
    """Tokens a decoder call runs: input_ids (cross-attention) or inputs_embeds (prefix), [batch, seq_len, ...]."""
    ids = feeds["input_ids"] if "input_ids" in feeds else feeds["inputs_embeds"]
    return int(ids.shape[1])
