"""The dual-encoder contract (CLIP, SigLIP): its manifest schema and its pipeline.

    pipe = vlmedge.load("bundles/clip")
    pipe.embed_images(["a.png", "b.png"])        # -> (2, D) float32, L2-normalised
    pipe.embed_texts(["a red circle"])            # -> (1, D)
    pipe.classify("a.png", ["cat", "dog"])       # -> [Label("cat", 0.93), Label("dog", 0.07)], best first

A bundle of this contract has two graphs, `image_encoder(pixel_values) -> image_embeds` and
`text_encoder(input_ids, attention_mask) -> text_embeds` (projected and normalised as the model's
forward does), and in `tasks.classify` the numbers that make logits of cosine similarities:
`logits = logit_scale * text . image + logit_bias`, label probabilities by `activation` (softmax
over the labels for CLIP, a sigmoid per label for SigLIP), as Hugging Face's zero-shot pipeline
computes them. The tokenizer's `max_length` truncates every text; `padding` says whether texts
are padded to the longest of a batch (CLIP) or always to `max_length` (SigLIP, which pools the
last position).

The manifest is checked like every bundle's (vlmedge.runtime.bundle: files confined to the bundle,
hashes), against its own schema below: schema version 3, `contract: "dual-encoder"`.
"""

from __future__ import annotations

import math
import numbers
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vlmedge.errors import BundleError, InputError, first_line
from vlmedge.runtime.bundle import (
    DTYPES, FILE_NAME, MANIFEST, RESAMPLE_FILTERS, SHA256, TARGETS, AxisRange, Bundle, GraphSpec, Manifest, TensorSpec,
    VOLUME_MAX, VOCAB_MAX, DIM_MAX, AXIS_MAX,
)
from vlmedge.runtime.images import DEFAULT_MAX_PIXELS, load_image
from vlmedge.runtime.schema import Free, Int, Invalid, List, Map, Num, Obj, Str, Either

CONTRACT = "dual-encoder"
SCHEMA_VERSION = 3  # the first version with the dual-encoder contract
ACTIVATIONS = ("softmax", "sigmoid")
PADDING = ("longest", "max_length")
DEFAULT_TEMPLATE = "a photo of a {}."
MAX_LABELS = 4096

_TENSOR = Obj({
    "name": Str(max_len=256, what="a tensor name"),
    "dtype": Str(choices=DTYPES),
    "shape": List(Either((int, Int(1, DIM_MAX)), (str, Str(max_len=64, what="an axis name")),
                         what="a positive int or an axis name"), min_len=0, max_len=8),
})
_GRAPH = Obj({"file": FILE_NAME, "sha256": SHA256, "inputs": List(_TENSOR, 1, 16), "outputs": List(_TENSOR, 1, 16)},
             {"data_sha256": SHA256})  # the graph's weights in `<file>.data` beside it (vlmedge.runtime.bundle)
_TEMPLATE = Str(max_len=1024, what="a prompt template with {} where the label goes",
                test=lambda s: None if s.count("{}") == 1 and "{" not in s.replace("{}", "") and "}" not in s.replace("{}", "")
                else "expected a template with one {} (where the label goes) and no other braces")
SCHEMA = Obj({
    "schema_version": Int(0, 1 << 31),
    "contract": Str(choices=(CONTRACT,)),
    "family": Str(max_len=128), "architecture": Str(max_len=256),
    "tasks": Obj({"classify": Obj({
        "activation": Str(choices=ACTIVATIONS), "logit_scale": Num(0, 1e6, positive=True), "logit_bias": Num(-1e6, 1e6),
        "template": _TEMPLATE,
    })}),
    "dims": Obj({"embed_dim": Int(1, DIM_MAX), "vocab_size": Int(1, VOCAB_MAX), "text_len": Int(2, AXIS_MAX)}),
    "graphs": Obj({"image_encoder": _GRAPH, "text_encoder": _GRAPH}),
    "axes": Map(Str(max_len=64, what="an axis name"),
                Obj({"min": Int(1, AXIS_MAX), "opt": Int(1, AXIS_MAX), "max": Int(1, AXIS_MAX)}), min_len=1, max_len=8),
    "preprocessing": Obj({
        "resample": Str(choices=RESAMPLE_FILTERS),
        "mean": List(Num(-1e6, 1e6), 3, 3), "std": List(Num(0, 1e6, positive=True), 3, 3),
        "rescale": Num(0, 1e6, positive=True),
    }, {"height": Int(1, 16384), "width": Int(1, 16384), "shortest_edge": Int(1, 16384),  # fixed size (CLIP, SigLIP)
        "patch_size": Int(1, 1024), "max_num_patches": Int(1, 1 << 16)}),  # NaFlex (SigLIP 2)
    "tokenizer": Obj({"file": FILE_NAME, "sha256": SHA256, "max_length": Int(2, AXIS_MAX),
                      "padding": Str(choices=PADDING), "pad_id": Int(0, VOCAB_MAX - 1)},
                     {"padding_side": Str(choices=("right", "left"))}),
    "precision": Obj({"dtype": Str(max_len=32)}, {"method": Str(max_len=64)}),
    "provenance": Free(dict),
}, {"validation": Free(dict), "target": Str(choices=TARGETS), "prompt": Free(dict)})

# graph -> (inputs, outputs): name -> the shape the pipeline relies on (None: an axis, str: a dims entry)
IO = {
    "image_encoder": ({"pixel_values": (None, 3, "height", "width")}, {"image_embeds": (None, "embed_dim")}),
    "text_encoder": ({"input_ids": (None, None), "attention_mask": (None, None)}, {"text_embeds": (None, "embed_dim")}),
}
# SigLIP 2 (NaFlex): an image is its patches, padded to max_num_patches, their mask and its patch grid
NAFLEX_IMAGE_IO = ({"pixel_values": (None, "max_num_patches", "patch_dim"), "pixel_attention_mask": (None, "max_num_patches"),
                    "spatial_shapes": (None, 2)}, {"image_embeds": (None, "embed_dim")})


def naflex(prep) -> bool:
    return "max_num_patches" in prep


def is_dual_encoder(path: str | os.PathLike) -> bool:
    """Whether a directory's manifest names the dual-encoder contract, read cheaply (no hashing; anything
    unreadable is False, and whoever loads it next reports it)."""
    from vlmedge.errors import VlmedgeError, read_json
    from vlmedge.runtime.bundle import MANIFEST_MAX_BYTES

    try:
        mpath = Path(path) / MANIFEST
        if not mpath.is_file():  # (a FIFO or a device named manifest.json is never read here)
            return False
        raw = read_json(mpath, BundleError, MANIFEST_MAX_BYTES)
    except (VlmedgeError, OSError, TypeError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("contract") == CONTRACT


def parse_manifest(raw: Any, where: str = MANIFEST) -> Manifest:
    """A decoded dual-encoder manifest, checked: the schema, then the graphs' tensors against what the
    pipeline feeds and reads, the axes they name and the token ids within the vocabulary."""
    try:
        m = SCHEMA.check(raw)
        if m["schema_version"] != SCHEMA_VERSION:
            raise BundleError(f"{where}: schema_version {m['schema_version']} of the dual-encoder contract is not "
                              f"supported (this vlmedge reads {SCHEMA_VERSION}); "
                              + ("upgrade vlmedge" if m["schema_version"] > SCHEMA_VERSION else "re-export the bundle"))
        axes = {}
        for name, a in m["axes"].items():
            if not a["min"] <= a["opt"] <= a["max"]:
                raise Invalid(f"axes.{name}", f"expected 1 <= min <= opt <= max, got {a['min']}, {a['opt']}, {a['max']}")
            axes[name] = AxisRange(a["min"], a["opt"], a["max"])
        if "batch" not in axes:
            raise Invalid("axes.batch", "missing (every graph's first axis)")
        dims, prep, tok = m["dims"], m["preprocessing"], m["tokenizer"]
        if naflex(prep):
            if "patch_size" not in prep or any(k in prep for k in ("height", "width", "shortest_edge")):
                raise Invalid("preprocessing", "NaFlex (max_num_patches) takes patch_size and no height, width or shortest_edge")
            sizes = {**dims, "max_num_patches": prep["max_num_patches"], "patch_dim": 3 * prep["patch_size"] ** 2}
        else:
            for key in ("height", "width"):
                if key not in prep:
                    raise Invalid(f"preprocessing.{key}", "missing (the image size, or max_num_patches and patch_size for NaFlex)")
            if "patch_size" in prep:
                raise Invalid("preprocessing.patch_size", "a setting of NaFlex preprocessing (max_num_patches), which this bundle does not use")
            sizes = {**dims, "height": prep["height"], "width": prep["width"]}
        io = {**IO, "image_encoder": NAFLEX_IMAGE_IO} if naflex(prep) else IO
        extra = sorted(set(m["graphs"]) - set(io))
        if extra:
            raise Invalid(f"graphs.{extra[0]}", "not a graph of the dual-encoder contract (image_encoder, text_encoder)")
        graphs = {}
        for gname, g in m["graphs"].items():
            graphs[gname] = spec = GraphSpec(g["file"], g["sha256"], *(tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"]))
                                                                         for t in g[k]) for k in ("inputs", "outputs")),
                                             **({"data_sha256": g["data_sha256"]} if "data_sha256" in g else {}))
            for kind, tensors, want in (("inputs", spec.inputs, io[gname][0]), ("outputs", spec.outputs, io[gname][1])):
                names = [t.name for t in tensors]
                if sorted(names) != sorted(want):
                    raise Invalid(f"graphs.{gname}.{kind}", f"expected {', '.join(sorted(want))}, got {', '.join(names)}")
                for i, t in enumerate(tensors):
                    w = f"graphs.{gname}.{kind}[{i}].shape"
                    if len(t.shape) != len(want[t.name]):
                        raise Invalid(w, f"{t.name} has rank {len(t.shape)}, expected {len(want[t.name])}")
                    volume = 1
                    for j, (s, expect) in enumerate(zip(t.shape, want[t.name])):
                        if isinstance(s, str) and s not in axes:
                            raise Invalid(f"{w}[{j}]", f"axis {s!r} is not defined in axes")
                        fixed = sizes[expect] if isinstance(expect, str) else expect
                        if isinstance(s, int) and fixed is not None and s != fixed:
                            raise Invalid(f"{w}[{j}]", f"{t.name} has {s} here, but the manifest's {expect} is {fixed}")
                        volume *= axes[s].max if isinstance(s, str) else s
                    if volume > VOLUME_MAX:
                        raise Invalid(w, f"{t.name} has {volume:,} elements at its largest shape, over {VOLUME_MAX:,}")
        ids = graphs["text_encoder"].inputs
        text_axis = next(t.shape[1] for t in ids if t.name == "input_ids")
        longest = axes[text_axis].max if isinstance(text_axis, str) else text_axis
        if tok["max_length"] > dims["text_len"] or tok["max_length"] > longest:
            raise Invalid("tokenizer.max_length", f"{tok['max_length']} is over the text graph's {min(dims['text_len'], longest)} positions")
        if tok["padding"] == "max_length" and isinstance(text_axis, int) and text_axis != tok["max_length"]:
            raise Invalid("tokenizer.max_length", f"texts are padded to {tok['max_length']}, but input_ids has {text_axis} positions")
        if tok["pad_id"] >= dims["vocab_size"]:
            raise Invalid("tokenizer.pad_id", f"token id {tok['pad_id']} is outside the vocabulary (dims.vocab_size {dims['vocab_size']})")
    except Invalid as e:
        raise BundleError(f"{where}: {e}") from None
    return Manifest(
        family=m["family"], architecture=m["architecture"], tasks=m["tasks"], dims=dims, graphs=graphs, axes=axes,
        preprocessing=prep, tokenizer=tok, precision=m["precision"], provenance=m["provenance"],
        validation=m.get("validation", {}), schema_version=m["schema_version"], target=m.get("target", TARGETS[0]),
        contract=CONTRACT, prompt=m.get("prompt", {}),
    )


# -- the pipeline ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Label:
    label: str
    score: float  # the label's probability: softmax over the labels (CLIP) or sigmoid (SigLIP)


def _many(x: Any) -> bool:
    return isinstance(x, (list, tuple))


def pixel_values(images: Sequence[Any], prep: dict) -> np.ndarray:
    """RGB PIL images -> (B, 3, H, W) float32, as the model's image processor makes them (fixed-size kinds):
    CLIPImageProcessor's shortest edge and centre crop (the one the LLaVA processor uses, runtime.processors),
    or SigLIP's resize straight to height x width (runtime.preprocess)."""
    from vlmedge.runtime import preprocess
    from vlmedge.runtime.processors import _clip

    if "shortest_edge" not in prep:
        return preprocess.pixel_values(images, prep)
    spec = {"shortest_edge": prep["shortest_edge"], "image_token": "", "image_tokens": 1}  # (no prompt tokens here)
    return np.concatenate([_clip(img, prep, spec).frames for img in _rgb(images)])


def _rgb(images: Sequence[Any]) -> list:
    from PIL import Image

    from vlmedge.runtime.images import to_rgb

    return [to_rgb(i if isinstance(i, Image.Image) else Image.fromarray(np.asarray(i, dtype=np.uint8))) for i in images]


def naflex_size(height: int, width: int, patch: int, max_patches: int, eps: float = 1e-5) -> tuple[int, int]:
    """Siglip2ImageProcessor's target size: the largest scale (found by bisection, as it does) at which the
    image, each side rounded up to whole patches, has at most `max_patches` patches."""
    def side(scale: float, size: int) -> int:
        return int(max(patch, math.ceil(size * scale / patch) * patch))

    lo, hi = eps / 10, 100.0
    while hi - lo >= eps:
        mid = (lo + hi) / 2
        if (side(mid, height) / patch) * (side(mid, width) / patch) <= max_patches:
            lo = mid
        else:
            hi = mid
    return side(lo, height), side(lo, width)


def naflex_inputs(images: Sequence[Any], prep: dict) -> dict[str, np.ndarray]:
    """SigLIP 2's NaFlex processor: each image resized to its own patch grid, cut into patches (row-major,
    each patch's pixels row by row, channels last), padded to max_num_patches with a mask."""
    from vlmedge.runtime.preprocess import _RESAMPLE, normalize

    p, n = int(prep["patch_size"]), int(prep["max_num_patches"])
    values, masks, shapes = [], [], []
    for img in _rgb(images):
        h, w = naflex_size(img.height, img.width, p, n)
        a = normalize(np.asarray(img.resize((w, h), _RESAMPLE[prep["resample"]]), np.uint8)[None], prep["mean"], prep["std"],
                      prep["rescale"])[0]  # (3, h, w)
        gh, gw = h // p, w // p
        patches = a.reshape(3, gh, p, gw, p).transpose(1, 3, 2, 4, 0).reshape(gh * gw, -1)
        values.append(np.pad(patches, ((0, n - len(patches)), (0, 0))))
        masks.append(np.arange(n) < len(patches))
        shapes.append((gh, gw))
    return {"pixel_values": np.stack(values).astype(np.float32), "pixel_attention_mask": np.stack(masks).astype(np.int64),
            "spatial_shapes": np.array(shapes, dtype=np.int64)}


def image_inputs(images: Sequence[Any], prep: dict) -> dict[str, np.ndarray]:
    """RGB images -> the image_encoder graph's inputs, as the model's image processor makes them."""
    if naflex(prep):
        return naflex_inputs(images, prep)
    return {"pixel_values": pixel_values(images, prep)}


class EmbeddingPipeline:
    """A dual-encoder bundle: embeddings of images and texts, and zero-shot label probabilities.
    Holds one session per graph and no per-call state; one pipeline can serve several threads."""

    contract = CONTRACT

    def __init__(self, bundle: Bundle, device: str = "cpu", threads: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, batch_size: int = 16, warn=None, shared_threads: bool = False):
        from tokenizers import Tokenizer

        from vlmedge.runtime.backends import open_backend

        self.bundle, self.manifest, self.device = bundle, bundle.manifest, device
        m = self.manifest
        if m.contract != CONTRACT:
            raise BundleError(f"{bundle.path}: a {m.contract} bundle; embeddings and classify need a dual-encoder bundle (CLIP, SigLIP)")
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
        length = int(tok["max_length"]) if tok["padding"] == "max_length" else None
        self.tokenizer.enable_padding(pad_id=tok["pad_id"], pad_token=self.tokenizer.id_to_token(tok["pad_id"]), length=length,
                                      direction=tok.get("padding_side", "right"))
        self._tok_lock = threading.Lock()
        self.backend = open_backend(bundle, device, threads, warn, shared_threads)
        self.batch_size = max(1, min(int(batch_size), m.axes["batch"].max))
        spec = m.tasks["classify"]
        self.scale, self.bias = np.float32(spec["logit_scale"]), np.float32(spec["logit_bias"])
        self.activation, self.template = spec["activation"], spec["template"]
        self.dim = int(m.dims["embed_dim"])

    def __repr__(self) -> str:
        return f"EmbeddingPipeline({self.bundle.path}, {self.manifest.family}, dim={self.dim}, backend={self.backend.name})"

    def caption(self, *args, **kwargs):
        raise InputError(f"{self.bundle.path}: a dual-encoder bundle ({self.manifest.architecture}) embeds and classifies; "
                         "it does not write captions or answers (use vlmedge classify, index or search)")

    # what the generating pipelines answer, refused in one line here (the commands and routes that call them)
    vqa = stream = settings = question_ids = run = generate_steps = caption
    caption_task = "caption"  # (read before `settings` refuses)

    @property
    def tasks(self) -> tuple[str, ...]:
        return ("embeddings", "classify")

    # -- inputs --------------------------------------------------------------------------------
    def image_inputs(self, images: Sequence[Any]) -> dict[str, np.ndarray]:
        """Paths, PIL images or arrays -> the image_encoder's inputs; the first bad image raises InputError naming it."""
        rgb = [load_image(img, self.max_pixels, where=f"image {i}") for i, img in enumerate(images)]
        return image_inputs(rgb, self.manifest.preprocessing)

    def pixel_values(self, images: Sequence[Any]) -> np.ndarray:
        return self.image_inputs(images)["pixel_values"]

    def text_ids(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> (input_ids, attention_mask), truncated to the context length and padded per the manifest."""
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InputError(f"text {i}: expected a string, got {type(t).__name__}")
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as e:
                raise InputError(f"text {i}: not valid Unicode text (a lone surrogate at character {e.start})") from None
        with self._tok_lock:
            enc = self.tokenizer.encode_batch(list(texts))
        for i, e in enumerate(enc):
            if not any(e.attention_mask):  # nothing to attend to: the model's output would be arbitrary
                raise InputError(f"text {i}: {texts[i]!r:.40} gives no tokens with this model's tokenizer; give some words")
        return (np.array([e.ids for e in enc], dtype=np.int64), np.array([e.attention_mask for e in enc], dtype=np.int64))

    # -- embeddings ----------------------------------------------------------------------------
    def embed_images(self, images: Any) -> np.ndarray:
        """One image -> (D,), a list -> (N, D): L2-normalised float32 embeddings, batched by the bundle's range."""
        many = _many(images)
        items = list(images) if many else [images]
        if not items:
            return np.zeros((0, self.dim), np.float32)
        out = []
        for start in range(0, len(items), self.batch_size):
            feeds = self.image_inputs(items[start: start + self.batch_size])
            out.append(np.asarray(self.backend.run("image_encoder", feeds)["image_embeds"], np.float32))
        e = np.concatenate(out)
        return e if many else e[0]

    def embed_texts(self, texts: Any) -> np.ndarray:
        """One text -> (D,), a list -> (N, D): L2-normalised float32 embeddings."""
        many = _many(texts)
        items = list(texts) if many else [texts]
        if not items:
            return np.zeros((0, self.dim), np.float32)
        out = []
        for start in range(0, len(items), self.batch_size):
            ids, mask = self.text_ids(items[start: start + self.batch_size])
            out.append(np.asarray(self.backend.run("text_encoder", {"input_ids": ids, "attention_mask": mask})["text_embeds"], np.float32))
        e = np.concatenate(out)
        return e if many else e[0]

    # -- zero-shot classification --------------------------------------------------------------
    def logits(self, image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
        """(N, D) images x (L, D) texts -> (N, L) logits, as the model's logits_per_image."""
        return (image_embeds @ text_embeds.T) * self.scale + self.bias

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Logits -> label probabilities: softmax over the labels (CLIP) or a sigmoid per label (SigLIP)."""
        if self.activation == "sigmoid":
            return 1.0 / (1.0 + np.exp(-logits))
        z = np.exp(logits - logits.max(-1, keepdims=True))
        return z / z.sum(-1, keepdims=True)

    def prompts(self, labels: Sequence[str], template: str | None = None) -> list[str]:
        """Labels -> the texts the text encoder reads, each label put in the template."""
        template = self.template if template is None else template
        if not isinstance(template, str) or template.count("{}") != 1 or "{" in template.replace("{}", "") \
                or "}" in template.replace("{}", ""):
            raise InputError(f"template: expected a text with one {{}} where the label goes, got {template!r:.60}")
        if not _many(labels):
            raise InputError(f"labels: expected a list of label texts, got {type(labels).__name__}")
        if not labels:
            raise InputError("labels: empty; give at least one label")
        if len(labels) > MAX_LABELS:
            raise InputError(f"labels: {len(labels)}, over the limit of {MAX_LABELS}")
        seen = set()
        for i, label in enumerate(labels):
            if not isinstance(label, str) or not label.strip():
                raise InputError(f"label {i}: expected a non-empty text, got {label!r:.40}")
            if label in seen:
                raise InputError(f"label {i}: {label!r:.40} is given twice")
            seen.add(label)
        return [template.replace("{}", label) for label in labels]

    def classify(self, images: Any, labels: Sequence[str], template: str | None = None,
                 top_k: int | None = None) -> list[Label] | list[list[Label]]:
        """Zero-shot label probabilities for one image (a list of Label, best first) or a list of images
        (one such list each), as Hugging Face's zero-shot image classification pipeline gives them."""
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
            raise InputError(f"top_k: expected an integer >= 1, got {top_k!r:.40}")
        texts = self.prompts(labels, template)
        many = _many(images)
        items = list(images) if many else [images]
        if not items:
            return []
        probs = self.probabilities(self.logits(self.embed_images(items), self.embed_texts(texts)))
        rows = []
        for p in probs:
            order = sorted(range(len(labels)), key=lambda j: -p[j])[: top_k or len(labels)]
            rows.append([Label(labels[j], float(p[j])) for j in order])
        return rows if many else rows[0]


def cosine_top_k(query: np.ndarray, keys: np.ndarray, k: int) -> list[tuple[int, float]]:
    """Brute-force cosine top k of one normalised query against normalised keys: (row, score), best first."""
    scores = keys @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return [(int(i), float(scores[i])) for i in order]
