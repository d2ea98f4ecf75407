"""What of the TensorRT path runs without a GPU: profiles from every family's manifest, the engine
manifest checks, ONNX Runtime's TensorRT EP options, and clear errors without TensorRT."""

import subprocess
import sys
from types import SimpleNamespace

import pytest

from vlmedge.cli import main
from vlmedge.errors import BuildError, InputError
from vlmedge.runtime.bundle import AxisRange, load_bundle, sha256_file
from vlmedge.tensorrt.engines import check_engine_manifest, read_engine_manifest, write_engine_manifest
from vlmedge.tensorrt.profiles import graph_profile, ort_tensorrt_options, parse_overrides, profiles

ALL = ["blip-caption", "blip-vqa", "vit-gpt2", "vit-bert", "shapes-vlm"]


@pytest.mark.parametrize("name", ALL)
def test_profiles_cover_every_input_within_the_declared_axes(bundles, name):
    m = load_bundle(bundles[name][2]).manifest
    ps = profiles(m)
    assert set(ps) == set(m.graphs)
    for graph, profile in ps.items():
        assert [t.name for t in m.graphs[graph].inputs] == list(profile)
        for t in m.graphs[graph].inputs:
            dims = profile[t.name]
            for i, d in enumerate(t.shape):
                lo, opt, hi = dims["min"][i], dims["opt"][i], dims["max"][i]
                assert 1 <= lo <= opt <= hi  # never a zero-length input
                if isinstance(d, int):
                    assert lo == opt == hi == d
                else:
                    assert (lo, opt, hi) == (m.axes[d].min, m.axes[d].opt, m.axes[d].max)
    step = ps["decoder"]
    past = step["past.0.self.key"]
    assert past["max"][0] == m.axes["batch"].max and past["max"][2] == m.axes["past_len"].max


def test_profile_overrides(bundles):
    m = load_bundle(bundles["shapes-vlm"][2]).manifest
    o = parse_overrides(["batch=1:2:4"])
    assert o == {"batch": AxisRange(1, 2, 4)}
    assert graph_profile(m, "vision_encoder", o)["pixel_values"] == {"min": (1, 3, 64, 64), "opt": (2, 3, 64, 64), "max": (4, 3, 64, 64)}
    with pytest.raises(InputError, match="expected AXIS=MIN:OPT:MAX"):
        parse_overrides(["batch=4"])
    with pytest.raises(InputError, match="outside the bundle's range"):
        graph_profile(m, "vision_encoder", parse_overrides(["batch=1:1:64"]))
    with pytest.raises(InputError, match="has no axis 'beams'"):
        graph_profile(m, "vision_encoder", parse_overrides(["beams=1:1:2"]))


def test_ort_tensorrt_ep_options(bundles, tmp_path):
    m = load_bundle(bundles["shapes-vlm"][2]).manifest
    opts = ort_tensorrt_options(graph_profile(m, "decoder"), str(tmp_path))
    assert opts["trt_profile_min_shapes"].startswith("input_ids:1x1,attention_mask:1x2,position_ids:1x1,encoder_mask:1x1,"
                                                     "past.0.self.key:1x4x1x32")
    assert "past.0.self.key:16x4x48x32" in opts["trt_profile_max_shapes"]  # 47 tokens and the hidden slot
    assert opts["trt_engine_cache_path"] == str(tmp_path) and opts["trt_engine_cache_enable"] == "True"


def _engine_manifest(m, **over):
    em = {"tensorrt": "10.3.0", "gpu": {"name": "Orin", "compute_capability": "8.7"},
          "flags": {"version_compatible": False, "hardware_compatible": False},
          "graphs": {g: {"file": f"{g}.plan", "sha256": "0" * 64, "source_sha256": s.sha256} for g, s in m.graphs.items()}}
    em.update(over)
    return em


def test_engine_manifest_checks(bundles, tmp_path):
    m = load_bundle(bundles["shapes-vlm"][2]).manifest
    write_engine_manifest(tmp_path, _engine_manifest(m))
    em = read_engine_manifest(tmp_path)
    check_engine_manifest(em, m, "10.3.0", "8.7")  # the same TensorRT and GPU: fine
    with pytest.raises(BuildError, match="built with TensorRT 10.3.0, this is TensorRT 10.7.0; rebuild"):
        check_engine_manifest(em, m, "10.7.0", "8.7")
    with pytest.raises(BuildError, match="built for compute capability 8.7 \\(Orin\\), this GPU is 9.0; rebuild"):
        check_engine_manifest(em, m, "10.3.0", "9.0")
    changed = _engine_manifest(m)
    changed["graphs"]["decoder"]["source_sha256"] = "0" * 64
    with pytest.raises(BuildError, match="decoder.plan was built from a different decoder.onnx"):
        check_engine_manifest(changed, m, "10.3.0", "8.7")
    compatible = _engine_manifest(m, flags={"version_compatible": True, "hardware_compatible": True})
    check_engine_manifest(compatible, m, "10.8.0", "9.0")  # later 10.x, another Ampere+ GPU
    with pytest.raises(BuildError, match="run on 10.x >= 10.3.0, not 11.0.0"):
        check_engine_manifest(compatible, m, "11.0.0", "9.0")
    with pytest.raises(BuildError, match="need an Ampere or newer GPU"):
        check_engine_manifest(compatible, m, "10.3.0", "7.5")
    (tmp_path / "engines.json").write_text('{"schema_version": 9}')
    with pytest.raises(BuildError, match="schema_version 9 is not supported"):
        read_engine_manifest(tmp_path)
    with pytest.raises(BuildError, match="is not an engine directory"):
        read_engine_manifest(tmp_path / "nope")


def test_build_without_tensorrt_is_one_line_and_writes_nothing(bundles, tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401  (only whether it imports)
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    assert main(["build", str(bundles["shapes-vlm"][2]), "--out", str(tmp_path / "engines")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install tensorrt" in err and "system TensorRT" in err
    assert not (tmp_path / "engines").exists()


def test_tensorrt_modules_import_nothing_heavy():
    code = ("import sys, vlmedge.tensorrt.profiles, vlmedge.tensorrt.engines, vlmedge.tensorrt.builder;"
            "print([m for m in ('tensorrt', 'torch', 'pycuda', 'cuda') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_an_engine_directory_without_tensorrt_is_one_clear_error(bundles, tmp_path, capsys):
    import shutil

    try:
        import tensorrt  # noqa: F401  (only whether it imports)
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    src = bundles["shapes-vlm"][2]
    d = tmp_path / "engines"
    d.mkdir()
    for f in ("manifest.json", "tokenizer.json"):
        shutil.copy2(src / f, d / f)
    m = load_bundle(src).manifest
    em = _engine_manifest(m)
    for g, e in em["graphs"].items():  # stand-in plans with their hashes: the directory is sound
        (d / e["file"]).write_bytes(g.encode())
        e["sha256"] = sha256_file(d / e["file"])
    write_engine_manifest(d, em)
    img = tmp_path / "x.png"
    from vlmedge.data.scenes import scenes

    next(scenes("test", 0, 1)).pil().save(img)
    assert main(["caption", str(d), str(img)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install tensorrt" in err


# -- the builder against a fake TensorRT (no GPU): timing cache and DLA ---------------------------


class FakeBuilderTensorRT:
    """The part of the tensorrt module the builder uses. A timing cache is bytes tagged with the
    TensorRT version and GPU that made it; TensorRT refuses (set_timing_cache -> False) any other."""

    __version__ = "10.3.0"
    TAG = b"trt-10.3.0/sm87:"

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 1

    class MemoryPoolType:
        WORKSPACE = 0

    class DeviceType:
        GPU, DLA = "GPU", "DLA"

    class BuilderFlag:
        GPU_FALLBACK, VERSION_COMPATIBLE = "GPU_FALLBACK", "VERSION_COMPATIBLE"

    def __init__(self, dla_cores=0):
        self.dla_cores, self.configs = dla_cores, []

    def Builder(self, logger):
        return _FakeBuilder(self)

    def OnnxParser(self, network, logger):
        return _FakeParser(network)


class _FakeParser:
    num_errors = 0

    def __init__(self, network):
        self.network = network

    def parse_from_file(self, path):
        import onnx

        graph = onnx.load(path, load_external_data=False).graph
        self.network.inputs = [i.name for i in graph.input]
        self.network.graph = path
        return True


class _FakeNetwork:
    def __init__(self):
        self.inputs, self.graph = [], None

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, i):
        return SimpleNamespace(name=self.inputs[i])


class _FakeCache:
    def __init__(self, data: bytes):
        self.data = data

    def serialize(self):
        return FakeBuilderTensorRT.TAG + self.data.removeprefix(FakeBuilderTensorRT.TAG) + b"+"


class _FakeConfig:
    def __init__(self):
        self.flags, self.profiles, self.cache, self.default_device_type, self.DLA_core = set(), [], None, "GPU", -1

    def set_memory_pool_limit(self, pool, size):
        pass

    def create_timing_cache(self, data):
        return _FakeCache(bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch):
        if cache.data and not cache.data.startswith(FakeBuilderTensorRT.TAG):
            return False  # another GPU or TensorRT version: nothing attached
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache

    def add_optimization_profile(self, p):
        self.profiles.append(p)

    def set_flag(self, flag):
        self.flags.add(flag)


class _FakeBuilder:
    def __init__(self, trt):
        self.trt = trt
        self.num_DLA_cores = trt.dla_cores

    def create_network(self, flags):
        return _FakeNetwork()

    def create_builder_config(self):
        config = _FakeConfig()
        self.trt.configs.append(config)
        return config

    def create_optimization_profile(self):
        shapes = {}
        return SimpleNamespace(shapes=shapes, set_shape=lambda n, lo, opt, hi: shapes.__setitem__(n, (lo, opt, hi)))

    def build_serialized_network(self, network, config):
        if config.cache is not None:
            config.cache.data += b"x"  # the build's timings
        return b"plan of " + str(network.graph).encode()


@pytest.fixture
def fake_builder(monkeypatch):
    """Install a fake TensorRT (and a fake GPU for its facts); returns a factory taking the DLA core count."""
    from vlmedge import tensorrt_import
    from vlmedge.tensorrt import builder

    made = {}

    def install(dla_cores=0):
        made["trt"] = FakeBuilderTensorRT(dla_cores)
        return made["trt"]

    monkeypatch.setattr(tensorrt_import, "load", lambda: made["trt"])
    monkeypatch.setattr(builder, "gpu_facts", lambda: ("Fake Orin", "8.7"))
    return install


def test_a_foreign_timing_cache_is_replaced_not_a_traceback(bundles, tmp_path, fake_builder):
    from vlmedge.tensorrt.builder import BuildOptions, build_engines

    trt = fake_builder()
    cache = tmp_path / "orin.timing"
    cache.write_bytes(b"made on another GPU")
    messages = []
    build_engines(bundles["shapes-vlm"][2], tmp_path / "engines", BuildOptions(timing_cache=cache), warn=messages.append)
    assert len(messages) == 1 and "timing cache made by another GPU or TensorRT version" in messages[0]
    assert cache.read_bytes().startswith(FakeBuilderTensorRT.TAG)  # a new cache replaced the foreign one
    assert all(c.cache is not None for c in trt.configs)  # every graph built with a cache attached
    # the next build reuses it: attached from the file, no warning, and it grows
    before = cache.read_bytes()
    build_engines(bundles["shapes-vlm"][2], tmp_path / "engines2", BuildOptions(timing_cache=cache), warn=messages.append)
    assert len(messages) == 1 and trt.configs[-len(trt.configs) // 2].cache.data.startswith(before)
    assert len(cache.read_bytes()) > len(before)


def test_dla_is_checked_against_the_device_and_gets_static_shapes(bundles, tmp_path, fake_builder):
    from vlmedge.tensorrt.builder import BuildOptions, build_engines

    src = bundles["shapes-vlm"][2]
    fake_builder(dla_cores=0)  # Orin Nano
    with pytest.raises(InputError, match="--dla-core 0: Fake Orin has no DLA cores"):
        build_engines(src, tmp_path / "e", BuildOptions(dla_core=0))
    fake_builder(dla_cores=2)  # AGX Orin
    with pytest.raises(InputError, match="--dla-core 2: Fake Orin has 2 DLA cores \\(0-1\\)"):
        build_engines(src, tmp_path / "e", BuildOptions(dla_core=2))
    with pytest.raises(InputError, match="--profile batch=1:1:4 with --dla-core: DLA runs static shapes"):
        build_engines(src, tmp_path / "e", BuildOptions(dla_core=0, profiles=parse_overrides(["batch=1:1:4"])))
    assert not (tmp_path / "e").exists()
    trt = fake_builder(dla_cores=2)
    em = build_engines(src, tmp_path / "e", BuildOptions(dla_core=1))
    dla = [c for c in trt.configs if c.default_device_type == "DLA"]
    assert len(dla) == 1 and dla[0].DLA_core == 1 and "GPU_FALLBACK" in dla[0].flags
    shapes = dla[0].profiles[0].shapes["pixel_values"]
    assert shapes[0] == shapes[1] == shapes[2] == (1, 3, 64, 64)  # min = opt = max
    assert em["graphs"]["vision_encoder"]["dla_core"] == 1 and em["graphs"]["decoder"]["dla_core"] is None
    assert load_bundle(tmp_path / "e").manifest.axes["batch"] == AxisRange(1, 1, 1)


def test_a_gated_cross_attention_bundle_builds_an_engine_per_graph(prefix_bundles, tmp_path, fake_builder):
    """IDEFICS: cross_kv an engine of its own, the decoder one engine whose two profiles take the images' rows."""
    from vlmedge.tensorrt.builder import BuildOptions, build_engines

    src = prefix_bundles("idefics")[2]
    trt = fake_builder()
    em = build_engines(src, tmp_path / "e", BuildOptions())
    assert set(em["graphs"]) == {"vision_encoder", "cross_kv", "embed", "decoder"}
    m = load_bundle(src).manifest
    decoder = [c for c in trt.configs if len(c.profiles) == 2]
    assert len(decoder) == 1
    for p in decoder[0].profiles:
        assert p.shapes["cross.0.key"][2][2] == p.shapes["cross_mask"][2][2] == m.axes["image_len"].max
    assert load_bundle(tmp_path / "e").manifest.prompt == m.prompt


@pytest.mark.parametrize("contract", ["cross-attention", "prefix"])
def test_a_vision_graph_that_reads_text_gets_its_profile_and_its_tokenizer(blip2_t5_bundles, blip2_bundles, tmp_path,
                                                                           fake_builder, contract):
    """InstructBLIP (Flan-T5 and Vicuna): the vision engine's profile covers the Q-Former's text length, and the
    engine directory carries the Q-Former's tokenizer, hash-checked on load."""
    from vlmedge.tensorrt.builder import BuildOptions, build_engines

    src = blip2_t5_bundles("instructblip-t5")[2] if contract == "cross-attention" else blip2_bundles("instructblip-vicuna")[2]
    trt = fake_builder()
    build_engines(src, tmp_path / "e", BuildOptions())
    m = load_bundle(src).manifest
    vision = next(c for c in trt.configs if any("qformer_input_ids" in p.shapes for p in c.profiles))
    lo, _, hi = vision.profiles[0].shapes["qformer_input_ids"]
    assert lo[1] == 1 and hi[1] == m.axes["vision_text_len"].max == m.prompt["vision_text"]["max_length"]
    name = m.prompt["vision_text"]["tokenizer"]
    assert (tmp_path / "e" / name).read_bytes() == (src / name).read_bytes()
    assert load_bundle(tmp_path / "e").manifest.prompt == m.prompt
