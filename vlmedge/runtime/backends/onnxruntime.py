"""ONNX Runtime backend: one InferenceSession per graph of a bundle."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from vlmedge.runtime.bundle import Bundle


class OrtBackend:
    def __init__(self, bundle: Bundle, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.sessions = {
            name: ort.InferenceSession(str(bundle.graph_path(name)), opts, providers=list(providers))
            for name in bundle.manifest.graphs
        }
        self._outputs = {name: [o.name for o in s.get_outputs()] for name, s in self.sessions.items()}
        self._inputs = {name: [i.name for i in s.get_inputs()] for name, s in self.sessions.items()}

    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # a graph may not consume every canonical input (e.g. a mask the family ignores)
        wanted = {k: feeds[k] for k in self._inputs[graph]}
        return dict(zip(self._outputs[graph], self.sessions[graph].run(None, wanted)))
