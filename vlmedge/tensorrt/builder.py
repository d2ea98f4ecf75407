"""`vlmedge build`: one strongly typed TensorRT engine per graph of a bundle.

Precision is decided in the bundle (FP16 from the ONNX tensor types, INT8 from Q/DQ nodes), so the
network is created strongly typed, as TensorRT 11 requires and 10.x supports; no FP16/INT8
builder flags. Profiles come from the manifest's axis ranges. The engine directory is written to a
temp directory and renamed into place: engines, the engine manifest, and the bundle's manifest and
tokenizer, so the runtime needs nothing else.

A timing cache (`--timing-cache`) is read, attached and rewritten after the build. TensorRT refuses
a cache made by another GPU or TensorRT version (`set_timing_cache` returns False): the build then
says so in one line and starts a new cache, which replaces the file. DLA (`--dla-core`) runs static
shapes only: the vision encoder is built at batch 1 (so every graph runs at batch 1), a `--profile`
that asks for more is refused, and the core is checked against the device's DLA cores first.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from vlmedge import tensorrt_import
from vlmedge.errors import BuildError, InputError, first_line
from vlmedge.runtime.bundle import MANIFEST, AxisRange, Manifest, load_bundle, sha256_file
from vlmedge.runtime.prefix import extra_files
from vlmedge.tensorrt.engines import write_engine_manifest
from vlmedge.tensorrt.profiles import Profile, axes_with, graph_profile, graph_profiles

DLA_GRAPH = "vision_encoder"  # the one graph with static shapes at batch 1


@dataclass(frozen=True)
class BuildOptions:
    workspace_gib: float = 4.0
    timing_cache: Path | None = None  # reused and updated; device-specific
    dla_core: int | None = None  # vision encoder on this DLA core, GPU fallback (static shapes: batch 1)
    version_compatible: bool = False
    hardware_compatible: bool = False  # Ampere and newer
    profiles: dict[str, AxisRange] = field(default_factory=dict)  # axis overrides
    force: bool = False


def _warn(msg: str) -> None:
    from vlmedge.console import warn

    warn(msg)


def gpu_facts() -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of the current device, through cuda-python or pycuda."""
    from vlmedge.runtime.backends.cuda import device_properties

    return device_properties()


def _network_flags(trt) -> int:
    # the value of STRONGLY_TYPED changed between TensorRT 10 and 11: read it, never hard-code it
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def dla_overrides(manifest: Manifest, o: BuildOptions) -> dict[str, AxisRange]:
    """The axis ranges of the DLA graph (batch 1 unless the user narrowed batch to 1 already);
    InputError if a `--profile` asks DLA for a range, or the graph has another dynamic axis."""
    batch = o.profiles.get("batch")
    if batch is not None and not batch.min == batch.opt == batch.max == 1:
        raise InputError(f"--profile batch={batch.min}:{batch.opt}:{batch.max} with --dla-core: DLA runs static shapes, "
                         "so the vision encoder (and every graph after it) runs at batch 1; use --profile batch=1:1:1 "
                         "or leave batch out")
    overrides = {**o.profiles, "batch": AxisRange(1, 1, 1)}
    for name, dims in graph_profile(manifest, DLA_GRAPH, overrides).items():
        if not dims["min"] == dims["opt"] == dims["max"]:
            raise InputError(f"--dla-core: {DLA_GRAPH}.{name} has a dynamic shape {dims['min']} .. {dims['max']} and "
                             "DLA needs a static one; pin its axes with --profile AXIS=N:N:N")
    return overrides


def check_dla_core(builder, core: int, gpu_name: str) -> None:
    """Refuse a DLA core this device does not have (Orin Nano has none)."""
    n = int(builder.num_DLA_cores)
    if n == 0:
        raise InputError(f"--dla-core {core}: {gpu_name} has no DLA cores (AGX Orin and Orin NX have 2, Orin Nano none); "
                         "build without --dla-core")
    if not 0 <= core < n:
        raise InputError(f"--dla-core {core}: {gpu_name} has {n} DLA cores (0-{n - 1})")


def attach_timing_cache(config, data: bytes | None, where: str, warn: Callable[[str], None]) -> bool:
    """Attach a timing cache made from `data` (a new one if `data` is empty or TensorRT refuses it:
    another GPU or TensorRT version); False if TensorRT attaches none, then the build runs without."""
    if data:
        cache = config.create_timing_cache(data)
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return True
        warn(f"{where}: timing cache made by another GPU or TensorRT version, not used; a new one replaces it")
    cache = config.create_timing_cache(b"")
    return cache is not None and bool(config.set_timing_cache(cache, ignore_mismatch=False))


def build_engine(trt, logger, onnx_path: Path, profiles: list[Profile], o: BuildOptions, timing_cache: bytes | None,
                 use_dla: bool, warn: Callable[[str], None] = _warn) -> tuple[bytes, bytes | None]:
    """One engine with one optimisation profile per entry of `profiles` (its weights stored once,
    whatever the count); returns its plan and the timing cache after the build (None if none was attached)."""
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"{onnx_path}: TensorRT cannot parse it ({first_line(Exception(errors))})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(o.workspace_gib * (1 << 30)))
    cached = attach_timing_cache(config, timing_cache, str(o.timing_cache or "timing cache"), warn)
    present = {network.get_input(i).name for i in range(network.num_inputs)}
    for profile in profiles:
        p = builder.create_optimization_profile()
        for name, dims in profile.items():
            if name in present:  # a graph may leave out an input its family ignores (BLIP's cross-attention mask)
                p.set_shape(name, dims["min"], dims["opt"], dims["max"])
        config.add_optimization_profile(p)
    if use_dla:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = o.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    if o.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if o.hardware_compatible:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError(f"{onnx_path}: TensorRT could not build an engine (see its log above)")
    after = config.get_timing_cache() if cached else None
    return bytes(plan), (bytes(after.serialize()) if after is not None else timing_cache)


def _json_profile(profile: Profile) -> dict:
    return {k: {kk: list(v) for kk, v in d.items()} for k, d in profile.items()}


def build_engines(bundle_dir: Path, out: Path, options: BuildOptions | None = None,
                  on_graph: Callable[[str, str], None] = lambda g, s: None,
                  warn: Callable[[str], None] = _warn) -> dict:
    """Build every graph of a bundle into `out`; returns the engine manifest."""
    from vlmedge.outdir import OutputDir, write_file_atomic

    o = options or BuildOptions()
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    if m.target != "tensorrt-portable":
        raise BuildError(f"{bundle_dir}: an ONNX Runtime-target bundle (manifest target {m.target!r}, ONNX Runtime's "
                         "fused ops) cannot be built for TensorRT; build the portable bundle it was made from")
    overrides = dla_overrides(m, o) if o.dla_core is not None else dict(o.profiles)
    trt = tensorrt_import.load()
    gpu_name, cc = gpu_facts()
    if o.dla_core is not None:
        check_dla_core(trt.Builder(trt.Logger(trt.Logger.WARNING)), o.dla_core, gpu_name)
    with OutputDir(out, o.force) as writer:
        tmp = writer.path
        logger = trt.Logger(trt.Logger.WARNING)
        cache = o.timing_cache.read_bytes() if o.timing_cache and o.timing_cache.is_file() else None
        graphs = {}
        for name, g in m.graphs.items():
            on_graph(name, "building")
            use_dla = o.dla_core is not None and name == DLA_GRAPH
            profiles = graph_profiles(m, name, overrides if use_dla else o.profiles)
            plan, cache = build_engine(trt, logger, bundle.graph_path(name), profiles, o, cache, use_dla, warn)
            (tmp / f"{name}.plan").write_bytes(plan)
            graphs[name] = {"file": f"{name}.plan", "sha256": sha256_file(tmp / f"{name}.plan"),
                            "source": g.file, "source_sha256": sha256_file(bundle.graph_path(name)),
                            "profile": _json_profile(profiles[0]),
                            **({"profiles": [_json_profile(p) for p in profiles]} if len(profiles) > 1 else {}),
                            "dla_core": o.dla_core if use_dla else None}
            on_graph(name, "done")
        if o.timing_cache and cache:
            write_file_atomic(o.timing_cache, cache)
        # the runtime keeps within the manifest's axes: write the ranges the engines were built for
        # (with DLA, batch 1 everywhere, since the vision encoder runs one image at a time)
        (tmp / MANIFEST).write_text(replace(m, axes=axes_with(m, overrides if o.dla_core is not None else o.profiles)).to_json())
        shutil.copy2(bundle.tokenizer_path, tmp / bundle.tokenizer_path.name)
        for name in extra_files(bundle.manifest.prompt):  # InstructBLIP's vision-text tokenizer
            shutil.copy2(bundle.path / name, tmp / name)
        em = {"tensorrt": trt.__version__, "gpu": {"name": gpu_name, "compute_capability": cc},
              "flags": {"strongly_typed": True, "workspace_gib": o.workspace_gib, "dla_core": o.dla_core,
                        "version_compatible": o.version_compatible, "hardware_compatible": o.hardware_compatible},
              "precision": m.precision.get("dtype", "float32"), "bundle": str(bundle.path), "graphs": graphs}
        write_engine_manifest(tmp, em)
        writer.commit()
    return em
