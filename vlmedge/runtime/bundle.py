"""The bundle contract: a directory of ONNX graphs, tokenizer.json and manifest.json.

The manifest is everything the runtime, calibration and the TensorRT builder need to use the
graphs without knowing the model family: per graph its file, hash, inputs and outputs (dtypes,
named dynamic axes), min/opt/max of every axis, preprocessing, tokenizer ids, task recipes,
precision, provenance and the export's validation results. Loading checks the schema version,
that every file exists and that its sha256 matches.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlmedge.errors import BundleError, read_json

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
GRAPH_NAMES = ("vision_encoder", "text_encoder", "decoder_init", "decoder_step")
DTYPES = ("float32", "float16", "int64", "int32", "bool", "int8", "uint8")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int | str, ...]  # ints are fixed, strings name a dynamic axis


@dataclass(frozen=True)
class GraphSpec:
    file: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class AxisRange:
    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class Manifest:
    family: str
    architecture: str
    tasks: dict[str, dict[str, Any]]  # task -> {encoder, prompt_ids, eos_id, pad_id, max_new_tokens, ...}
    dims: dict[str, int]
    graphs: dict[str, GraphSpec]
    axes: dict[str, AxisRange]  # named dynamic axis -> its range (TensorRT profiles come from here)
    preprocessing: dict[str, Any]
    tokenizer: dict[str, Any]  # {file, sha256}
    precision: dict[str, Any]  # {dtype, method, ...}
    provenance: dict[str, Any]
    validation: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _need(d: dict, key: str, kind: type | tuple, where: str):
    if key not in d:
        raise BundleError(f"{where}: missing field {key!r}")
    if not isinstance(d[key], kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise BundleError(f"{where}.{key}: expected {names}, got {type(d[key]).__name__}")
    return d[key]


def _tensor(d: Any, where: str) -> TensorSpec:
    if not isinstance(d, dict):
        raise BundleError(f"{where}: expected an object with name, dtype and shape")
    name = _need(d, "name", str, where)
    dtype = _need(d, "dtype", str, where)
    if dtype not in DTYPES:
        raise BundleError(f"{where}.dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    shape = _need(d, "shape", list, where)
    for i, s in enumerate(shape):
        if not (isinstance(s, str) and s) and not (isinstance(s, int) and not isinstance(s, bool) and s > 0):
            raise BundleError(f"{where}.shape[{i}]: expected a positive int or an axis name, got {s!r}")
    return TensorSpec(name, dtype, tuple(shape))


def parse_manifest(raw: Any, where: str = MANIFEST) -> Manifest:
    """Check a decoded manifest against the schema; every error names the field."""
    if not isinstance(raw, dict):
        raise BundleError(f"{where}: expected a JSON object")
    version = _need(raw, "schema_version", int, where)
    if version != SCHEMA_VERSION:
        raise BundleError(f"{where}: schema_version {version} is not supported (this vlmedge reads {SCHEMA_VERSION}); re-export the bundle")
    graphs: dict[str, GraphSpec] = {}
    for gname, g in _need(raw, "graphs", dict, where).items():
        w = f"{where}: graphs.{gname}"
        if gname not in GRAPH_NAMES:
            raise BundleError(f"{w}: unknown graph (expected {', '.join(GRAPH_NAMES)})")
        if not isinstance(g, dict):
            raise BundleError(f"{w}: expected an object")
        graphs[gname] = GraphSpec(
            file=_need(g, "file", str, w), sha256=_need(g, "sha256", str, w),
            inputs=tuple(_tensor(t, f"{w}.inputs[{i}]") for i, t in enumerate(_need(g, "inputs", list, w))),
            outputs=tuple(_tensor(t, f"{w}.outputs[{i}]") for i, t in enumerate(_need(g, "outputs", list, w))),
        )
    axes: dict[str, AxisRange] = {}
    for aname, a in _need(raw, "axes", dict, where).items():
        w = f"{where}: axes.{aname}"
        if not isinstance(a, dict):
            raise BundleError(f"{w}: expected an object with min, opt, max")
        r = AxisRange(_need(a, "min", int, w), _need(a, "opt", int, w), _need(a, "max", int, w))
        if not 1 <= r.min <= r.opt <= r.max:
            raise BundleError(f"{w}: expected 1 <= min <= opt <= max, got {r.min}, {r.opt}, {r.max}")
        axes[aname] = r
    for gname, g in graphs.items():
        for t in g.inputs + g.outputs:
            for s in t.shape:
                if isinstance(s, str) and s not in axes:
                    raise BundleError(f"{where}: graphs.{gname} tensor {t.name} uses axis {s!r}, which axes does not define")
    tasks = _need(raw, "tasks", dict, where)
    if not tasks:
        raise BundleError(f"{where}: tasks is empty")
    for tname, t in tasks.items():
        w = f"{where}: tasks.{tname}"
        if tname not in ("caption", "vqa"):
            raise BundleError(f"{w}: unknown task (expected caption or vqa)")
        enc = _need(t, "encoder", str, w)
        needed = ["vision_encoder", "decoder_init", "decoder_step"] + (["text_encoder"] if enc == "text_encoder" else [])
        for n in needed:
            if n not in graphs:
                raise BundleError(f"{w}: needs graph {n!r}, which graphs does not list")
        _need(t, "prompt_ids", list, w)
        _need(t, "eos_id", int, w)
        _need(t, "pad_id", int, w)
        _need(t, "max_new_tokens", int, w)
    return Manifest(
        family=_need(raw, "family", str, where), architecture=_need(raw, "architecture", str, where),
        tasks=tasks, dims=_need(raw, "dims", dict, where), graphs=graphs, axes=axes,
        preprocessing=_need(raw, "preprocessing", dict, where), tokenizer=_need(raw, "tokenizer", dict, where),
        precision=_need(raw, "precision", dict, where), provenance=_need(raw, "provenance", dict, where),
        validation=raw.get("validation", {}), schema_version=version,
    )


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest

    def graph_path(self, name: str) -> Path:
        return self.path / self.manifest.graphs[name].file

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest.tokenizer["file"]


def load_bundle(path: str | Path, verify_hashes: bool = True) -> Bundle:
    """Open a bundle directory; refuses unknown schemas, missing files and hash mismatches. A
    TensorRT engine directory (engines.json beside the bundle's manifest and tokenizer) opens too:
    its graphs are engines, checked when the TensorRT backend loads them."""
    root = Path(path)
    mpath = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"{root}: not a bundle directory")
    if not mpath.is_file():
        raise BundleError(f"{mpath}: missing; {root} is not a vlmedge bundle")
    manifest = parse_manifest(read_json(mpath, BundleError), str(mpath))
    engines = (root / "engines.json").is_file()
    files = [] if engines else [(f"graphs.{n}", g.file, g.sha256) for n, g in manifest.graphs.items()]
    files.append(("tokenizer", manifest.tokenizer.get("file", ""), manifest.tokenizer.get("sha256", "")))
    for field_name, fname, digest in files:
        fpath = root / fname
        if not fname or not fpath.is_file():
            raise BundleError(f"{fpath}: missing (named by {MANIFEST} {field_name})")
        if verify_hashes and sha256_file(fpath) != digest:
            raise BundleError(f"{fpath}: sha256 does not match {MANIFEST} {field_name}; the file was changed or is corrupt")
    return Bundle(root, manifest)
