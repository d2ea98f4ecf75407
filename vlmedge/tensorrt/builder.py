"""`vlmedge build`: one strongly typed TensorRT engine per graph of a bundle.

Precision is decided in the bundle (FP16 from the ONNX tensor types, INT8 from Q/DQ nodes), so the
network is created strongly typed, as TensorRT 11 requires and 10.x supports; no FP16/INT8
builder flags. Profiles come from the manifest's axis ranges. The engine directory is written to a
temp directory and renamed into place: engines, the engine manifest, and the bundle's manifest and
tokenizer, so the runtime needs nothing else.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from vlmedge.errors import BuildError, first_line
from vlmedge.runtime.bundle import MANIFEST, AxisRange, load_bundle, sha256_file
from vlmedge.tensorrt.engines import write_engine_manifest
from vlmedge.tensorrt.profiles import axes_with, graph_profile

INSTALL_HINT = ("TensorRT's Python package is not installed: on Jetson use JetPack's system TensorRT "
                "(a venv with --system-site-packages); on x86, pip install tensorrt")


@dataclass(frozen=True)
class BuildOptions:
    workspace_gib: float = 4.0
    timing_cache: Path | None = None  # reused and updated; device-specific
    dla_core: int | None = None  # vision encoder on this DLA core, GPU fallback (static shapes: batch 1)
    version_compatible: bool = False
    hardware_compatible: bool = False  # Ampere and newer
    profiles: dict[str, AxisRange] = field(default_factory=dict)  # axis overrides
    force: bool = False


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BuildError(INSTALL_HINT) from None
    return trt


def gpu_facts() -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of the current device, through cuda-python or pycuda."""
    from vlmedge.runtime.backends.cuda import device_properties

    return device_properties()


def _network_flags(trt) -> int:
    # the value of STRONGLY_TYPED changed between TensorRT 10 and 11: read it, never hard-code it
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def build_engine(trt, logger, onnx_path: Path, profile: dict, o: BuildOptions, timing_cache: bytes | None,
                 use_dla: bool) -> tuple[bytes, bytes]:
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"{onnx_path}: TensorRT cannot parse it ({first_line(Exception(errors))})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(o.workspace_gib * (1 << 30)))
    cache = config.create_timing_cache(timing_cache or b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    p = builder.create_optimization_profile()
    present = {network.get_input(i).name for i in range(network.num_inputs)}
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
    return bytes(plan), bytes(config.get_timing_cache().serialize())


def build_engines(bundle_dir: Path, out: Path, options: BuildOptions | None = None,
                  on_graph: Callable[[str, str], None] = lambda g, s: None) -> dict:
    """Build every graph of a bundle into `out`; returns the engine manifest."""
    from vlmedge.outdir import OutputDir

    o = options or BuildOptions()
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    overrides = dict(o.profiles)
    if o.dla_core is not None:  # DLA runs static shapes only: the vision encoder at batch 1
        overrides.setdefault("batch", AxisRange(1, 1, 1))
    trt = import_tensorrt()
    gpu_name, cc = gpu_facts()
    with OutputDir(out, o.force) as writer:
        tmp = writer.path
        logger = trt.Logger(trt.Logger.WARNING)
        cache = o.timing_cache.read_bytes() if o.timing_cache and o.timing_cache.is_file() else None
        graphs = {}
        for name, g in m.graphs.items():
            on_graph(name, "building")
            use_dla = o.dla_core is not None and name == "vision_encoder"
            profile = graph_profile(m, name, overrides if use_dla else o.profiles)
            plan, cache = build_engine(trt, logger, bundle.graph_path(name), profile, o, cache, use_dla)
            (tmp / f"{name}.plan").write_bytes(plan)
            graphs[name] = {"file": f"{name}.plan", "sha256": sha256_file(tmp / f"{name}.plan"),
                            "source": g.file, "source_sha256": sha256_file(bundle.graph_path(name)),
                            "profile": {k: {kk: list(v) for kk, v in d.items()} for k, d in profile.items()},
                            "dla_core": o.dla_core if use_dla else None}
            on_graph(name, "done")
        if o.timing_cache and cache:
            o.timing_cache.write_bytes(cache)
        # the runtime keeps within the manifest's axes: write the ranges the engines were built for
        # (with DLA, batch 1 everywhere, since the vision encoder runs one image at a time)
        (tmp / MANIFEST).write_text(replace(m, axes=axes_with(m, overrides if o.dla_core is not None else o.profiles)).to_json())
        shutil.copy2(bundle.tokenizer_path, tmp / bundle.tokenizer_path.name)
        em = {"tensorrt": trt.__version__, "gpu": {"name": gpu_name, "compute_capability": cc},
              "flags": {"strongly_typed": True, "workspace_gib": o.workspace_gib, "dla_core": o.dla_core,
                        "version_compatible": o.version_compatible, "hardware_compatible": o.hardware_compatible},
              "precision": m.precision.get("dtype", "float32"), "bundle": str(bundle.path), "graphs": graphs}
        write_engine_manifest(tmp, em)
        writer.commit()
    return em
