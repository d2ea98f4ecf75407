"""The bundle contract: a directory of ONNX graphs, tokenizer.json and manifest.json.

The manifest is everything the runtime, calibration and the TensorRT builder need to use the
graphs without knowing the model family: per graph its file, hash, inputs and outputs (dtypes,
named dynamic axes), min/opt/max of every axis, preprocessing, tokenizer ids, task recipes,
precision, provenance and the export's validation results.

A bundle is untrusted input, checked like a request body before anything reads it: the manifest
against a schema (vlmedge.runtime.schema: every field typed and ranged, axis ranges bounded), its
cross-field rules (axes defined, the tensor names and ranks the decoding loop uses, token ids
within the vocabulary), every file name confined to the bundle directory (no absolute paths, no
'..', no symlink that leads out), and every file's sha256. When a backend opens a graph,
`check_graph_io` compares the graph's own inputs and outputs with the manifest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from vlmedge.errors import BundleError, first_line, read_json
from vlmedge.runtime.schema import (
    Bool, Either, Free, Int, Invalid, List, Map, Nullable, Num, Obj, Str, check_generation, show,
)

SCHEMA_VERSION = 4  # cross-attention bundles: cross_kv and one decoder graph for the prompt and every step
SPLIT_SCHEMA_VERSION = 1  # cross-attention bundles of vlmedge 0.1: decoder_init and decoder_step, each with the weights
PREFIX_SCHEMA_VERSION = 2  # the first version with the prefix contract (decoder-only VLMs)
READ_VERSIONS = (SPLIT_SCHEMA_VERSION, PREFIX_SCHEMA_VERSION, SCHEMA_VERSION)
MANIFEST = "manifest.json"
CONTRACTS = ("cross-attention", "prefix")  # vlmedge.models.prefix describes the second
GRAPH_NAMES = ("vision_encoder", "text_encoder", "cross_kv", "decoder", "decoder_init", "decoder_step", "embed")
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
    data_sha256: str | None = None  # the graph's weights, in `<file>.data` beside it (None: inside the graph file)
    data_file: str | None = None  # the weights file where it is another graph's (an explain graph's: its production
    # graph's; a graph sharing a tied table with another: that graph's, vlmedge.export.graphs.share_weights)

    @property
    def data(self) -> str | None:
        """The file of the graph's weights, or None where the graph file holds them."""
        return None if self.data_sha256 is None else (self.data_file or self.file + DATA_SUFFIX)


DATA_SUFFIX = ".data"


def graph_hashes(path: Path) -> dict[str, str | None]:
    """GraphSpec's hashes of a graph file written with its weights beside it: its own, and that of its
    weights file if it has one (and no weights file of another graph that it reads)."""
    data = path.with_name(path.name + DATA_SUFFIX)
    return {"sha256": sha256_file(path), "data_sha256": sha256_file(data) if data.is_file() else None, "data_file": None}


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
    target: str = "tensorrt-portable"  # or "onnxruntime": ONNX Runtime's fused contrib ops (vlmedge.export.ort_target)
    contract: str = "cross-attention"  # or "prefix" (decoder-only VLMs: vision_encoder, embed, decoder)
    prompt: dict[str, Any] = field(default_factory=dict)  # prefix: chat template, image token, caption instruction
    # cross-attention: {"graphs": {graph: GraphSpec of its explain graph}, "image_grid": {leading, rows, cols}}
    explain: dict[str, Any] = field(default_factory=dict)

    @property
    def split_decoder(self) -> bool:
        """A cross-attention bundle of schema 1: decoder_init and decoder_step instead of cross_kv and decoder."""
        return self.contract == CONTRACTS[0] and self.schema_version == SPLIT_SCHEMA_VERSION

    def to_json(self) -> str:
        d = asdict(self)
        for g in [*d["graphs"].values(), *d["explain"].get("graphs", {}).values()]:
            if g["data_sha256"] is None:  # weights inside the graph file
                del g["data_sha256"]
            if g["data_file"] is None:  # weights in `<file>.data`
                del g["data_file"]
        if not self.explain:
            del d["explain"]
        if self.contract == CONTRACTS[0]:  # the field's default: absent, as in the bundles of vlmedge 0.1
            del d["contract"]
            if not self.prompt:  # a cross-attention bundle has one only where its vision graph reads text
                del d["prompt"]
        return json.dumps(d, indent=2) + "\n"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- the manifest's schema ----------------------------------------------------------------------

AXIS_MAX = 1 << 20  # largest value of any dynamic axis (batch, lengths): beyond it no profile is sane
DIM_MAX = 1 << 24  # largest fixed dimension (a vocabulary, a hidden width)
VOLUME_MAX = (1 << 31) - 1  # elements of one tensor at its largest shape (TensorRT indexes with int32)
VOCAB_MAX = 1 << 22
MANIFEST_MAX_BYTES = 16 << 20
RESAMPLE_FILTERS = ("nearest", "bilinear", "bicubic", "box", "lanczos", "hamming")  # runtime.preprocess
RESIZE_MODES = ("stretch", "fit_pad")  # runtime.preprocess; older bundles: stretch
FIT_PAD_KEYS = ("align_long_axis", "crop_margin", "thumbnail_resample", "thumbnail_reducing_gap")  # fit_pad's own
CHANNEL_ORDERS = ("RGB",)  # what runtime.preprocess produces
TARGETS = ("tensorrt-portable", "onnxruntime")  # what a bundle's graphs are made for; older bundles: portable
SHA256 = Str(pattern=r"[0-9a-f]{64}", what="a sha256 (64 lowercase hex digits)")


def _relative_name(name: str) -> str | None:
    """Why a file name from a manifest is not a plain path inside its directory, or None."""
    if "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return f"{show(name)} is an absolute path; expected a file name inside the directory"
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return f"{show(name)} leaves the directory or is not a plain path ('..', '.', empty parts); expected a file name inside it"
    return None


FILE_NAME = Str(max_len=255, test=_relative_name, what="a file name")
_TENSOR = Obj({
    "name": Str(max_len=256, what="a tensor name"),
    "dtype": Str(choices=DTYPES),
    "shape": List(Either((int, Int(1, DIM_MAX)), (str, Str(max_len=64, what="an axis name")),
                         what="a positive int or an axis name"), min_len=0, max_len=8),
})
_GRAPH = Obj({"file": FILE_NAME, "sha256": SHA256, "inputs": List(_TENSOR, 1, 8192), "outputs": List(_TENSOR, 1, 8192)},
             optional={"data_sha256": SHA256, "data_file": FILE_NAME})
_EXPLAIN = Obj({"graphs": Map(Str(choices=("decoder", "text_encoder")), _GRAPH, min_len=1, max_len=2)},
               {"image_grid": Obj({"leading": Int(0, 64), "rows": Int(1, 4096), "cols": Int(1, 4096)})})
_IDS = Int(0, VOCAB_MAX - 1)
# caption and vqa, or a task a family names by its own token (Florence-2: "<OD>", "<OCR>", ...)
TASK_NAME = Str(pattern=r"caption|vqa|<[A-Z][A-Z_]{0,62}>", what="caption, vqa or a task token such as <OD>")
POSTPROCESS = ("text", "pure_text", "description_with_bboxes", "ocr")  # vlmedge.runtime.florence2 reads the last three
_TASK = Obj({
    "encoder": Str(choices=("vision_encoder", "text_encoder")),
    "prompt_ids": List(_IDS, min_len=1, max_len=1024),
    "eos_id": _IDS, "pad_id": _IDS,
    "max_new_tokens": Int(1, AXIS_MAX),
}, {  # absent in bundles of families without task prompts: (), False, "text"
    "text_prompt_ids": List(_IDS, min_len=0, max_len=4096),
    "image_prefix": Bool(),
    "postprocess": Str(choices=POSTPROCESS),
    "generation": Free(dict),  # checked by check_generation
})
_TOKEN_TEXT = Str(max_len=64, pattern=r"[^\s]{1,64}", what="a token's text")
_PROCESSOR = Obj({"kind": Str(choices=("clip", "idefics3", "anyres", "fixed", "qwen2_vl")), "image_tokens": Int(1, 1 << 16), "image_token": _TOKEN_TEXT}, {
    "shortest_edge": Int(1, 16384),  # clip
    "tile": Int(1, 16384), "longest_edge": Int(1, 16384), "split": Bool(),  # idefics3
    "grid_pinpoints": List(List(Int(1, 16384), 2, 2), 1, 256), "max_tiles": Int(1, 1024),  # anyres
    "fake_image_token": _TOKEN_TEXT, "global_image_token": _TOKEN_TEXT,
    "pan_and_scan": Obj({"min_crop_size": Int(1, 16384), "max_crops": Int(2, 64), "min_ratio": Num(1, 1024),  # Gemma 3
                         "intro": Str(max_len=256, what="text"), "crops_intro": Str(max_len=256, what="text")}),
})
# the text a vision graph reads beside the pixels: its tokenizer, the two graph inputs it fills (ids, mask), its
# longest row, and the text of each task that brings no text of its own (a cross-attention caption's instruction)
_VISION_TEXT = Obj({"tokenizer": FILE_NAME, "sha256": SHA256, "inputs": List(Str(max_len=256, what="an input name"), 2, 2),
                    "max_length": Int(1, AXIS_MAX)},
                   {"texts": Map(TASK_NAME, Str(max_len=4096, what="a task's text", lines=True), max_len=64)})
_PREFIX_TASK = Obj({"eos_id": _IDS, "pad_id": _IDS, "max_new_tokens": Int(1, AXIS_MAX)}, {"generation": Free(dict)})
_PROMPT = Obj({
    "chat_template": Str(max_len=1 << 16, what="a jinja2 chat template", lines=True), "image_token": _TOKEN_TEXT,
    "image_token_id": _IDS, "caption_instruction": Str(max_len=4096, what="a caption instruction", lines=True),
}, {"special_tokens": Map(Str(choices=("bos_token", "eos_token", "pad_token", "unk_token")), Str(max_len=256), max_len=4),
    # a decoder with gated cross-attention (IDEFICS): the token after which no image is seen until the next one,
    # and the most images one prompt holds
    "cross_attention": Obj({"reset_token_id": _IDS, "max_images": Int(1, 1024)}),
    # the text a vision graph reads beside the pixels (InstructBLIP's Q-Former): its tokenizer and the inputs it fills
    "vision_text": _VISION_TEXT})
# a cross-attention bundle's prompt: only the text its vision graph reads (InstructBLIP with Flan-T5)
_CROSS_PROMPT = Obj({"vision_text": _VISION_TEXT})
MANIFEST_SCHEMA = Obj({
    "schema_version": Int(0, 1 << 31),
    "family": Str(max_len=128), "architecture": Str(max_len=256),
    "tasks": Map(TASK_NAME, _TASK, min_len=1, max_len=64),
    "dims": Obj({
        "decoder_layers": Int(1, 1024), "decoder_heads": Int(1, 1024), "decoder_head_dim": Int(1, 4096),
        "vocab_size": Int(1, VOCAB_MAX), "encoder_hidden": Int(1, DIM_MAX), "image_tokens": Int(1, AXIS_MAX),
        "max_target_len": Int(2, AXIS_MAX),
    }, {"max_question_len": Int(0, AXIS_MAX)}),
    "graphs": Map(Str(choices=GRAPH_NAMES), _GRAPH, min_len=1),
    "axes": Map(Str(max_len=64, what="an axis name"),
                Obj({"min": Int(1, AXIS_MAX), "opt": Int(1, AXIS_MAX), "max": Int(1, AXIS_MAX)}), min_len=1, max_len=64),
    "preprocessing": Obj({
        "height": Int(1, 16384), "width": Int(1, 16384), "resample": Str(choices=RESAMPLE_FILTERS),
        "mean": List(Num(-1e6, 1e6), 3, 3), "std": List(Num(0, 1e6, positive=True), 3, 3),
    }, {"rescale": Num(0, 1e6, positive=True), "channel_order": Str(choices=CHANNEL_ORDERS), "processor": Nullable(_PROCESSOR),
        "resize_mode": Str(choices=RESIZE_MODES), "align_long_axis": Bool(), "crop_margin": Bool(),
        "thumbnail_resample": Str(choices=RESAMPLE_FILTERS), "thumbnail_reducing_gap": Num(1, 1e6)}),
    "tokenizer": Obj({"file": FILE_NAME, "sha256": SHA256}),
    "precision": Obj({"dtype": Str(max_len=32)}, {"method": Str(max_len=64)}),
    "provenance": Free(dict),
}, {"validation": Free(dict), "target": Str(choices=TARGETS), "contract": Str(choices=CONTRACTS), "prompt": _CROSS_PROMPT,
    "explain": _EXPLAIN})
# the prefix contract: tasks without prompt ids (the prompt is built per call), a chat template
PREFIX_MANIFEST_SCHEMA = Obj({**MANIFEST_SCHEMA.required, "tasks": Map(Str(choices=("caption", "vqa")), _PREFIX_TASK, 1, 2),
                              "prompt": _PROMPT}, {k: v for k, v in MANIFEST_SCHEMA.optional.items() if k != "prompt"})


def kv_names(prefix: str, layers: int) -> list[str]:
    """present.{i}.self.key / value ..., past.{i}.self.key / value ..., cross.{i}.key / value ..."""
    if prefix == "cross":
        return [f"cross.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    return [f"{prefix}.{i}.self.{k}" for i in range(layers) for k in ("key", "value")]


def canonical_io(graph: str, layers: int, contract: str = "cross-attention",
                 schema: int = SCHEMA_VERSION) -> tuple[dict[str, int], dict[str, int]]:
    """The inputs and outputs (name -> rank) the decoding loop feeds and reads for a graph."""
    kv = lambda prefix: {n: 4 for n in kv_names(prefix, layers)}  # noqa: E731  (batch, heads, length, head_dim)
    if contract == "prefix":
        prefix = {
            "vision_encoder": ({"pixel_values": 4}, {"image_embeds": 3}),
            "cross_kv": ({"image_embeds": 3}, {}),  # IDEFICS: its outputs are checked against the decoder's inputs
            "embed": ({"input_ids": 2}, {"inputs_embeds": 3}),
            "decoder": ({"inputs_embeds": 3, "attention_mask": 2, "position_ids": 2, **kv("past")}, {"logits": 2, **kv("present")}),
        }
        if graph not in prefix:
            raise Invalid(f"graphs.{graph}", "not a graph of the prefix contract (vision_encoder, cross_kv, embed, decoder)")
        return prefix[graph]
    if graph == "embed":
        raise Invalid(f"graphs.{graph}", "a graph of the prefix contract, in a cross-attention bundle")
    encoders = {
        "vision_encoder": ({"pixel_values": 4}, {"image_states": 3}),
        "text_encoder": ({"question_ids": 2, "question_mask": 2, "image_states": 3}, {"encoder_states": 3}),
    }
    decoders = {
        "cross_kv": ({"encoder_states": 3}, kv("cross")),
        "decoder": ({"input_ids": 2, "attention_mask": 2, "position_ids": 2, "encoder_mask": 2, **kv("past"), **kv("cross")},
                    {"logits": 2, **kv("present")}),
    } if schema != SPLIT_SCHEMA_VERSION else {
        "decoder_init": ({"input_ids": 2, "encoder_states": 3, "encoder_mask": 2},
                         {"logits": 2, **kv("present"), **kv("cross")}),
        "decoder_step": ({"input_ids": 2, "encoder_mask": 2, **kv("past"), **kv("cross")}, {"logits": 2, **kv("present")}),
    }
    if graph not in {**encoders, **decoders}:
        raise Invalid(f"graphs.{graph}", f"not a graph of schema_version {schema}'s cross-attention contract "
                      f"({', '.join([*encoders, *decoders])})")
    return {**encoders, **decoders}[graph]


def _check_graphs(graphs: dict[str, GraphSpec], axes: dict[str, AxisRange], dims: dict[str, int],
                  prep: dict[str, Any], contract: str = "cross-attention", schema: int = SCHEMA_VERSION,
                  vision_text: tuple[str, ...] = ()) -> None:
    """Each graph's tensors: the names and ranks the decoding loop uses, defined axes, sane sizes; a
    graph that reads another's weights file names the file of a graph that has one of its own."""
    for gname, g in graphs.items():
        w = f"graphs.{gname}"
        if g.data_file is not None and not any(h.data_file is None and h.data == g.data_file and h.data_sha256 == g.data_sha256
                                               for n, h in graphs.items() if n != gname):
            raise Invalid(f"{w}.data_file", f"{g.data_file!r:.60} is not the weights file of another graph (with its data_sha256)")
        want_in, want_out = canonical_io(gname, dims["decoder_layers"], contract, schema)
        if contract == "prefix" and gname == "vision_encoder" and any(t.name == "image_newline" for t in g.outputs):
            want_out = {**want_out, "image_newline": 1}  # LLaVA-OneVision's row separator, a constant of the model
        if contract == "prefix" and gname == "decoder" and any(t.name == "block_ids" for t in g.inputs):
            want_in = {**want_in, "block_ids": 2}  # PaliGemma, Gemma 3: blocks of the prompt that attend both ways
        if contract == "prefix" and gname == "decoder" and any(t.name == "position_ids" and len(t.shape) == 3 for t in g.inputs):
            want_in = {**want_in, "position_ids": 3}  # M-RoPE (Qwen2-VL): [3, batch, seq_len]
        if contract == "prefix" and gname == "vision_encoder" and any(t.name == "vision_position_ids" for t in g.inputs):
            want_in = {"pixel_values": 2, "vision_position_ids": 2, "vision_segment_ids": 1}  # Qwen2-VL: patches of any grid
            if any(t.name == "vision_window_ids" for t in g.inputs):
                want_in["vision_window_ids"] = 1  # Qwen2.5-VL: the windows its window layers attend within
            want_out = {"image_embeds": 2}
        if gname == "vision_encoder" and vision_text:
            want_in = {**want_in, **{n: 2 for n in vision_text}}  # InstructBLIP: the instruction's ids and mask, per frame
        if contract == "prefix" and "cross_kv" in graphs and gname in ("cross_kv", "decoder"):
            cross = {t.name: 4 for t in graphs["cross_kv"].outputs}  # IDEFICS: one key and value per gated layer
            if not cross or set(cross) != set(kv_names("cross", len(cross) // 2)) or len(cross) > 2 * dims["decoder_layers"]:
                raise Invalid("graphs.cross_kv.outputs", "expected cross.{j}.key and cross.{j}.value for j = 0, 1, ..., "
                              "at most one pair per decoder layer")
            want_in, want_out = ({"image_embeds": 3}, cross) if gname == "cross_kv" else \
                ({**want_in, "cross_mask": 3, **cross}, want_out)
        for kind, tensors, want in (("inputs", g.inputs, want_in), ("outputs", g.outputs, want_out)):
            names = [t.name for t in tensors]
            if len(set(names)) != len(names):
                raise Invalid(f"{w}.{kind}", f"names a tensor twice ({', '.join(sorted({n for n in names if names.count(n) > 1}))})")
            if set(names) != set(want):
                missing, extra = sorted(set(want) - set(names)), sorted(set(names) - set(want))
                raise Invalid(f"{w}.{kind}", "not the tensors the decoding loop uses with dims.decoder_layers "
                              f"{dims['decoder_layers']}: " + "; ".join(x for x in (
                                  f"missing {', '.join(missing[:4])}" if missing else "",
                                  f"unexpected {', '.join(extra[:4])}" if extra else "") if x))
            for i, t in enumerate(tensors):
                tw = f"{w}.{kind}[{i}]"
                if len(t.shape) != want[t.name]:
                    raise Invalid(f"{tw}.shape", f"{t.name} has rank {len(t.shape)}, expected {want[t.name]}")
                volume = 1
                for j, s in enumerate(t.shape):
                    if isinstance(s, str) and s not in axes:
                        raise Invalid(f"{tw}.shape[{j}]", f"axis {s!r} is not defined in axes")
                    volume *= axes[s].max if isinstance(s, str) else s
                if volume > VOLUME_MAX:
                    raise Invalid(f"{tw}.shape", f"{t.name} has {volume:,} elements at its largest shape, "
                                  f"over {VOLUME_MAX:,}; the axes ranges are too large")
                if t.name == "logits" and isinstance(t.shape[-1], int) and t.shape[-1] != dims["vocab_size"]:
                    raise Invalid(f"{tw}.shape[1]", f"logits has {t.shape[-1]} entries, but dims.vocab_size is {dims['vocab_size']}")
                if t.name == "pixel_values" and len(t.shape) == 4:
                    want_shape = (3, prep["height"], prep["width"])
                    for j, (s, expect) in enumerate(zip(t.shape[1:], want_shape), start=1):
                        if isinstance(s, int) and s != expect:
                            raise Invalid(f"{tw}.shape[{j}]", f"pixel_values is {t.shape[1:]}, but preprocessing makes "
                                          f"(3, {prep['height']}, {prep['width']})")


def _check_tasks(tasks: dict[str, dict], graphs: dict[str, GraphSpec], dims: dict[str, int], schema: int) -> None:
    vocab = dims["vocab_size"]
    decoders = ["decoder_init", "decoder_step"] if schema == SPLIT_SCHEMA_VERSION else ["cross_kv", "decoder"]
    for tname, t in tasks.items():
        w = f"tasks.{tname}"
        if tname == "vqa" and t["encoder"] != "text_encoder":
            raise Invalid(f"{w}.encoder", "vqa runs through the text_encoder graph")
        needed = ["vision_encoder", *decoders] + (["text_encoder"] if t["encoder"] == "text_encoder" else [])
        for n in needed:
            if n not in graphs:
                raise Invalid(w, f"needs graph {n!r}, which graphs does not list")
        for key in ("prompt_ids", "text_prompt_ids"):
            for i, token in enumerate(t.get(key, ())):
                if token >= vocab:
                    raise Invalid(f"{w}.{key}[{i}]", f"token id {token} is outside the vocabulary (dims.vocab_size {vocab})")
        if (t.get("text_prompt_ids") or t.get("image_prefix")) and t["encoder"] != "text_encoder":
            raise Invalid(f"{w}.encoder", "a task with text_prompt_ids or image_prefix runs through the text_encoder graph")
        if t.get("text_prompt_ids") and len(t["text_prompt_ids"]) > dims.get("max_question_len", 0):
            raise Invalid(f"{w}.text_prompt_ids", f"{len(t['text_prompt_ids'])} tokens, over dims.max_question_len "
                          f"{dims.get('max_question_len', 0)}")
        for key in ("eos_id", "pad_id"):
            if t[key] >= vocab:
                raise Invalid(f"{w}.{key}", f"token id {t[key]} is outside the vocabulary (dims.vocab_size {vocab})")
        if "generation" in t:
            t["generation"] = check_generation(t["generation"], vocab, f"{w}.generation")
        room = dims["max_target_len"] - len(t["prompt_ids"])
        if t["max_new_tokens"] > room:
            raise Invalid(f"{w}.max_new_tokens", f"{t['max_new_tokens']} does not fit after a {len(t['prompt_ids'])}-token "
                          f"prompt in dims.max_target_len {dims['max_target_len']}")


def _check_prefix(m: dict, graphs: dict[str, GraphSpec]) -> None:
    """The prefix contract's own rules: its three graphs, its prompt, tasks without prompt ids."""
    for n in ("vision_encoder", "embed", "decoder"):
        if n not in graphs:
            raise Invalid("graphs", f"the prefix contract needs graph {n!r}")
    if not isinstance(m["preprocessing"].get("processor"), dict):
        raise Invalid("preprocessing.processor", "missing (how the prefix contract's images become frames and tokens)")
    for axis in ("frames", "seq_len", "past_len", "total_len"):
        if axis not in m["axes"]:
            raise Invalid(f"axes.{axis}", "missing (an axis of the prefix contract's graphs)")
    vocab = m["dims"]["vocab_size"]
    if m["prompt"]["image_token_id"] >= vocab:
        raise Invalid("prompt.image_token_id", f"token id {m['prompt']['image_token_id']} is outside the vocabulary ({vocab})")
    for tname, t in m["tasks"].items():
        for key in ("eos_id", "pad_id"):
            if t[key] >= vocab:
                raise Invalid(f"tasks.{tname}.{key}", f"token id {t[key]} is outside the vocabulary (dims.vocab_size {vocab})")
        if "generation" in t:
            t["generation"] = check_generation(t["generation"], vocab, f"tasks.{tname}.generation")


def parse_manifest(raw: Any, where: str = MANIFEST) -> Manifest:
    """Check a decoded manifest against the schema and its cross-field rules; every error is one
    line naming the field."""
    if isinstance(raw, dict) and raw.get("contract") == "dual-encoder":  # CLIP / SigLIP: its own schema
        from vlmedge.runtime.embedding import parse_manifest as parse_dual_encoder

        return parse_dual_encoder(raw, where)
    if isinstance(raw, dict) and raw.get("contract") == "fusion":  # ViLT / BridgeTower: its own schema
        from vlmedge.runtime.fusion import parse_manifest as parse_fusion

        return parse_fusion(raw, where)
    if isinstance(raw, dict) and "schema_version" in raw and type(raw["schema_version"]) is int \
            and raw["schema_version"] not in READ_VERSIONS:
        newer = raw["schema_version"] > max(READ_VERSIONS)
        raise BundleError(f"{where}: schema_version {raw['schema_version']} is not supported (this vlmedge reads "
                          f"{', '.join(map(str, READ_VERSIONS))}); "
                          + ("upgrade vlmedge" if newer else "re-export the bundle"))
    prefix = isinstance(raw, dict) and raw.get("contract") == "prefix"
    try:
        m = (PREFIX_MANIFEST_SCHEMA if prefix else MANIFEST_SCHEMA).check(raw)
        graphs = {n: _graph_spec(g) for n, g in m["graphs"].items()}
        explain = {n: _graph_spec(g) for n, g in m.get("explain", {}).get("graphs", {}).items()}
        axes = {}
        for name, a in m["axes"].items():
            if not a["min"] <= a["opt"] <= a["max"]:
                raise Invalid(f"axes.{name}", f"expected 1 <= min <= opt <= max, got {a['min']}, {a['opt']}, {a['max']}")
            axes[name] = AxisRange(a["min"], a["opt"], a["max"])
        if "batch" not in axes:
            raise Invalid("axes.batch", "missing (every graph's first axis)")
        contract = m.get("contract", CONTRACTS[0])
        if (contract == "prefix") != (m["schema_version"] == PREFIX_SCHEMA_VERSION):
            raise Invalid("schema_version", f"{m['schema_version']} does not go with contract {contract} (the prefix "
                          f"contract is schema {PREFIX_SCHEMA_VERSION}; cross-attention {SPLIT_SCHEMA_VERSION} or {SCHEMA_VERSION})")
        vision_text = tuple((m.get("prompt") or {}).get("vision_text", {}).get("inputs", ()))
        _check_graphs(graphs, axes, m["dims"], m["preprocessing"], contract, m["schema_version"], vision_text)
        prep, fit = m["preprocessing"], m["preprocessing"].get("resize_mode") == "fit_pad"
        extra = [k for k in FIT_PAD_KEYS if k in prep]
        if extra and not fit:
            raise Invalid(f"preprocessing.{extra[0]}", "a setting of resize_mode fit_pad, which this bundle does not use")
        if fit and prefix:
            raise Invalid("preprocessing.resize_mode", "fit_pad is for cross-attention bundles; the prefix contract's processor resizes")
        if prefix:
            _check_prefix(m, graphs)
        else:
            _check_explain(explain, graphs, m.get("explain", {}).get("image_grid"), m["dims"])
            if m["preprocessing"].get("processor"):
                raise Invalid("preprocessing.processor", "only the prefix contract has one")
            _check_tasks(m["tasks"], graphs, m["dims"], m["schema_version"])
            texts = (m.get("prompt") or {}).get("vision_text", {}).get("texts", {})
            for tname, t in m["tasks"].items():  # a task without a question needs the vision graph's text of its own
                if vision_text and tname != "vqa" and tname not in texts:
                    raise Invalid(f"prompt.vision_text.texts.{tname}", "missing (the vision graph reads a text for every task)")
    except Invalid as e:
        raise BundleError(f"{where}: {e}") from None
    return Manifest(
        family=m["family"], architecture=m["architecture"], tasks=m["tasks"], dims=m["dims"], graphs=graphs, axes=axes,
        preprocessing=m["preprocessing"], tokenizer=m["tokenizer"], precision=m["precision"],
        provenance=m["provenance"], validation=m.get("validation", {}), schema_version=m["schema_version"],
        target=m.get("target", TARGETS[0]), contract=m.get("contract", CONTRACTS[0]), prompt=m.get("prompt", {}),
        explain={**m["explain"], "graphs": explain} if m.get("explain") else {},
    )


def _graph_spec(g: dict) -> GraphSpec:
    return GraphSpec(g["file"], g["sha256"], *(tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in g[k])
                                               for k in ("inputs", "outputs")),
                     data_sha256=g.get("data_sha256"), data_file=g.get("data_file"))


EXPLAIN_OUTPUTS = {"decoder": ("cross_attentions", 4), "text_encoder": ("image_attention", 5)}


def _check_explain(explain: dict[str, GraphSpec], graphs: dict[str, GraphSpec], grid: dict | None, dims: dict) -> None:
    """An explain graph takes its production graph's inputs and gives its outputs and one more, reads its
    weights from the production graph's weights file (or its own), and the image grid fits the image tokens."""
    for name, g in explain.items():
        w = f"explain.graphs.{name}"
        base = graphs.get(name)
        if base is None:
            raise Invalid(w, f"explains graph {name}, which this bundle does not have")
        if g.inputs != base.inputs:
            raise Invalid(f"{w}.inputs", f"not the inputs of graphs.{name}")
        extra, rank = EXPLAIN_OUTPUTS[name]
        if g.outputs[:-1] != base.outputs or g.outputs[-1].name != extra or len(g.outputs[-1].shape) != rank \
                or g.outputs[-1].dtype != "float32":
            raise Invalid(f"{w}.outputs", f"expected the outputs of graphs.{name} and then {extra} (float32, rank {rank})")
        if g.data_file is not None and g.data_file != base.data:
            raise Invalid(f"{w}.data_file", f"{g.data_file!r:.60} is not the weights file of graphs.{name}")
        if g.file in {s.file for s in graphs.values()}:
            raise Invalid(f"{w}.file", f"{g.file!r:.60} is a production graph's file")
    if grid is not None and grid["leading"] + grid["rows"] * grid["cols"] > dims["image_tokens"]:
        raise Invalid("explain.image_grid", f"{grid['leading']} + {grid['rows']} x {grid['cols']} positions, over "
                      f"dims.image_tokens {dims['image_tokens']}")


# -- graphs as the backends see them ------------------------------------------------------------

_ONNX_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
               "tensor(int32)": "int32", "tensor(bool)": "bool", "tensor(int8)": "int8", "tensor(uint8)": "uint8"}
IO = Iterable[Any]  # (name, dtype, shape) tuples, or objects with .name .type .shape (onnxruntime's NodeArg)


def check_graph_io(where: str, graph: str, spec: GraphSpec, inputs: IO, outputs: IO,
                   axes: Mapping[str, AxisRange] | None = None, unused_inputs_ok: bool = False) -> None:
    """Refuse a loaded graph (an ONNX Runtime session, a TensorRT engine) whose inputs or outputs
    differ from the manifest's in name, dtype or rank, or in a fixed dimension: a graph swapped for
    another fails here, when it is opened, not halfway through a caption. dtypes are numpy names or
    ONNX type strings (`tensor(float)`); a dynamic dimension is a string, None or a negative int.
    `unused_inputs_ok`: the graph may lack inputs its family ignores (TensorRT drops them)."""
    for kind, declared, actual in (("inputs", spec.inputs, list(inputs)), ("outputs", spec.outputs, list(outputs))):
        want = {t.name: t for t in declared}
        actual = [t if isinstance(t, tuple) else (t.name, t.type, t.shape) for t in actual]
        got = {name: (_ONNX_TYPES.get(str(dtype), str(dtype)), tuple(shape)) for name, dtype, shape in actual}
        extra = sorted(set(got) - set(want))
        missing = sorted(set(want) - set(got)) if kind == "outputs" or not unused_inputs_ok else []
        if extra or missing:
            what = "; ".join(x for x in (f"has {', '.join(extra[:4])} that the manifest does not declare" if extra else "",
                                         f"lacks {', '.join(missing[:4])}" if missing else "") if x)
            raise BundleError(f"{where}: not the graph manifest.json describes for graphs.{graph}.{kind}: it {what}")
        for name, (dtype, shape) in got.items():
            t = want[name]
            field_name = f"graphs.{graph}.{kind}[{declared.index(t)}]"
            if dtype != t.dtype:
                raise BundleError(f"{where}: {name} is {dtype}, but manifest.json {field_name}.dtype says {t.dtype}")
            if len(shape) != len(t.shape):
                raise BundleError(f"{where}: {name} has rank {len(shape)}, but manifest.json {field_name}.shape "
                                  f"{list(t.shape)} has rank {len(t.shape)}")
            for j, (d, m) in enumerate(zip(shape, t.shape)):
                if type(d) is not int or d < 0:
                    continue  # dynamic in the graph
                if isinstance(m, int) and d != m:
                    raise BundleError(f"{where}: {name} has dimension {j} = {d}, but manifest.json {field_name}.shape says {m}")
                if isinstance(m, str) and axes and m in axes and not axes[m].min <= d <= axes[m].max:
                    raise BundleError(f"{where}: {name} has dimension {j} fixed at {d}, outside axes.{m} "
                                      f"{axes[m].min}..{axes[m].max} in manifest.json")

@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest

    def graph_path(self, name: str) -> Path:
        return self.path / self.manifest.graphs[name].file

    def graph_bytes(self, name: str) -> int:
        """Bytes of a graph on disk: its file and its weights file (a weights file it reads from another
        graph counts as that graph's), so that the graphs' bytes add up to the bundle's."""
        g = self.manifest.graphs[name]
        return sum((self.path / f).stat().st_size for f in (g.file, None if g.data_file else g.data) if f)

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest.tokenizer["file"]


def confined(root: Path, name: str, field_name: str, what: str = MANIFEST) -> Path:
    """`root/name`, refused unless it stays inside `root` once symlinks are resolved."""
    problem = _relative_name(name)
    if problem:
        raise BundleError(f"{root / what}: {field_name}: {problem}")
    path = root / name
    try:
        real, base = path.resolve(), root.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
        raise BundleError(f"{path}: cannot be resolved ({first_line(e)}; named by {what} {field_name})") from None
    if real != base and base not in real.parents:
        raise BundleError(f"{path}: leads outside {root} (to {real}) through a symlink; refused "
                          f"(named by {what} {field_name})")
    return path


def load_bundle(path: str | Path, verify_hashes: bool = True) -> Bundle:
    """Open a bundle directory; refuses unknown schemas, a manifest that fails its schema, files
    outside the directory, missing files and hash mismatches. A TensorRT engine directory
    (engines.json beside the bundle's manifest and tokenizer) opens too: its graphs are engines,
    checked when the TensorRT backend loads them."""
    root = Path(path)
    mpath = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"{root}: not a bundle directory")
    if not mpath.is_file():
        raise BundleError(f"{mpath}: missing; {root} is not a vlmedge bundle")
    manifest = parse_manifest(read_json(mpath, BundleError, MANIFEST_MAX_BYTES), str(mpath))
    engines = (root / "engines.json").is_file()
    files = [(f"graphs.{n}.file", g.file, g.sha256) for n, g in manifest.graphs.items()]
    files += [(f"graphs.{n}.data_sha256", g.data, g.data_sha256) for n, g in manifest.graphs.items() if g.data]
    explain = manifest.explain.get("graphs", {})
    files += [(f"explain.graphs.{n}.file", g.file, g.sha256) for n, g in explain.items()]
    files += [(f"explain.graphs.{n}.data_sha256", g.data, g.data_sha256) for n, g in explain.items() if g.data]
    checked = set()
    files.append(("tokenizer.file", manifest.tokenizer["file"], manifest.tokenizer["sha256"]))
    if "vision_text" in manifest.prompt:
        files.append(("prompt.vision_text.tokenizer", manifest.prompt["vision_text"]["tokenizer"], manifest.prompt["vision_text"]["sha256"]))
    for field_name, fname, digest in files:
        fpath = confined(root, fname, field_name)
        if engines and field_name.startswith(("graphs.", "explain.")):
            continue  # an engine directory holds engines, not the ONNX files its manifest names
        if not fpath.is_file():
            raise BundleError(f"{fpath}: missing (named by {MANIFEST} {field_name})")
        if verify_hashes and (fname, digest) not in checked and sha256_file(fpath) != digest:
            raise BundleError(f"{fpath}: sha256 does not match {MANIFEST} {field_name}; the file was changed or is corrupt")
        checked.add((fname, digest))  # a weights file two graphs read is hashed once
    return Bundle(root, manifest)
