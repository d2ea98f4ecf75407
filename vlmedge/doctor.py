"""`vlmedge doctor`: what this machine has for the GPU path, and what each `--device` would run on.

Every probe is guarded: a missing package, a missing GPU or a driver that refuses is a line in the
report, never an exception, so the report works on any machine (and `make gpu-check` starts with it).
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vlmedge.errors import VlmedgeError, first_line


def _onnxruntime() -> dict[str, Any]:
    from vlmedge.runtime.backends.onnxruntime import clash, import_onnxruntime, installed_distributions

    found = installed_distributions()
    r: dict[str, Any] = {"packages": found}
    try:
        ort = import_onnxruntime()
    except VlmedgeError as e:
        return {**r, "installed": False, "reason": str(e)}
    except Exception as e:  # e.g. a wheel built against another numpy
        return {**r, "installed": False, "reason": f"import onnxruntime failed ({first_line(e)})"}
    r.update(installed=True, version=ort.__version__, path=ort.__file__, providers=list(ort.get_available_providers()))
    if message := clash(found):
        r["problem"] = message
    return r


def _tensorrt() -> dict[str, Any]:
    from vlmedge import tensorrt_import

    try:
        trt = tensorrt_import.load()
    except VlmedgeError as e:
        return {"installed": False, "reason": str(e)}
    return {"installed": True, "version": trt.__version__}


def _nvidia_smi() -> str | None:
    """`nvidia-smi -L`'s first line, if the tool is there and sees a GPU."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [l for l in out.stdout.splitlines() if l.startswith("GPU")]
    return lines[0] if out.returncode == 0 and lines else None


def _cuda() -> dict[str, Any]:
    from vlmedge.runtime.backends import cuda

    try:
        a = cuda.api()
    except VlmedgeError as e:
        return {"layer": None, "reason": str(e), "devices": 0, "nvidia_smi": _nvidia_smi()}
    r: dict[str, Any] = {"layer": a.name, "module": getattr(a, "layout", a.name), "version": _layer_version(a.name),
                         "cuda_graphs": bool(a.graphs)}
    try:
        r["devices"] = cuda.device_count()
        r["driver_cuda"] = cuda.driver_version()
        if r["devices"]:
            r["gpu"], r["compute_capability"] = cuda.device_properties()
    except VlmedgeError as e:
        r.update(devices=0, reason=str(e))
    return r


def _layer_version(name: str) -> str | None:
    from importlib import metadata

    for dist in (("cuda-bindings", "cuda-python") if name == "cuda-python" else ("pycuda",)):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            pass
    return None


def _dla_cores(trt_ok: bool, gpu_ok: bool) -> int | str:
    if not (trt_ok and gpu_ok):
        return "unknown (needs TensorRT and a GPU)"
    from vlmedge import tensorrt_import

    try:
        trt = tensorrt_import.load()
        return int(trt.Builder(trt.Logger(trt.Logger.ERROR)).num_DLA_cores)
    except Exception as e:  # TensorRT could not create a builder on this device
        return f"unknown ({first_line(e)})"


def _devices(r: dict[str, Any]) -> dict[str, str]:
    """What `--device cpu|cuda|tensorrt` runs a bundle on, and what runs an engine directory."""
    from vlmedge.runtime.backends.onnxruntime import providers_for

    ort, gpu = r["onnxruntime"], r["cuda"].get("devices", 0) > 0 or bool(r["cuda"].get("nvidia_smi"))
    out: dict[str, str] = {}
    for device in ("cpu", "cuda", "tensorrt"):
        if not ort["installed"]:
            out[device] = "nothing: " + ort["reason"]
            continue
        said: list[str] = []
        first = providers_for(device, ort["providers"], warn=said.append)[0]
        if said:
            note = f": {said[0]}"
        elif first != "CPUExecutionProvider" and not gpu:
            note = " (listed, but no GPU is visible: sessions will fall back to the CPU)"
        else:
            note = ""
        out[device] = f"onnxruntime {first}{note}"
    trt, c = r["tensorrt"], r["cuda"]
    if not trt["installed"]:
        out["engine directory"] = "nothing: " + trt["reason"]
    elif c.get("layer") is None:
        out["engine directory"] = "nothing: " + c["reason"]
    elif not c.get("devices"):
        out["engine directory"] = "nothing: no CUDA device visible" + (f" ({c['reason']})" if c.get("reason") else "")
    else:
        out["engine directory"] = (f"TensorRT {trt['version']} on {c['gpu']} via {c['layer']}"
                                   f"{'' if c['cuda_graphs'] else ' (no CUDA graphs: they need cuda-python)'}")
    return out


def gpu_gates() -> dict[str, str | None]:
    """Why each kind of GPU test cannot run here (None: it can): `gpu` needs a visible CUDA device,
    `tensorrt` TensorRT and a device reachable from Python, `ort_cuda` / `ort_tensorrt` the
    onnxruntime provider and a device."""
    c, trt, ort = _cuda(), _tensorrt(), _onnxruntime()
    device = None if c.get("devices", 0) > 0 or c.get("nvidia_smi") else f"no CUDA device visible ({c.get('reason', 'none found')})"
    providers = ort.get("providers", [])
    return {
        "gpu": device,
        "tensorrt": (None if trt["installed"] and c.get("devices", 0) > 0
                     else trt.get("reason") or c.get("reason") or "no CUDA device visible"),
        "ort_cuda": device or (None if "CUDAExecutionProvider" in providers
                               else "this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"),
        "ort_tensorrt": device or (None if "TensorrtExecutionProvider" in providers
                                   else "this onnxruntime has no TensorrtExecutionProvider (install onnxruntime-gpu)"),
    }


def diagnose() -> dict[str, Any]:
    """The report as a dict (what `vlmedge doctor --json` prints)."""
    import numpy as np

    r: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(),
                         "numpy": np.__version__}
    r["onnxruntime"] = _onnxruntime()
    r["tensorrt"] = _tensorrt()
    r["cuda"] = _cuda()
    r["dla_cores"] = _dla_cores(r["tensorrt"]["installed"], r["cuda"].get("devices", 0) > 0)
    r["devices"] = _devices(r)
    problems = [r["onnxruntime"]["problem"]] if "problem" in r["onnxruntime"] else []
    if (r["machine"] == "aarch64" and "onnxruntime-gpu" in r["onnxruntime"]["packages"]
            and int(np.__version__.split(".")[0]) >= 2):
        problems.append("numpy >= 2 with onnxruntime-gpu on aarch64: JetPack 6's onnxruntime-gpu wheels need "
                        "numpy < 2 (pip install 'numpy<2')")
    r["problems"] = problems
    return r


def print_report(r: dict[str, Any], console: Console) -> None:
    """The report as two tables: what is installed, and what each device runs on."""
    ort, trt, c = r["onnxruntime"], r["tensorrt"], r["cuda"]
    t = Table(title="vlmedge doctor", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    rows = [
        ("python", f"{r['python']} ({r['platform']})"),
        ("numpy", r["numpy"]),
        ("onnxruntime", f"{ort['version']} from {', '.join(f'{k} {v}' for k, v in ort['packages'].items()) or '?'} "
                        f"({ort['path']})" if ort["installed"] else ort["reason"]),
        ("providers", ", ".join(ort.get("providers", [])) or "-"),
        ("TensorRT", trt["version"] if trt["installed"] else trt["reason"]),
        ("CUDA from Python", f"{c['layer']} ({c.get('version') or '?'}, {c['module']})" if c.get("layer") else c["reason"]),
        ("GPU", f"{c['gpu']}, compute capability {c['compute_capability']}" if c.get("gpu")
                else (c.get("nvidia_smi") or c.get("reason") or "none visible")),
        ("driver", f"supports CUDA {c['driver_cuda']}" if c.get("driver_cuda") else "-"),
        ("DLA cores", str(r["dla_cores"])),
    ]
    for k, v in rows:
        t.add_row(k, escape(str(v)))
    console.print(t)
    d = Table(title="what runs a bundle on each --device, and an engine directory")
    d.add_column("--device")
    d.add_column("runs on")
    for k, v in r["devices"].items():
        d.add_row(escape(k), escape(v))
    console.print(d)
    for p in r["problems"]:
        console.print(f"[yellow]problem:[/yellow] {escape(p)}", highlight=False)
