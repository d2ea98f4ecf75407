"""Backends run a bundle's graphs by name; the decoding loop is written once against this interface.

Values a backend returns stay where the backend keeps them (device memory on a GPU, ONNX Runtime's
own buffers on the CPU) until the caller asks for them on the host, so the KV cache and the
encoder outputs never round-trip through numpy between decoding steps. Feeds may mix numpy
arrays and values the same backend returned.
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Mapping, Protocol

import numpy as np

DEVICES = ("cpu", "cuda", "tensorrt")


class Backend(Protocol):
    name: str  # what actually runs the graphs, e.g. "onnxruntime/CPUExecutionProvider"

    def run(self, graph: str, feeds: Mapping[str, Any], keep: Collection[str] = ()) -> dict[str, Any]:
        """Run one graph. Outputs named in `keep` stay backend-resident; the others come back as numpy."""
        ...

    def prepare(self, graph: str, fixed: Mapping[str, Any], keep: Collection[str] = ()) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
        """`run` with the inputs in `fixed` bound once: the returned callable takes the other feeds.
        The decoding loop binds cross-attention K/V and the mask this way, once per sequence."""
        ...

    def to_host(self, value: Any) -> np.ndarray:
        """A backend-resident value (or a numpy array) as a numpy array."""
        ...

    def take(self, value: Any, rows: np.ndarray) -> Any:
        """Rows of a batch-major value, in the given order, kept on the backend (beam expansion and reordering)."""
        ...


def open_backend(bundle, device: str = "cpu", threads: int | None = None, warn=None, shared_threads: bool = False) -> Backend:
    """The backend for a bundle on `device` (cpu, cuda, tensorrt). A bundle's ONNX graphs run in ONNX
    Runtime, whose execution providers serve all three devices (one that is not available falls
    back to the next with a message via `warn`); an engine directory from `vlmedge build` runs on
    TensorRT itself, after its engines are checked against this TensorRT and GPU."""
    if (bundle.path / "engines.json").is_file():
        return _open_engines(bundle, warn)
    from vlmedge.runtime.backends.onnxruntime import OrtBackend

    return OrtBackend(bundle, device=device, threads=threads, warn=warn, shared_threads=shared_threads)


def _open_engines(bundle, warn) -> Backend:
    """The TensorRT backend for an engine directory, once engines.json matches this TensorRT and GPU."""
    from vlmedge import tensorrt_import
    from vlmedge.runtime.backends import cuda
    from vlmedge.runtime.backends.tensorrt import TensorRTBackend
    from vlmedge.tensorrt.engines import ENGINES, check_engine_manifest, read_engine_manifest, verify_plans

    em = read_engine_manifest(bundle.path)
    verify_plans(bundle.path, em)  # before TensorRT reads a byte of them
    trt = tensorrt_import.load()
    _, compute_capability = cuda.device_properties()
    check_engine_manifest(em, bundle.manifest, trt.__version__, compute_capability, where=str(bundle.path / ENGINES))
    return TensorRTBackend(bundle.path, em, bundle.manifest, warn=warn)
