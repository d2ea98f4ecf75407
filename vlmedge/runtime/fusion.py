"""The fusion contract (ViLT, BridgeTower): its manifest schema, its preprocessing and its pipeline.

    pipe = vlmedge.load("bundles/vilt-vqa")
    pipe.vqa("a.png", "what colour is the circle?")      # -> [Answer("red", 0.91), ...], best first
    pipe = vlmedge.load("bundles/bridgetower-itm")
    pipe.match("a.png", ["a red circle", "two dogs"])     # -> [Match("a red circle", 4.2), Match(...)], in text order

A bundle of this contract has one graph, `fusion`, from pixels and text to the model's head output
(`logits`; vlmedge.models.fusion says what each head's logits are), and in `tasks` what the head is:
`vqa` with its answer vocabulary (scores: a sigmoid per answer, as Hugging Face's VQA pipeline gives
them), or `match` with how a score is read (`logit`: logits[:, index]; `contrastive`: exp(logit_scale)
* text . image over the graph's normalised embeddings).

Preprocessing is the models' image processors (ViltImageProcessor, BridgeTowerImageProcessor; their
Pillow backends) in numpy + Pillow: the shorter edge resized to `shortest_edge`, the longer capped at
`longest_edge`, both rounded down to `size_divisor`; then either a centre crop to one size
(BridgeTower: `crop_height` x `crop_width`, zero padding where the image is smaller) or, where the graph
reads a pixel mask (ViLT), every image of a batch padded at the bottom and right to the largest. The
tokenizer truncates every text to `max_length` and pads a batch to its longest.

The manifest is checked like every bundle's (vlmedge.runtime.bundle: files confined to the bundle,
hashes), against its own schema below: schema version 5, `contract: "fusion"`.
"""

from __future__ import annotations

import numbers
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vlmedge.errors import BundleError, InputError, first_line
from vlmedge.runtime.bundle import (
    AXIS_MAX, DIM_MAX, DTYPES, FILE_NAME, MANIFEST, RESAMPLE_FILTERS, SHA256, TARGETS, VOCAB_MAX, VOLUME_MAX, AxisRange, Bundle,
    GraphSpec, Manifest, TensorSpec,
)
from vlmedge.runtime.images import DEFAULT_MAX_PIXELS, load_image
from vlmedge.runtime.schema import Either, Free, Int, Invalid, List, Map, Num, Obj, Str

CONTRACT = "fusion"
SCHEMA_VERSION = 5  # the first version with the fusion contract
MAX_TEXTS = 4096
MAX_ANSWERS = 1 << 16

_TENSOR = Obj({
    "name": Str(max_len=256, what="a tensor name"),
    "dtype": Str(choices=DTYPES),
    "shape": List(Either((int, Int(1, DIM_MAX)), (str, Str(max_len=64, what="an axis name")),
                         what="a positive int or an axis name"), min_len=0, max_len=8),
})
_GRAPH = Obj({"file": FILE_NAME, "sha256": SHA256, "inputs": List(_TENSOR, 1, 16), "outputs": List(_TENSOR, 1, 16)},
             {"data_sha256": SHA256})
_SIDE = Int(1, 16384)
SCHEMA = Obj({
    "schema_version": Int(0, 1 << 31),
    "contract": Str(choices=(CONTRACT,)),
    "family": Str(max_len=128), "architecture": Str(max_len=256),
    "tasks": Obj({}, {
        "vqa": Obj({"activation": Str(choices=("sigmoid",)), "labels": List(Str(max_len=1024, what="an answer"), 1, MAX_ANSWERS)}),
        "match": Obj({"score": Str(choices=("logit", "contrastive"))},
                     {"index": Int(0, DIM_MAX - 1), "logit_scale": Num(0, 1e6, positive=True)}),
    }),
    "dims": Obj({"vocab_size": Int(1, VOCAB_MAX), "text_len": Int(2, AXIS_MAX), "patch_size": Int(1, 1024)}),
    "graphs": Obj({"fusion": _GRAPH}),
    "axes": Map(Str(max_len=64, what="an axis name"),
                Obj({"min": Int(1, AXIS_MAX), "opt": Int(1, AXIS_MAX), "max": Int(1, AXIS_MAX)}), min_len=1, max_len=8),
    "preprocessing": Obj({
        "resample": Str(choices=RESAMPLE_FILTERS),
        "mean": List(Num(-1e6, 1e6), 3, 3), "std": List(Num(0, 1e6, positive=True), 3, 3),
        "rescale": Num(0, 1e6, positive=True),
        "shortest_edge": _SIDE, "longest_edge": _SIDE, "size_divisor": Int(1, 1024),
    }, {"crop_height": _SIDE, "crop_width": _SIDE}),
    "tokenizer": Obj({"file": FILE_NAME, "sha256": SHA256, "max_length": Int(2, AXIS_MAX), "pad_id": Int(0, VOCAB_MAX - 1)}),
    "precision": Obj({"dtype": Str(max_len=32)}, {"method": Str(max_len=64)}),
    "provenance": Free(dict),
}, {"validation": Free(dict), "target": Str(choices=TARGETS), "prompt": Free(dict)})  # (prompt: written empty)

TEXT_INPUTS = {"input_ids": (None, None), "attention_mask": (None, None)}  # (name -> shape: None an axis, int fixed)


def expected_io(prep: dict, tasks: dict, masked: bool) -> tuple[dict, dict]:
    """The fusion graph's inputs and outputs as the pipeline feeds and reads them: name -> shape
    (None: a named axis; an int: that size; "any": an int of the head's own)."""
    if masked:  # ViLT: images of any size, padded within a batch, with their mask
        inputs = {"pixel_values": (None, 3, None, None), "pixel_mask": (None, None, None)}
    else:
        inputs = {"pixel_values": (None, 3, prep.get("crop_height"), prep.get("crop_width"))}
    if "vqa" in tasks:
        logits = (None, len(tasks["vqa"]["labels"]))
    elif tasks["match"]["score"] == "logit":
        logits = (None, "any")
    else:
        logits = (None, 3, "any")
    return {**inputs, **TEXT_INPUTS}, {"logits": logits}


def is_fusion(path: str | os.PathLike) -> bool:
    """Whether a directory's manifest names the fusion contract, read cheaply (no hashing; anything
    unreadable is False, and whoever loads it next reports it)."""
    from vlmedge.errors import VlmedgeError, read_json
    from vlmedge.runtime.bundle import MANIFEST_MAX_BYTES

    try:
        mpath = Path(path) / MANIFEST
        if not mpath.is_file():
            return False
        raw = read_json(mpath, BundleError, MANIFEST_MAX_BYTES)
    except (VlmedgeError, OSError, TypeError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("contract") == CONTRACT


def parse_manifest(raw: Any, where: str = MANIFEST) -> Manifest:
    """A decoded fusion manifest, checked: the schema, then the graph's tensors against what the pipeline
    feeds and reads, the axes they name, the head and the token ids within the vocabulary."""
    try:
        m = SCHEMA.check(raw)
        if m["schema_version"] != SCHEMA_VERSION:
            raise BundleError(f"{where}: schema_version {m['schema_version']} of the fusion contract is not supported "
                              f"(this vlmedge reads {SCHEMA_VERSION}); "
                              + ("upgrade vlmedge" if m["schema_version"] > SCHEMA_VERSION else "re-export the bundle"))
        tasks, prep, tok, dims = m["tasks"], m["preprocessing"], m["tokenizer"], m["dims"]
        if len(tasks) != 1:
            raise Invalid("tasks", "expected exactly one of vqa, match")
        match = tasks.get("match")
        if match and (match["score"] == "logit") != ("index" in match and "logit_scale" not in match):
            raise Invalid("tasks.match", "score logit takes an index; score contrastive a logit_scale")
        if prep["longest_edge"] < prep["shortest_edge"]:
            raise Invalid("preprocessing.longest_edge", f"{prep['longest_edge']} is under shortest_edge {prep['shortest_edge']}")
        if ("crop_height" in prep) != ("crop_width" in prep):
            raise Invalid("preprocessing", "crop_height and crop_width go together")
        axes = {}
        for name, a in m["axes"].items():
            if not a["min"] <= a["opt"] <= a["max"]:
                raise Invalid(f"axes.{name}", f"expected 1 <= min <= opt <= max, got {a['min']}, {a['opt']}, {a['max']}")
            axes[name] = AxisRange(a["min"], a["opt"], a["max"])
        if "batch" not in axes:
            raise Invalid("axes.batch", "missing (the graph's first axis)")
        g = m["graphs"]["fusion"]
        spec = GraphSpec(g["file"], g["sha256"], *(tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in g[k])
                                                   for k in ("inputs", "outputs")),
                         **({"data_sha256": g["data_sha256"]} if "data_sha256" in g else {}))
        masked = any(t.name == "pixel_mask" for t in spec.inputs)
        if masked == ("crop_height" in prep):
            raise Invalid("preprocessing", "a graph with a pixel_mask takes images of any size (no crop); one without, cropped ones")
        want_in, want_out = expected_io(prep, tasks, masked)
        for kind, tensors, want in (("inputs", spec.inputs, want_in), ("outputs", spec.outputs, want_out)):
            names = [t.name for t in tensors]
            if sorted(names) != sorted(want):
                raise Invalid(f"graphs.fusion.{kind}", f"expected {', '.join(sorted(want))}, got {', '.join(names)}")
            for i, t in enumerate(tensors):
                w = f"graphs.fusion.{kind}[{i}]"
                if (t.dtype in ("int64", "int32")) != (t.name in ("input_ids", "attention_mask", "pixel_mask")):
                    raise Invalid(f"{w}.dtype", f"{t.name} is {t.dtype}")
                if len(t.shape) != len(want[t.name]):
                    raise Invalid(f"{w}.shape", f"{t.name} has rank {len(t.shape)}, expected {len(want[t.name])}")
                volume = 1
                for j, (s, expect) in enumerate(zip(t.shape, want[t.name])):
                    if isinstance(s, str) and s not in axes:
                        raise Invalid(f"{w}.shape[{j}]", f"axis {s!r} is not defined in axes")
                    if isinstance(expect, int) and s != expect:
                        raise Invalid(f"{w}.shape[{j}]", f"{t.name} has {s!r} here, expected {expect}")
                    if expect == "any" and not isinstance(s, int):
                        raise Invalid(f"{w}.shape[{j}]", f"{t.name} has {s!r} here, expected a fixed size")
                    volume *= axes[s].max if isinstance(s, str) else s
                if volume > VOLUME_MAX:
                    raise Invalid(f"{w}.shape", f"{t.name} has {volume:,} elements at its largest shape, over {VOLUME_MAX:,}")
        logits = spec.outputs[0].shape
        if match and match["score"] == "logit" and match["index"] >= logits[-1]:
            raise Invalid("tasks.match.index", f"{match['index']} is outside the logits' {logits[-1]} columns")
        ids = next(t for t in spec.inputs if t.name == "input_ids").shape[1]
        longest = axes[ids].max if isinstance(ids, str) else ids
        if tok["max_length"] > dims["text_len"] or tok["max_length"] > longest:
            raise Invalid("tokenizer.max_length", f"{tok['max_length']} is over the graph's {min(dims['text_len'], longest)} positions")
        if tok["pad_id"] >= dims["vocab_size"]:
            raise Invalid("tokenizer.pad_id", f"token id {tok['pad_id']} is outside the vocabulary (dims.vocab_size {dims['vocab_size']})")
        if masked and prep["size_divisor"] % dims["patch_size"]:
            raise Invalid("preprocessing.size_divisor", f"{prep['size_divisor']} is not a multiple of dims.patch_size {dims['patch_size']}")
    except Invalid as e:
        raise BundleError(f"{where}: {e}") from None
    return Manifest(
        family=m["family"], architecture=m["architecture"], tasks=tasks, dims=dims, graphs={"fusion": spec}, axes=axes,
        preprocessing=prep, tokenizer=tok, precision=m["precision"], provenance=m["provenance"],
        validation=m.get("validation", {}), schema_version=m["schema_version"], target=m.get("target", TARGETS[0]),
        contract=CONTRACT,
    )


# -- preprocessing ------------------------------------------------------------------------------

def resize_size(height: int, width: int, prep: dict) -> tuple[int, int]:
    """Both processors' `get_resize_output_image_size`: the shorter edge to shortest_edge, the longer capped at
    longest_edge, rounded to the nearest pixel, then down to a multiple of size_divisor."""
    short, cap, div = prep["shortest_edge"], prep["longest_edge"], prep["size_divisor"]
    scale = short / min(height, width)
    h, w = (short, scale * width) if height < width else (scale * height, short)
    if max(h, w) > cap:
        s = cap / max(h, w)
        h, w = s * h, s * w
    return int(h + 0.5) // div * div, int(w + 0.5) // div * div


def _center_crop(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """transformers' center_crop on (h, w, 3) uint8: a window of height x width about the centre; where the
    image is smaller, it is first placed on zeros (its top-left at the ceiling of half the difference)."""
    h, w = a.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0 and top + height <= h and left + width <= w:
        return a[top: top + height, left: left + width]
    nh, nw = max(height, h), max(width, w)
    canvas = np.zeros((nh, nw, 3), np.uint8)
    tp, lp = -(-(nh - h) // 2), -(-(nw - w) // 2)
    canvas[tp: tp + h, lp: lp + w] = a
    top, left = top + tp, left + lp
    return canvas[max(0, top): min(nh, top + height), max(0, left): min(nw, left + width)]


def image_inputs(images: Sequence[Any], prep: dict, masked: bool) -> dict[str, np.ndarray]:
    """RGB PIL images -> pixel_values (B, 3, H, W) float32 and, for a masked graph, pixel_mask (B, H, W) int64,
    as the model's image processor makes them (module docstring)."""
    from vlmedge.runtime.preprocess import _RESAMPLE, normalize

    frames = []
    for i, img in enumerate(images):
        h, w = resize_size(img.height, img.width, prep)
        if h < 1 or w < 1:
            raise InputError(f"image {i}: {img.width}x{img.height} px resizes to {w}x{h}; its aspect ratio is too extreme "
                             f"for this model (the longer side is capped at {prep['longest_edge']} px)")
        a = np.asarray(img.resize((w, h), _RESAMPLE[prep["resample"]]) if img.size != (w, h) else img, np.uint8)
        if "crop_height" in prep:
            a = _center_crop(a, prep["crop_height"], prep["crop_width"])
        frames.append(normalize(a[None], prep["mean"], prep["std"], prep["rescale"])[0])  # (3, h, w)
    if not masked:
        return {"pixel_values": np.stack(frames).astype(np.float32)}
    H, W = max(f.shape[1] for f in frames), max(f.shape[2] for f in frames)
    values = np.zeros((len(frames), 3, H, W), np.float32)
    mask = np.zeros((len(frames), H, W), np.int64)
    for i, f in enumerate(frames):
        values[i, :, : f.shape[1], : f.shape[2]] = f
        mask[i, : f.shape[1], : f.shape[2]] = 1
    return {"pixel_values": values, "pixel_mask": mask}


# -- the pipeline ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Answer:
    answer: str
    score: float  # the answer's sigmoid, as Hugging Face's VQA pipeline gives it


@dataclass(frozen=True)
class Match:
    text: str
    score: float  # the head's image-text matching score (module docstring): higher is a better match


def _many(x: Any) -> bool:
    return isinstance(x, (list, tuple))


class FusionPipeline:
    """A fusion bundle: answers to questions about images (ViLT VQA) or image-text matching scores (ViLT
    retrieval, BridgeTower). Holds one session and no per-call state; one pipeline can serve several threads."""

    contract = CONTRACT

    def __init__(self, bundle: Bundle, device: str = "cpu", threads: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, batch_size: int = 16, warn=None, shared_threads: bool = False):
        from tokenizers import Tokenizer

        from vlmedge.runtime.backends import open_backend

        self.bundle, self.manifest, self.device = bundle, bundle.manifest, device
        m = self.manifest
        if m.contract != CONTRACT:
            raise BundleError(f"{bundle.path}: a {m.contract} bundle; vqa and match here need a fusion bundle (ViLT, BridgeTower)")
        self.max_pixels = max_pixels
        try:
            self.tokenizer = Tokenizer.from_file(str(bundle.tokenizer_path))
        except Exception as e:  # tokenizers raises plain Exception for a file it cannot parse
            raise BundleError(f"{bundle.tokenizer_path}: not a tokenizer the tokenizers library can load "
                              f"({first_line(e)}; named by manifest.json tokenizer.file)") from None
        tok = m.tokenizer
        if self.tokenizer.id_to_token(tok["pad_id"]) is None:
            raise BundleError(f"{bundle.tokenizer_path}: has no token {tok['pad_id']} (manifest.json tokenizer.pad_id)")
        self.tokenizer.enable_truncation(max_length=int(tok["max_length"]))
        self.tokenizer.enable_padding(pad_id=tok["pad_id"], pad_token=self.tokenizer.id_to_token(tok["pad_id"]))
        self._tok_lock = threading.Lock()
        self.backend = open_backend(bundle, device, threads, warn, shared_threads)
        self.batch_size = max(1, min(int(batch_size), m.axes["batch"].max))
        self.masked = any(t.name == "pixel_mask" for t in m.graphs["fusion"].inputs)
        self.task = next(iter(m.tasks))
        self.head = m.tasks[self.task]

    def __repr__(self) -> str:
        return f"FusionPipeline({self.bundle.path}, {self.manifest.family}, {self.task}, backend={self.backend.name})"

    @property
    def tasks(self) -> tuple[str, ...]:
        return (self.task,)

    def caption(self, *args, **kwargs):
        raise InputError(f"{self.bundle.path}: a fusion bundle ({self.manifest.architecture}) "
                         + ("answers from its answer vocabulary (vlmedge vqa); it writes no captions" if self.task == "vqa"
                            else "scores image-text matches (vlmedge match); it writes no captions or answers"))

    # what the generating pipelines answer, refused in one line here
    stream = settings = run = generate_steps = embed_images = embed_texts = classify = caption
    caption_task = "caption"

    # -- inputs --------------------------------------------------------------------------------
    def image_inputs(self, images: Sequence[Any]) -> dict[str, np.ndarray]:
        """Paths, PIL images or arrays -> pixel_values (and pixel_mask); the first bad image raises InputError naming it."""
        rgb = [load_image(img, self.max_pixels, where=f"image {i}") for i, img in enumerate(images)]
        return image_inputs(rgb, self.manifest.preprocessing, self.masked)

    def text_ids(self, texts: Sequence[str], what: str = "text") -> tuple[np.ndarray, np.ndarray]:
        """Texts -> (input_ids, attention_mask), truncated to the model's positions, padded to the longest."""
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InputError(f"{what} {i}: expected a string, got {type(t).__name__}")
            if not t.strip():
                raise InputError(f"{what} {i}: empty; give some words")
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as e:
                raise InputError(f"{what} {i}: not valid Unicode text (a lone surrogate at character {e.start})") from None
        with self._tok_lock:
            enc = self.tokenizer.encode_batch(list(texts))
        return (np.array([e.ids for e in enc], dtype=np.int64), np.array([e.attention_mask for e in enc], dtype=np.int64))

    question_ids = text_ids  # (the CLI checks a question once, before reading images)

    # -- the graph -------------------------------------------------------------------------------
    def logits(self, images: Sequence[Any], texts: Sequence[str], what: str = "text") -> np.ndarray:
        """Pairs (images[i], texts[i]) -> the head's logits, (N, ...) float32, batched by the bundle's range."""
        if len(images) != len(texts):
            raise InputError(f"{len(images)} images and {len(texts)} texts: give one text per image")
        self.text_ids(texts, what)  # every text checked before any image is read
        out = []
        for s in range(0, len(images), self.batch_size):
            ids, mask = self.text_ids(texts[s: s + self.batch_size], what)
            feeds = {**self.image_inputs(images[s: s + self.batch_size]), "input_ids": ids, "attention_mask": mask}
            out.append(np.asarray(self.backend.run("fusion", feeds)["logits"], np.float32))
        return np.concatenate(out) if out else np.zeros((0,), np.float32)

    def scores(self, logits: np.ndarray) -> np.ndarray:
        """Logits -> per pair: the answers' sigmoids (N, answers) for vqa, or one matching score (N,)."""
        x = logits.astype(np.float32)
        if self.task == "vqa":
            return 1.0 / (1.0 + np.exp(-x))
        if self.head["score"] == "logit":
            return x[:, self.head["index"]]
        return np.float32(self.head["logit_scale"]) * (x[:, 0] * x[:, 1]).sum(-1)  # text . image, both normalised

    # -- tasks ---------------------------------------------------------------------------------
    def vqa(self, images: Any, questions: Any, top_k: int = 5) -> list[Answer] | list[list[Answer]]:
        """One image and one question -> its top answers (Answer, best first); lists of images and questions
        (one question each, or one for all) -> one such list each."""
        if self.task != "vqa":
            raise InputError(f"{self.bundle.path}: {self.manifest.architecture} scores image-text matches and has no "
                             "answer vocabulary; use match (vlmedge match)")
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
            raise InputError(f"top_k: expected an integer >= 1, got {top_k!r:.40}")
        many = _many(images)
        items = list(images) if many else [images]
        qs = list(questions) if _many(questions) else [questions] * len(items)
        if len(qs) != len(items):
            raise InputError(f"{len(items)} images and {len(qs)} questions: give one question, or one per image")
        if not items:
            return []
        probs = self.scores(self.logits(items, qs, "question"))
        labels = self.head["labels"]
        k = min(int(top_k), len(labels))
        rows = []
        for p in probs:
            order = np.argsort(-p, kind="stable")[:k]
            rows.append([Answer(labels[j], float(p[j])) for j in order])
        return rows if many else rows[0]

    def match(self, images: Any, texts: Sequence[str]) -> list[Match] | list[list[Match]]:
        """One image and texts -> a Match per text, in the texts' order; a list of images -> one such list each."""
        if self.task != "match":
            raise InputError(f"{self.bundle.path}: {self.manifest.architecture} answers questions; use vqa (vlmedge vqa)")
        if not _many(texts):
            raise InputError(f"texts: expected a list of texts, got {type(texts).__name__}")
        if not texts:
            raise InputError("texts: empty; give at least one text")
        if len(texts) > MAX_TEXTS:
            raise InputError(f"texts: {len(texts)}, over the limit of {MAX_TEXTS}")
        many = _many(images)
        items = list(images) if many else [images]
        if not items:
            return []
        self.text_ids(list(texts))
        rgb = [load_image(img, self.max_pixels, where=f"image {i}") for i, img in enumerate(items)]
        pairs_img = [img for img in rgb for _ in texts]
        scores = self.scores(self.logits(pairs_img, [t for _ in rgb for t in texts])).reshape(len(rgb), len(texts))
        rows = [[Match(t, float(s)) for t, s in zip(texts, row)] for row in scores]
        return rows if many else rows[0]
