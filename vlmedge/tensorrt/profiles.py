"""Optimisation profiles from a bundle's manifest: min/opt/max of every graph input.

Every named axis of an input takes its range from the manifest's `axes` (overridable, e.g. a
smaller max batch on a Jetson with little memory); fixed dimensions stay fixed. No range starts at
zero: the prompt runs after a hidden one-slot past (the `decoder` graph of either contract; schema 1
cross-attention bundles run it in a graph of its own, decoder_init), so past_len >= 1 always.
"""

from __future__ import annotations

from vlmedge.errors import InputError
from vlmedge.runtime.bundle import AxisRange, Manifest

Shape = tuple[int, ...]
Profile = dict[str, dict[str, Shape]]  # input -> {"min": shape, "opt": shape, "max": shape}


def parse_overrides(items: list[str] | None) -> dict[str, AxisRange]:
    """["batch=1:4:8", ...] -> {axis: AxisRange}."""
    out = {}
    for item in items or []:
        name, _, spec = item.partition("=")
        try:
            lo, opt, hi = (int(x) for x in spec.split(":"))
        except ValueError:
            raise InputError(f"--profile {item!r}: expected AXIS=MIN:OPT:MAX, e.g. batch=1:1:8") from None
        if not 1 <= lo <= opt <= hi:
            raise InputError(f"--profile {item!r}: expected 1 <= MIN <= OPT <= MAX")
        out[name] = AxisRange(lo, opt, hi)
    return out


def axes_with(manifest: Manifest, overrides: dict[str, AxisRange] | None = None) -> dict[str, AxisRange]:
    axes = dict(manifest.axes)
    for name, r in (overrides or {}).items():
        if name not in axes:
            raise InputError(f"--profile {name}: the bundle has no axis {name!r} (it has {', '.join(sorted(axes))})")
        declared = axes[name]
        if r.max > declared.max or r.min < declared.min:
            raise InputError(f"--profile {name}={r.min}:{r.opt}:{r.max}: outside the bundle's range "
                             f"{declared.min}:{declared.opt}:{declared.max} (axes.{name} in manifest.json)")
        axes[name] = r
    # the step's present is one longer than its past
    if "past_len" in axes and "total_len" in axes:
        p = axes["past_len"]
        axes["total_len"] = AxisRange(p.min + 1, p.opt + 1, p.max + 1)
    return axes


def graph_profile(manifest: Manifest, graph: str, overrides: dict[str, AxisRange] | None = None) -> Profile:
    """One profile covering every shape the graph takes (for a decoder: prompt and step alike)."""
    axes = axes_with(manifest, overrides)
    if graph == "decoder":  # total_len covers the prompt's (seq_len + 1) too
        s, p, t = axes["seq_len"], axes["past_len"], axes["total_len"]
        axes["total_len"] = AxisRange(2, t.opt, max(t.max, s.max + 1, p.max + 1))
    return _profile(manifest, graph, axes)


def graph_profiles(manifest: Manifest, graph: str, overrides: dict[str, AxisRange] | None = None) -> list[Profile]:
    """The optimisation profiles of a graph's engine. One for most graphs; two for the `decoder` of
    either contract, one engine (its weights once on the GPU) serving both phases: the prompt
    (seq_len tokens after the one hidden slot: past_len 1) and the step (seq_len 1), each tuned for
    its own shapes. The runtime picks the profile whose ranges hold a call's shapes."""
    if graph != "decoder":
        return [graph_profile(manifest, graph, overrides)]
    axes = axes_with(manifest, overrides)
    s, p = axes["seq_len"], axes["past_len"]
    prompt = {**axes, "past_len": AxisRange(1, 1, 1), "total_len": AxisRange(s.min + 1, s.opt + 1, s.max + 1)}
    step = {**axes, "seq_len": AxisRange(1, 1, 1), "total_len": AxisRange(p.min + 1, p.opt + 1, p.max + 1)}
    return [_profile(manifest, graph, prompt), _profile(manifest, graph, step)]


def _profile(manifest: Manifest, graph: str, axes: dict[str, AxisRange]) -> Profile:
    profile: Profile = {}
    for t in manifest.graphs[graph].inputs:
        dims = {k: tuple(d if isinstance(d, int) else getattr(axes[d], k) for d in t.shape) for k in ("min", "opt", "max")}
        profile[t.name] = dims
    return profile


def profiles(manifest: Manifest, overrides: dict[str, AxisRange] | None = None) -> dict[str, Profile]:
    return {g: graph_profile(manifest, g, overrides) for g in manifest.graphs}


def ort_tensorrt_options(profile: Profile | None, cache_dir: str, dtype: str = "float32") -> dict[str, str]:
    """ONNX Runtime TensorRT execution provider options for one graph: explicit profile shapes
    (`name:1x3x224x224,...`; None: let the provider size engines from the shapes it sees), an
    engine / timing cache directory so engines are built once, and the bundle's precision.

    The provider builds weakly typed networks and has no strongly typed option, so reduced precision
    must be allowed explicitly: FP16 bundles enable FP16 kernels, INT8 bundles (explicit Q/DQ, no
    calibration table) enable INT8; an FP32 bundle stays FP32."""
    def shapes(kind: str) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, dims[kind]))}" for name, dims in (profile or {}).items())

    opts = {
        "trt_engine_cache_enable": "True", "trt_engine_cache_path": cache_dir,
        "trt_timing_cache_enable": "True", "trt_timing_cache_path": cache_dir,
    }
    if profile:
        opts.update({"trt_profile_min_shapes": shapes("min"), "trt_profile_opt_shapes": shapes("opt"),
                     "trt_profile_max_shapes": shapes("max")})
    if dtype == "float16":
        opts["trt_fp16_enable"] = "True"
    elif dtype == "int8":
        opts["trt_int8_enable"] = "True"
    return opts
