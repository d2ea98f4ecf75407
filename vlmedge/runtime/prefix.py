"""The prefix contract at run time: decoder-only VLMs whose image tokens sit in the language model's
own sequence (LLaVA, Idefics3, SmolVLM). See vlmedge.models.prefix for the graphs.

A call goes: each image through its family's processor (frames + placeholder text,
vlmedge.runtime.processors); the messages through the chat template the bundle carries, each
image's `<image>` replaced by its placeholder text, then tokenised (one BOS: a template that writes
it gets none from the tokenizer); the rows left-padded; `embed` on the ids; the image rows of the
embeddings replaced by `vision_encoder`'s output in order (their count checked); then the one
decoding loop over the `decoder` graph through `PrefixDecoder`.

A decoder that takes `block_ids` (PaliGemma, Gemma 3: parts of the prompt attend to each other both
ways) gets them from the manifest's `prompt.blocks` rule, written here in numpy (`block_ids`): "prefix",
every prompt token in block 0; "images", each run of image tokens a block of its own; -1 for padding
and for every generated token, which attends causally.

A decoder whose `position_ids` has three rows (M-RoPE: Qwen2-VL) gets them as `get_rope_index` writes
them (`mrope_positions`), and at each step the prompt's largest position plus one and counting, on all
three rows (HF's rope_deltas). A vision graph that takes patches (Qwen2-VL) runs over several images at
once, with each patch's rotary (row, col) and its image as a segment id that keeps the images apart (and
for Qwen2.5-VL the patches in window order with their window ids; vlmedge.runtime.processors.vision_feeds).

A vision graph that also reads the prompt's text (InstructBLIP: its Q-Former reads the instruction) says so
in the manifest's `prompt.vision_text`: the tokenizer file for that text (with its sha256) and the names of
the graph's inputs it fills, `[ids, mask]`, each [frames, vision_text_len]. The text is the user turn's text
as given (what the family's processor hands its second tokenizer), tokenised with special tokens and
right-padded per call (`VisionText`).

A bundle with a `cross_kv` graph (IDEFICS: gated cross-attention) keeps each image's `<image>` token in the
prompt as a token and feeds the image to the decoder's cross-attention instead: `vision_encoder` per image,
each row's images one after another through `cross_kv` (rows with fewer images padded with zero rows), and
`cross_mask` written from the prompt ids by IdeficsProcessor's rule (`cross_mask`): each token sees the
latest image before it, none before the first and none after `prompt.cross_attention.reset_token_id` (EOS)
until the next image; every generated token sees what the prompt's last token saw.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vlmedge.errors import BundleError, InputError
from vlmedge.runtime.backends import Backend
from vlmedge.runtime.bundle import kv_names
from vlmedge.runtime.decoding import GenerationConfig, Settings, Steps, Timings, _host_logits, check_options, decode, resolve
from vlmedge.runtime.images import load_image
from vlmedge.runtime.pipeline import Generation, Pipeline, _count, _many, pairs, stream_pieces
from vlmedge.runtime.processors import ImageInput, pack, process, vision_feeds


BLOCK_RULES = ("prefix", "images")  # manifest prompt.blocks: how the prompt's block_ids are written


def block_ids(rule: str, ids: np.ndarray, mask: np.ndarray, image_token_id: int) -> np.ndarray:
    """The decoder's block_ids for left-padded prompt ids: tokens that share an id >= 0 attend to each
    other both ways, -1 attends causally (HF's `block_sequence_ids` from the processor's token_type_ids)."""
    real = mask > 0
    if rule == "prefix":  # PaliGemma: the image and the text prefix, one block
        return np.where(real, 0, -1).astype(np.int64)
    image = real & (ids == image_token_id)  # Gemma 3: each image's run of tokens
    start = image & ~np.pad(image, ((0, 0), (1, 0)))[:, :-1]
    return np.where(image, np.cumsum(start, axis=1) - 1, -1).astype(np.int64)


def mrope_positions(ids: np.ndarray, mask: np.ndarray, grids: list[list[tuple[int, int, int]]], image_token_id: int,
                    merge: int) -> np.ndarray:
    """M-RoPE positions [3, batch, seq_len] of left-padded prompts, as Qwen2-VL's `get_rope_index` writes them:
    text on all three rows, one after another; each run of image tokens at (t, row, col) of its image's merged
    grid, offset by the position it starts at; the text after it from that position plus the grid's longer
    side. `grids`: each row's images' (t, rows, cols) patch grids, in order. Padding gets 0."""
    out = np.zeros((3, *ids.shape), dtype=np.int64)
    for b in range(ids.shape[0]):
        real = np.flatnonzero(mask[b] > 0)
        image = ids[b, real] == image_token_id
        pos, cur, at, left = [], 0, 0, iter(grids[b])
        while at < len(real):
            end = at
            while end < len(real) and image[end] == image[at]:
                end += 1
            if not image[at]:
                pos.append(np.broadcast_to(np.arange(end - at) + cur, (3, end - at)))
                cur += end - at
            else:
                grid = next(left, None)
                if grid is None:
                    raise InputError(f"prompt {b}: more runs of image tokens than images")
                t, h, w = grid[0], grid[1] // merge, grid[2] // merge
                tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
                run = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + cur
                if run.shape[1] != end - at:
                    raise InputError(f"prompt {b}: {end - at} image tokens for an image of {run.shape[1]}")
                pos.append(run)
                cur += max(h, w)
            at = end
        if pos:
            out[:, b, real] = np.concatenate(pos, 1)
    return out


class VisionText:
    """The text a vision graph reads beside the pixels (manifest `prompt.vision_text`): its own tokenizer,
    checked against the manifest's sha256, and the two graph inputs (ids, mask) it fills."""

    def __init__(self, spec: Any, root: Path, graph_inputs: Sequence[str]):
        from tokenizers import Tokenizer

        from vlmedge.runtime.bundle import confined, sha256_file

        w = "manifest.json prompt.vision_text"
        if not (isinstance(spec, dict) and isinstance(spec.get("tokenizer"), str) and isinstance(spec.get("sha256"), str)
                and isinstance(spec.get("inputs"), list) and len(spec["inputs"]) == 2
                and all(isinstance(n, str) for n in spec["inputs"])
                and isinstance(spec.get("max_length"), int) and spec["max_length"] >= 1):
            raise BundleError(f"{w}: expected {{tokenizer: file, sha256, inputs: [ids, mask], max_length}}")
        missing = [n for n in spec["inputs"] if n not in graph_inputs]
        if missing:
            raise BundleError(f"{w}.inputs: {', '.join(missing)} are not inputs of graphs.vision_encoder")
        path = confined(root, spec["tokenizer"], "prompt.vision_text.tokenizer")
        if not path.is_file():
            raise BundleError(f"{path}: missing (named by {w}.tokenizer)")
        if sha256_file(path) != spec["sha256"]:
            raise BundleError(f"{path}: sha256 does not match {w}.sha256; the file was changed or is corrupt")
        self.tokenizer = Tokenizer.from_file(str(path))
        self.names, self.max_length = tuple(spec["inputs"]), int(spec["max_length"])
        self.lock = threading.Lock()

    def ids(self, text: str) -> tuple[int, ...]:
        with self.lock:
            ids = self.tokenizer.encode(text, add_special_tokens=True).ids
        if len(ids) > self.max_length:
            raise InputError(f"prompt: {len(ids)} tokens for the vision graph's text, over this bundle's maximum of "
                             f"{self.max_length} (prompt.vision_text.max_length)")
        return tuple(ids)

    def feeds(self, images: Sequence[ImageInput]) -> dict[str, np.ndarray]:
        """Each frame's row of its image's text ids and mask, right-padded to the longest."""
        return self.rows([img.text_ids for img in images for _ in range(len(img.frames))])

    def texts(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """One row per text (a cross-attention bundle's vision graph: one frame per image)."""
        return self.rows([self.ids(t) for t in texts])

    def rows(self, rows: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """Ids and mask of these rows, right-padded to the longest."""
        width = max(map(len, rows))
        ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = r, 1
        return dict(zip(self.names, (ids, mask)))


def extra_files(prompt: dict) -> list[str]:
    """Files a prefix bundle holds beside its graphs and tokenizer.json, by the manifest's `prompt` (InstructBLIP's
    vision-text tokenizer): what a writer of a derived bundle (quantize, build) copies with the tokenizer."""
    spec = prompt.get("vision_text")
    return [spec["tokenizer"]] if isinstance(spec, dict) and isinstance(spec.get("tokenizer"), str) else []


def turn_text(conv: list[dict]) -> str:
    """The text of a prompt's user turns as given, in order (what a vision graph's text is made of)."""
    return "".join(part["text"] for m in conv if m["role"] == "user" for part in m["content"] if part.get("type") == "text")


def cross_mask(ids: np.ndarray, image_token_id: int, reset_id: int, latents: int, images: int) -> np.ndarray:
    """[batch, seq_len, images * latents] int64: 1 where a token sees an image's rows. Token t of a row sees
    the row's k-th image (k counted from 0 along the row) when the latest image token at or before t is its
    k-th and no `reset_id` token lies between that image token and t (the reset token itself still sees it)."""
    B, S = ids.shape
    latest = np.full((B, S), -1, dtype=np.int64)
    for b in range(B):
        count, reset = -1, False
        for t in range(S):
            token = int(ids[b, t])
            if token == image_token_id:
                count, reset = count + 1, False
            latest[b, t] = -1 if reset else count
            if token == reset_id:
                reset = True
    seen = (latest[:, :, None] == np.arange(images)[None, None, :]).astype(np.int64)  # (B, S, images)
    return np.repeat(seen, latents, axis=2)


def positions(mask: np.ndarray) -> np.ndarray:
    """HF `generate`'s position ids of a left-padded batch: cumulative mask minus one, pads at 1."""
    pos = np.cumsum(mask, axis=1) - 1
    pos[mask == 0] = 1
    return pos.astype(np.int64)


class PrefixDecoder:
    """The decoding loop's view of the `decoder` graph: the prompt's embeddings run after a masked
    one-slot past, every later token is embedded and run with the cache."""

    ROOM = 64  # cache rows allocated past the prompt when the cache is updated in place (doubled when full)

    def __init__(self, backend: Backend, dims: dict, embeds: np.ndarray, mask: np.ndarray, prompt_rows: int | None = None,
                 blocks: np.ndarray | None = None, prompt_positions: np.ndarray | None = None,
                 cross: dict[str, np.ndarray] | None = None, prompt_cross_mask: np.ndarray | None = None):
        """`prompt_rows`: the most rows one prompt call takes (the manifest's `axes.prompt_batch`, which
        the ONNX Runtime target's GroupQueryAttention sets to 1). Such a graph also updates the cache in
        place: each layer's past and present are one buffer with room for the rows to come (on
        backends that can write into a buffer), so a step writes one row instead of copying the cache.
        `blocks`: the prompt's block_ids, for a decoder that takes them (None: it does not).
        `prompt_positions`: the prompt's position_ids when they are not HF generate's (M-RoPE: [3, batch,
        seq_len]); by default the cumulative mask minus one.
        `cross`, `prompt_cross_mask`: a decoder with cross-attention (IDEFICS): the cross K/V of each row's
        images, and which of them each prompt token sees [batch, seq_len, image_len]."""
        L = int(dims["decoder_layers"])
        self.backend = backend
        self.present, self.past = kv_names("present", L), kv_names("past", L)
        self.kv_shape = (int(dims["decoder_heads"]), 1, int(dims["decoder_head_dim"]))
        self.embeds, self.prompt_mask, self.prompt_blocks = embeds, mask, blocks
        self.prompt_positions = positions(mask) if prompt_positions is None else prompt_positions
        self.rows = 3 if self.prompt_positions.ndim == 3 else None  # M-RoPE: every step feeds three equal rows
        self.blocks = None
        self.prompt_rows = prompt_rows
        self.in_place = prompt_rows is not None and hasattr(backend, "prepare_into")
        self.capacity = 0
        self.runner, self.bound = None, None  # in place: the decoder with this cache's buffers bound once
        self.cross, self.prompt_cross_mask = cross or {}, prompt_cross_mask
        # every generated token sees what the prompt's last token saw
        self.step_cross_mask = None if prompt_cross_mask is None else np.ascontiguousarray(prompt_cross_mask[:, -1:])

    def start(self, prompt: np.ndarray) -> np.ndarray:
        B = prompt.shape[0]
        self.mask = np.concatenate([np.zeros((B, 1), dtype=np.int64), self.prompt_mask], 1)  # the hidden slot
        if self.prompt_blocks is not None:
            self.blocks = np.concatenate([np.full((B, 1), -1, dtype=np.int64), self.prompt_blocks], 1)
        pos = self.prompt_positions
        self.next_pos = pos[:, -1:] + 1 if self.rows is None else pos.max(axis=(0, 2))[:, None] + 1  # (B, 1)
        at = (lambda s: pos[s]) if self.rows is None else (lambda s: pos[:, s])  # noqa: E731  rows of a batch
        if self.in_place:
            self.capacity = self.mask.shape[1] + self.ROOM
        step = self.prompt_rows or B
        if step >= B:
            logits, self.cache = self._prompt(self.embeds, self.mask, pos, self.blocks, self._cross_feeds(slice(None), True))
            return logits
        parts = [self._prompt(self.embeds[s : s + step], self.mask[s : s + step], at(slice(s, s + step)),
                              None if self.blocks is None else self.blocks[s : s + step],
                              self._cross_feeds(slice(s, s + step), True)) for s in range(0, B, step)]
        to_host = self.backend.to_host
        self.cache = [np.concatenate([to_host(c[i]) for _, c in parts]) for i in range(len(self.present))]
        if self.in_place:
            self.cache = [self.backend.buffer(c) for c in self.cache]
        return np.concatenate([logits for logits, _ in parts])

    def _cross_feeds(self, rows: slice, prompt: bool) -> dict[str, np.ndarray]:
        """The cross-attention inputs of these rows (none for a decoder without cross-attention)."""
        if self.prompt_cross_mask is None:
            return {}
        mask = self.prompt_cross_mask if prompt else self.step_cross_mask
        return {"cross_mask": mask[rows], **{k: v[rows] for k, v in self.cross.items()}}

    def _prompt(self, embeds: np.ndarray, mask: np.ndarray, pos: np.ndarray, blocks: np.ndarray | None,
                cross: dict[str, np.ndarray]) -> tuple[np.ndarray, list]:
        heads, _, dh = self.kv_shape
        feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": pos, **cross}
        if blocks is not None:
            feeds["block_ids"] = blocks
        if self.in_place:
            cache = [self.backend.buffer(np.zeros((len(embeds), heads, self.capacity, dh), dtype=embeds.dtype)) for _ in self.past]
            feeds.update(zip(self.past, cache))
            out = self.backend.run_into("decoder", feeds, dict(zip(self.present, cache)), keep=self.present)
            return _host_logits(out["logits"]), cache
        empty = np.zeros((len(embeds), *self.kv_shape), dtype=embeds.dtype)
        feeds.update((n, empty) for n in self.past)
        out = self.backend.run("decoder", feeds, keep=self.present)
        return _host_logits(out["logits"]), [out[n] for n in self.present]

    def expand(self, rows: np.ndarray) -> None:
        take = self.backend.take
        self.cache = [take(v, rows) for v in self.cache]
        self.mask, self.next_pos = self.mask[rows], self.next_pos[rows]
        if self.blocks is not None:
            self.blocks = self.blocks[rows]
        if self.step_cross_mask is not None:
            self.step_cross_mask = self.step_cross_mask[rows]
            self.cross = {k: v[rows] for k, v in self.cross.items()}

    def reorder(self, rows: np.ndarray) -> None:
        if not np.array_equal(rows, np.arange(len(rows))):
            self.expand(rows)

    def step(self, ids: np.ndarray) -> np.ndarray:
        B = len(ids)
        embeds = self.backend.run("embed", {"input_ids": ids.reshape(B, 1).astype(np.int64)})["inputs_embeds"]
        self.mask = np.concatenate([self.mask, np.ones((B, 1), dtype=np.int64)], 1)
        pos = self.next_pos if self.rows is None else np.broadcast_to(self.next_pos[None], (self.rows, B, 1))
        feeds = {"inputs_embeds": embeds, "attention_mask": self.mask, "position_ids": np.ascontiguousarray(pos),
                 **self._cross_feeds(slice(None), False)}
        if self.blocks is not None:  # a generated token attends causally
            self.blocks = np.concatenate([self.blocks, np.full((B, 1), -1, dtype=np.int64)], 1)
            feeds["block_ids"] = self.blocks
        if self.in_place and self.mask.shape[1] > self.capacity:
            self._grow(max(self.mask.shape[1], 2 * self.capacity))
        if self.in_place:
            if self.runner is None or self.bound is not self.cache:  # new buffers: after the prompt, a reorder or growth
                self.runner = self.backend.prepare_into("decoder", dict(zip(self.past, self.cache)), dict(zip(self.present, self.cache)))
                self.bound = self.cache
            out = self.runner(feeds)
        else:
            feeds.update(zip(self.past, self.cache))
            out = self.backend.run("decoder", feeds, keep=self.present)
            self.cache = [out[n] for n in self.present]
        self.next_pos = self.next_pos + 1
        return _host_logits(out["logits"])

    def _grow(self, capacity: int) -> None:
        """Move the in-place cache into buffers with room for `capacity` rows."""
        to_host, grown = self.backend.to_host, []
        for v in self.cache:
            old = to_host(v)
            new = np.zeros((*old.shape[:2], capacity, old.shape[3]), dtype=old.dtype)
            new[:, :, : old.shape[2]] = old
            grown.append(self.backend.buffer(new))
        self.cache, self.capacity = grown, capacity


def _generation_tag():
    """`{% generation %}...{% endgeneration %}` (transformers' marker of assistant text for training
    masks) rendered as its contents, as transformers renders it for generation."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    return Generation


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    import json

    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatPrompt:
    """The bundle's chat template (jinja2, sandboxed, set up as transformers sets it up) and its tokenizer."""

    def __init__(self, spec: dict, tokenizer, lock: threading.Lock):
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise InputError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _generation_tag()])
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = _tojson
        try:
            self.template = env.from_string(spec["chat_template"])
        except Exception as e:  # jinja2's TemplateSyntaxError
            raise BundleError(f"manifest.json prompt.chat_template: not a template jinja2 can read ({e})") from None
        self.spec, self.tokenizer, self.lock = spec, tokenizer, lock
        self.named = dict(spec.get("special_tokens") or {})

    def text(self, messages: list[dict]) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=True, **self.named)
        except InputError:
            raise
        except Exception as e:  # jinja2's SecurityError, UndefinedError, TypeError from the template's own code
            raise BundleError(f"manifest.json prompt.chat_template: fails on these messages "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None

    def ids(self, text: str, images: Sequence[ImageInput]) -> list[int]:
        token = self.spec["image_token"]
        parts = text.split(token)
        if len(parts) - 1 != len(images):
            raise InputError(f"prompt: {len(parts) - 1} image placeholders for {len(images)} images")
        text = parts[0] + "".join(img.text + part for img, part in zip(images, parts[1:]))
        bos = self.named.get("bos_token")
        special = self.spec.get("add_special_tokens", not (bos and text.startswith(bos)))  # False: the template writes them
        with self.lock:
            return self.tokenizer.encode(text, add_special_tokens=bool(special)).ids


def user_turn(question: str, images: int = 1) -> dict:
    return {"role": "user", "content": [*({"type": "image"} for _ in range(images)), {"type": "text", "text": question}]}


class PrefixPipeline(Pipeline):
    """`vlmedge.load` of a prefix-contract bundle: caption, vqa and chat."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.chat_prompt = ChatPrompt(self.manifest.prompt, self.tokenizer, self._tok_lock)
        self.max_frames = self.manifest.axes["frames"].max
        self.block_rule = None
        self.patch_vision = any(t.name == "vision_position_ids" for t in self.manifest.graphs["vision_encoder"].inputs)
        self.mrope = any(t.name == "position_ids" and len(t.shape) == 3 for t in self.manifest.graphs["decoder"].inputs)
        proc = self.manifest.preprocessing["processor"]
        if (self.patch_vision or self.mrope) and proc["kind"] != "qwen2_vl":
            raise BundleError(f"manifest.json preprocessing.processor.kind: {proc['kind']!r} does not go with a vision graph "
                              "over patches or M-RoPE positions (qwen2_vl)")
        if self.patch_vision and "patches" not in self.manifest.axes:
            raise BundleError("manifest.json axes.patches: missing (the vision graph takes patches)")
        if any(t.name == "block_ids" for t in self.manifest.graphs["decoder"].inputs):
            rule = self.manifest.prompt.get("blocks")
            if rule not in BLOCK_RULES:
                raise BundleError(f"manifest.json prompt.blocks: {str(rule)!r:.40} is not one of {', '.join(BLOCK_RULES)} "
                                  "(the decoder takes block_ids)")
            self.block_rule = rule
        for key in ("image_start", "image_end"):
            if not isinstance(self.manifest.preprocessing["processor"].get(key, ""), str):
                raise BundleError(f"manifest.json preprocessing.processor.{key}: expected text")
        if not isinstance(self.manifest.prompt.get("add_special_tokens", True), bool):
            raise BundleError("manifest.json prompt.add_special_tokens: expected true or false")
        self.cross_attention = "cross_kv" in self.manifest.graphs
        if self.cross_attention != ("cross_attention" in self.manifest.prompt):
            raise BundleError("manifest.json prompt.cross_attention: a prefix bundle has it exactly when it has a cross_kv graph")
        self.vision_text = None
        if "vision_text" in self.manifest.prompt:
            names = [t.name for t in self.manifest.graphs["vision_encoder"].inputs]
            self.vision_text = VisionText(self.manifest.prompt["vision_text"], self.bundle.path, names)

    def max_new_tokens(self, task: str, prompt_len: int = 0) -> int:
        """Tokens a prompt of this length leaves: the decoder's positions (axes.total_len, less the hidden slot)
        hold the prompt and every generated token but the last."""
        return int(self.manifest.axes["total_len"].max) - prompt_len

    def settings(self, task: str, config: GenerationConfig | None = None, prompt_len: int = 0) -> Settings:
        spec = self.manifest.tasks[task]
        defaults = {"eos_token_id": spec["eos_id"], **spec.get("generation", {})}
        s = resolve(config or GenerationConfig(), defaults, prompt_len, spec["max_new_tokens"], self.manifest.dims["vocab_size"])
        limit = self.max_new_tokens(task, prompt_len)
        if s.max_new > limit:
            if s.user_length:
                after = f" after this {prompt_len}-token prompt" if prompt_len else " (less the prompt's tokens)"
                raise InputError(f"max_new_tokens: {s.max_new} is over this bundle's limit of {limit}{after} "
                                 "(axes.total_len; export with a larger --max-length)")
            s = replace(s, max_new=limit)
        return s

    # -- tasks -------------------------------------------------------------------------------
    def caption(self, images, *, return_ids: bool = False, batch_size: int | None = None,
                timings: Timings | None = None, **generation):
        single = not _many(images)
        items = [images] if single else list(images)
        text = self.manifest.prompt["caption_instruction"]
        convs = [[user_turn(text)] for _ in items]
        out = self._generate("caption", [[img] for img in items], convs, generation, return_ids, batch_size, timings)
        return out[0] if single else out

    def vqa(self, images, questions, *, return_ids: bool = False, batch_size: int | None = None,
            timings: Timings | None = None, **generation):
        single, imgs, qs = pairs(images, questions)
        self.question_ids(qs)
        convs = [[user_turn(q)] for q in qs]
        out = self._generate("vqa", [[img] for img in imgs], convs, generation, return_ids, batch_size, timings)
        return out[0] if single else out

    def chat(self, messages: list[dict], *, return_ids: bool = False, timings: Timings | None = None, **generation):
        """OpenAI-style messages (several turns; a user turn's content a string or parts: {"type": "text",
        "text"}, {"type": "image", "image": path | PIL image | array}, or {"type": "image_url", "image_url":
        {"url": path}}) -> the assistant's answer."""
        conv, images = chat_messages(messages)
        return self._generate("vqa", [images], [conv], generation, return_ids, None, timings)[0]

    def stream_chat(self, messages: list[dict], *, timings: Timings | None = None, **generation):
        """`chat`'s answer as text pieces while it is decoded (greedily or by sampling; num_beams=1)."""
        steps = self.generate_steps("vqa", [], conversations=[messages], timings=timings, **generation)
        return stream_pieces(steps, self.raw_text)

    def generate_steps(self, task: str, images: Sequence[Any], questions: Sequence[str] | None = None, *,
                       conversations: Sequence[list[dict]] | None = None, timings: Timings | None = None,
                       **generation) -> Steps:
        """One batch of caption, vqa or (conversations: one list of messages per item, images in them) chat,
        decoded greedily or by sampling, as an iterator of steps (see Pipeline.generate_steps)."""
        config = self._config(task, generation)
        beams = config.num_beams or self.manifest.tasks[task].get("generation", {}).get("num_beams", 1)
        if beams != 1:
            raise InputError(f"num_beams: {beams}; token by token decoding follows one beam per item (pass num_beams=1)")
        if conversations is not None:
            pairs_ = [chat_messages(m) for m in conversations]
            convs, images = [c for c, _ in pairs_], [i for _, i in pairs_]
        elif questions is None:
            convs, images = [[user_turn(self.manifest.prompt["caption_instruction"])] for _ in images], [[i] for i in images]
        else:
            if len(questions) != len(images):
                raise InputError(f"vqa: {len(images)} images but {len(questions)} questions; pass one of each per pair")
            self.question_ids(questions)
            convs, images = [[user_turn(q)] for q in questions], [[i] for i in images]
        if not convs or len(convs) > self.max_batch:
            raise InputError(f"images: {len(convs)}; a step-by-step batch holds 1 to {self.max_batch} (axes.batch.max)")
        contract, ids, settings = self._batch(task, images, convs, config, timings)
        return Steps(contract, ids, settings, timings, context=contract.prompt_mask.sum(1))

    def question_ids(self, questions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The questions' own ids (right-padded, with a mask); empty or non-text questions are refused."""
        rows = []
        for i, q in enumerate(questions):
            if not isinstance(q, str) or not q.strip():
                raise InputError(f"question {i}: expected a question in words, got {str(q)!r:.40}")
            try:
                q.encode("utf-8")
            except UnicodeEncodeError as e:
                raise InputError(f"question {i}: not valid Unicode text (a lone surrogate at character {e.start})") from None
            with self._tok_lock:
                rows.append(self.tokenizer.encode(q, add_special_tokens=False).ids or [self.manifest.tasks["vqa"]["pad_id"]])
        width = max(map(len, rows), default=0)
        ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = r, 1
        return ids, mask

    def run(self, images, task: str, **kw):
        raise InputError(f"task: {task!r:.40}: decoder-only bundles run caption, vqa and chat")

    def _generate(self, task, images, convs, generation, return_ids, batch_size, timings):
        if task not in self.manifest.tasks:
            raise InputError(f"{self.bundle.path}: this bundle has no {task} task (it has {', '.join(self.tasks)}); "
                             "export it with --task all")
        try:
            config = GenerationConfig(**generation)
        except TypeError as e:
            raise InputError(f"{task}: {e}; options are {', '.join(GenerationConfig.__dataclass_fields__)}") from None
        check_options({k: v for k, v in generation.items() if v is None and k not in ("max_new_tokens", "max_length", "eos_token_id")})
        config.check()
        if not isinstance(return_ids, bool):
            raise InputError(f"return_ids: expected True or False, got {type(return_ids).__name__}")
        if batch_size is not None:
            _count("batch_size", batch_size, 1)
        beams = config.num_beams or self.manifest.tasks[task].get("generation", {}).get("num_beams", 1)
        if beams > self.max_batch:
            raise InputError(f"num_beams: {beams} beams are over this bundle's batch maximum of {self.max_batch} "
                             f"(axes.batch.max); use at most {self.max_batch}")
        chunk = max(1, min(batch_size or self.batch_size, self.max_batch // beams))
        results: list = []
        for s in range(0, len(convs), chunk):
            rows = self._one_batch(task, images[s : s + chunk], convs[s : s + chunk], config, timings)
            results += [Generation(self.decode(r), tuple(r)) if return_ids else self.decode(r) for r in rows]
        return results

    def prompt_inputs(self, images: list[list[Any]], convs: list[list[dict]]) -> tuple[list[list[ImageInput]], list[list[int]]]:
        """Each item's processed images and prompt ids, as the family's processor and apply_chat_template make them."""
        inputs, rows = [], []
        prep = self.manifest.preprocessing
        for i, (imgs, conv) in enumerate(zip(images, convs)):
            item = [process(load_image(img, self.max_pixels, where=f"image {i}"), prep, multi=len(imgs) > 1) for img in imgs]
            if self.vision_text is not None:
                text_ids = self.vision_text.ids(turn_text(conv))
                item = [replace(img, text_ids=text_ids) for img in item]
            rows.append(self.chat_prompt.ids(self.chat_prompt.text(conv), item))
            inputs.append(item)
        return inputs, rows

    def _one_batch(self, task, images, convs, config, timings):
        return decode(*self._batch(task, images, convs, config, timings), timings)

    def _batch(self, task, images, convs, config, timings) -> tuple[PrefixDecoder, np.ndarray, Settings]:
        """The decoder over one batch's merged embeddings, its prompt ids and the settings they decode with."""
        t0 = time.perf_counter()
        inputs, rows = self.prompt_inputs(images, convs)
        width = max(map(len, rows))
        limit = self.manifest.axes["seq_len"].max
        if width > limit:
            raise InputError(f"prompt: {width} tokens with the image tokens, over this bundle's maximum of {limit} "
                             "(axes.seq_len); use a smaller image or export with a larger --max-length")
        pad = self.manifest.tasks[task]["pad_id"]
        ids = np.full((len(rows), width), pad, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
        settings = self.settings(task, config, width)
        t1 = time.perf_counter()
        embeds = self.embeddings(ids, inputs)
        if timings is not None:
            timings.preprocess += t1 - t0
            timings.encoder += time.perf_counter() - t1
        return self.decoder(embeds, mask, ids, inputs), ids, settings

    def decoder(self, embeds: np.ndarray, mask: np.ndarray, ids: np.ndarray,
                inputs: list[list[ImageInput]] | None = None) -> PrefixDecoder:
        """The decoding loop's contract over merged prompt embeddings, their mask, ids and (M-RoPE) each row's
        images, as this bundle's decoder takes prompts (`axes.prompt_batch`: rows per prompt call, and the
        cache in place)."""
        rows = self.manifest.axes.get("prompt_batch")
        image_id = self.manifest.prompt["image_token_id"]
        blocks = None if self.block_rule is None else block_ids(self.block_rule, ids, mask, image_id)
        pos = None
        if self.mrope:
            grids = [[img.grid for img in item] for item in (inputs or [[] for _ in ids])]
            pos = mrope_positions(ids, mask, grids, image_id, int(self.manifest.preprocessing["processor"]["merge_size"]))
        cross, prompt_cross = (None, None) if not self.cross_attention else self._cross(ids, inputs)
        return PrefixDecoder(self.backend, self.manifest.dims, embeds, mask, rows.max if rows else None, blocks, pos,
                             cross, prompt_cross)

    def _cross(self, ids: np.ndarray, inputs: list[list[ImageInput]] | None) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """A cross-attention decoder's inputs (IDEFICS): the cross K/V of each row's images, one after another
        (zero rows where a row has fewer), and the prompt's cross_mask."""
        spec, image_id = self.manifest.prompt["cross_attention"], self.manifest.prompt["image_token_id"]
        inputs = inputs if inputs is not None else [[] for _ in ids]
        counts = [len(item) for item in inputs]
        for i, (row, n) in enumerate(zip(ids, counts)):
            if int((row == image_id).sum()) != n:
                raise InputError(f"prompt: {int((row == image_id).sum())} image tokens for {n} images; the text "
                                 f"holds {self.manifest.prompt['image_token']} of its own")
        most = max(1, *counts)
        if most > spec["max_images"]:
            raise InputError(f"prompt: {most} images, over this bundle's maximum of {spec['max_images']} per prompt")
        latents = int(self.manifest.dims["image_tokens"])
        to_host = self.backend.to_host
        width = self.manifest.graphs["cross_kv"].inputs[0].shape[-1]
        states = np.zeros((len(ids), most * latents, width), np.float32)
        px = [img.frames for item in inputs for img in item]
        if px:
            frames = np.concatenate(px)
            features = np.concatenate([to_host(self.backend.run("vision_encoder", {"pixel_values": frames[s : s + self.max_frames]})
                                               ["image_embeds"]) for s in range(0, len(frames), self.max_frames)])
            at = 0
            for i, n in enumerate(counts):
                states[i, : n * latents] = features[at : at + n].reshape(n * latents, width)
                at += n
        out = self.backend.run("cross_kv", {"image_embeds": states})
        cross = {t.name: np.asarray(to_host(out[t.name])) for t in self.manifest.graphs["cross_kv"].outputs}
        return cross, cross_mask(ids, image_id, spec["reset_token_id"], latents, most)

    def embeddings(self, ids: np.ndarray, inputs: list[list[ImageInput]]) -> np.ndarray:
        """Text embeddings with the image-token rows replaced by the images' embeddings, in order."""
        to_host = self.backend.to_host
        embeds = np.array(to_host(self.backend.run("embed", {"input_ids": ids})["inputs_embeds"]))
        images = [img for item in inputs for img in item]
        if not images or self.cross_attention:  # IDEFICS: the images reach the decoder through cross_kv (`decoder`)
            return embeds
        if self.patch_vision:
            return self._merge(ids, embeds, np.concatenate(self._patch_features(images)))
        px = np.concatenate([img.frames for img in images])
        text = self.vision_text.feeds(images) if self.vision_text is not None else {}
        outs = [self.backend.run("vision_encoder", {"pixel_values": px[s : s + self.max_frames],
                                                    **{k: v[s : s + self.max_frames] for k, v in text.items()}})
                for s in range(0, len(px), self.max_frames)]
        features = np.concatenate([to_host(o["image_embeds"]) for o in outs])
        newline = to_host(outs[0]["image_newline"]) if "image_newline" in outs[0] else None
        prep, rows, at = self.manifest.preprocessing, [], 0
        for img in images:
            rows.append(pack(features[at : at + len(img.frames)], img, prep, newline))
            at += len(img.frames)
        return self._merge(ids, embeds, np.concatenate(rows))

    def _patch_features(self, images: list[ImageInput]) -> list[np.ndarray]:
        """Each image's embeddings from a vision graph over patches (Qwen2-VL): images grouped into calls of at
        most axes.patches.max patches, kept apart in a call by their segment ids."""
        proc = self.manifest.preprocessing["processor"]
        limit, merge, window = self.manifest.axes["patches"].max, int(proc["merge_size"]), int(proc.get("window", 0))
        groups, out = [[]], []
        for img in images:
            if len(img.frames) > limit:
                raise InputError(f"image: {len(img.frames)} patches, over this bundle's maximum of {limit} (axes.patches)")
            if sum(len(i.frames) for i in groups[-1]) + len(img.frames) > limit:
                groups.append([])
            groups[-1].append(img)
        for group in groups:
            feeds, restore = vision_feeds(group, merge, window)
            features = self.backend.to_host(self.backend.run("vision_encoder", feeds)["image_embeds"])
            features = features if restore is None else features[restore]
            at = 0
            for img in group:
                n = len(img.frames) // (merge * merge)
                out.append(features[at : at + n])
                at += n
        return out

    def _merge(self, ids: np.ndarray, embeds: np.ndarray, image: np.ndarray) -> np.ndarray:
        """The embeddings with the image-token rows replaced by the images' rows, in order (their count checked)."""
        where = ids == self.manifest.prompt["image_token_id"]
        if int(where.sum()) != len(image):
            raise InputError(f"prompt: {int(where.sum())} image tokens for {len(image)} image embeddings; the text "
                             f"holds {self.manifest.prompt['image_token']} of its own")
        embeds[where] = image.astype(embeds.dtype, copy=False)
        return embeds


def chat_messages(messages: Any) -> tuple[list[dict], list[Any]]:
    """OpenAI-style messages -> (the messages as chat templates read them, the images in order)."""
    if not isinstance(messages, list) or not messages:
        raise InputError("messages: expected a non-empty list of {'role', 'content'}")
    conv, images = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise InputError(f"messages[{i}]: expected {{'role': 'system' | 'user' | 'assistant', 'content': ...}}")
        content = m.get("content")
        if isinstance(content, str):
            conv.append({"role": m["role"], "content": [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, list):
            raise InputError(f"messages[{i}].content: expected a string or a list of parts")
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind in ("image", "image_url") and m["role"] == "user":
                src = part.get("image") if kind == "image" else (part.get("image_url") or {}).get("url") \
                    if isinstance(part.get("image_url"), dict) else part.get("image_url")
                if src is None:
                    raise InputError(f"messages[{i}].content[{j}]: an image part without an image")
                images.append(src)
                parts.append({"type": "image"})
            else:
                raise InputError(f"messages[{i}].content[{j}]: expected a text part, or an image part in a user turn")
        conv.append({"role": m["role"], "content": parts})
    return conv, images
