"""The canonical graphs as export specs: inputs, outputs and dynamic axes, derived from ModelDims.

Example inputs never have a dynamic dimension of size 1 (torch.export would specialise it), and
every dynamic axis carries the name the manifest and the TensorRT profiles use.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from vlmedge.errors import ExportError
from vlmedge.models.base import FamilyInfo
from vlmedge.runtime.bundle import DATA_SUFFIX, GraphSpec
from vlmedge.runtime.decoding import kv_names

# Ranges of the named axes: (min, opt, max). Batch and lengths are dynamic; image size is fixed.
DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_LENGTH = 128  # decoder positions (prompt + generated) the graphs declare, within the model's limit


@dataclass(frozen=True)
class TensorDecl:
    name: str
    dtype: str
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class GraphDecl:
    name: str
    inputs: tuple[TensorDecl, ...]
    outputs: tuple[TensorDecl, ...]


def kv(prefix: str, layers: int, heads: int, head_dim: int, length_axis: str) -> tuple[TensorDecl, ...]:
    return tuple(TensorDecl(n, "float32", ("batch", heads, length_axis, head_dim)) for n in kv_names(prefix, layers))


def graph_decls(info: FamilyInfo, image_width: int, with_text_encoder: bool) -> list[GraphDecl]:
    """The graphs a bundle of this family holds; `image_width` is the vision encoder's output width."""
    d, p = info.dims, info.preprocessing
    L, H, dh = d.decoder_layers, d.decoder_heads, d.decoder_head_dim
    graphs = [
        GraphDecl(
            "vision_encoder",
            (TensorDecl("pixel_values", "float32", ("batch", 3, p.height, p.width)),),
            (TensorDecl("image_states", "float32", ("batch", d.image_tokens, image_width)),),
        )
    ]
    if with_text_encoder:
        graphs.append(GraphDecl(
            "text_encoder",
            (TensorDecl("question_ids", "int64", ("batch", "question_len")),
             TensorDecl("question_mask", "int64", ("batch", "question_len")),
             TensorDecl("image_states", "float32", ("batch", d.image_tokens, image_width))),
            (TensorDecl("encoder_states", "float32", ("batch", "question_len", d.encoder_hidden)),),
        ))
    graphs.append(GraphDecl(
        "cross_kv",
        (TensorDecl("encoder_states", "float32", ("batch", "encoder_len", d.encoder_hidden)),),
        kv("cross", L, H, dh, "encoder_len"),
    ))
    # one graph for the prompt (after a one-slot past the mask hides) and every later token
    graphs.append(GraphDecl(
        "decoder",
        (TensorDecl("input_ids", "int64", ("batch", "seq_len")),
         TensorDecl("attention_mask", "int64", ("batch", "total_len")),
         TensorDecl("position_ids", "int64", ("batch", "seq_len")),
         TensorDecl("encoder_mask", "int64", ("batch", "encoder_len")),
         *kv("past", L, H, dh, "past_len"), *kv("cross", L, H, dh, "encoder_len")),
        (TensorDecl("logits", "float32", ("batch", d.vocab_size)), *kv("present", L, H, dh, "total_len")),
    ))
    return graphs


def axis_ranges(info: FamilyInfo, tasks: list[str], max_batch: int = DEFAULT_MAX_BATCH,
                max_length: int | None = None) -> dict[str, tuple[int, int, int]]:
    """min/opt/max of every named axis, for the manifest and the TensorRT optimisation profiles.
    `max_length` bounds prompt + generated tokens (default: the larger of 128 and the tasks' own
    limits, within the model's positions); the runtime refuses longer generation."""
    d = info.dims
    prompt = max(len(info.tasks[t].prompt_ids) for t in tasks)
    max_new = max(info.tasks[t].max_new_tokens for t in tasks)
    q = d.max_question_len
    specs = [info.tasks[t] for t in tasks]
    # what the decoder attends to: image tokens, the question, or (image_prefix) the image tokens and the prompt
    enc_min = [d.image_tokens if s.encoder == "vision_encoder" else d.image_tokens + 1 if s.image_prefix else 1 for s in specs]
    enc_max = [d.image_tokens if s.encoder == "vision_encoder" else q + d.image_tokens * s.image_prefix for s in specs]
    total_max = min(d.max_target_len, max_length or max(prompt + max_new, DEFAULT_MAX_LENGTH))
    # past and total count the hidden slot the prompt runs after: positions go up to total_max - 1
    ranges = {
        "batch": (1, 1, max_batch),
        "seq_len": (1, 1, max(prompt, 1)),
        "encoder_len": (min(enc_min), max(enc_max), max(enc_max)),
        "past_len": (1, min(17, total_max), total_max),
        "total_len": (2, min(18, total_max + 1), total_max + 1),
    }
    if any(s.encoder == "text_encoder" for s in specs):
        prompts = [len(s.text_prompt_ids) for s in specs if s.text_prompt_ids]
        opt = max(prompts) if prompts else min(16, q)
        ranges["question_len"] = (1, opt, q)
        if prompts:  # the decoder attends to [image tokens; prompt]: that is its usual length
            ranges["encoder_len"] = (min(enc_min), min(max(enc_max), d.image_tokens + opt), max(enc_max))
    return ranges


def save_graph(model, path: Path) -> None:
    """Write an ONNX graph with its weights (initializers of 1 kB and more) in `<file>.data` beside it.
    ONNX Runtime maps that file rather than copying every weight out of the parsed protobuf, so a
    bundle opens faster and holds its weights once in memory (benchmarks/memory.py). The model's
    initializers become references to that file (onnx's own conversion, in place)."""
    import onnx
    from onnx import numpy_helper

    for i, t in enumerate(model.graph.initializer):  # onnx moves raw bytes only: FP16 converters write typed fields
        if not t.HasField("raw_data") and t.data_location != onnx.TensorProto.EXTERNAL and t.data_type != onnx.TensorProto.STRING:
            arr = numpy_helper.to_array(t)
            if arr.nbytes >= 1024:
                model.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, t.name))
    data = path.with_name(path.name + DATA_SUFFIX)
    data.unlink(missing_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
              size_threshold=1024)
    if data.is_file():  # onnx creates it owner-only; it is read like the graph file beside it
        data.chmod(path.stat().st_mode & 0o777)


def copy_graph(src: Path, dst: Path) -> None:
    """Copy a graph file and its weights file, if it has one. A graph that reads weights from another
    graph's file (`share_weights`) is written with its weights in a file of its own, so that the copy
    stands alone whatever is written beside it later."""
    import onnx

    own = src.name + DATA_SUFFIX
    model = onnx.load(str(src), load_external_data=False)
    if any({e.key: e.value for e in t.external_data}.get("location") != own
           for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL):
        save_graph(onnx.load(str(src)), dst)
        return
    shutil.copyfile(src, dst)
    data = src.with_name(own)
    if data.is_file():
        shutil.copyfile(data, dst.with_name(dst.name + DATA_SUFFIX))


PAGE = 4096  # a weight appended to another graph's weights file starts on a page: it can be mapped where it lies


def share_weights(out: Path, graphs: dict[str, GraphSpec]) -> dict[str, GraphSpec]:
    """Store once a weight that two graphs of the bundle in `out` hold: a tied token table (the prefix
    contract's `embed` and its decoder's LM head; Florence-2's language encoder and decoder). The graph with
    the smaller weights file then reads the larger one's: its other weights are appended there, its own
    weights file is removed, and its spec names the file it reads (`data_file`). Returns the specs with
    their new hashes. A weight joins two graphs only where it has two or more dimensions and is not one
    value repeated (so not the ones and zeros a freshly initialised norm has in both towers of a model)."""
    import hashlib

    import onnx

    from vlmedge.runtime.bundle import sha256_file

    own = sorted((n for n, g in graphs.items() if g.data_file is None and g.data and (out / g.data).is_file()),
                 key=lambda n: -(out / graphs[n].data).stat().st_size)
    stored: dict[str, dict[bytes, tuple[int, int]]] = {}  # weights file -> content -> (offset, length)
    moved: dict[str, str] = {}  # graph -> the weights file it now reads
    for name, g in graphs.items():  # shared before (a spec made again from the files): the file it reads
        if g.data_file is None and not (g.data and (out / g.data).is_file()):
            model = onnx.load(str(out / g.file), load_external_data=False)
            files = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
            if len(files) == 1:
                moved[name] = files.pop()
    for name in own:
        g = graphs[name]
        model = onnx.load(str(out / g.file), load_external_data=False)
        tensors = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        key, joins = {}, []  # content of each weight (one weight in memory at a time), those that may join
        with open(out / g.data, "rb") as f:
            for t in tensors:
                offset, length = _place(t)
                f.seek(offset)
                raw = f.read(length)
                key[t.name] = hashlib.blake2b(raw, digest_size=16).digest() + length.to_bytes(8, "little")
                if len(t.dims) >= 2 and _varies(t, raw):
                    joins.append(t.name)
        host = next((file for file, index in stored.items() if any(key[n] in index for n in joins)), None)
        if host is None:
            stored[g.data] = {key[t.name]: _place(t) for t in tensors}
            continue
        index = stored[host]
        with open(out / g.data, "rb") as src, open(out / host, "r+b") as f:
            for t in tensors:
                if key[t.name] not in index:
                    offset, length = _place(t)
                    src.seek(offset)
                    end = f.seek(0, 2)
                    f.write(b"\0" * (-end % PAGE))
                    index[key[t.name]] = (f.tell(), length)
                    f.write(src.read(length))
                offset, length = index[key[t.name]]
                del t.external_data[:]
                for k, v in (("location", host), ("offset", str(offset)), ("length", str(length))):
                    e = t.external_data.add()
                    e.key, e.value = k, v
        onnx.save(model, str(out / g.file))
        (out / g.data).unlink()
        moved[name] = host
    if not moved:
        return graphs
    hashes = {file: sha256_file(out / file) for file in {*stored, *moved.values()}}
    shared = dict(graphs)
    for name, g in graphs.items():
        if name in moved:
            shared[name] = replace(g, sha256=sha256_file(out / g.file), data_sha256=hashes[moved[name]], data_file=moved[name])
        elif g.data in hashes:
            shared[name] = replace(g, data_sha256=hashes[g.data])
    for name, file in moved.items():
        if file not in {shared[n].data for n in shared if shared[n].data_file is None}:
            raise ExportError(f"{graphs[name].file} reads weights from {file}, which is no graph's weights file")
    return shared


def _place(t) -> tuple[int, int]:
    where = {e.key: e.value for e in t.external_data}
    return int(where.get("offset", 0)), int(where["length"])


def _varies(t, raw: bytes) -> bool:
    """Whether a tensor's elements are not all the same value."""
    import numpy as np
    import onnx

    size = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    elems = np.frombuffer(raw, np.uint8).reshape(-1, size)
    return bool((elems != elems[:1]).any())

