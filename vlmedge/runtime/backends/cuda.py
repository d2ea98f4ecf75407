"""Device memory, streams, copies and CUDA graphs for the TensorRT backend and builder.

Works over cuda-python (`cuda.bindings.runtime`, or `cuda.cudart` before 12.6) or, failing that,
PyCUDA on the device's primary context (the one TensorRT's runtime API calls use). Neither is
imported until the first call. Every cuda-python call returns `(error, results...)`: each is checked
and a failure raises BuildError naming the call; PyCUDA's exceptions are turned into the same.

CUDA graphs (stream capture) need cuda-python: PyCUDA releases do not expose stream capture, so
`graphs_supported()` is False there and the backend runs without them. A capture that fails ends
as trtexec ends one: the capture is closed, any graph it returned destroyed and the error cleared,
so the stream and the next call are unaffected.

Threads: the runtime API (cuda-python, TensorRT) binds the device's primary context on any thread;
PyCUDA's driver calls need a current context, so each of them pushes the primary context and pops
it again, and a pipeline shared across threads works with either.
"""

from __future__ import annotations

import ctypes
from typing import Any, Callable

import numpy as np

from vlmedge.errors import BuildError, first_line

MISSING = "CUDA is not reachable from Python: install cuda-python (pip install cuda-python) or pycuda"


class _CudaPython:
    """The driver interface over cuda-python's runtime API (the same calls as the C runtime)."""

    name = "cuda-python"
    graphs = True

    def __init__(self, rt):
        self.rt = rt
        self.layout = getattr(rt, "__name__", "cuda-python")  # cuda.bindings.runtime, or cuda.cudart before 12.6

    def _call(self, call: str, result: tuple) -> Any:
        err, rest = result[0], result[1:]
        if err != self.rt.cudaError_t.cudaSuccess:
            raise BuildError(f"{call} failed: {getattr(err, 'name', err)}")
        return rest[0] if len(rest) == 1 else rest

    def device_count(self) -> int:
        return int(self._call("cudaGetDeviceCount", self.rt.cudaGetDeviceCount()))

    def driver_version(self) -> str:
        v = int(self._call("cudaDriverGetVersion", self.rt.cudaDriverGetVersion()))  # 1000 * major + 10 * minor
        return f"{v // 1000}.{v % 1000 // 10}"

    def device_properties(self) -> tuple[str, str]:
        p = self._call("cudaGetDeviceProperties", self.rt.cudaGetDeviceProperties(0))
        name = p.name.decode(errors="replace") if isinstance(p.name, bytes) else str(p.name)
        return name.split("\x00")[0].strip(), f"{p.major}.{p.minor}"

    def stream_create(self):
        return self._call("cudaStreamCreate", self.rt.cudaStreamCreate())

    def stream_handle(self, stream) -> int:
        return int(stream)  # a cudaStream_t converts to the C handle's address

    def stream_sync(self, stream) -> None:
        self._call("cudaStreamSynchronize", self.rt.cudaStreamSynchronize(stream))

    def stream_destroy(self, stream) -> None:
        self._call("cudaStreamDestroy", self.rt.cudaStreamDestroy(stream))

    def malloc(self, nbytes: int) -> tuple[int, Any]:
        ptr = self._call("cudaMalloc", self.rt.cudaMalloc(nbytes))
        return int(ptr), ptr

    def free(self, handle) -> None:
        self._call("cudaFree", self.rt.cudaFree(handle))

    def malloc_host(self, nbytes: int) -> tuple[np.ndarray, Any]:
        ptr = self._call("cudaMallocHost", self.rt.cudaMallocHost(nbytes))
        return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(int(ptr))), ptr

    def free_host(self, handle) -> None:
        self._call("cudaFreeHost", self.rt.cudaFreeHost(handle))

    def _copy(self, call: str, dst: int, src: int, nbytes: int, kind: str, stream) -> None:
        self._call(call, self.rt.cudaMemcpyAsync(dst, src, nbytes, getattr(self.rt.cudaMemcpyKind, kind), stream))

    def h2d(self, dst: int, host: np.ndarray, stream) -> None:
        self._copy("cudaMemcpyAsync (host to device)", dst, host.ctypes.data, host.nbytes,
                   "cudaMemcpyHostToDevice", stream)

    def d2h(self, host: np.ndarray, src: int, stream) -> None:
        self._copy("cudaMemcpyAsync (device to host)", host.ctypes.data, src, host.nbytes,
                   "cudaMemcpyDeviceToHost", stream)

    def d2d(self, dst: int, src: int, nbytes: int, stream) -> None:
        self._copy("cudaMemcpyAsync (device to device)", dst, src, nbytes, "cudaMemcpyDeviceToDevice", stream)

    def begin_capture(self, stream) -> None:
        # thread-local, as trtexec: another thread's unrelated CUDA calls do not invalidate this capture
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._call("cudaStreamBeginCapture", self.rt.cudaStreamBeginCapture(stream, mode))

    def end_capture(self, stream):
        return self._call("cudaStreamEndCapture", self.rt.cudaStreamEndCapture(stream))

    def end_capture_on_error(self, stream) -> None:
        """Close a capture whose enqueue failed: an invalidated capture returns no graph; otherwise
        the graph it returns is unusable and destroyed. Then clear the error the capture left."""
        err, graph = self.rt.cudaStreamEndCapture(stream)
        if err == self.rt.cudaError_t.cudaSuccess and graph is not None and int(graph):
            self.rt.cudaGraphDestroy(graph)
        self.clear_error()

    def clear_error(self) -> None:
        self.rt.cudaGetLastError()  # returns and resets the last (non-sticky) error

    def instantiate(self, graph):
        # ...WithFlags: the same signature in CUDA 11.4+ and 12 (plain cudaGraphInstantiate changed in 12)
        return self._call("cudaGraphInstantiateWithFlags", self.rt.cudaGraphInstantiateWithFlags(graph, 0))

    def destroy_graph(self, graph) -> None:
        self._call("cudaGraphDestroy", self.rt.cudaGraphDestroy(graph))

    def launch(self, exe, stream) -> None:
        self._call("cudaGraphLaunch", self.rt.cudaGraphLaunch(exe, stream))

    def destroy_exec(self, exe) -> None:
        self._call("cudaGraphExecDestroy", self.rt.cudaGraphExecDestroy(exe))


class _PyCuda:
    """The same interface over PyCUDA's driver API (no stream capture)."""

    name = "pycuda"
    graphs = False

    def __init__(self, drv, context):
        self.drv, self.context = drv, context  # the device's primary context (pycuda.autoprimaryctx)
        self.layout = "pycuda.driver"

    def _do(self, call: str, fn: Callable, *args) -> Any:
        # the primary context is current only on the thread that imported pycuda.autoprimaryctx:
        # make it current around every call, so any thread may use the pipeline
        try:
            self.context.push()
        except self.drv.Error as e:
            raise BuildError(f"Context.push failed: {first_line(e)}") from None
        try:
            return fn(*args)
        except self.drv.Error as e:
            raise BuildError(f"{call} failed: {first_line(e)}") from None
        finally:
            self.drv.Context.pop()

    def device_count(self) -> int:
        return int(self._do("Device.count", self.drv.Device.count))

    def driver_version(self) -> str:
        v = int(self._do("get_driver_version", self.drv.get_driver_version))
        return f"{v // 1000}.{v % 1000 // 10}"

    def device_properties(self) -> tuple[str, str]:
        dev = self._do("Device", self.drv.Device, 0)
        major, minor = dev.compute_capability()
        return dev.name(), f"{major}.{minor}"

    def stream_create(self):
        return self._do("Stream", self.drv.Stream)

    def stream_handle(self, stream) -> int:
        return int(stream.handle)

    def stream_sync(self, stream) -> None:
        self._do("Stream.synchronize", stream.synchronize)

    def stream_destroy(self, stream) -> None:
        pass  # PyCUDA destroys a stream with its object

    def malloc(self, nbytes: int) -> tuple[int, Any]:
        alloc = self._do("mem_alloc", self.drv.mem_alloc, nbytes)
        return int(alloc), alloc

    def free(self, handle) -> None:
        self._do("DeviceAllocation.free", handle.free)

    def malloc_host(self, nbytes: int) -> tuple[np.ndarray, Any]:
        array = self._do("pagelocked_empty", self.drv.pagelocked_empty, nbytes, np.uint8)
        return array, array

    def free_host(self, handle) -> None:
        self._do("HostAllocation.free", handle.base.free)

    def h2d(self, dst: int, host: np.ndarray, stream) -> None:
        self._do("memcpy_htod_async", self.drv.memcpy_htod_async, dst, host, stream)

    def d2h(self, host: np.ndarray, src: int, stream) -> None:
        self._do("memcpy_dtoh_async", self.drv.memcpy_dtoh_async, host, src, stream)

    def d2d(self, dst: int, src: int, nbytes: int, stream) -> None:
        self._do("memcpy_dtod_async", self.drv.memcpy_dtod_async, dst, src, nbytes, stream)


_API: Any = None  # the driver interface in use, loaded on first use (tests put a fake here)


def api():
    """The driver interface: cuda-python if it imports, else PyCUDA; BuildError naming both if neither."""
    global _API
    if _API is None:
        try:
            from cuda.bindings import runtime as rt
        except ImportError:
            try:
                from cuda import cudart as rt
            except ImportError:
                rt = None
        if rt is not None:
            _API = _CudaPython(rt)
        else:
            try:
                import pycuda.driver as drv
            except ImportError:
                raise BuildError(MISSING) from None
            try:
                import pycuda.autoprimaryctx as primary  # retains the primary context (current on this thread)
            except Exception as e:  # pycuda.driver.Error: no device or driver
                raise BuildError(f"pycuda cannot open the GPU ({first_line(e)})") from None
            _API = _PyCuda(drv, primary.context)
    return _API


def device_properties() -> tuple[str, str]:
    """(name, compute capability "major.minor") of device 0."""
    return api().device_properties()


def device_count() -> int:
    return api().device_count()


def driver_version() -> str:
    """The CUDA version the driver supports, "major.minor"."""
    return api().driver_version()


def graphs_supported() -> bool:
    return api().graphs


class Stream:
    """A non-default stream: TensorRT work on the legacy default stream costs an extra synchronisation."""

    def __init__(self):
        self._api = api()
        self.raw = self._api.stream_create()
        self.handle = self._api.stream_handle(self.raw)  # what TensorRT's execute_async_v3 takes

    def synchronize(self) -> None:
        self._api.stream_sync(self.raw)

    def __del__(self):
        try:
            self._api.stream_destroy(self.raw)
        except Exception:  # interpreter shutdown: CUDA may be gone already
            pass


class DeviceBuffer:
    """`nbytes` of device memory at `ptr`, freed with the object."""

    def __init__(self, nbytes: int):
        self._api = api()
        self.nbytes = nbytes
        self.ptr, self._handle = self._api.malloc(max(nbytes, 1))

    def __del__(self):
        try:
            self._api.free(self._handle)
        except Exception:
            pass


class PinnedBuffer:
    """`nbytes` of page-locked host memory as a uint8 numpy array (`.array`), freed with the object;
    views of `.array` must not outlive it."""

    def __init__(self, nbytes: int):
        self._api = api()
        self.nbytes = nbytes
        self.array, self._handle = self._api.malloc_host(max(nbytes, 1))

    def __del__(self):
        try:
            self._api.free_host(self._handle)
        except Exception:
            pass


def h2d(dst: int, host: np.ndarray, stream: Stream) -> None:
    """Copy a C-contiguous host array to device address `dst` (async on `stream`)."""
    api().h2d(dst, host, stream.raw)


def d2h(host: np.ndarray, src: int, stream: Stream) -> None:
    """Copy `host.nbytes` from device address `src` into a C-contiguous host array (async on `stream`)."""
    api().d2h(host, src, stream.raw)


def d2d(dst: int, src: int, nbytes: int, stream: Stream) -> None:
    api().d2d(dst, src, nbytes, stream.raw)


class CudaGraph:
    """An instantiated CUDA graph of the work one call enqueues on a stream. It replays that work
    on the same device addresses and shapes it was captured with."""

    def __init__(self, exe):
        self._api, self._exe = api(), exe

    @classmethod
    def capture(cls, stream: Stream, enqueue: Callable[[], None]) -> "CudaGraph":
        a = api()
        if not a.graphs:
            raise BuildError(f"CUDA graphs need cuda-python ({a.name} cannot capture streams): pip install cuda-python")
        a.begin_capture(stream.raw)
        try:
            enqueue()
        except BaseException:  # leave capture mode, drop what was captured, clear the error
            a.end_capture_on_error(stream.raw)
            raise
        try:
            graph = a.end_capture(stream.raw)  # fails if the capture was invalidated
        except BuildError:
            a.clear_error()
            raise
        try:
            return cls(a.instantiate(graph))
        except BuildError:
            a.clear_error()
            raise
        finally:
            a.destroy_graph(graph)

    def launch(self, stream: Stream) -> None:
        self._api.launch(self._exe, stream.raw)

    def __del__(self):
        try:
            self._api.destroy_exec(self._exe)
        except Exception:
            pass
