"""Native TensorRT backend: one deserialised engine and execution context per graph of an engine
directory (`vlmedge build`), run on one non-default CUDA stream, every tensor in device memory
allocated once.

- Memory: every output has a device buffer at its largest shape (inputs' maxima from the engine's
  profile, outputs' named axes at those maxima, else at the manifest's); an input gets one only
  when it is first fed from the host. A kept output is a `DeviceValue` (address, shape, dtype).
  A buffer is reused once the caller holds no value in it, so the decoder, whose present.* buffers
  come in pairs, reads past from one and writes present into the other, and the next step the other
  way round: ping-pong by addresses, no copy of the cache per token.
- Host traffic: numpy inputs are cast to the engine's dtype and copied in through pinned memory;
  outputs not kept (logits) come back through pinned memory as numpy copies. Every call ends with a
  stream synchronisation, after which pinned buffers are free for the next call.
- `prepare()` uploads and binds the fixed inputs (cross-attention K/V, the encoder mask) once per
  sequence. `take()` gathers batch rows device-to-device (a row of a batch-major tensor is
  contiguous), one copy per run of consecutive rows, into a free buffer of the same tensor.
- CUDA graphs (`cuda_graph=True`; cuda-python, TensorRT 10+): the cross-attention decoder's token
  step (its step profile; decoder_step in schema 1 bundles) is captured once per distinct set of
  input shapes and tensor addresses, then replayed whenever that set comes back.
  TensorRT ties a captured graph to its execution context's shape state, so (as its developer guide
  advises) each graph gets its own context, all of them sharing one block of activation memory
  (they run one at a time on one stream). A new set runs once on its context (the enqueue TensorRT
  wants after a shape change, and this call's result), then is captured. Since present alternates
  between two buffers, each (batch, past length) gets one graph per parity rather than being
  re-captured. Greedy decoding lands on the same addresses for every sequence, so from the second
  sequence of a batch size on, every step replays; beam reordering picks either parity, both
  captured. At most MAX_CUDA_GRAPHS are kept, for the backend's lifetime; sets beyond run plainly.
  The encoders, cross_kv and the prompt run once per sequence and are not captured (nor is the
  prefix contract's decoder). A failed capture says
  so in one line, is cleaned up (cuda.CudaGraph.capture), turns CUDA graphs off and the step runs
  plainly. `graph_launches` counts replays (the GPU tests check that graphs did replay).
- Calls are serialised by a lock: a Pipeline shared by threads runs one graph at a time.
"""

from __future__ import annotations

import sys
import threading
import weakref
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Sequence

import numpy as np

from vlmedge import tensorrt_import
from vlmedge.errors import BuildError, InputError, first_line
from vlmedge.runtime.backends import cuda
from vlmedge.runtime.bundle import AxisRange, GraphSpec, Manifest, TensorSpec, check_graph_io

MAX_CUDA_GRAPHS = 256  # captured decoder steps kept (each holds an execution context)

Dims = tuple[int, ...]


def _stderr(msg: str) -> None:
    print(f"vlmedge: {msg}", file=sys.stderr)


# -- shape bookkeeping (pure) -------------------------------------------------------------------


def volume(dims: Sequence[int]) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def axis_limits(inputs: Sequence[TensorSpec], input_max: Mapping[str, Sequence[int]],
                axes: Mapping[str, AxisRange]) -> dict[str, int]:
    """Largest size of every named axis: as the engine's profile allows for the axes its inputs
    use (a build may narrow the manifest's ranges), else the manifest's `axes` maximum. An input
    the engine left out (one its family ignores) has no profile and is skipped."""
    limits = {name: r.max for name, r in axes.items()}
    seen: dict[str, int] = {}
    for t in inputs:
        if t.name not in input_max:
            continue
        for d, m in zip(t.shape, input_max[t.name]):
            if isinstance(d, str):
                seen[d] = max(seen.get(d, 0), int(m))
    return {**limits, **seen}


def max_shape(spec: TensorSpec, limits: Mapping[str, int]) -> Dims:
    return tuple(d if isinstance(d, int) else limits[d] for d in spec.shape)


def outside(dims: Sequence[int], lo: Sequence[int], hi: Sequence[int]) -> bool:
    """Whether a shape is not within a profile's [min, max] (or has the wrong rank)."""
    return len(dims) != len(lo) or any(not a <= d <= b for d, a, b in zip(dims, lo, hi))


def gather_plan(rows: Sequence[int], row_bytes: int) -> list[tuple[int, int, int]]:
    """(destination offset, source offset, bytes) of the copies that put source rows `rows` in
    that order into a new batch-major tensor; consecutive source rows become one copy."""
    plan: list[tuple[int, int, int]] = []
    for i, r in enumerate(int(r) for r in rows):
        dst, src = i * row_bytes, r * row_bytes
        if plan and plan[-1][0] + plan[-1][2] == dst and plan[-1][1] + plan[-1][2] == src:
            plan[-1] = (plan[-1][0], plan[-1][1], plan[-1][2] + row_bytes)
        else:
            plan.append((dst, src, row_bytes))
    return plan


def graph_key(tensors: Mapping[str, "DeviceValue"]) -> tuple:
    """What a captured CUDA graph depends on: every tensor's name, shape and address."""
    return tuple(sorted((name, v.dims, v.ptr) for name, v in tensors.items()))


# -- device values and their buffers ------------------------------------------------------------


class DeviceValue:
    """A tensor the backend keeps in device memory: its address, shape and dtype."""

    __slots__ = ("ptr", "dims", "dtype", "pool", "__weakref__")

    def __init__(self, ptr: int, dims: Dims, dtype: np.dtype, pool: "_Pool"):
        self.ptr, self.dims, self.dtype, self.pool = ptr, dims, dtype, pool

    def shape(self) -> Dims:  # a method, as onnxruntime's OrtValue.shape() (the decoding loop reads either)
        return self.dims

    @property
    def nbytes(self) -> int:
        return volume(self.dims) * self.dtype.itemsize

    def __repr__(self) -> str:
        return f"DeviceValue({self.dims}, {self.dtype}, 0x{self.ptr:x})"


class _Pool:
    """Device buffers of one tensor, each at its largest size. A buffer is free once no DeviceValue
    in it is alive (CPython drops a value as soon as nothing refers to it); a new one is allocated
    only when all are held."""

    def __init__(self, where: str, nbytes: int, dtype: np.dtype, alloc: Callable[[int], Any], buffers: int = 1):
        self.where, self.nbytes, self.dtype, self.alloc = where, nbytes, np.dtype(dtype), alloc
        self.slots: list[list] = [[alloc(nbytes), None] for _ in range(buffers)]  # [buffer, weakref to its value]

    def acquire(self, dims: Dims) -> DeviceValue:
        need = volume(dims) * self.dtype.itemsize
        if need > self.nbytes:
            raise InputError(f"{self.where}: shape {tuple(dims)} is larger than the engine's largest "
                             f"({self.nbytes} bytes); rebuild the engines with a larger profile")
        slot = next((s for s in self.slots if s[1] is None or s[1]() is None), None)
        if slot is None:
            slot = [self.alloc(self.nbytes), None]
            self.slots.append(slot)
        value = DeviceValue(slot[0].ptr, tuple(int(d) for d in dims), self.dtype, self)
        slot[1] = weakref.ref(value)
        return value


class _Engine:
    """One graph: its engine, execution context, tensors, buffers and pinned staging."""

    def __init__(self, trt, runtime, name: str, path: Path, spec: GraphSpec, axes: Mapping[str, AxisRange],
                 stream: "cuda.Stream | None" = None):
        if not path.is_file():
            raise BuildError(f"{path}: missing (named by engines.json graphs.{name}.file); rebuild with vlmedge build")
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BuildError(f"{path}: TensorRT {trt.__version__} cannot deserialise this engine (see its log above); "
                             "rebuild with vlmedge build")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [t.name for t in spec.outputs]
        # a graph may leave out an input its family ignores (BLIP's cross-attention mask)
        if not set(self.inputs) <= {t.name for t in spec.inputs} or set(names) - set(self.inputs) != set(self.outputs):
            raise BuildError(f"{path}: the engine's tensors ({', '.join(names)}) are not the manifest's for {name}; "
                             "rebuild with vlmedge build")
        self.dtypes: dict[str, np.dtype] = {}
        for n in names:
            try:
                self.dtypes[n] = np.dtype(trt.nptype(engine.get_tensor_dtype(n)))
            except TypeError:
                raise BuildError(f"{path}: tensor {n} is {engine.get_tensor_dtype(n)}, which numpy cannot hold; "
                                 "rebuild with float32, float16 or integer I/O") from None
        io = {n: (n, self.dtypes[n].name, tuple(engine.get_tensor_shape(n))) for n in names}  # -1: dynamic
        check_graph_io(str(path), name, spec, [io[n] for n in self.inputs], [io[n] for n in self.outputs], axes,
                       unused_inputs_ok=True)
        # (min, opt, max) of every input in each optimisation profile: one, or two for a `decoder`
        # (prompt and step); `profile` is their union, which sizes the buffers
        count = int(getattr(engine, "num_optimization_profiles", 1))
        self.profiles = [{n: tuple(tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(n, i))
                          for n in self.inputs} for i in range(count)]
        self.profile = {n: (tuple(map(min, *(p[n][0] for p in self.profiles))) if count > 1 else self.profiles[0][n][0],
                            self.profiles[0][n][1],
                            tuple(map(max, *(p[n][2] for p in self.profiles))) if count > 1 else self.profiles[0][n][2])
                        for n in self.inputs}
        limits = axis_limits(spec.inputs, {n: p[2] for n, p in self.profile.items()}, axes)
        self.trt, self.name, self.engine, self.stream = trt, name, engine, stream
        # one execution context per profile (a context keeps the profile it was set to)
        self.contexts = []
        for i in range(count):
            ctx = engine.create_execution_context()
            if ctx is None:
                raise BuildError(f"{path}: TensorRT could not create an execution context (out of GPU memory?)")
            if i and not ctx.set_optimization_profile_async(i, stream.handle):
                raise BuildError(f"{path}: TensorRT could not select optimisation profile {i} (see its log above)")
            self.contexts.append(ctx)
        self.context = self.contexts[0]
        self.pools: dict[str, _Pool] = {}
        for t in spec.outputs:
            # ping-pong: a step reads past from one buffer and writes present into the other
            paired = name in ("decoder_step", "decoder") and t.name.startswith("present.")
            nbytes = volume(max_shape(t, limits)) * self.dtypes[t.name].itemsize
            self.pools[t.name] = _Pool(f"{name}.{t.name}", nbytes, self.dtypes[t.name], cuda.DeviceBuffer,
                                       2 if paired else 1)
        for n in self.inputs:  # no buffer until fed from the host: KV and encoder states never are
            nbytes = volume(self.profile[n][2]) * self.dtypes[n].itemsize
            self.pools[n] = _Pool(f"{name}.{n}", nbytes, self.dtypes[n], cuda.DeviceBuffer, 0)
        self._staging: dict[str, cuda.PinnedBuffer] = {}
        self._scratch: cuda.DeviceBuffer | None = None  # activation memory of the shared contexts

    def shared_context(self, profile: int = 0):
        """Another execution context, on activation memory shared by all such contexts of this
        engine (one per captured CUDA graph; they never run at the same time), set to `profile`."""
        e, trt = self.engine, self.trt
        try:
            size = e.device_memory_size_v2 if hasattr(e, "device_memory_size_v2") else e.device_memory_size  # v2: 10.1+
            if self._scratch is None:
                self._scratch = cuda.DeviceBuffer(size)
            ctx = e.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if ctx is None:
                raise BuildError(f"{self.name}: TensorRT could not create another execution context")
            if hasattr(ctx, "set_device_memory"):  # TensorRT 10.1+
                ctx.set_device_memory(self._scratch.ptr, size)
            else:  # 10.0
                ctx.device_memory = self._scratch.ptr
            if profile and not ctx.set_optimization_profile_async(profile, self.stream.handle):
                raise BuildError(f"{self.name}: TensorRT could not select optimisation profile {profile} (see its log above)")
        except (AttributeError, TypeError) as err:
            raise BuildError(f"this TensorRT cannot share execution context memory ({first_line(err)})") from None
        return ctx

    def staging(self, tensor: str) -> np.ndarray:
        """The pinned host buffer of a tensor (uint8, its largest size), allocated on first use."""
        if tensor not in self._staging:
            self._staging[tensor] = cuda.PinnedBuffer(self.pools[tensor].nbytes)
        return self._staging[tensor].array

    def check(self, tensor: str, dims: Dims) -> None:
        lo, _, hi = self.profile[tensor]
        if outside(dims, lo, hi):
            raise InputError(f"{self.name}.{tensor}: shape {tuple(dims)} is outside the engine's profile "
                             f"{lo} .. {hi}; rebuild the engines with a wider profile (vlmedge build --profile)")

    def context_for(self, bound: Mapping[str, "DeviceValue"]):
        """The execution context of the first profile whose ranges hold every bound input's shape."""
        if len(self.contexts) == 1:
            return self.context
        for ctx, p in zip(self.contexts, self.profiles):
            if not any(outside(v.dims, p[n][0], p[n][2]) for n, v in bound.items() if n in p):
                return ctx
        shapes = ", ".join(f"{n} {tuple(v.dims)}" for n, v in bound.items())
        raise InputError(f"{self.name}: no optimisation profile of the engine holds these shapes together ({shapes}); "
                         "rebuild the engines (vlmedge build)")


class _Runner:
    """One graph with some inputs bound for good; calling it binds the rest and runs."""

    def __init__(self, backend: "TensorRTBackend", graph: str, fixed: Mapping[str, Any], keep: Collection[str]):
        if graph not in backend.engines:
            raise InputError(f"no engine for graph {graph!r} (this engine directory has {', '.join(backend.engines)})")
        self.backend, self.engine, self.keep = backend, backend.engines[graph], frozenset(keep)
        with backend._lock:
            self.fixed = {n: backend._device(self.engine, n, fixed[n]) for n in self.engine.inputs if n in fixed}
            if self.fixed:
                backend.stream.synchronize()  # the fixed inputs' pinned staging is free again

    def __call__(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        b, e = self.backend, self.engine
        with b._lock:
            bound = dict(self.fixed)
            for n in e.inputs:
                if n not in bound:
                    if n not in feeds:
                        raise InputError(f"{e.name}: missing input {n!r}")
                    bound[n] = b._device(e, n, feeds[n])
            return b._execute(e, bound, self.keep)


class TensorRTBackend:
    """The Backend interface over the engines of an engine directory (see the module docstring).
    `engines` is the directory's engines.json, already checked against this TensorRT and GPU."""

    def __init__(self, engine_dir: Path, engines: dict, manifest: Manifest, warn: Callable[[str], None] | None = None,
                 cuda_graph: bool = False):
        trt = tensorrt_import.load()  # first: its absence is the likeliest problem and the clearest message
        self.warn = warn or _stderr
        self.name = f"tensorrt/{trt.__version__}"
        self.stream = cuda.Stream()  # also sets up CUDA (PyCUDA: the primary context) before TensorRT runs
        self._lock = threading.Lock()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        if engines.get("flags", {}).get("version_compatible"):
            self._runtime.engine_host_code_allowed = True  # a version-compatible plan embeds its lean runtime
        root = Path(engine_dir)
        self.engines: dict[str, _Engine] = {}
        for g, entry in engines["graphs"].items():
            if g not in manifest.graphs:
                raise BuildError(f"{root / 'engines.json'}: graph {g!r} is not in the bundle's manifest")
            self.engines[g] = _Engine(trt, self._runtime, g, root / entry["file"], manifest.graphs[g], manifest.axes,
                                      self.stream)
        self._graphs: dict[tuple, tuple[Any, cuda.CudaGraph]] | None = None  # decoder steps: key -> (context, graph)
        # the graph whose token steps are captured: the cross-attention decoder (the prefix decoder runs plainly)
        self._captured = ("decoder_step" if manifest.split_decoder else "decoder") if manifest.contract == "cross-attention" else None
        self.graph_launches = 0  # decoder steps replayed from a captured CUDA graph
        if cuda_graph:
            if cuda.graphs_supported():
                self._graphs = {}
            else:
                self.warn(f"CUDA graphs need cuda-python ({cuda.api().name} cannot capture streams); "
                          "running without them")

    # -- the Backend interface ----------------------------------------------------------------

    def run(self, graph: str, feeds: Mapping[str, Any], keep: Collection[str] = ()) -> dict[str, Any]:
        return _Runner(self, graph, {}, keep)(feeds)

    def prepare(self, graph: str, fixed: Mapping[str, Any], keep: Collection[str] = ()) -> _Runner:
        return _Runner(self, graph, fixed, keep)

    def to_host(self, value: Any) -> np.ndarray:
        if isinstance(value, np.ndarray):
            return value
        out = np.empty(value.dims, value.dtype)
        with self._lock:
            cuda.d2h(out.reshape(-1).view(np.uint8), value.ptr, self.stream)
            self.stream.synchronize()
        return out

    def take(self, value: Any, rows: np.ndarray) -> Any:
        if isinstance(value, np.ndarray):
            return np.take(value, rows, axis=0)
        rows = np.asarray(rows).reshape(-1)
        batch = value.dims[0]
        if rows.size and (rows.min() < 0 or rows.max() >= batch):
            raise InputError(f"take: rows {rows.tolist()} are not all within a batch of {batch}")
        row_bytes = value.nbytes // batch
        with self._lock:
            out = value.pool.acquire((len(rows), *value.dims[1:]))
            for dst, src, n in gather_plan(rows, row_bytes):
                cuda.d2d(out.ptr + dst, value.ptr + src, n, self.stream)
        return out  # ordered before any later work on the stream: no synchronisation needed

    # -- internals ----------------------------------------------------------------------------

    def _device(self, e: _Engine, name: str, value: Any) -> DeviceValue:
        """An input as a device value: values of this backend as they are, numpy copied in."""
        want = e.dtypes[name]
        if isinstance(value, DeviceValue):
            if value.dtype != want:
                raise InputError(f"{e.name}.{name}: a {value.dtype} value where the engine takes {want}")
            return value
        if not isinstance(value, np.ndarray):
            raise InputError(f"{e.name}.{name}: expected a numpy array or a value of this backend, "
                             f"got {type(value).__name__}")
        host = np.ascontiguousarray(value, dtype=want)
        e.check(name, host.shape)
        dst = e.pools[name].acquire(host.shape)
        stage = e.staging(name)[: host.nbytes]
        stage[:] = host.reshape(-1).view(np.uint8)
        cuda.h2d(dst.ptr, stage, self.stream)
        return dst

    def _execute(self, e: _Engine, bound: dict[str, DeviceValue], keep: frozenset) -> dict[str, Any]:
        for n, v in bound.items():
            e.check(n, v.dims)
        ctx = e.context_for(bound)
        _bind(ctx, e.name, bound, bound)
        outs: dict[str, DeviceValue] = {}
        for n in e.outputs:  # their shapes, from the inputs' (the context does the shape inference)
            dims = tuple(int(d) for d in ctx.get_tensor_shape(n))
            if any(d < 0 for d in dims):
                raise BuildError(f"{e.name}.{n}: TensorRT cannot tell this output's shape from the inputs' ({dims})")
            outs[n] = e.pools[n].acquire(dims)
        _bind(ctx, e.name, outs, ())
        self._enqueue(e, {**bound, **outs}, ctx)
        host = {}
        for n, v in outs.items():
            if n not in keep:
                host[n] = e.staging(n)[: v.nbytes]
                cuda.d2h(host[n], v.ptr, self.stream)
        self.stream.synchronize()
        return {n: v if n in keep else host[n].view(v.dtype).reshape(v.dims).copy() for n, v in outs.items()}

    def _enqueue(self, e: _Engine, tensors: dict[str, DeviceValue], ctx=None) -> None:
        ctx = e.context if ctx is None else ctx
        # CUDA graphs for the token steps of the cross-attention decoder: its last profile (the step's)
        graphs = self._graphs if e.name == self._captured and ctx is e.contexts[-1] else None
        if graphs is None:
            return _run(ctx, e.name, self.stream)
        key = graph_key(tensors)
        if key in graphs:
            self.graph_launches += 1
            return graphs[key][1].launch(self.stream)
        if len(graphs) >= MAX_CUDA_GRAPHS:
            return _run(ctx, e.name, self.stream)
        profile = len(e.contexts) - 1
        try:
            shared = e.shared_context(profile)
            _bind(shared, e.name, tensors, e.inputs)
            _run(shared, e.name, self.stream)  # this call's result; the enqueue TensorRT wants before a capture
            self.stream.synchronize()
            graphs[key] = (shared, cuda.CudaGraph.capture(self.stream, lambda: _run(shared, e.name, self.stream)))
        except BuildError as err:  # the capture is closed and its error cleared (CudaGraph.capture)
            self.warn(f"the {e.name} step could not be captured as a CUDA graph ({err}); running without CUDA graphs")
            self._graphs = None
            _run(ctx, e.name, self.stream)  # that context is bound to this call's tensors


def _bind(ctx, graph: str, tensors: Mapping[str, DeviceValue], inputs: Collection[str]) -> None:
    """Set the addresses of `tensors` on an execution context, and the shapes of those in `inputs`."""
    for n, v in tensors.items():
        if (n in inputs and not ctx.set_input_shape(n, v.dims)) or not ctx.set_tensor_address(n, v.ptr):
            raise BuildError(f"{graph}.{n}: TensorRT refused shape {v.dims} at 0x{v.ptr:x} (see its log above)")


def _run(ctx, graph: str, stream: cuda.Stream) -> None:
    if not ctx.execute_async_v3(stream.handle):
        raise BuildError(f"{graph}: TensorRT could not run the engine (see its log above)")
