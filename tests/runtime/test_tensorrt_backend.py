"""The native TensorRT backend and its CUDA layer.

Without a GPU: imports stay light, missing packages are one-line errors, the pure bookkeeping
(profiles, row gathers, buffer ping-pong, graph keys) is checked with plain numbers, and the whole
backend runs the decoding loop against a fake TensorRT and a fake CUDA layer: engines that execute
the bundle's ONNX graphs with onnxruntime on simulated device memory, and CUDA graphs that replay
exactly the addresses and shapes they were captured with. That checks every address the backend
binds, every row it gathers and every buffer it reuses against onnxruntime's own results.
With a GPU (marked `gpu`): engines built from the shipped bundle caption like onnxruntime FP32.
"""

import json
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

import vlmedge
from vlmedge import tensorrt_import
from vlmedge.data.scenes import pick_questions, scenes
from vlmedge.errors import BuildError, InputError
from vlmedge.runtime.backends import cuda
from vlmedge.runtime.backends.tensorrt import (DeviceValue, TensorRTBackend, _Pool, axis_limits, gather_plan,
                                               graph_key, max_shape, outside)
from vlmedge.runtime.bundle import AxisRange, TensorSpec
from vlmedge.tensorrt.profiles import graph_profiles

# -- imports and missing packages --------------------------------------------------------------


def test_importing_the_backend_imports_neither_tensorrt_nor_cuda():
    code = ("import sys, vlmedge.runtime.backends.tensorrt, vlmedge.runtime.backends.cuda;"
            "print([m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'cuda', 'pycuda')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _hide(monkeypatch, *modules):
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)  # `import m` now raises ImportError


def test_without_tensorrt_the_backend_says_what_to_install(monkeypatch, tmp_path):
    _hide(monkeypatch, "tensorrt")
    with pytest.raises(BuildError) as e:
        TensorRTBackend(tmp_path, {"graphs": {}}, None)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "pip install tensorrt" in msg and "system TensorRT" in msg


def test_without_cuda_python_or_pycuda_the_device_layer_names_both(monkeypatch):
    monkeypatch.setattr(cuda, "_API", None)
    _hide(monkeypatch, "cuda", "cuda.bindings", "cuda.cudart", "pycuda", "pycuda.driver")
    for call in (cuda.Stream, lambda: cuda.DeviceBuffer(16), cuda.device_properties):
        with pytest.raises(BuildError) as e:
            call()
        msg = str(e.value)
        assert len(msg.splitlines()) == 1 and "pip install cuda-python" in msg and "pycuda" in msg


def test_cuda_python_errors_name_the_call():
    ok, bad = SimpleNamespace(name="cudaSuccess"), SimpleNamespace(name="cudaErrorMemoryAllocation")
    rt = SimpleNamespace(cudaError_t=SimpleNamespace(cudaSuccess=ok), cudaMalloc=lambda n: (bad, 0))
    with pytest.raises(BuildError, match="cudaMalloc failed: cudaErrorMemoryAllocation"):
        cuda._CudaPython(rt).malloc(64)
    fine = SimpleNamespace(cudaError_t=rt.cudaError_t, cudaMalloc=lambda n: (ok, 4096))
    assert cuda._CudaPython(fine).malloc(64)[0] == 4096


# -- pure bookkeeping ---------------------------------------------------------------------------


def test_output_maxima_follow_the_engine_profile_then_the_manifest():
    axes = {"batch": AxisRange(1, 1, 16), "past_len": AxisRange(1, 16, 127), "total_len": AxisRange(2, 17, 128)}
    past = TensorSpec("past.0.self.key", "float32", ("batch", 4, "past_len", 32))
    present = TensorSpec("present.0.self.key", "float32", ("batch", 4, "total_len", 32))
    limits = axis_limits([past], {past.name: (8, 4, 63, 32)}, axes)  # the build narrowed batch and past_len
    assert limits == {"batch": 8, "past_len": 63, "total_len": 128}
    assert max_shape(present, limits) == (8, 4, 128, 32)


def test_an_input_the_engine_left_out_has_no_profile_and_is_skipped():
    axes = {"batch": AxisRange(1, 1, 16), "encoder_len": AxisRange(1, 8, 64)}
    states = TensorSpec("encoder_states", "float32", ("batch", "encoder_len", 32))
    mask = TensorSpec("encoder_mask", "int64", ("batch", "encoder_len"))  # BLIP's: nothing reads it
    limits = axis_limits([states, mask], {"encoder_states": (4, 16, 32)}, axes)  # the engine has no mask input
    assert limits == {"batch": 4, "encoder_len": 16}


def test_shapes_outside_a_profile():
    assert not outside((2, 5), (1, 1), (16, 5))
    assert outside((17, 5), (1, 1), (16, 5)) and outside((2, 6), (1, 1), (16, 5)) and outside((2,), (1, 1), (16, 5))


def test_gather_plan_copies_runs_of_rows():
    assert gather_plan([0, 1, 2], 10) == [(0, 0, 30)]
    assert gather_plan([2, 0, 1], 10) == [(0, 20, 10), (10, 0, 20)]
    assert gather_plan([0, 0, 1, 1], 10) == [(0, 0, 10), (10, 0, 20), (30, 10, 10)]
    rng = np.random.default_rng(0)
    for _ in range(50):
        src = rng.integers(0, 255, (6, 7), dtype=np.uint8)
        rows = rng.integers(0, 6, rng.integers(1, 12))
        dst = np.zeros((len(rows), 7), np.uint8)
        for d, s, n in gather_plan(rows, 7):
            dst.reshape(-1)[d : d + n] = src.reshape(-1)[s : s + n]
        assert np.array_equal(dst, src[rows])


def _pool(buffers=2):
    addresses = iter(range(1000, 100000, 1000))
    return _Pool("decoder.present.0.self.key", 64, np.float32, lambda n: SimpleNamespace(ptr=next(addresses)),
                 buffers)


def test_decoders_ping_pong_between_two_buffers():
    pool = _pool()
    cache = SimpleNamespace(ptr=1, dims=(1,))  # the first past comes from decoder_init's buffers
    written = []
    for _ in range(6):  # each step: past is the cache the loop holds, present a buffer it does not
        present = pool.acquire((1, 4))
        assert present.ptr != cache.ptr
        written.append(present.ptr)
        cache = present  # the loop drops the old cache
    assert written == [1000, 2000] * 3 and len(pool.slots) == 2


def test_reordering_gathers_into_the_free_buffer_and_the_step_writes_back():
    pool = _pool()
    cache = pool.acquire((2, 4))  # a step's present, in buffer 1000
    reordered = pool.acquire((2, 4))  # take(): into the buffer not held
    del cache  # the loop replaces its cache with the reordered one
    present = pool.acquire((2, 4))
    assert (reordered.ptr, present.ptr) == (2000, 1000) and len(pool.slots) == 2


def test_a_third_buffer_only_while_two_values_are_held_and_sizes_are_checked():
    pool = _pool()
    a, b = pool.acquire((4, 4)), pool.acquire((4, 4))
    c = pool.acquire((4, 4))
    assert len({a.ptr, b.ptr, c.ptr}) == 3 and len(pool.slots) == 3
    with pytest.raises(InputError, match="larger than the engine's largest"):
        pool.acquire((5, 4))


def test_graph_keys_tell_parities_and_shapes_apart():
    def v(ptr, dims):
        return DeviceValue(ptr, dims, np.dtype(np.float32), None)

    even = graph_key({"past": v(1000, (1, 4, 3, 8)), "present": v(2000, (1, 4, 4, 8))})
    odd = graph_key({"past": v(2000, (1, 4, 3, 8)), "present": v(1000, (1, 4, 4, 8))})
    longer = graph_key({"past": v(1000, (1, 4, 4, 8)), "present": v(2000, (1, 4, 5, 8))})
    assert len({even, odd, longer}) == 3
    assert even == graph_key({"present": v(2000, (1, 4, 4, 8)), "past": v(1000, (1, 4, 3, 8))})


# -- the backend against a fake TensorRT on simulated device memory ------------------------------


class FakeCuda:
    """cuda.py's driver interface over host memory: a device pointer is an address inside one of
    the numpy blocks; a CUDA graph is the list of enqueues made during capture, replayed as recorded."""

    name, graphs = "fake", True

    def __init__(self, graphs=True):
        self.graphs = graphs
        self.blocks: dict[int, np.ndarray] = {}
        self.next = 1 << 20
        self.capturing: list | None = None
        self.counts = Counter()

    def device_properties(self):
        return "Fake GPU", "8.7"

    def stream_create(self):
        return "stream"

    def stream_handle(self, stream):
        return 7

    def stream_sync(self, stream):
        pass

    def stream_destroy(self, stream):
        pass

    def malloc(self, nbytes):
        ptr, self.next = self.next, self.next + nbytes + 4096  # a gap: overruns land outside every block
        self.blocks[ptr] = np.zeros(nbytes, np.uint8)
        self.counts["malloc"] += 1
        return ptr, ptr

    def free(self, handle):
        self.blocks.pop(handle, None)

    def malloc_host(self, nbytes):
        a = np.zeros(nbytes, np.uint8)
        return a, a

    def free_host(self, handle):
        pass

    def mem(self, ptr, nbytes) -> np.ndarray:
        base = max(b for b in self.blocks if b <= ptr)
        assert ptr - base + nbytes <= self.blocks[base].size, "access past the end of an allocation"
        return self.blocks[base][ptr - base : ptr - base + nbytes]

    def h2d(self, dst, host, stream):
        self.mem(dst, host.nbytes)[:] = host.reshape(-1).view(np.uint8)

    def d2h(self, host, src, stream):
        host.reshape(-1).view(np.uint8)[:] = self.mem(src, host.nbytes)

    def d2d(self, dst, src, nbytes, stream):
        self.counts["d2d"] += 1
        self.mem(dst, nbytes)[:] = self.mem(src, nbytes)

    def begin_capture(self, stream):
        assert self.capturing is None
        self.capturing = []

    def end_capture(self, stream):
        graph, self.capturing = self.capturing, None
        return graph

    def end_capture_on_error(self, stream):
        assert self.capturing is not None, "no capture to end"
        self.capturing = None
        self.counts["graphs destroyed"] += 1  # what the failed capture recorded is thrown away
        self.clear_error()  # as cuda-python's layer does after closing the capture

    def clear_error(self):
        self.counts["errors cleared"] += 1

    def instantiate(self, graph):
        return list(graph)

    def destroy_graph(self, graph):
        pass

    def launch(self, exe, stream):
        self.counts["launch"] += 1
        for enqueue in exe:
            enqueue()

    def destroy_exec(self, exe):
        pass


class FakeEngine:
    """A graph's ONNX run by onnxruntime, reading inputs from and writing outputs to fake device memory."""

    device_memory_size_v2 = 256

    def __init__(self, fake, graph):
        spec = fake.bundle.manifest.graphs[graph]
        self.fake, self.graph = fake, graph
        self.session = fake.sessions[graph]
        self.specs = {t.name: t for t in spec.inputs + spec.outputs}
        self.inputs = [t.name for t in spec.inputs]
        self.names = list(self.specs)
        self.num_io_tensors = len(self.names)

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return FakeTensorRT.TensorIOMode.INPUT if name in self.inputs else FakeTensorRT.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return np.dtype(self.specs[name].dtype)

    def get_tensor_shape(self, name):  # -1: a dynamic dimension, as TensorRT reports it
        return tuple(d if isinstance(d, int) else -1 for d in self.specs[name].shape)

    @property
    def num_optimization_profiles(self):
        return len(graph_profiles(self.fake.bundle.manifest, self.graph))

    def get_tensor_profile_shape(self, name, profile):  # as `vlmedge build` makes them
        dims = graph_profiles(self.fake.bundle.manifest, self.graph)[profile][name]
        return [dims[k] for k in ("min", "opt", "max")]

    def create_execution_context(self, strategy=0):
        self.fake.contexts += 1
        return FakeContext(self)

    def compute(self, shapes, addrs):
        mem = self.fake.device.mem
        feeds = {n: mem(addrs[n], int(np.prod(shapes[n])) * self.get_tensor_dtype(n).itemsize)
                 .view(self.get_tensor_dtype(n)).reshape(shapes[n]).copy() for n in self.inputs}
        return dict(zip([o.name for o in self.session.get_outputs()], self.session.run(None, feeds)))

    def execute(self, shapes, addrs):
        outs = self.compute(shapes, addrs)
        read = [(addrs[n], addrs[n] + int(np.prod(shapes[n])) * self.get_tensor_dtype(n).itemsize) for n in self.inputs]
        for n, a in outs.items():
            a = np.ascontiguousarray(a, dtype=self.get_tensor_dtype(n))
            lo, hi = addrs[n], addrs[n] + a.nbytes
            assert all(hi <= r0 or lo >= r1 for r0, r1 in read), f"{self.graph}.{n} overwrites an input"
            self.fake.device.mem(lo, a.nbytes)[:] = a.reshape(-1).view(np.uint8)


class FakeContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addrs, self._outs, self.profile = engine, {}, {}, None, 0

    def set_device_memory(self, ptr, size):
        self.memory = ptr

    def set_optimization_profile_async(self, index, stream_handle):
        self.profile = index
        return True

    def set_input_shape(self, name, dims):
        lo, _, hi = self.engine.get_tensor_profile_shape(name, self.profile)
        if outside(dims, lo, hi):
            return False
        self.shapes[name], self._outs = tuple(dims), None
        return True

    def set_tensor_address(self, name, ptr):
        self.addrs[name] = ptr
        if name in self.engine.inputs:
            self._outs = None
        return True

    def get_tensor_shape(self, name):
        if self._outs is None:
            self._outs = self.engine.compute(self.shapes, self.addrs)
        return self._outs[name].shape

    def execute_async_v3(self, stream_handle):
        shapes, addrs, device = dict(self.shapes), dict(self.addrs), self.engine.fake.device
        if device.capturing is not None and getattr(device, "refuse_capture", False):
            return False  # an engine with work CUDA graphs cannot capture
        if device.capturing is not None:  # a CUDA graph keeps the addresses and shapes of its capture
            device.capturing.append(lambda: self.engine.execute(shapes, addrs))
        else:
            self.engine.execute(shapes, addrs)
        return True


class FakeTensorRT:
    """The part of the tensorrt module the backend uses; a .plan file holds its graph's name."""

    __version__ = "10.3.0"

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    class TensorIOMode:
        INPUT, OUTPUT = "INPUT", "OUTPUT"

    class ExecutionContextAllocationStrategy:
        STATIC, USER_MANAGED = 0, 2

    @staticmethod
    def nptype(dtype):
        return dtype.type

    def __init__(self, bundle, device, sessions):
        self.bundle, self.device, self.sessions, self.contexts, self.runtimes = bundle, device, sessions, 0, []

    def Runtime(self, logger):
        fake = self
        runtime = SimpleNamespace(engine_host_code_allowed=False,
                                  deserialize_cuda_engine=lambda data: FakeEngine(fake, data.decode()))
        self.runtimes.append(runtime)
        return runtime


@pytest.fixture(scope="module")
def world():
    scs = list(scenes("test", 0, 6))
    return scs, [pick_questions(s)[0].text for s in scs]


@pytest.fixture
def fake(monkeypatch, shapes, ort_pipe, tmp_path):
    """A fake TensorRT and CUDA (its engines run the reference pipeline's onnxruntime sessions), an
    engine directory of fake plans, and `make(**kw)` for a Pipeline on them."""
    bundle = ort_pipe.bundle
    device = FakeCuda()
    trt = FakeTensorRT(bundle, device, ort_pipe.backend.sessions)
    monkeypatch.setattr(cuda, "_API", device)
    monkeypatch.setattr(tensorrt_import, "load", lambda: trt)
    for g in bundle.manifest.graphs:
        (tmp_path / f"{g}.plan").write_bytes(g.encode())
    engines = {"tensorrt": "10.3.0", "flags": {"version_compatible": False},
               "graphs": {g: {"file": f"{g}.plan"} for g in bundle.manifest.graphs}}

    def make(**kw):
        pipe = vlmedge.load(shapes)
        pipe.backend = TensorRTBackend(tmp_path, engines, bundle.manifest, **kw)
        return pipe

    return SimpleNamespace(device=device, trt=trt, engines=engines, dir=tmp_path, manifest=bundle.manifest, make=make)


def test_greedy_captions_match_onnxruntime_without_copying_the_cache(fake, ort_pipe, world):
    images = [s.image for s in world[0]]
    pipe = fake.make()
    assert pipe.backend.name == "tensorrt/10.3.0"
    for batch in (4, 1):
        assert pipe.caption(images, batch_size=batch, return_ids=True) == \
            ort_pipe.caption(images, batch_size=batch, return_ids=True)
    assert fake.device.counts["d2d"] == 0  # greedy: present becomes the next past by address alone
    step = pipe.backend.engines["decoder"]
    assert all(len(step.pools[n].slots) == 2 for n in step.outputs if n.startswith("present."))


def test_beam_search_and_vqa_match_onnxruntime(fake, ort_pipe, world):
    scs, questions = world
    images = [s.image for s in scs]
    pipe = fake.make()
    assert pipe.caption(images, num_beams=3, batch_size=2, return_ids=True) == \
        ort_pipe.caption(images, num_beams=3, batch_size=2, return_ids=True)
    assert fake.device.counts["d2d"] > 0  # beams were expanded and reordered on the device
    assert pipe.vqa(images, questions, return_ids=True) == ort_pipe.vqa(images, questions, return_ids=True)
    assert pipe.vqa(images[:2], questions[:2], num_beams=2) == ort_pipe.vqa(images[:2], questions[:2], num_beams=2)


def test_cuda_graphs_replay_decoders_from_the_second_sequence_on(fake, ort_pipe, world):
    images = [s.image for s in world[0][:2]]
    pipe = fake.make(cuda_graph=True)
    expected = ort_pipe.caption(images, batch_size=2, return_ids=True)
    assert pipe.caption(images, batch_size=2, return_ids=True) == expected
    captured = len(pipe.backend._graphs)
    assert captured > 0 and fake.device.counts["launch"] == 0
    steps = max(len(g.ids) for g in expected) - 1
    assert pipe.caption(images, batch_size=2, return_ids=True) == expected
    assert len(pipe.backend._graphs) == captured and fake.device.counts["launch"] == steps
    # two beams of one image: the same batch of 2, but cross K/V elsewhere and the cache reordered
    # (either parity); graphs must only replay where every address is the same
    beams = ort_pipe.caption(images[:1], num_beams=2, return_ids=True)
    for _ in range(2):
        assert pipe.caption(images[:1], num_beams=2, return_ids=True) == beams
    assert fake.device.counts["launch"] > steps


def test_cuda_graphs_off_where_the_cuda_layer_cannot_capture(fake, ort_pipe, world):
    fake.device.graphs = False
    messages = []
    pipe = fake.make(cuda_graph=True, warn=messages.append)
    assert pipe.backend._graphs is None and "CUDA graphs need cuda-python" in messages[0]
    images = [s.image for s in world[0][:2]]
    assert pipe.caption(images) == ort_pipe.caption(images)


def test_a_failed_capture_is_cleaned_up_and_the_step_runs_plainly(fake, ort_pipe, world):
    fake.device.refuse_capture = True
    messages = []
    pipe = fake.make(cuda_graph=True, warn=messages.append)
    images = [s.image for s in world[0][:2]]
    assert pipe.caption(images, return_ids=True) == ort_pipe.caption(images, return_ids=True)
    assert len(messages) == 1 and "could not be captured as a CUDA graph" in messages[0]
    assert fake.device.capturing is None  # the stream left capture mode
    assert fake.device.counts["graphs destroyed"] == 1 and fake.device.counts["errors cleared"] == 1
    assert pipe.backend._graphs is None and pipe.backend.graph_launches == 0


def test_cuda_graph_capture_closes_and_clears_on_every_failure():
    """cuda.CudaGraph.capture over cuda-python's calls, as trtexec ends a failed capture."""
    calls = []
    ok, invalid = SimpleNamespace(name="cudaSuccess"), SimpleNamespace(name="cudaErrorStreamCaptureInvalidated")

    def rt(end_error):
        return SimpleNamespace(
            cudaError_t=SimpleNamespace(cudaSuccess=ok),
            cudaStreamCaptureMode=SimpleNamespace(cudaStreamCaptureModeThreadLocal="thread-local"),
            cudaStreamBeginCapture=lambda s, mode: calls.append(("begin", mode)) or (ok,),
            cudaStreamEndCapture=lambda s: calls.append("end") or ((end_error, 0) if end_error is invalid else (ok, 99)),
            cudaGraphDestroy=lambda g: calls.append(("destroy", g)) or (ok,),
            cudaGetLastError=lambda: calls.append("clear") or (ok,),
            cudaGraphInstantiateWithFlags=lambda g, f: (ok, "exe"))

    def failing():
        raise BuildError("decoder: TensorRT could not run the engine")

    for end_error, destroyed in ((ok, [("destroy", 99)]), (invalid, [])):
        calls.clear()
        api = cuda._CudaPython(rt(end_error))
        cuda._API = api
        try:
            with pytest.raises(BuildError, match="could not run"):
                cuda.CudaGraph.capture(SimpleNamespace(raw="s"), failing)
        finally:
            cuda._API = None
        assert calls == [("begin", "thread-local"), "end", *destroyed, "clear"]


class FakePyCudaDriver:
    """pycuda.driver's calls, where (as in CUDA) a driver call needs a context current on its thread."""

    class Error(Exception):
        pass

    def __init__(self):
        self.local = __import__("threading").local()
        driver = self

        class Context:
            def push(self):
                driver._stack().append(self)

            @staticmethod
            def pop():
                driver._stack().pop()

        self.Context = Context
        self.primary = Context()

    def _stack(self):
        if not hasattr(self.local, "stack"):
            self.local.stack = []
        return self.local.stack

    def _current(self):
        if not self._stack():
            raise self.Error("cuMemAlloc failed: invalid device context")

    def mem_alloc(self, n):
        self._current()
        return 4096

    def Stream(self):
        self._current()
        return SimpleNamespace(handle=7, synchronize=self._current)


def test_pycuda_calls_work_from_any_thread():
    import threading

    drv = FakePyCudaDriver()
    drv.primary.push()  # what pycuda.autoprimaryctx does, on the importing thread only
    api = cuda._PyCuda(drv, drv.primary)
    results, errors = [], []

    def worker():
        try:
            results.append(api.malloc(64)[0])
            api.stream_sync(api.stream_create())
        except BuildError as e:
            errors.append(str(e))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert not errors and results == [4096]
    assert drv._stack() == [drv.primary]  # every push popped again


def test_the_older_cuda_cudart_layout_is_used_when_cuda_bindings_is_absent(monkeypatch):
    import types

    monkeypatch.setattr(cuda, "_API", None)
    cudart = types.ModuleType("cuda.cudart")
    package = types.ModuleType("cuda")
    package.cudart = cudart
    monkeypatch.setitem(sys.modules, "cuda", package)
    monkeypatch.setitem(sys.modules, "cuda.cudart", cudart)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)  # cuda-python before 12.6
    a = cuda.api()
    assert isinstance(a, cuda._CudaPython) and a.rt is cudart and a.layout == "cuda.cudart"


def test_host_values_device_values_take_and_to_host(fake, ort_pipe, world):
    backend = fake.make().backend
    px = ort_pipe.images([s.image for s in world[0][:3]])
    ref = ort_pipe.backend.run("vision_encoder", {"pixel_values": px})["image_states"]
    kept = backend.run("vision_encoder", {"pixel_values": px.astype(np.float64)},  # cast to the engine's float32
                       keep=("image_states",))["image_states"]
    assert isinstance(kept, DeviceValue) and kept.shape() == ref.shape
    np.testing.assert_allclose(backend.to_host(kept), ref, rtol=1e-5, atol=1e-5)
    assert np.array_equal(backend.to_host(backend.take(kept, np.array([2, 0, 0]))), backend.to_host(kept)[[2, 0, 0]])
    assert np.array_equal(backend.take(ref, np.array([1])), ref[[1]])
    with pytest.raises(InputError, match="outside the engine's profile"):
        backend.run("vision_encoder", {"pixel_values": np.zeros((17, *px.shape[1:]), np.float32)})
    with pytest.raises(InputError, match="takes float32"):
        backend.run("cross_kv", {"encoder_states": DeviceValue(kept.ptr, (1, 4, 128), np.dtype(np.int64), None)})


def test_engine_directory_problems_are_build_errors(fake):
    (fake.dir / "decoder.plan").unlink()
    with pytest.raises(BuildError, match="decoder.plan: missing"):
        TensorRTBackend(fake.dir, fake.engines, fake.manifest)
    (fake.dir / "decoder.plan").write_bytes(b"decoder")
    TensorRTBackend(fake.dir, {**fake.engines, "flags": {"version_compatible": True}}, fake.manifest)
    assert fake.trt.runtimes[-1].engine_host_code_allowed  # version-compatible plans carry their runtime


def test_an_engine_directory_opens_through_vlmedge_load(fake, ort_pipe, world, monkeypatch):
    import shutil

    from vlmedge.runtime.bundle import sha256_file
    from vlmedge.tensorrt.engines import write_engine_manifest

    bundle = ort_pipe.bundle
    shutil.copy2(bundle.path / "manifest.json", fake.dir)
    shutil.copy2(bundle.tokenizer_path, fake.dir)
    graphs = {g: {"file": f"{g}.plan", "sha256": sha256_file(fake.dir / f"{g}.plan"), "source_sha256": spec.sha256}
              for g, spec in fake.manifest.graphs.items()}
    em = {"tensorrt": "10.3.0", "gpu": {"name": "Fake GPU", "compute_capability": "8.7"}, "flags": {}, "graphs": graphs}
    write_engine_manifest(fake.dir, em)
    pipe = vlmedge.load(fake.dir, device="tensorrt")
    assert pipe.backend.name == "tensorrt/10.3.0"
    images = [s.image for s in world[0][:3]]
    assert pipe.caption(images) == ort_pipe.caption(images)
    write_engine_manifest(fake.dir, {**em, "tensorrt": "10.7.0"})
    with pytest.raises(BuildError, match="engines built with TensorRT 10.7.0, this is TensorRT 10.3.0"):
        vlmedge.load(fake.dir, device="tensorrt")


# -- on a GPU: engines built from the shipped bundle ----------------------------------------------


@pytest.fixture(scope="module")
def engine_dir(shapes, tmp_path_factory):
    pytest.importorskip("tensorrt")
    from vlmedge.tensorrt.builder import build_engines

    out = tmp_path_factory.mktemp("trt") / "engines"
    build_engines(shapes, out)
    return out


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_engines_caption_like_onnxruntime_fp32(engine_dir, ort_pipe):
    images = [s.image for s in scenes("test", 0, 20)]
    pipe = vlmedge.load(engine_dir, device="tensorrt")
    assert pipe.backend.name.startswith("tensorrt/")
    expected = ort_pipe.caption(images)
    assert sum(a == b for a, b in zip(pipe.caption(images), expected)) >= 18
    beams = ort_pipe.caption(images[:6], num_beams=3)
    assert sum(a == b for a, b in zip(pipe.caption(images[:6], num_beams=3), beams)) >= 5


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_engines_with_cuda_graphs_caption_like_without(engine_dir, ort_pipe):
    engines = json.loads((engine_dir / "engines.json").read_text())
    images = [s.image for s in scenes("test", 0, 8)]
    plain = vlmedge.load(engine_dir, device="tensorrt").caption(images, batch_size=4)
    pipe = vlmedge.load(engine_dir, device="tensorrt")
    messages = []
    pipe.backend = TensorRTBackend(engine_dir, engines, pipe.manifest, warn=messages.append, cuda_graph=True)
    assert pipe.caption(images, batch_size=4) == plain  # the first batch captures, the second replays
    assert not messages and pipe.backend._graphs
    assert pipe.backend.graph_launches > 0  # decoder steps did replay from captured graphs


# -- the prefix contract: one decoder engine, two optimisation profiles -------------------------------


@pytest.fixture
def prefix_fake(monkeypatch, prefix_bundles, tmp_path, request):
    """The fake TensorRT over a decoder-only bundle (SmolVLM's architecture, or the family a test names by
    indirect parametrization)."""
    _, _, path = prefix_bundles(getattr(request, "param", "smolvlm"))
    ort = vlmedge.load(path)
    device = FakeCuda()
    trt = FakeTensorRT(ort.bundle, device, ort.backend.sessions)
    monkeypatch.setattr(cuda, "_API", device)
    monkeypatch.setattr(tensorrt_import, "load", lambda: trt)
    for g in ort.bundle.manifest.graphs:
        (tmp_path / f"{g}.plan").write_bytes(g.encode())
    engines = {"tensorrt": "10.3.0", "flags": {}, "graphs": {g: {"file": f"{g}.plan"} for g in ort.bundle.manifest.graphs}}

    def make():
        pipe = vlmedge.load(path)
        pipe.backend = TensorRTBackend(tmp_path, engines, ort.bundle.manifest)
        return pipe

    return SimpleNamespace(ort=ort, make=make, trt=trt)


def test_the_prefix_decoder_is_one_engine_with_a_prompt_and_a_step_profile(prefix_fake):
    m = prefix_fake.ort.manifest
    prompt, step = graph_profiles(m, "decoder")
    assert prompt["past.0.self.key"]["max"][2] == 1 and prompt["inputs_embeds"]["max"][1] == m.axes["seq_len"].max
    assert step["inputs_embeds"]["max"][1] == 1 and step["past.0.self.key"]["max"][2] == m.axes["past_len"].max
    assert step["attention_mask"]["max"][1] == m.axes["past_len"].max + 1
    assert [len(graph_profiles(m, g)) for g in ("vision_encoder", "embed")] == [1, 1]
    pipe = prefix_fake.make()
    engine = pipe.backend.engines["decoder"]
    assert len(engine.contexts) == 2 and [c.profile for c in engine.contexts] == [0, 1]


def test_prefix_captions_and_beams_on_tensorrt_match_onnxruntime(prefix_fake):
    images = [s.image for s in scenes("test", 0, 3)]
    questions = [pick_questions(s)[0].text for s in scenes("test", 0, 3)]
    pipe = prefix_fake.make()
    for kw in ({}, {"num_beams": 3}):
        assert pipe.caption(images, max_new_tokens=10, **kw) == prefix_fake.ort.caption(images, max_new_tokens=10, **kw)
        assert pipe.vqa(images, questions, max_new_tokens=6, **kw) == prefix_fake.ort.vqa(images, questions, max_new_tokens=6, **kw)
    # the prompt ran on profile 0, every later token on profile 1
    engine = pipe.backend.engines["decoder"]
    assert engine.contexts[0].shapes["past.0.self.key"][2] == 1
    assert engine.contexts[1].shapes["inputs_embeds"][1] == 1


@pytest.mark.parametrize("prefix_fake", ["idefics"], indirect=True)
def test_gated_cross_attention_on_tensorrt_matches_onnxruntime(prefix_fake):
    """IDEFICS: cross_kv is an engine of its own; the decoder's two profiles cover the images' rows (image_len)."""
    m = prefix_fake.ort.manifest
    prompt, step = graph_profiles(m, "decoder")
    for p in (prompt, step):
        assert p["cross.0.key"]["max"][2] == m.axes["image_len"].max and p["cross_mask"]["max"][2] == m.axes["image_len"].max
    assert step["cross_mask"]["max"][1] == 1 and len(graph_profiles(m, "cross_kv")) == 1
    images = [s.image for s in scenes("test", 0, 3)]
    questions = [pick_questions(s)[0].text for s in scenes("test", 0, 3)]
    pipe = prefix_fake.make()
    for kw in ({}, {"num_beams": 3}):
        assert pipe.vqa(images, questions, max_new_tokens=8, **kw) == prefix_fake.ort.vqa(images, questions, max_new_tokens=8, **kw)
    two = [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "and"},
                                        {"type": "image", "image": images[1]}, {"type": "text", "text": "?"}]}]
    assert pipe.chat(two, max_new_tokens=8) == prefix_fake.ort.chat(two, max_new_tokens=8)
