"""`vlmedge.load(bundle)`: captioning and VQA from a bundle, with nothing but the runtime installed.

    pipe = vlmedge.load("bundles/shapes-vlm", device="cpu")
    pipe.caption("scene.png")                                  # -> "a small red circle , ..."
    pipe.caption(["a.png", "b.png"], num_beams=3)              # -> ["...", "..."]
    pipe.vqa("scene.png", "what color is the circle ?")        # -> "red"
    pipe.caption(images, return_ids=True)                      # -> [Generation(text, ids), ...]
    pipe.caption("scene.png", do_sample=True, top_p=0.9, seed=1)  # sampled, reproducibly
    for piece in pipe.stream("scene.png"):                     # the caption as it is decoded
        print(piece, end="", flush=True)

Generation options are named as in Hugging Face `generate`. A pipeline holds one ONNX Runtime
session per graph and no per-call state, so one pipeline can serve several threads.
"""

from __future__ import annotations

import hashlib
import numbers
import os
import re
import threading
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from vlmedge.errors import BundleError, InputError, VlmedgeError, first_line
from vlmedge.runtime.backends import open_backend
from vlmedge.runtime.bundle import Bundle, load_bundle
from vlmedge.runtime.decoding import GenerationConfig, Settings, Steps, Timings, check_options, cross_decoder, encode, resolve, run
from vlmedge.runtime.images import DEFAULT_MAX_PIXELS, load_image
from vlmedge.runtime.preprocess import pixel_values


CAPTION_TASKS = ("caption", "<CAPTION>")  # what `caption` runs, in order of preference


@dataclass(frozen=True)
class Generation:
    text: str
    ids: tuple[int, ...]  # generated ids, EOS included where it was produced


def _many(x: Any) -> bool:
    return isinstance(x, (list, tuple))


def pairs(images: Any, questions: Any) -> tuple[bool, list, list]:
    """vqa's arguments as (one pair given, images, questions): lists of equal length, or one of either
    repeated for each of the other."""
    single = not _many(images) and not _many(questions)
    imgs = list(images) if _many(images) else [images]
    qs = list(questions) if _many(questions) else [questions]
    if len(imgs) == 1 and len(qs) > 1:
        imgs = imgs * len(qs)
    elif len(qs) == 1 and len(imgs) > 1:
        qs = qs * len(imgs)
    if len(imgs) != len(qs):
        raise InputError(f"vqa: {len(imgs)} images but {len(qs)} questions; pass one of each per pair")
    return single, imgs, qs


def _count(name: str, value: Any, least: int) -> int:
    """An integer argument (never a bool, a float or a string) of at least `least`, as an int."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name}: expected an integer >= {least}, got {type(value).__name__} {value!r:.40}")
    if value < least:
        raise InputError(f"{name}: expected >= {least}, got {value}")
    return int(value)


_SPACE = re.compile(r"\s")


def _cjk(ch: str) -> bool:
    """A character that ends a word by itself (CJK ideographs and kana, Hangul), as HF's TextStreamer reads them."""
    return unicodedata.category(ch) == "Lo" and ord(ch) >= 0x2E80


class TextStream:
    """A row's generated ids -> new text, piece by piece. A piece ends before the last whitespace (the
    word after it may still grow by a word piece) unless the text ends in a CJK character, and never in
    an unfinished multi-byte character (U+FFFD); once the row has ended, its pieces join to the text
    `Pipeline.decode` gives for the same ids."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()):
        self.decode = decode  # ids -> text, special tokens skipped, not stripped
        self.stop = tuple(s for s in stop if s)  # the text ends before the first of these; `stopped` says it did
        self.sent = ""
        self.stopped = False

    def push(self, ids: Sequence[int], final: bool = False) -> str:
        """The new piece once `ids` (the row's ids so far) are decoded; `final`: the row has ended."""
        if self.stopped:
            return ""
        text = self.decode(ids).lstrip()
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            text, final, self.stopped = text[: min(hits)], True, True
        if final:
            text = text.strip()
        else:
            if not (text and _cjk(text[-1])):
                spaces = [m.start() for m in _SPACE.finditer(text)]
                text = text[: spaces[-1]].rstrip() if spaces else ""
            text = text[: text.index("\ufffd")] if "\ufffd" in text else text
            for s in self.stop:  # hold back what may be the start of a stop string
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        text = text[:-k].rstrip()
                        break
        if not text.startswith(self.sent) or len(text) == len(self.sent):
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece


def stream_pieces(steps: Steps, decode: Callable[[Sequence[int]], str], row: int = 0) -> Iterator[str]:
    """The text pieces of one row of a decoding loop, each as soon as it is certain."""
    text = TextStream(decode)
    for _ in steps:
        if steps.finished[row]:
            break
        piece = text.push(steps.ids(row))
        if piece:
            yield piece
    piece = text.push(steps.ids(row), final=True)
    if piece:
        yield piece


class Questions(tuple):
    """`question_ids`' (ids, mask), which also keeps the questions' texts (what a vision graph that reads the
    question takes: InstructBLIP's Q-Former)."""

    def __new__(cls, arrays: tuple[np.ndarray, np.ndarray], texts: tuple[str, ...]):
        self = super().__new__(cls, arrays)
        self.texts = texts
        return self


class Pipeline:
    def __init__(self, bundle: Bundle, device: str = "cpu", threads: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, batch_size: int = 8, warn=None, shared_threads: bool = False):
        from tokenizers import Tokenizer

        self.bundle = bundle
        self.manifest = m = bundle.manifest
        if not isinstance(device, str):
            raise InputError(f"device: expected 'cpu', 'cuda' or 'tensorrt', got {type(device).__name__}")
        self.max_pixels = _count("max_pixels", max_pixels, 1)
        self.batch_size = _count("batch_size", batch_size, 1)
        if threads is not None:
            _count("threads", threads, 0)
        try:
            self.tokenizer = Tokenizer.from_file(str(bundle.tokenizer_path))
        except Exception as e:  # tokenizers raises plain Exception for a file it cannot parse
            raise BundleError(f"{bundle.tokenizer_path}: not a tokenizer the tokenizers library can load "
                              f"({first_line(e)}; named by manifest.json tokenizer.file)") from None
        self.backend = open_backend(bundle, device, threads, warn, shared_threads)
        self._tok_lock = threading.Lock()
        self.layers = int(m.dims["decoder_layers"])
        self.max_question_len = int(m.dims.get("max_question_len", 0))
        self.max_batch = m.axes["batch"].max if "batch" in m.axes else batch_size
        # a question's rows hold the image's (BLIP-2 / InstructBLIP with Flan-T5: the tokenizer writes a placeholder
        # per image row before the text), measured on the bundle's tokenizer
        image_rows = int(m.dims.get("image_tokens", 0))
        written = len(self.tokenizer.encode("a").ids) - len(self.tokenizer.encode("a", add_special_tokens=False).ids)
        self.question_holds_image = 0 < image_rows <= written
        self.vision_text = None  # the text a cross-attention bundle's vision graph reads (InstructBLIP with Flan-T5)
        if m.contract == "cross-attention" and "vision_text" in (m.prompt or {}):
            from vlmedge.runtime.prefix import VisionText

            self.vision_text = VisionText(m.prompt["vision_text"], bundle.path, [t.name for t in m.graphs["vision_encoder"].inputs])

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.manifest.tasks)

    def __repr__(self) -> str:
        return f"Pipeline({self.bundle.path}, {self.manifest.family}, tasks={list(self.tasks)}, backend={self.backend.name})"

    # -- inputs ------------------------------------------------------------------------------
    def images(self, images: Sequence[Any]) -> np.ndarray:
        """Paths, PIL images or arrays -> pixel_values; the first bad image raises InputError naming it."""
        rgb = [load_image(img, self.max_pixels, where=f"image {i}") for i, img in enumerate(images)]
        return pixel_values(rgb, self.manifest.preprocessing)

    def question_ids(self, questions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Questions -> right-padded ids and mask, with the family's special tokens. Empty questions
        and questions longer than the model's max_question_len are refused (not truncated)."""
        rows = []
        for i, q in enumerate(questions):
            if not isinstance(q, str):
                raise InputError(f"question {i}: expected a string, got {type(q).__name__}")
            try:
                q.encode("utf-8")
            except UnicodeEncodeError as e:
                raise InputError(f"question {i}: not valid Unicode text (a lone surrogate at character {e.start})") from None
            if not q.strip():
                raise InputError(f"question {i}: empty; expected a question in words")
            with self._tok_lock:
                ids = self.tokenizer.encode(q).ids
            if self.max_question_len and len(ids) > self.max_question_len:
                raise InputError(f"question {i}: {len(ids)} tokens, over the model's maximum of "
                                 f"{self.max_question_len} (dims.max_question_len); shorten it")
            rows.append(ids)
        if self.vision_text is not None:
            for q in questions:
                self.vision_text.ids(q)  # checked here: one over the vision graph's length is this question's error
        pad = self.manifest.tasks["vqa"]["pad_id"]
        width = max(map(len, rows))
        ids = np.full((len(rows), width), pad, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        return Questions((ids, mask), tuple(questions))

    def decode(self, ids: Sequence[int]) -> str:
        return self.raw_text(ids).strip()

    def raw_text(self, ids: Sequence[int]) -> str:
        """Ids -> text with special tokens skipped and spaces as the tokenizer leaves them (what streams read)."""
        with self._tok_lock:
            return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def encode(self, task: str, px: np.ndarray, questions: tuple[np.ndarray, np.ndarray] | None = None,
               backend=None) -> tuple[Any, np.ndarray]:
        """The states a task's decoder attends to, and their mask: the image's, the question's (ids
        and mask from `question_ids`), or those of the task's own prompt (Florence-2)."""
        backend = backend or self.backend
        spec = self.manifest.tasks[task]
        vision = self.vision_feeds(task, px.shape[0], questions)
        if questions is None and spec.get("text_prompt_ids"):
            ids = np.tile(np.asarray(spec["text_prompt_ids"], dtype=np.int64), (px.shape[0], 1))
            return encode(backend, px, ids, np.ones_like(ids), spec.get("image_prefix", False), vision)
        return encode(backend, px, vision_text=vision) if questions is None else encode(backend, px, *questions, vision_text=vision)

    def vision_feeds(self, task: str, n: int, questions=None) -> dict[str, np.ndarray] | None:
        """What a vision graph that reads text takes beside the pixels (None for the others): each question's
        ids and mask (the questions as `question_ids` keeps them), or the task's own text's for every image."""
        if self.vision_text is None:
            return None
        if questions is None:
            return self.vision_text.texts([self.manifest.prompt["vision_text"]["texts"][task]] * n)
        texts = getattr(questions, "texts", None)
        if texts is None:
            raise InputError("questions: this bundle's vision graph reads each question's text; pass what "
                             "question_ids() returns")
        return self.vision_text.texts(texts)

    def task_text(self, task: str, ids: Sequence[int]) -> str:
        """A family task's answer text, read as its processor reads it (Florence-2: pure text)."""
        from vlmedge.runtime.florence2 import parse, tokens_text

        with self._tok_lock:
            text = tokens_text(self.tokenizer, ids)
        return parse(task, self.manifest.tasks[task]["postprocess"], text, (1, 1)).text

    def max_new_tokens(self, task: str) -> int:
        """The longest generation the bundle allows: within the model's positions and the declared
        total_len range (the last step attends to prompt + max_new_tokens - 1 positions, and the
        hidden slot the prompt runs after where the bundle has one decoder graph)."""
        prompt = len(self.manifest.tasks[task]["prompt_ids"])
        limit = int(self.manifest.dims["max_target_len"]) - prompt
        if "total_len" in self.manifest.axes:
            slot = 0 if self.manifest.split_decoder else 1
            limit = min(limit, self.manifest.axes["total_len"].max - prompt + 1 - slot)
        return limit

    def settings(self, task: str, config: GenerationConfig | None = None) -> Settings:
        """The generation settings a call of `task` decodes with: the options passed over the model's
        own settings from the manifest (`tasks.<task>.generation`) over HF's defaults. A length the
        model's settings ask for is kept within the bundle's limit; one passed beyond it is refused."""
        spec = self.manifest.tasks[task]
        defaults = {"eos_token_id": spec["eos_id"], **spec.get("generation", {})}
        s = resolve(config or GenerationConfig(), defaults, len(spec["prompt_ids"]), spec["max_new_tokens"],
                    self.manifest.dims["vocab_size"])
        limit = self.max_new_tokens(task)
        if s.max_new > limit:
            if s.user_length:
                raise InputError(f"max_new_tokens: {s.max_new} is over this bundle's limit of {limit} "
                                 "(axes.total_len and dims.max_target_len; export with a larger --max-length)")
            s = replace(s, max_new=limit)
        return s

    # -- tasks -------------------------------------------------------------------------------
    @property
    def caption_task(self) -> str:
        """The task `caption` runs: caption, or the family's own caption task (Florence-2: <CAPTION>)."""
        return next((t for t in CAPTION_TASKS if t in self.manifest.tasks), "caption")

    def caption(self, images, *, return_ids: bool = False, return_attention: bool = False, batch_size: int | None = None,
                timings: Timings | None = None, **generation):
        """Caption one image (-> str) or a list of images (-> list of str). `return_attention`: an
        Explanation per image (text, ids, the cross-attention that chose each token; vlmedge.runtime.explain)."""
        single = not _many(images)
        items = [images] if single else list(images)
        out = self._run(self.caption_task, items, None, generation, return_ids, batch_size, timings, return_attention)
        return out[0] if single else out

    def run(self, images, task: str, *, batch_size: int | None = None, timings: Timings | None = None,
            **generation):
        """Run a task the bundle names (Florence-2: "<OD>", "<OCR_WITH_REGION>", ...) on one image
        (-> TaskResult) or a list (-> list of TaskResult): text, and boxes in the original image's pixels."""
        from vlmedge.runtime.florence2 import TaskResult, parse, tokens_text

        if not isinstance(task, str) or task not in self.manifest.tasks:
            raise InputError(f"task: {str(task)!r:.60} is not a task of this bundle (it has {', '.join(self.tasks)})")
        if self.manifest.tasks[task]["encoder"] == "text_encoder" and not self.manifest.tasks[task].get("text_prompt_ids"):
            raise InputError(f"task: {task} answers a question; use vqa(images, questions)")
        single = not _many(images)
        rgb = [load_image(img, self.max_pixels, where=f"image {i}") for i, img in enumerate([images] if single else images)]
        kind = self.manifest.tasks[task].get("postprocess", "text")
        out = []
        for img, gen in zip(rgb, self._run(task, rgb, None, generation, True, batch_size, timings)):
            if kind == "text":
                out.append(TaskResult(task, gen.text, ids=gen.ids))
                continue
            with self._tok_lock:
                text = tokens_text(self.tokenizer, gen.ids)
            out.append(parse(task, kind, text, img.size, gen.ids))
        return out[0] if single else out

    def vqa(self, images, questions, *, return_ids: bool = False, return_attention: bool = False,
            batch_size: int | None = None, timings: Timings | None = None, **generation):
        """Answer questions about images: one image and one question (-> str), or lists of equal
        length, or one of either with a list of the other (-> list of str). `return_attention`: an
        Explanation per answer (with `image_attention`, the question's attention to the image, where
        the answer decoder reads the question encoder)."""
        single, imgs, qs = pairs(images, questions)
        out = self._run("vqa", imgs, qs, generation, return_ids, batch_size, timings, return_attention)
        return out[0] if single else out

    def _config(self, task: str, generation: dict) -> GenerationConfig:
        """The options of a call as a checked GenerationConfig (the task must be the bundle's)."""
        if task not in self.manifest.tasks:
            raise InputError(f"{self.bundle.path}: this bundle has no {task} task (it has {', '.join(self.tasks)})")
        try:
            config = GenerationConfig(**generation)
        except TypeError as e:
            raise InputError(f"{task}: {e}; options are {', '.join(GenerationConfig.__dataclass_fields__)}") from None
        # None leaves an option to its default only where it always meant that (lengths, EOS); elsewhere it is refused
        check_options({k: v for k, v in generation.items() if v is None and k not in ("max_new_tokens", "max_length", "eos_token_id")})
        config.check()
        return config

    def _checked_settings(self, task: str, generation: dict) -> Settings:
        settings = self.settings(task, self._config(task, generation))
        if settings.num_beams > self.max_batch:
            raise InputError(f"num_beams: {settings.num_beams} beams are over this bundle's batch maximum of "
                             f"{self.max_batch} (axes.batch.max); use at most {self.max_batch}")
        return settings

    # -- step by step ------------------------------------------------------------------------
    def stream(self, image, question: str | None = None, *, timings: Timings | None = None, **generation) -> Iterator[str]:
        """The caption of one image (or, with a question, the answer) as text pieces while it is decoded,
        greedily or by sampling (num_beams=1); the pieces join to what caption / vqa return. The image
        is read and encoded before this returns, so bad input raises here, not at the first piece."""
        task = self.caption_task if question is None else "vqa"
        steps = self.generate_steps(task, [image], None if question is None else [question], timings=timings, **generation)
        return stream_pieces(steps, self.raw_text)

    def generate_steps(self, task: str, images: Sequence[Any], questions: Sequence[str] | None = None, *,
                       timings: Timings | None = None, **generation) -> Steps:
        """One batch (within the bundle's batch range) of caption or vqa, decoded greedily or by sampling,
        as an iterator of steps (see decoding.Steps); `steps.rows()` are the ids once it is spent, and
        `decode(ids)` their text."""
        settings = self._checked_settings(task, generation)
        if settings.num_beams != 1:
            raise InputError(f"num_beams: {settings.num_beams}; token by token decoding follows one beam per "
                             "item (pass num_beams=1)")
        if self.manifest.tasks[task].get("postprocess", "text") != "text":
            raise InputError(f"task: {task} gives regions, not text to stream; use run()")
        if not images or len(images) > self.max_batch:
            raise InputError(f"images: {len(images)}; a step-by-step batch holds 1 to {self.max_batch} (axes.batch.max)")
        if questions is not None and len(questions) != len(images):
            raise InputError(f"vqa: {len(images)} images but {len(questions)} questions; pass one of each per pair")
        import time

        t0 = time.perf_counter()
        px = self.images(images)
        q = self.question_ids(questions) if questions is not None else None
        t1 = time.perf_counter()
        states, mask = self.encode(task, px, q)
        if timings is not None:
            timings.preprocess += t1 - t0
            timings.encoder += time.perf_counter() - t1
        prompt = np.tile(np.asarray(self.manifest.tasks[task]["prompt_ids"], dtype=np.int64), (len(images), 1))
        # tokens read before the first generated one: the prompt, the states attended to, and the image
        # tokens a question's encoder read (a question's states hold the question's positions only, except where
        # the question's own rows hold the image: BLIP-2 / InstructBLIP with Flan-T5)
        image = int(self.manifest.dims.get("image_tokens", 0)) if q is not None and not self.question_holds_image else 0
        return Steps(cross_decoder(self.backend, self.layers, states, mask, self.manifest.split_decoder), prompt, settings, timings,
                     context=prompt.shape[1] + mask.sum(1) + image)

    def _run(self, task, images, questions, generation, return_ids, batch_size, timings, return_attention=False):
        import time

        settings = self._checked_settings(task, generation)
        for name, flag in (("return_ids", return_ids), ("return_attention", return_attention)):
            if not isinstance(flag, bool):
                raise InputError(f"{name}: expected True or False, got {type(flag).__name__}")
        if return_attention:
            self._check_explain(task)
        if batch_size is not None:
            _count("batch_size", batch_size, 1)
        spec = self.manifest.tasks[task]
        if not images:
            return []
        # a decoder batch is (images x beams) rows and stays within the bundle's batch range
        chunk = min(batch_size or self.batch_size, self.max_batch // settings.num_beams)
        results: list = []
        for s in range(0, len(images), chunk):
            t0 = time.perf_counter()
            px = self.images(images[s : s + chunk])
            q = self.question_ids(questions[s : s + chunk]) if questions is not None else None
            t1 = time.perf_counter()
            states, mask = self.encode(task, px, q)
            t2 = time.perf_counter()
            if timings is not None:
                timings.preprocess += t1 - t0
                timings.encoder += t2 - t1
            rows = run(self.backend, self.layers, states, mask, spec["prompt_ids"], settings, timings, self.manifest.split_decoder)
            texts = [self.decode(ids) if spec.get("postprocess", "text") == "text" else self.task_text(task, ids) for ids in rows]
            if return_attention:
                results += self._explain(task, px, q, states, mask, rows, texts)
                continue
            results += [Generation(text, tuple(ids)) if return_ids else text for text, ids in zip(texts, rows)]
        return results

    # -- attention ---------------------------------------------------------------------------
    def _check_explain(self, task: str) -> None:
        if not hasattr(self.backend, "explain"):
            raise InputError(f"return_attention: runs on ONNX Runtime (device cpu or cuda); this pipeline runs {self.backend.name}")
        have = self.manifest.explain.get("graphs", {})
        if "decoder" not in have:
            why = ("its attention is fused (the ONNX Runtime target); use the bundle it was made from"
                   if self.manifest.target == "onnxruntime" else "export it again with this vlmedge")
            raise InputError(f"return_attention: {self.bundle.path} has no explain graphs ({why})")

    def forced_attention(self, task: str, images: Sequence[Any], rows: Sequence[Sequence[int]],
                         questions: Sequence[str] | None = None) -> list:
        """Explanations of given token ids (`rows`, one per image) instead of the ones this bundle would choose:
        the attention each token gets when the decoder is forced along them (how `compare` measures a
        variant's attention drift against the reference's tokens)."""
        self._check_explain(task)
        if len(rows) != len(images) or (questions is not None and len(questions) != len(images)):
            raise InputError(f"forced_attention: {len(images)} images, {len(rows)} rows of ids"
                             + (f", {len(questions)} questions" if questions is not None else "") + "; pass one of each per item")
        out: list = []
        for s in range(0, len(images), self.batch_size):
            px = self.images(images[s : s + self.batch_size])
            q = self.question_ids(questions[s : s + self.batch_size]) if questions is not None else None
            states, mask = self.encode(task, px, q)
            part = [list(r) for r in rows[s : s + self.batch_size]]
            out += self._explain(task, px, q, states, mask, part, [self.decode(r) for r in part])
        return out

    def _explain(self, task, px, questions, states, mask, rows, texts) -> list:
        """Explanations of a batch's generated `rows`: the explain decoder run along them (and, for a
        question encoder with cross-attention, its explain graph on the same questions)."""
        from vlmedge.runtime.decoding import attend
        from vlmedge.runtime.explain import explained

        spec = self.manifest.tasks[task]
        attention = attend(self.backend, self.layers, states, mask, spec["prompt_ids"], rows)
        image_attention = [None] * len(rows)
        if questions is not None and not spec.get("image_prefix") and "text_encoder" in self.manifest.explain["graphs"]:
            image = self.backend.run("vision_encoder", {"pixel_values": px, **(self.vision_feeds(task, len(px), questions) or {})},
                                     keep=("image_states",))["image_states"]
            feeds = {"question_ids": questions[0], "question_mask": questions[1], "image_states": image}
            out = self.backend.run(self.backend.explain("text_encoder"), feeds)["image_attention"]
            image_attention = [out[b, :, :, : int(questions[1][b].sum())] for b in range(len(rows))]
        grid = self.manifest.explain.get("image_grid")
        with self._tok_lock:
            words = [[self.tokenizer.id_to_token(i) or "" for i in ids] for ids in rows]
        return [explained(text, ids, a, grid, ia, w) for text, ids, a, ia, w in zip(texts, rows, attention, image_attention, words)]


def cache_dir() -> Path:
    """Where built-in models are exported once: $VLMEDGE_CACHE, else $XDG_CACHE_HOME/vlmedge, else ~/.cache/vlmedge."""
    env = os.environ.get("VLMEDGE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vlmedge"


def _usable(path: Path) -> bool:
    """A cache entry counts only if its manifest loads and every file matches its hash."""
    try:
        load_bundle(path)
        return True
    except VlmedgeError:  # missing, half deleted, corrupt: export it again
        return False


def cache_entry(name: str) -> Path:
    """The cache directory of a built-in model's bundle: one per weights, vlmedge version and bundle
    schema (an entry an older layout wrote is exported again in today's)."""
    from vlmedge import __version__
    from vlmedge.models.checkpoint import BUILTIN_MODELS, WEIGHTS
    from vlmedge.runtime.bundle import SCHEMA_VERSION

    digest = hashlib.sha256((BUILTIN_MODELS[name] / WEIGHTS).read_bytes()).hexdigest()[:12]
    return cache_dir() / "bundles" / f"{name}-{digest}-v{__version__}-s{SCHEMA_VERSION}"


def builtin_bundle(name: str, on_export=None, on_wait=None) -> Path:
    """The cached bundle of a built-in model, exported on first use (this step needs the export extras).
    An entry that fails its hashes (half deleted, corrupt) is exported again; processes that arrive
    while one exports wait for it (`on_wait(holder)` says so) and then use its bundle."""
    from vlmedge.outdir import TargetLock

    path = cache_entry(name)
    if _usable(path):
        return path
    with TargetLock(path, wait=True, on_wait=on_wait, label="cache entry"):
        if _usable(path):  # another process exported it while this one waited
            return path
        try:
            from vlmedge.export.exporter import ExportOptions, export_bundle
            from vlmedge.models.registry import load_adapter
        except ImportError as e:
            raise InputError(f"{name}: the built-in model is exported on first use, which needs torch "
                             f"({e.name} is missing): pip install 'vlmedge[export]', or pass a bundle directory") from None
        if on_export:
            on_export(name, path)
        export_bundle(load_adapter(name), "all", path, ExportOptions(force=True))  # replaces a broken entry
    return path


def resolve_bundle(source: str | os.PathLike, on_export=None, on_wait=None) -> Bundle:
    """A bundle directory, or a built-in model's name."""
    from vlmedge.models.checkpoint import BUILTIN_MODELS

    s = str(source)
    if s in BUILTIN_MODELS and not Path(s).exists():
        return load_bundle(builtin_bundle(s, on_export, on_wait))
    return load_bundle(s)


def load(bundle: str | os.PathLike, device: str = "cpu", *, threads: int | None = None,
         max_pixels: int = DEFAULT_MAX_PIXELS, batch_size: int = 8, warn=None, shared_threads: bool = False) -> Pipeline:
    """Open a bundle (or a built-in model's name) for captioning and VQA on `device`: cpu, cuda or tensorrt.
    `shared_threads=True` runs all graphs on one ONNX Runtime thread pool (faster on small CPUs; see
    vlmedge.runtime.backends.onnxruntime for the catch)."""
    return open_pipeline(resolve_bundle(bundle), device, threads, max_pixels, batch_size, warn, shared_threads)


def open_pipeline(bundle: Bundle, device: str = "cpu", threads: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                  batch_size: int = 8, warn=None, shared_threads: bool = False) -> Pipeline:
    """The pipeline of a loaded bundle's contract: cross-attention, prefix (decoder-only VLMs), or a dual encoder's
    (a built-in such as shapes-clip, opened by name)."""
    if bundle.manifest.contract == "dual-encoder":
        from vlmedge.runtime.embedding import EmbeddingPipeline

        return EmbeddingPipeline(bundle, device, threads, max_pixels, batch_size, warn, shared_threads)
    if bundle.manifest.contract == "prefix":
        from vlmedge.runtime.prefix import PrefixPipeline

        return PrefixPipeline(bundle, device, threads, max_pixels, batch_size, warn, shared_threads)
    return Pipeline(bundle, device, threads, max_pixels, batch_size, warn, shared_threads)


__all__ = ["Generation", "Pipeline", "VlmedgeError", "load"]
