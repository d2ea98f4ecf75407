"""The engine manifest (`engines.json`): what an engine directory's engines were built by, for
which GPU, with which profiles and flags, from which ONNX files.

An engine only runs on the TensorRT version that built it (unless built version-compatible, then on
that version or later within the same major version) and on GPUs of the same compute capability
(unless built hardware-compatible, then on Ampere or newer). Loading checks this first, so a
mismatch is one clear error that says to rebuild rather than a deserialisation failure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from packaging.version import Version

from vlmedge.errors import BuildError, read_json
from vlmedge.runtime.bundle import Manifest

ENGINES = "engines.json"
SCHEMA_VERSION = 1


def write_engine_manifest(out: Path, data: dict[str, Any]) -> None:
    (out / ENGINES).write_text(json.dumps({"schema_version": SCHEMA_VERSION, **data}, indent=2) + "\n")


def read_engine_manifest(engine_dir: Path) -> dict[str, Any]:
    path = engine_dir / ENGINES
    if not path.is_file():
        raise BuildError(f"{path}: missing; {engine_dir} is not an engine directory (make one with vlmedge build)")
    em = read_json(path, BuildError)
    if not isinstance(em, dict) or em.get("schema_version") != SCHEMA_VERSION:
        raise BuildError(f"{path}: schema_version {em.get('schema_version') if isinstance(em, dict) else None!r} "
                         f"is not supported (this vlmedge reads {SCHEMA_VERSION}); rebuild with vlmedge build")
    for key in ("tensorrt", "gpu", "flags", "graphs"):
        if key not in em:
            raise BuildError(f"{path}: missing field {key!r}")
    return em


def check_engine_manifest(em: dict[str, Any], manifest: Manifest, tensorrt_version: str,
                          compute_capability: str, where: str = ENGINES) -> None:
    """Refuse engines this TensorRT or GPU cannot run, or that were built from other ONNX files."""
    built, running = Version(em["tensorrt"]), Version(tensorrt_version)
    flags = em["flags"]
    if flags.get("version_compatible"):
        if running.major != built.major or running < built:
            raise BuildError(f"{where}: engines built version-compatible with TensorRT {built} run on {built.major}.x "
                             f">= {built}, not {running}; rebuild with vlmedge build")
    elif running != built:
        raise BuildError(f"{where}: engines built with TensorRT {built}, this is TensorRT {running}; "
                         f"rebuild them here with vlmedge build")
    cc_built, cc_here = em["gpu"]["compute_capability"], compute_capability
    if flags.get("hardware_compatible"):
        if Version(cc_here) < Version("8.0"):
            raise BuildError(f"{where}: hardware-compatible engines need an Ampere or newer GPU (compute capability "
                             f">= 8.0), this GPU is {cc_here}; rebuild here with vlmedge build")
    elif cc_built != cc_here:
        raise BuildError(f"{where}: engines built for compute capability {cc_built} ({em['gpu'].get('name', '?')}), "
                         f"this GPU is {cc_here}; rebuild them here with vlmedge build (or build --hardware-compatible)")
    for name, g in manifest.graphs.items():
        e = em["graphs"].get(name)
        if e is None:
            raise BuildError(f"{where}: no engine for graph {name!r}; rebuild with vlmedge build")
        if e.get("source_sha256") != g.sha256:
            raise BuildError(f"{where}: {e.get('file', name)} was built from a different {g.file} "
                             f"(sha256 {str(e.get('source_sha256'))[:12]}..., now {g.sha256[:12]}...); rebuild with vlmedge build")
