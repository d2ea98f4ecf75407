"""ONNX Runtime backend: one InferenceSession per graph, run through IOBinding.

- CPU: inputs are bound in place (numpy or OrtValue, no copy) and outputs are allocated by ONNX
  Runtime and handed back as OrtValues; the host view of a CPU OrtValue is zero-copy, so the KV
  cache is never copied between steps beyond the graph's own concatenation.
- CUDA / TensorRT execution providers: outputs named in `keep` (KV cache, cross K/V, encoder states)
  are allocated on the GPU and fed back as they are; only logits are copied to the host.
- `shared_threads=True` gives all sessions of the process one intra-op thread pool: with one pool
  per session, idle workers of one graph spin while the next graph runs, which on a 2-core edge
  CPU costs as much as a small decoder step. It is opt-in (the CLI uses it) because once that pool
  exists onnxruntime refuses any session in the process that asks for its own threads.
- `prepare()` binds a graph's fixed inputs once (cross-attention K/V and the mask for every
  decoding step); each call then binds only what changed.
- onnxruntime is not a hard dependency (`vlmedge[cpu]` installs onnxruntime, `vlmedge[gpu]`
  onnxruntime-gpu; both provide the same module, so the one installed last wins): which package was
  found and which providers run is one line (`summary`); without any, one line says what to install.
- TensorRT provider: the bundle's precision is enabled (FP16, INT8) and explicit profiles come from
  the manifest. The provider needs a profile for every dynamic input of every TensorRT subgraph it
  carves out; when it refuses the manifest's, the graph is opened without explicit profiles (engines
  sized from the shapes seen), and if that fails too, on the next provider; one line says so.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Callable, Collection, Mapping

import numpy as np

from vlmedge.errors import BundleError, DependencyError, InputError, first_line
from vlmedge.runtime.bundle import Bundle, check_graph_io

INSTALL_HINT = ("onnxruntime is not installed: pip install 'vlmedge[cpu]' (CPU), or 'vlmedge[gpu]' for "
                "onnxruntime-gpu (NVIDIA GPUs; on Jetson, JetPack's onnxruntime-gpu: see docs/jetson.md)")
DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-qnn")

_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def _stderr(msg: str) -> None:
    print(f"vlmedge: {msg}", file=sys.stderr)


def import_onnxruntime():
    """The onnxruntime module; DependencyError naming what to install if there is none."""
    try:
        import onnxruntime
    except ImportError:
        raise DependencyError(INSTALL_HINT) from None
    return onnxruntime


def installed_distributions() -> dict[str, str]:
    """Packages that provide the `onnxruntime` module, with their versions (more than one clash)."""
    from importlib import metadata

    found = {}
    for name in DISTRIBUTIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def clash(found: dict[str, str]) -> str | None:
    """A one-line warning when several onnxruntime packages share the module (the last installed wins)."""
    if len(found) < 2:
        return None
    names = " ".join(found)
    gpu = "onnxruntime-gpu" if "onnxruntime-gpu" in found else next(n for n in found if n != "onnxruntime")
    return (f"{', '.join(found)} are all installed and share one module, so the last one installed wins; "
            f"keep one: pip uninstall -y {names} && pip install {gpu}")


def summary(ort, providers: list[str]) -> str:
    """Which onnxruntime was found and which providers a session uses, in one line."""
    found = installed_distributions()
    package = ", ".join(f"{n} {v}" for n, v in found.items()) or f"onnxruntime {ort.__version__}"
    return (f"onnxruntime: {package} ({ort.__file__.rsplit('/', 2)[0] if ort.__file__ else '?'}); "
            f"providers {', '.join(providers)}")


def tensorrt_provider_options(bundle: Bundle, graph: str, cache_dir: str | None = None,
                              profiles: bool = True) -> dict[str, str]:
    """TensorRT EP options for one graph: the bundle's precision, profile shapes from the manifest
    (unless `profiles` is False), and an engine and timing cache beside the bundle (engines are built
    on the first run and reused)."""
    from vlmedge.tensorrt.profiles import graph_profile, ort_tensorrt_options

    return ort_tensorrt_options(graph_profile(bundle.manifest, graph) if profiles else None,
                                cache_dir or str(bundle.path / ".trt-cache"),
                                bundle.manifest.precision.get("dtype", "float32"))


def providers_for(device: str, available: Collection[str], warn=_stderr) -> list[str]:
    """The providers for a device, with unavailable ones dropped (and said so)."""
    if device not in _PROVIDERS:
        raise InputError(f"--device: {device!r} is not one of {', '.join(_PROVIDERS)}")
    wanted = _PROVIDERS[device]
    chosen = [p for p in wanted if p in available]
    if chosen[0] != wanted[0]:
        hint = ("install onnxruntime-gpu: pip install 'vlmedge[gpu]' (on Jetson, JetPack's onnxruntime-gpu, "
                "see docs/jetson.md)") if device != "cpu" else ""
        warn(f"{wanted[0]} is not available in this onnxruntime ({', '.join(available)}); "
             f"running on {chosen[0]}. {hint}".strip())
    return chosen


_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}
_shared_pool: dict[str, int | None] = {}  # the process-wide pool's size, once set up (None: unavailable)


def _use_shared_pool(ort, threads: int | None, wanted: bool) -> bool:
    """Whether sessions use the process-wide thread pool: always once it exists (onnxruntime then
    refuses sessions with their own pools); set up on first use if `wanted` and still possible."""
    if _shared_pool.get("size") is not None:
        return True
    if not wanted or "size" in _shared_pool:
        return False
    try:
        ort.set_global_thread_pool_sizes(threads or 0, 1)  # 0: one thread per physical core
        _shared_pool["size"] = threads or 0
    except Exception:  # onnxruntime's environment was created earlier in this process
        _shared_pool["size"] = None
    return _shared_pool["size"] is not None


def session_options(ort):
    """SessionOptions for a session of this process: on the process-wide thread pool once one
    exists (ONNX Runtime then refuses sessions with their own pools), else with their own."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if _shared_pool.get("size") is not None:
        opts.use_per_session_threads = False
    return opts


class _Runner:
    """One graph with some inputs bound for good; calling it binds the rest and runs."""

    def __init__(self, backend: "OrtBackend", graph: str, fixed: Mapping[str, Any], keep: Collection[str]):
        self.backend, self.graph, self.keep = backend, graph, keep
        self.session = backend.sessions[graph]
        self.binding = self.session.io_binding()
        self.outputs = backend._outputs[graph]
        self.varying = [n for n in backend._inputs[graph] if n not in fixed]
        for name in backend._inputs[graph]:
            if name in fixed:
                backend._bind_input(self.binding, graph, name, fixed[name])

    def __call__(self, feeds: Mapping[str, Any], into: Mapping[str, Any] | None = None) -> dict[str, Any]:
        b = self.binding
        for name in self.varying:
            self.backend._bind_input(b, self.graph, name, feeds[name])
        b.clear_binding_outputs()  # fresh outputs: the previous step's present is this step's past
        for name in self.outputs:
            if into and name in into:
                b.bind_ortvalue_output(name, into[name])
            else:
                b.bind_output(name, self.backend.device if name in self.keep else "cpu")
        self.session.run_with_iobinding(b)
        return {name: v if name in self.keep else v.numpy() for name, v in zip(self.outputs, b.get_outputs())}


class OrtBackend:
    def __init__(self, bundle: Bundle, device: str = "cpu", threads: int | None = None, warn=None,
                 shared_threads: bool = False):
        ort = import_onnxruntime()
        self._ort = ort
        warn = warn or _stderr
        if device != "cpu" and (message := clash(installed_distributions())):
            warn(message)
        chosen = providers_for(device, ort.get_available_providers(), warn)
        first = chosen[0]
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if _use_shared_pool(ort, threads, shared_threads):
            opts.use_per_session_threads = False
        elif threads:
            opts.intra_op_num_threads = threads
        self.sessions = {}
        refused: dict[str, str] = {}  # graph -> what happened to the TensorRT provider's profiles
        for name in bundle.manifest.graphs:
            self.sessions[name] = s = self._session(bundle, name, opts, chosen, refused)
            check_graph_io(str(bundle.graph_path(name)), name, bundle.manifest.graphs[name], s.get_inputs(),
                           s.get_outputs(), bundle.manifest.axes)
        if refused:
            first_error = next(iter(refused.values()))
            warn(f"TensorRT provider refused the manifest's profiles for {', '.join(refused)} ({first_error}); "
                 "they run with engines sized from the shapes seen, or on the next provider")
        last = self.sessions[next((g for g in ("decoder_step", "decoder") if g in self.sessions), name)]  # (a dual encoder has neither)
        used = last.get_providers()[0]
        if used != first and not refused:  # (a refusal was said already)
            warn(f"{first} could not be initialised (see onnxruntime's log); running on {used}")
        self.name = f"onnxruntime/{used}"
        self.summary = summary(ort, last.get_providers())
        self.device = "cpu" if used == "CPUExecutionProvider" else "cuda"
        self._inputs = {n: [i.name for i in s.get_inputs()] for n, s in self.sessions.items()}
        # host arrays are cast to what each graph declares (an FP16 bundle may take float16 inputs)
        self._dtypes = {(n, i.name): _NP_TYPES.get(i.type) for n, s in self.sessions.items() for i in s.get_inputs()}
        self._outputs = {n: [o.name for o in s.get_outputs()] for n, s in self.sessions.items()}
        self._bundle, self._opts, self._chosen = bundle, opts, chosen
        self._lock = threading.Lock()

    def explain(self, graph: str) -> str:
        """The session name of `graph`'s explain graph (manifest `explain.graphs`), opened on first use:
        the production graph that also returns its cross-attention probabilities."""
        name = graph + "_explain"
        with self._lock:
            if name not in self.sessions:
                spec = self._bundle.manifest.explain.get("graphs", {}).get(graph)
                if spec is None:
                    raise InputError(f"{self._bundle.path}: this bundle has no explain graph for its {graph} "
                                     "(export it again with this vlmedge to return attention)")
                path = self._bundle.path / spec.file
                try:
                    # TensorRT's provider would build engines for a graph that runs now and then: CUDA or CPU
                    providers = [p for p in self._chosen if p != "TensorrtExecutionProvider"] or ["CPUExecutionProvider"]
                    s = self._ort.InferenceSession(str(path), self._opts, providers=providers)
                except Exception as e:
                    raise BundleError(f"{path}: onnxruntime cannot load this graph ({first_line(e)})") from None
                check_graph_io(str(path), name, spec, s.get_inputs(), s.get_outputs(), self._bundle.manifest.axes)
                self._inputs[name] = [i.name for i in s.get_inputs()]
                self._dtypes.update({(name, i.name): _NP_TYPES.get(i.type) for i in s.get_inputs()})
                self._outputs[name] = [o.name for o in s.get_outputs()]
                self.sessions[name] = s
        return name

    def _session(self, bundle: Bundle, name: str, opts, chosen: list[str], refused: dict[str, str]):
        """One graph's session; with the TensorRT provider, explicit profiles first, then none, then
        the providers after it (each failure noted in `refused`)."""
        path, ort = str(bundle.graph_path(name)), self._ort
        attempts: list[list] = []
        if "TensorrtExecutionProvider" in chosen:
            for profiles in (True, False):
                attempts.append([(p, tensorrt_provider_options(bundle, name, profiles=profiles))
                                 if p == "TensorrtExecutionProvider" else p for p in chosen])
        rest = [p for p in chosen if p != "TensorrtExecutionProvider"] or ["CPUExecutionProvider"]
        attempts.append(rest)
        for i, providers in enumerate(attempts):
            try:
                return ort.InferenceSession(path, opts, providers=providers)
            except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
                if i == len(attempts) - 1:
                    raise BundleError(f"{path}: onnxruntime cannot load this graph ({first_line(e)})") from None
                refused.setdefault(name, first_line(e))

    def _bind_input(self, binding, graph: str, name: str, value: Any) -> None:
        if isinstance(value, np.ndarray):
            dtype = self._dtypes.get((graph, name))
            binding.bind_cpu_input(name, np.ascontiguousarray(value, dtype=dtype))
        else:
            binding.bind_ortvalue_input(name, value)

    def prepare(self, graph: str, fixed: Mapping[str, Any], keep: Collection[str] = ()) -> _Runner:
        return _Runner(self, graph, fixed, keep)

    def run(self, graph: str, feeds: Mapping[str, Any], keep: Collection[str] = ()) -> dict[str, Any]:
        return _Runner(self, graph, {}, keep)(feeds)

    def run_into(self, graph: str, feeds: Mapping[str, Any], into: Mapping[str, Any], keep: Collection[str] = ()) -> dict[str, Any]:
        """`run` with the outputs named in `into` written into those values (from `buffer`): a KV cache
        updated in place, its past and present one buffer (ONNX Runtime's GroupQueryAttention)."""
        return _Runner(self, graph, {}, keep)(feeds, into)

    def prepare_into(self, graph: str, fixed: Mapping[str, Any], into: Mapping[str, Any]) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
        """`run_into` with the inputs in `fixed` and the outputs in `into` bound once (a KV cache updated
        in place, the same buffers every step): each call binds the other inputs, runs, and returns the
        other outputs as numpy."""
        session, binding = self.sessions[graph], self.sessions[graph].io_binding()
        for name, value in fixed.items():
            self._bind_input(binding, graph, name, value)
        rest = [n for n in self._outputs[graph] if n not in into]
        for name in rest:  # first: outputs come back in the order they were bound, rebinding keeps the place
            binding.bind_output(name, "cpu")
        for name, value in into.items():
            binding.bind_ortvalue_output(name, value)
        varying = [n for n in self._inputs[graph] if n not in fixed]

        def call(feeds: Mapping[str, Any]) -> dict[str, Any]:
            for name in varying:
                self._bind_input(binding, graph, name, feeds[name])
            for name in rest:
                binding.bind_output(name, "cpu")
            session.run_with_iobinding(binding)
            return {name: v.numpy() for name, v in zip(rest, binding.get_outputs())}

        return call

    def buffer(self, array: np.ndarray) -> Any:
        """`array` as a value this backend keeps and `run_into` can write into."""
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def to_host(self, value: Any) -> np.ndarray:
        return value if isinstance(value, np.ndarray) else value.numpy()

    def take(self, value: Any, rows: np.ndarray) -> Any:
        # CPU: a zero-copy view, gathered once. CUDA: through the host (only at beam expansion and
        # when beams are reordered).
        host = np.take(self.to_host(value), rows, axis=0)
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(host), self.device, 0)
