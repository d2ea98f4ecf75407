"""ONNX Runtime backend: one InferenceSession per graph, run through IOBinding.

- CPU: inputs are bound in place (numpy or OrtValue, no copy) and outputs are allocated by ONNX
  Runtime and handed back as OrtValues; the host view of a CPU OrtValue is zero-copy, so the KV
  cache is never copied between steps beyond the graph's own concatenation.
- CUDA / TensorRT execution providers: outputs named in `keep` (KV cache, cross K/V, encoder states)
  are allocated on the GPU and fed back as they are; only logits are copied to the host.
"""

from __future__ import annotations

import sys
from typing import Any, Collection, Mapping

import numpy as np

from vlmedge.errors import BundleError, InputError, first_line
from vlmedge.runtime.bundle import Bundle

_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def _stderr(msg: str) -> None:
    print(f"vlmedge: {msg}", file=sys.stderr)


def tensorrt_provider_options(bundle: Bundle, cache_dir: str | None = None) -> dict[str, str]:
    """TensorRT EP options: an engine and timing cache beside the bundle (engines are built on the
    first run and reused)."""
    from pathlib import Path

    cache = Path(cache_dir) if cache_dir else bundle.path / ".trt-cache"
    return {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache),
    }


def providers_for(device: str, available: Collection[str], bundle: Bundle, warn=_stderr) -> tuple[list, str]:
    """The provider list for a device, with unavailable providers dropped (and said so)."""
    if device not in _PROVIDERS:
        raise InputError(f"--device: {device!r} is not one of {', '.join(_PROVIDERS)}")
    wanted = _PROVIDERS[device]
    chosen = [p for p in wanted if p in available]
    if chosen[0] != wanted[0]:
        hint = "install onnxruntime-gpu (onnxruntime-gpu for Jetson from the JetPack index)" if device != "cpu" else ""
        warn(f"{wanted[0]} is not available in this onnxruntime ({', '.join(available)}); "
             f"running on {chosen[0]}. {hint}".strip())
    providers: list = [(p, tensorrt_provider_options(bundle)) if p == "TensorrtExecutionProvider" else p for p in chosen]
    return providers, chosen[0]


class OrtBackend:
    def __init__(self, bundle: Bundle, device: str = "cpu", threads: int | None = None, warn=None):
        import onnxruntime as ort

        self._ort = ort
        warn = warn or _stderr
        providers, first = providers_for(device, ort.get_available_providers(), bundle, warn)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        self.sessions = {}
        for name in bundle.manifest.graphs:
            path = bundle.graph_path(name)
            try:
                self.sessions[name] = ort.InferenceSession(str(path), opts, providers=providers)
            except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
                raise BundleError(f"{path}: onnxruntime cannot load this graph ({first_line(e)})") from None
        used = self.sessions["decoder_step"].get_providers()[0]
        if used != first:
            warn(f"{first} could not be initialised (see onnxruntime's log); running on {used}")
        self.name = f"onnxruntime/{used}"
        self.device = "cpu" if used == "CPUExecutionProvider" else "cuda"
        self._inputs = {n: [i.name for i in s.get_inputs()] for n, s in self.sessions.items()}
        self._outputs = {n: [o.name for o in s.get_outputs()] for n, s in self.sessions.items()}

    def run(self, graph: str, feeds: Mapping[str, Any], keep: Collection[str] = ()) -> dict[str, Any]:
        session = self.sessions[graph]
        binding = session.io_binding()
        for name in self._inputs[graph]:  # a graph may not consume every canonical input
            value = feeds[name]
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, value)
        for name in self._outputs[graph]:
            binding.bind_output(name, self.device if name in keep else "cpu")
        session.run_with_iobinding(binding)
        out = {}
        for name, value in zip(self._outputs[graph], binding.get_outputs()):
            out[name] = value if name in keep else value.numpy()
        return out

    def to_host(self, value: Any) -> np.ndarray:
        return value if isinstance(value, np.ndarray) else value.numpy()

    def take(self, value: Any, rows: np.ndarray) -> Any:
        # CPU: a zero-copy view, gathered once. CUDA: through the host (only at beam expansion and
        # when beams are reordered).
        host = np.take(self.to_host(value), rows, axis=0)
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(host), self.device, 0)
