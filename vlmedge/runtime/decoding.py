"""The decoding loop over a bundle's graphs, written once for every family and backend.

Greedy search and beam search follow Hugging Face `generate` (transformers 5.x) step for step:
beam scores are accumulated log-softmax probabilities; each step keeps the top 2·k candidates,
finalises those among the top k that end in EOS or reach the length limit (score divided by
generated_length ** length_penalty), continues with the best k unfinished ones, and stops per
`early_stopping` (True: k finished hypotheses; False: HF's heuristic; "never": only at the limit).
So `num_beams=k` gives the tokens HF gives for the same logits.

The KV cache stays backend-resident: the loop only reads logits on the host and asks the backend
to reorder cache rows when beams change.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from vlmedge.errors import InputError
from vlmedge.runtime.backends import Backend
from vlmedge.runtime.bundle import kv_names

NEG = np.float32(-1.0e9)  # HF's "never choose this" score


@dataclass(frozen=True)
class GenerationConfig:
    """Generation options, named and defaulted as in Hugging Face `generate`."""

    max_new_tokens: int | None = None  # None: the task's default from the manifest
    min_new_tokens: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never"
    eos_token_id: int | None = None  # None: the task's EOS

    def check(self) -> None:
        """Refuse options of the wrong type or range with one line naming the option: a bool is not
        a count, a float must be finite, a string is not a number."""
        if self.max_new_tokens is not None:
            _count("max_new_tokens", self.max_new_tokens, 1)
        _count("min_new_tokens", self.min_new_tokens, 0)
        _count("num_beams", self.num_beams, 1)
        if isinstance(self.length_penalty, bool) or not isinstance(self.length_penalty, numbers.Real) \
                or not math.isfinite(self.length_penalty) or abs(self.length_penalty) > 10:
            # bounded: generated_length ** length_penalty must stay a float
            raise InputError(f"length_penalty: expected a finite number in [-10, 10], got {_show(self.length_penalty)}")
        if not (self.early_stopping is True or self.early_stopping is False
                or (isinstance(self.early_stopping, str) and self.early_stopping == "never")):
            raise InputError(f"early_stopping: expected True, False or 'never', got {_show(self.early_stopping)}")
        if self.eos_token_id is not None:
            _count("eos_token_id", self.eos_token_id, 0)


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _count(name: str, value: Any, least: int) -> None:
    """An integer option (Python or numpy int, never a bool or a float) of at least `least`."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name}: expected an integer >= {least}, got {_show(value)}")
    if value < least:
        raise InputError(f"{name}: expected >= {least}, got {value}")


@dataclass
class Timings:
    """Seconds per stage of one call, filled in when passed to the loop."""

    preprocess: float = 0.0
    encoder: float = 0.0
    first_token: float = 0.0  # decoder_init and the choice of the first token
    tokens: list[float] = field(default_factory=list)  # every later step: decoder_step and the choice

    @property
    def total(self) -> float:
        return self.preprocess + self.encoder + self.first_token + sum(self.tokens)


def encode(backend: Backend, pixel_values: np.ndarray, question_ids: np.ndarray | None = None,
           question_mask: np.ndarray | None = None, image_prefix: bool = False) -> tuple[Any, np.ndarray]:
    """The states the decoder cross-attends to (kept on the backend), and their mask. `image_prefix`:
    the text encoder's output is [image tokens; question], so the mask covers the image tokens too."""
    image = backend.run("vision_encoder", {"pixel_values": pixel_values}, keep=("image_states",))["image_states"]
    if question_ids is None:
        return image, np.ones((pixel_values.shape[0], _length(image)), dtype=np.int64)
    feeds = {"question_ids": question_ids, "question_mask": question_mask, "image_states": image}
    states = backend.run("text_encoder", feeds, keep=("encoder_states",))["encoder_states"]
    if image_prefix:
        question_mask = np.concatenate([np.ones((pixel_values.shape[0], _length(image)), dtype=np.int64), question_mask], 1)
    return states, question_mask


def _length(value: Any) -> int:
    shape = value.shape if isinstance(value, np.ndarray) else value.shape()
    return int(shape[1])


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _host_logits(logits: np.ndarray) -> np.ndarray:
    return logits if logits.dtype == np.float32 else logits.astype(np.float32)


def _topk(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values per row, largest first (torch.topk's order)."""
    part = np.argpartition(-x, k - 1, axis=-1)[:, :k] if k < x.shape[-1] else np.broadcast_to(np.arange(x.shape[-1]), x.shape)
    order = np.argsort(-np.take_along_axis(x, part, -1), axis=-1, kind="stable")
    return np.take_along_axis(part, order, -1)


class _Decoder:
    """decoder_init / decoder_step with the cache kept on the backend."""

    def __init__(self, backend: Backend, layers: int):
        self.backend = backend
        self.present = kv_names("present", layers)
        self.past = kv_names("past", layers)
        self.cross_names = kv_names("cross", layers)

    def init(self, prompt: np.ndarray, states: Any, mask: np.ndarray) -> np.ndarray:
        out = self.backend.run("decoder_init", {"input_ids": prompt, "encoder_states": states, "encoder_mask": mask},
                               keep=self.present + self.cross_names)
        self.cache = [out[n] for n in self.present]
        self.cross = {n: out[n] for n in self.cross_names}
        self.mask = mask
        self._step = None
        return _host_logits(out["logits"])

    def expand(self, rows: np.ndarray) -> None:
        """Repeat or reorder batch rows of the cache, the cross K/V and the mask."""
        take = self.backend.take
        self.cache = [take(v, rows) for v in self.cache]
        self.cross = {n: take(v, rows) for n, v in self.cross.items()}
        self.mask = self.mask[rows]
        self._step = None

    def reorder(self, rows: np.ndarray) -> None:
        """Beam reordering: only the self-attention cache changes (beams of one item share cross K/V)."""
        if not np.array_equal(rows, np.arange(len(rows))):
            self.cache = [self.backend.take(v, rows) for v in self.cache]

    def step(self, ids: np.ndarray) -> np.ndarray:
        if self._step is None:  # cross K/V and the mask are bound once per sequence
            self._step = self.backend.prepare("decoder_step", {"encoder_mask": self.mask, **self.cross}, keep=self.present)
        feeds = {"input_ids": ids.reshape(-1, 1).astype(np.int64)}
        feeds.update(zip(self.past, self.cache))
        out = self._step(feeds)
        self.cache = [out[n] for n in self.present]
        return _host_logits(out["logits"])


def generate(backend: Backend, layers: int, states: Any, mask: np.ndarray, prompt_ids: Sequence[int], eos_id: int,
             config: GenerationConfig, max_new_tokens: int, timings: Timings | None = None) -> list[list[int]]:
    """Generated ids per row, EOS included where it was produced, prompt excluded."""
    config.check()
    eos = config.eos_token_id if config.eos_token_id is not None else eos_id
    max_new = config.max_new_tokens or max_new_tokens
    dec = _Decoder(backend, layers)
    B = mask.shape[0]
    prompt = np.tile(np.asarray(prompt_ids, dtype=np.int64), (B, 1))
    t0 = time.perf_counter()
    logits = dec.init(prompt, states, mask)
    if config.num_beams == 1:
        return _greedy(dec, logits, B, eos, config.min_new_tokens, max_new, timings, t0)
    return _beam(dec, logits, B, eos, config, max_new, timings, t0)


def _mark(timings: Timings | None, t0: float, first: bool) -> float:
    now = time.perf_counter()
    if timings is not None:
        if first:
            timings.first_token += now - t0
        else:
            timings.tokens.append(now - t0)
    return now


def _greedy(dec: _Decoder, logits, B, eos, min_new, max_new, timings, t0) -> list[list[int]]:
    rows: list[list[int]] = [[] for _ in range(B)]
    done = np.zeros(B, dtype=bool)
    for step in range(max_new):
        if step < min_new:
            logits = logits.copy()
            logits[:, eos] = -np.inf
        nxt = logits.argmax(-1)
        for b in np.flatnonzero(~done):
            rows[b].append(int(nxt[b]))
        done |= nxt == eos
        t0 = _mark(timings, t0, step == 0)
        if done.all() or step == max_new - 1:
            break
        logits = dec.step(nxt)
    return rows


def _beam(dec: _Decoder, logits, B, eos, cfg: GenerationConfig, max_new, timings, t0) -> list[list[int]]:
    k, lp, es = cfg.num_beams, cfg.length_penalty, cfg.early_stopping
    K = 2 * k  # candidates kept per item: enough to continue k beams even if k of them end in EOS
    V = logits.shape[-1]
    dec.expand(np.repeat(np.arange(B), k))  # decoder_init ran once per item; its beams start identical
    logits = np.repeat(logits, k, axis=0)
    top_k_slot = np.arange(K) < k
    run_seq = np.full((B, k, max_new), -1, dtype=np.int64)
    run_score = np.zeros((B, k), dtype=np.float32)
    run_score[:, 1:] = NEG
    fin_seq = np.full((B, k, max_new), -1, dtype=np.int64)
    fin_len = np.zeros((B, k), dtype=np.int64)
    fin_score = np.full((B, k), NEG, dtype=np.float32)
    fin_done = np.zeros((B, k), dtype=bool)
    can_improve = np.ones((B, 1), dtype=bool)
    offset = (np.arange(B) * k)[:, None]
    for step in range(max_new):
        logp = _log_softmax(logits)
        if step < cfg.min_new_tokens:
            logp[:, eos] = -np.inf
        acc = (logp.reshape(B, k, V) + run_score[:, :, None]).reshape(B, k * V)
        idx = _topk(acc, K)
        cand_score = np.take_along_axis(acc, idx, -1)
        beam, token = idx // V, idx % V
        cand_seq = np.take_along_axis(run_seq, beam[:, :, None], 1)
        cand_seq[:, :, step] = token
        cand_src = beam + offset
        hits = (token == eos) | (step + 1 >= max_new)

        # the best k unfinished candidates continue
        cont_score = cand_score + hits.astype(np.float32) * NEG
        keep = _topk(cont_score, k)
        run_seq = np.take_along_axis(cand_seq, keep[:, :, None], 1)
        run_score = np.take_along_axis(cont_score, keep, -1)
        src = np.take_along_axis(cand_src, keep, -1)

        # finished candidates among the top k join the finished list if they beat what is there
        just = hits & top_k_slot[None, :]
        score = cand_score / np.float32((step + 1) ** lp)
        if es is True:
            score = score + (fin_done.all(-1, keepdims=True)).astype(np.float32) * NEG
        score = score + (~can_improve).astype(np.float32) * NEG + (~just).astype(np.float32) * NEG
        m_score = np.concatenate([fin_score, score], 1)
        sel = _topk(m_score, k)
        fin_seq = np.take_along_axis(np.concatenate([fin_seq, cand_seq], 1), sel[:, :, None], 1)
        fin_len = np.take_along_axis(np.concatenate([fin_len, np.full((B, K), step + 1)], 1), sel, -1)
        fin_done = np.take_along_axis(np.concatenate([fin_done, just], 1), sel, -1)
        fin_score = np.take_along_axis(m_score, sel, -1)

        # can a running beam still beat the worst finished one?
        best_len = max_new if (es == "never" and lp > 0) else step + 1
        best_running = run_score[:, :1] / np.float32(best_len ** lp)
        worst = np.where(fin_done, fin_score.min(-1, keepdims=True), NEG)
        can_improve &= (best_running > worst).any(-1, keepdims=True)
        t0 = _mark(timings, t0, step == 0)
        if not can_improve.any() or (fin_done.all() and es is True) or hits.all() or step == max_new - 1:
            break
        dec.reorder(src.reshape(-1))
        logits = dec.step(run_seq[:, :, step].reshape(-1))
    return [fin_seq[b, 0, : fin_len[b, 0]].tolist() for b in range(B)]
