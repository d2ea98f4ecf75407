"""Backends run a bundle's graphs by name: `run(graph, feeds) -> outputs`."""

from __future__ import annotations

from typing import Mapping, Protocol

import numpy as np


class Backend(Protocol):
    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...
