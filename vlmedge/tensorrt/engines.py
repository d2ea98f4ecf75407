"""The engine manifest (`engines.json`): what an engine directory's engines were built by, for
which GPU, with which profiles and flags, from which ONNX files.

An engine only runs on the TensorRT version that built it (unless built version-compatible, then on
that version or later within the same major version) and on GPUs of the same compute capability
(unless built hardware-compatible, then on Ampere or newer). Loading checks this first, so a
mismatch is one clear error that says to rebuild rather than a deserialisation failure.

`engines.json` is untrusted input like a bundle's manifest: `read_engine_manifest` checks it
against `ENGINES_SCHEMA` (vlmedge.runtime.schema, the same checker as the manifest's: why not a
schema library is said there), and `verify_plans` confines every plan file to the directory and
checks its sha256 before TensorRT ever deserialises it (a plan is native code TensorRT trusts).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from vlmedge.errors import BuildError, BundleError, read_json
from vlmedge.runtime.bundle import AXIS_MAX, FILE_NAME, GRAPH_NAMES, SHA256, Manifest, confined, sha256_file
from vlmedge.runtime.schema import Bool, Free, Int, Invalid, List, Map, Nullable, Num, Obj, Str

ENGINES = "engines.json"
SCHEMA_VERSION = 1
ENGINES_MAX_BYTES = 16 << 20


def _version(text: str) -> str | None:
    try:
        Version(text)
    except InvalidVersion:
        return f"{text!r} is not a version number"
    return None


_SHAPE = List(Int(1, AXIS_MAX), 0, 8)
_PROFILE = Map(Str(max_len=256), Obj({"min": _SHAPE, "opt": _SHAPE, "max": _SHAPE}))
ENGINES_SCHEMA = Obj({
    "schema_version": Int(0, 1 << 31),
    "tensorrt": Str(max_len=64, test=_version, what="a TensorRT version"),
    "gpu": Obj({"compute_capability": Str(pattern=r"[0-9]{1,3}\.[0-9]{1,3}", what="a compute capability such as 8.7")},
               {"name": Str(max_len=256)}),
    "flags": Obj({}, {"version_compatible": Bool(), "hardware_compatible": Bool(), "strongly_typed": Bool(),
                      "workspace_gib": Num(0, 1 << 20), "dla_core": Nullable(Int(0, 63))}),
    "graphs": Map(Str(choices=GRAPH_NAMES), Obj(
        {"file": FILE_NAME, "sha256": SHA256},
        {"source": Str(max_len=255), "source_sha256": SHA256, "dla_core": Nullable(Int(0, 63)),
         "profile": _PROFILE, "profiles": List(_PROFILE, 1, 8)}), min_len=1),
}, {"precision": Str(max_len=32), "bundle": Free(str)})


def write_engine_manifest(out: Path, data: dict[str, Any]) -> None:
    (out / ENGINES).write_text(json.dumps({"schema_version": SCHEMA_VERSION, **data}, indent=2) + "\n")


def read_engine_manifest(engine_dir: Path) -> dict[str, Any]:
    """engines.json, checked against its schema; every problem is one line naming the field."""
    path = engine_dir / ENGINES
    if not path.is_file():
        raise BuildError(f"{path}: missing; {engine_dir} is not an engine directory (make one with vlmedge build)")
    em = read_json(path, BuildError, ENGINES_MAX_BYTES)
    if not isinstance(em, dict) or em.get("schema_version") != SCHEMA_VERSION:
        raise BuildError(f"{path}: schema_version {em.get('schema_version') if isinstance(em, dict) else None!r} "
                         f"is not supported (this vlmedge reads {SCHEMA_VERSION}); rebuild with vlmedge build")
    try:
        return ENGINES_SCHEMA.check(em)
    except Invalid as e:
        raise BuildError(f"{path}: {e}") from None


def verify_plans(engine_dir: Path, em: dict[str, Any]) -> None:
    """Every plan file inside the directory, present, and with the sha256 engines.json records:
    checked before TensorRT deserialises anything."""
    for name, g in em["graphs"].items():
        try:
            path = confined(engine_dir, g["file"], f"graphs.{name}.file", ENGINES)
        except BundleError as e:
            raise BuildError(str(e)) from None
        if not path.is_file():
            raise BuildError(f"{path}: missing (named by {ENGINES} graphs.{name}.file); rebuild with vlmedge build")
        if sha256_file(path) != g["sha256"]:
            raise BuildError(f"{path}: sha256 does not match {ENGINES} graphs.{name}.sha256; the plan was changed "
                             "or is corrupt; rebuild with vlmedge build")


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
