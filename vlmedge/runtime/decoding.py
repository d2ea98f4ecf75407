"""The decoding loop over a bundle's graphs, written once for every family and backend.

Greedy search and beam search follow Hugging Face `generate` (transformers 5.x) step for step:
beam scores are accumulated log-softmax probabilities; each step keeps the top 2·k candidates,
finalises those among the top k that end in EOS or reach the length limit (score divided by
generated_length ** length_penalty), continues with the best k unfinished ones, and stops per
`early_stopping` (True: k finished hypotheses; False: HF's heuristic; "never": only at the limit).
So `num_beams=k` gives the tokens HF gives for the same logits.

Sampling (`do_sample=True`, one row per item) applies HF's warpers after the processors, in HF's
order (temperature, top_k, top_p, min_p, then renormalize_logits) and with its defaults (top_k 50),
then draws each row's token from the softmax. Each row draws from its own numpy generator seeded by
(`seed`, row): the same seed gives the same tokens, on any backend. The draws cannot equal torch's
(another generator), only follow the same distribution.

`Steps` is the greedy/sampling loop as an iterator of per-step tokens: `decode` drains it, a stream
reads each step's tokens as they come, and a caller that leaves can `stop` its rows.

The KV cache stays backend-resident: the loop only reads logits on the host and asks the backend
to reorder cache rows when beams change.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from vlmedge.errors import InputError
from vlmedge.runtime.backends import Backend
from vlmedge.runtime.bundle import kv_names

NEG = np.float32(-1.0e9)  # HF's "never choose this" score


@dataclass(frozen=True)
class GenerationConfig:
    """Generation options, named and defaulted as in Hugging Face `generate`. None: the task's
    default from the manifest (`tasks.<task>.generation`, the model's own generation settings), else
    HF's global default."""

    max_new_tokens: int | None = None  # wins over max_length, as in HF
    max_length: int | None = None  # prompt + generated tokens
    min_new_tokens: int | None = None
    min_length: int | None = None  # prompt + generated tokens
    num_beams: int | None = None
    length_penalty: float | None = None
    early_stopping: bool | str | None = None  # True, False or "never"
    eos_token_id: int | list[int] | None = None  # one id or several
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    bad_words_ids: list[list[int]] | None = None
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | list[int] | None = None
    exponential_decay_length_penalty: tuple[int, float] | list | None = None  # (start, factor)
    suppress_tokens: list[int] | None = None
    begin_suppress_tokens: list[int] | None = None
    remove_invalid_values: bool | None = None
    renormalize_logits: bool | None = None
    do_sample: bool | None = None  # True: draw each token (one beam only); False: greedy or beam search
    temperature: float | None = None  # sampling: logits divided by it (> 0)
    top_k: int | None = None  # sampling: keep the k likeliest tokens (0: all; HF's default 50)
    top_p: float | None = None  # sampling: keep the likeliest tokens whose probabilities sum to top_p
    min_p: float | None = None  # sampling: drop tokens less likely than min_p x the likeliest one's probability
    seed: int | None = None  # sampling: the same seed draws the same tokens (None: fresh entropy per call)

    def check(self) -> None:
        """Refuse options of the wrong type or range with one line naming the option: a bool is not
        a count, a float must be finite, a string is not a number."""
        check_options({k: v for k, v in self.__dict__.items() if v is not None})

    def set(self) -> dict[str, Any]:
        """The options given (not None)."""
        return {k: v for k, v in self.__dict__.items() if v is not None}


# HF's global defaults (GenerationConfig._get_default_generation_params) for what the loop reads
HF_DEFAULTS = {"num_beams": 1, "length_penalty": 1.0, "early_stopping": False, "min_length": 0, "min_new_tokens": 0,
               "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0}
LIMITS = {"ids": 1 << 22, "count": 1 << 20, "list": 4096, "word": 64, "beams": 1024, "penalty": 1.0e4, "factor": 100.0,
          "seed": (1 << 64) - 1, "temperature": 1.0e4}


def _ids(name: str, value: Any, many: bool, most: int) -> list[int]:
    """A token id, or (many) a list of 1..most ids; returned as a list."""
    if many and isinstance(value, (list, tuple)):
        if not 1 <= len(value) <= most:
            raise InputError(f"{name}: expected 1 to {most} token ids, got {len(value)}")
        for i, v in enumerate(value):
            _count(f"{name}[{i}]", v, 0, LIMITS["ids"] - 1)
        return [int(v) for v in value]
    _count(name, value, 0, LIMITS["ids"] - 1)
    return [int(value)]


def _real(name: str, value: Any, lo: float, hi: float, positive: bool = False) -> None:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or not lo <= value <= hi or (positive and value <= 0):
        span = f"({lo}, {hi}]" if positive else f"[{lo}, {hi}]"
        raise InputError(f"{name}: expected a finite number in {span}, got {_show(value)}")


def _flag(name: str, value: Any) -> None:
    if not (value is True or value is False):
        raise InputError(f"{name}: expected True or False, got {_show(value)}")


def check_options(opts: dict[str, Any]) -> None:
    """Type and range checks of generation settings (HF names), one line naming the first bad one."""
    for name, v in opts.items():
        if name in ("max_new_tokens", "max_length"):  # the bundle's own limit is checked where it is known
            _count(name, v, 1)
        elif name == "num_beams":
            _count(name, v, 1, LIMITS["beams"])
        elif name in ("min_new_tokens", "min_length", "no_repeat_ngram_size"):
            _count(name, v, 0, LIMITS["count"])
        elif name == "length_penalty":  # bounded: generated_length ** length_penalty must stay a float
            _real(name, v, -10, 10)
        elif name == "repetition_penalty":
            _real(name, v, 0, LIMITS["penalty"], positive=True)
        elif name == "early_stopping":
            if not (v is True or v is False or (isinstance(v, str) and v == "never")):
                raise InputError(f"early_stopping: expected True, False or 'never', got {_show(v)}")
        elif name in ("eos_token_id", "forced_eos_token_id"):
            _ids(name, v, True, LIMITS["word"])
        elif name in ("forced_bos_token_id", "decoder_start_token_id", "bos_token_id", "pad_token_id"):
            _ids(name, v, False, 1)
        elif name in ("suppress_tokens", "begin_suppress_tokens"):
            if not isinstance(v, (list, tuple)) or len(v) > LIMITS["list"]:
                raise InputError(f"{name}: expected a list of at most {LIMITS['list']} token ids, got {_show(v)}")
            if v:
                _ids(name, v, True, LIMITS["list"])
        elif name == "bad_words_ids":
            if not isinstance(v, (list, tuple)) or len(v) > LIMITS["list"]:  # []: none
                raise InputError(f"bad_words_ids: expected a list of at most {LIMITS['list']} lists of token ids, got {_show(v)}")
            for i, word in enumerate(v):
                if not isinstance(word, (list, tuple)):
                    raise InputError(f"bad_words_ids[{i}]: expected a list of token ids, got {_show(word)}")
                _ids(f"bad_words_ids[{i}]", word, True, LIMITS["word"])
        elif name == "exponential_decay_length_penalty":
            if not isinstance(v, (list, tuple)) or len(v) != 2:
                raise InputError(f"{name}: expected [start, factor], got {_show(v)}")
            _count(f"{name}[0]", v[0], 0, LIMITS["count"])
            _real(f"{name}[1]", v[1], 0, LIMITS["factor"], positive=True)
        elif name in ("remove_invalid_values", "renormalize_logits"):
            _flag(name, v)
        elif name == "do_sample":
            _flag(name, v)
        elif name == "temperature":
            _real(name, v, 0, LIMITS["temperature"], positive=True)
        elif name == "top_k":
            _count(name, v, 0, LIMITS["ids"])
        elif name in ("top_p", "min_p"):
            _real(name, v, 0, 1)
        elif name == "seed":
            _count(name, v, 0, LIMITS["seed"])


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _count(name: str, value: Any, least: int, most: int | None = None) -> None:
    """An integer option (Python or numpy int, never a bool or a float) in [least, most]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name}: expected an integer >= {least}, got {_show(value)}")
    if value < least:
        raise InputError(f"{name}: expected >= {least}, got {value}")
    if most is not None and value > most:
        raise InputError(f"{name}: expected <= {most}, got {value}")


@dataclass(frozen=True)
class Settings:
    """Generation settings resolved for one task: the user's options over the task's defaults over
    HF's global defaults."""

    max_new: int
    num_beams: int
    length_penalty: float
    early_stopping: bool | str
    eos: tuple[int, ...]
    options: dict[str, Any]  # every processor setting in effect (HF names)
    prompt_len: int
    user_length: bool  # max_new_tokens / max_length came from the user, not from defaults

    @property
    def max_length(self) -> int:
        return self.prompt_len + self.max_new

    @property
    def sample(self) -> bool:
        """Draw tokens (do_sample) rather than take the likeliest."""
        return self.options.get("do_sample") is True


def resolve(config: GenerationConfig, defaults: dict[str, Any] | None, prompt_len: int, task_max_new: int,
            vocab: int | None = None) -> Settings:
    """The settings one call decodes with. Lengths as in HF: max_new_tokens wins over max_length
    (both the user's over the task's defaults); with neither, the task's max_new_tokens."""
    config.check()
    user = config.set()
    base = {k: v for k, v in (defaults or {}).items() if v is not None}
    opts = {**HF_DEFAULTS, **base, **user}
    if vocab is not None:
        for name in ("eos_token_id", "forced_eos_token_id", "forced_bos_token_id", "suppress_tokens", "begin_suppress_tokens"):
            if name in user:
                for t in (user[name] if isinstance(user[name], (list, tuple)) else [user[name]]):
                    if t >= vocab:
                        raise InputError(f"{name}: token id {t} is outside the vocabulary (0..{vocab - 1})")
        for i, word in enumerate(user.get("bad_words_ids") or []):
            for t in word:
                if t >= vocab:
                    raise InputError(f"bad_words_ids[{i}]: token id {t} is outside the vocabulary (0..{vocab - 1})")
    user_length = "max_new_tokens" in user or "max_length" in user
    max_new = task_max_new
    for src in (user, base):
        if "max_new_tokens" in src:
            max_new = src["max_new_tokens"]
            break
        if "max_length" in src:
            max_new = src["max_length"] - prompt_len
            if max_new < 1:
                if src is user:
                    raise InputError(f"max_length: {src['max_length']} leaves no room after the {prompt_len}-token prompt")
                max_new = task_max_new
            break
    eos = opts.get("eos_token_id")
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    if opts["do_sample"] is True and opts["num_beams"] != 1:
        raise InputError(f"do_sample: sampling draws one sequence per item; it cannot run with num_beams={opts['num_beams']} "
                         "(pass num_beams=1, or do_sample=False for beam search)")
    return Settings(int(max_new), int(opts["num_beams"]), float(opts["length_penalty"]), opts["early_stopping"],
                    tuple(int(e) for e in eos if e is not None), opts, prompt_len, user_length)


class Processors:
    """Hugging Face's logits processors for greedy and beam search, in `_get_logits_processor`'s
    order and with its semantics, in numpy over all batch x beam rows at once:

    repetition_penalty, no_repeat_ngram_size, bad_words_ids, min_length, min_new_tokens,
    forced_bos_token_id, forced_eos_token_id, remove_invalid_values, exponential_decay_length_penalty,
    suppress_tokens, begin_suppress_tokens, then (sampling) temperature, top_k, top_p, min_p, and last
    renormalize_logits.

    `seqs` is every row's decoder sequence so far, prompt included ([rows, cur_len]); greedy passes
    raw logits, beam search log-probabilities, as HF does. Unset settings cost nothing per token."""

    def __init__(self, settings: Settings):
        o, eos = settings.options, np.asarray(settings.eos, dtype=np.int64)
        P = settings.prompt_len
        self.eos = eos
        self.rep = float(o.get("repetition_penalty", 1.0))
        self.ngram = int(o.get("no_repeat_ngram_size", 0))
        self.min_length = int(o.get("min_length", 0)) if len(eos) else 0
        self.min_new = int(o.get("min_new_tokens", 0)) if len(eos) else 0
        self.prompt_len = P
        self.forced_bos = o.get("forced_bos_token_id")
        forced_eos = o.get("forced_eos_token_id")
        self.forced_eos = None if forced_eos is None else np.asarray(
            forced_eos if isinstance(forced_eos, (list, tuple)) else [forced_eos], dtype=np.int64)
        self.max_length = settings.max_length
        self.inf_nan = bool(o.get("remove_invalid_values", False))
        decay = o.get("exponential_decay_length_penalty")
        self.decay = None if decay is None else (int(decay[0]) + P, float(decay[1]))
        self.suppress = np.asarray(o.get("suppress_tokens") or [], dtype=np.int64)
        self.begin_suppress = np.asarray(o.get("begin_suppress_tokens") or [], dtype=np.int64)
        self.begin_index = P if (P > 1 or self.forced_bos is None) else P + 1
        self.renormalize = bool(o.get("renormalize_logits", False))
        self.temperature = float(o.get("temperature", 1.0))
        self.top_k = int(o.get("top_k") or 0)
        self.top_p = float(o.get("top_p", 1.0))
        self.min_p = None if o.get("min_p") is None else float(o["min_p"])
        self.warp = settings.sample and (self.temperature != 1.0 or self.top_k != 0 or self.top_p < 1.0
                                         or self.min_p is not None)
        # bad words: single tokens always banned; longer words grouped by prefix length
        eos_words = {(int(e),) for e in eos}
        words = [tuple(w) for w in (o.get("bad_words_ids") or []) if tuple(w) not in eos_words]
        self.bad_single = np.asarray(sorted({w[0] for w in words if len(w) == 1}), dtype=np.int64)
        groups: dict[int, list[tuple[int, ...]]] = {}
        for w in dict.fromkeys(words):
            if len(w) > 1:
                groups.setdefault(len(w) - 1, []).append(w)
        self.bad_groups = [(m, np.asarray([w[:-1] for w in ws], dtype=np.int64), np.asarray([w[-1] for w in ws], dtype=np.int64))
                           for m, ws in groups.items()]
        self.active = bool(self.rep != 1.0 or self.ngram > 0 or len(self.bad_single) or self.bad_groups or self.min_length
                           or self.min_new or self.forced_bos is not None or self.forced_eos is not None or self.inf_nan
                           or self.decay is not None or len(self.suppress) or len(self.begin_suppress) or self.renormalize
                           or self.warp)

    def __call__(self, seqs: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Processed scores (a new array where anything changes; `scores` itself is not written)."""
        if not self.active:
            return scores
        scores = scores.copy()
        L = seqs.shape[1]
        V = scores.shape[1]
        if self.rep != 1.0:
            repetition_penalty(seqs, scores, self.rep)
        if self.ngram > 0:
            no_repeat_ngram(seqs, scores, self.ngram)
        if len(self.bad_single):
            scores[:, self.bad_single[self.bad_single < V]] = -np.inf
        for m, prefixes, last in self.bad_groups:
            if m <= L:
                hit = (seqs[:, None, L - m:] == prefixes[None]).all(-1)
                rows, which = np.nonzero(hit)
                scores[rows, last[which]] = -np.inf
        if L < self.min_length or L - self.prompt_len < self.min_new:
            scores[:, self.eos] = -np.inf
        if self.forced_bos is not None and L == 1:
            scores[:] = -np.inf
            scores[:, self.forced_bos] = 0
        if self.forced_eos is not None and L == self.max_length - 1:
            scores[:] = -np.inf
            scores[:, self.forced_eos] = 0
        if self.inf_nan:
            scores[np.isnan(scores)] = 0.0
            info = np.finfo(scores.dtype)
            scores[scores == np.inf] = info.max
            scores[scores == -np.inf] = info.min
        if self.decay is not None and L > self.decay[0] and len(self.eos):
            with np.errstate(over="ignore"):
                factor = float(np.float64(self.decay[1]) ** (L - self.decay[0])) - 1
            cur = scores[:, self.eos]
            penalty = np.abs(cur) * np.float32(factor)
            penalty[~np.isfinite(cur)] = 0.0
            scores[:, self.eos] = cur + penalty
        if len(self.suppress):
            scores[:, self.suppress] = -np.inf
        if len(self.begin_suppress) and L == self.begin_index:
            scores[:, self.begin_suppress] = -np.inf
        if self.warp:
            if self.temperature != 1.0:
                scores = temperature(scores, self.temperature)
            if self.top_k != 0:
                scores = top_k(scores, self.top_k)
            if self.top_p < 1.0:
                scores = top_p(scores, self.top_p)
            if self.min_p is not None:
                scores = min_p(scores, self.min_p)
        if self.renormalize:
            scores = _log_softmax(scores)
        return scores


def temperature(scores: np.ndarray, t: float) -> np.ndarray:
    """HF's TemperatureLogitsWarper: scores / t."""
    return scores / np.float32(t)


def top_k(scores: np.ndarray, k: int, keep: int = 1) -> np.ndarray:
    """HF's TopKLogitsWarper: scores below the k-th largest of their row become -inf (ties stay)."""
    k = min(max(k, keep), scores.shape[-1])
    kth = np.partition(scores, -k, axis=-1)[:, -k:].min(-1, keepdims=True)
    return np.where(scores < kth, np.float32(-np.inf), scores)


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def top_p(scores: np.ndarray, p: float, keep: int = 1) -> np.ndarray:
    """HF's TopPLogitsWarper (nucleus): in ascending order, tokens whose cumulative probability is at
    most 1 - p become -inf; the `keep` likeliest always stay."""
    order = np.argsort(scores, axis=-1, kind="stable")
    sorted_scores = np.take_along_axis(scores, order, -1)
    cum = np.cumsum(_softmax(sorted_scores), axis=-1, dtype=np.float32)
    drop = cum <= np.float32(1 - p)
    drop[:, -keep:] = False
    remove = np.zeros_like(drop)
    np.put_along_axis(remove, order, drop, -1)
    return np.where(remove, np.float32(-np.inf), scores)


def min_p(scores: np.ndarray, p: float, keep: int = 1) -> np.ndarray:
    """HF's MinPLogitsWarper: tokens whose probability is under p x the row's highest become -inf;
    the `keep` likeliest always stay."""
    probs = _softmax(scores)
    remove = probs < np.float32(p) * probs.max(-1, keepdims=True)
    np.put_along_axis(remove, _topk(probs, min(keep, probs.shape[-1])), False, -1)
    return np.where(remove, np.float32(-np.inf), scores)


def draw(scores: np.ndarray, rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """One token per row from softmax(scores) (torch.multinomial's distribution), row b with rngs[b].
    A row with no finite score (everything masked) takes its argmax, as there is nothing to draw."""
    x = scores.astype(np.float64)
    with np.errstate(invalid="ignore"):  # a row of -inf: nan, taken care of below
        x = np.exp(x - x.max(-1, keepdims=True))
    cdf = np.cumsum(x, axis=-1)
    total = cdf[:, -1]
    u = np.array([g.random() for g in rngs]) * total
    out = (cdf > u[:, None]).argmax(-1)
    bad = ~(np.isfinite(total) & (total > 0))
    if bad.any():
        out[bad] = scores[bad].argmax(-1)
    return out


def generators(seed: int | None, rows: int) -> list[np.random.Generator]:
    """Row b's generator: seeded by (seed, b), so a row's draws do not depend on the others; fresh
    entropy shared out to the rows when there is no seed."""
    base = np.random.SeedSequence(seed) if seed is None else None
    return [np.random.default_rng([seed, b] if seed is not None else base.spawn(1)[0]) for b in range(rows)]


def repetition_penalty(seqs: np.ndarray, scores: np.ndarray, penalty: float) -> None:
    """HF's RepetitionPenaltyLogitsProcessor, in place: every token already in a row's sequence has
    its score divided by `penalty` where positive, multiplied where negative."""
    rows = np.arange(scores.shape[0])[:, None]
    seen = scores[rows, seqs]
    scores[rows, seqs] = np.where(seen < 0, seen * np.float32(penalty), seen / np.float32(penalty))


def no_repeat_ngram(seqs: np.ndarray, scores: np.ndarray, n: int) -> None:
    """HF's NoRepeatNGramLogitsProcessor, in place: a token that would complete an n-gram already
    in the row's sequence is banned."""
    L = seqs.shape[1]
    if L < n:
        return
    windows = np.lib.stride_tricks.sliding_window_view(seqs, n, axis=1)  # [rows, L - n + 1, n]
    if n == 1:
        hit = np.ones(windows.shape[:2], dtype=bool)
    else:
        hit = (windows[:, :, :-1] == seqs[:, None, L - n + 1:]).all(-1)
    rows, at = np.nonzero(hit)
    scores[rows, windows[rows, at, -1]] = -np.inf


@dataclass
class Timings:
    """Seconds per stage of one call, filled in when passed to the loop."""

    preprocess: float = 0.0
    encoder: float = 0.0
    first_token: float = 0.0  # the prompt through the decoder and the choice of the first token
    tokens: list[float] = field(default_factory=list)  # every later step: the decoder and the choice

    @property
    def total(self) -> float:
        return self.preprocess + self.encoder + self.first_token + sum(self.tokens)


def encode(backend: Backend, pixel_values: np.ndarray, question_ids: np.ndarray | None = None,
           question_mask: np.ndarray | None = None, image_prefix: bool = False,
           vision_text: dict[str, np.ndarray] | None = None) -> tuple[Any, np.ndarray]:
    """The states the decoder cross-attends to (kept on the backend), and their mask. `image_prefix`:
    the text encoder's output is [image tokens; question], so the mask covers the image tokens too.
    `vision_text`: the ids and mask of the text a vision graph reads beside the pixels (InstructBLIP's Q-Former)."""
    image = backend.run("vision_encoder", {"pixel_values": pixel_values, **(vision_text or {})},
                        keep=("image_states",))["image_states"]
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
    """The cross-attention contract: `cross_kv` once per sequence, then one `decoder` graph for the
    prompt (after a one-slot past the attention mask hides) and for every later token, with the
    cache kept on the backend."""

    def __init__(self, backend: Backend, layers: int, states: Any, mask: np.ndarray, graph: str = "decoder"):
        self.backend, self.graph = backend, graph
        self.present = kv_names("present", layers)
        self.past = kv_names("past", layers)
        self.cross_names = kv_names("cross", layers)
        self.states, self.mask = states, mask

    def start(self, prompt: np.ndarray) -> np.ndarray:
        B, P = prompt.shape
        self.cross = self.backend.run("cross_kv", {"encoder_states": self.states}, keep=self.cross_names)
        first = self.backend.to_host(self.cross[self.cross_names[0]])  # heads, head size and dtype of the cache
        empty = np.zeros((B, first.shape[1], 1, first.shape[3]), dtype=first.dtype)
        self.attention = np.concatenate([np.zeros((B, 1), dtype=np.int64), np.ones((B, P), dtype=np.int64)], 1)
        self.next_pos = P
        self._step = None
        feeds = {"input_ids": prompt.astype(np.int64, copy=False), "attention_mask": self.attention,
                 "position_ids": np.tile(np.arange(P, dtype=np.int64), (B, 1)), **{n: empty for n in self.past}}
        return self._run(feeds)

    def _run(self, feeds: dict) -> np.ndarray:
        if self._step is None:  # cross K/V and the encoder mask are bound once per sequence
            self._step = self.backend.prepare(self.graph, {"encoder_mask": self.mask, **self.cross}, keep=self.present)
        out = self._step(feeds)
        self.cache = [out[n] for n in self.present]
        self.attention_probs = out.get("cross_attentions")  # the explain graph's [batch, layers, heads, encoder_len]
        return _host_logits(out["logits"])

    def expand(self, rows: np.ndarray) -> None:
        """Repeat or reorder batch rows of the cache, the cross K/V and the masks."""
        take = self.backend.take
        self.cache = [take(v, rows) for v in self.cache]
        self.cross = {n: take(v, rows) for n, v in self.cross.items()}
        self.mask, self.attention = self.mask[rows], self.attention[rows]
        self._step = None

    def reorder(self, rows: np.ndarray) -> None:
        """Beam reordering: only the self-attention cache changes (beams of one item share cross K/V, and
        every row has the same length)."""
        if not np.array_equal(rows, np.arange(len(rows))):
            self.cache = [self.backend.take(v, rows) for v in self.cache]

    def step(self, ids: np.ndarray) -> np.ndarray:
        B = len(ids)
        self.attention = np.concatenate([self.attention, np.ones((B, 1), dtype=np.int64)], 1)
        feeds = {"input_ids": ids.reshape(B, 1).astype(np.int64), "attention_mask": self.attention,
                 "position_ids": np.full((B, 1), self.next_pos, dtype=np.int64)}
        feeds.update(zip(self.past, self.cache))
        self.next_pos += 1
        return self._run(feeds)


class _SplitDecoder(_Decoder):
    """The cross-attention contract of schema 1 bundles: decoder_init / decoder_step, the cache kept on the backend."""

    def start(self, prompt: np.ndarray) -> np.ndarray:
        out = self.backend.run("decoder_init", {"input_ids": prompt, "encoder_states": self.states, "encoder_mask": self.mask},
                               keep=self.present + self.cross_names)
        self.cache = [out[n] for n in self.present]
        self.cross = {n: out[n] for n in self.cross_names}
        self._step = None
        return _host_logits(out["logits"])

    def expand(self, rows: np.ndarray) -> None:
        """Repeat or reorder batch rows of the cache, the cross K/V and the mask."""
        take = self.backend.take
        self.cache = [take(v, rows) for v in self.cache]
        self.cross = {n: take(v, rows) for n, v in self.cross.items()}
        self.mask = self.mask[rows]
        self._step = None

    def step(self, ids: np.ndarray) -> np.ndarray:
        if self._step is None:  # cross K/V and the mask are bound once per sequence
            self._step = self.backend.prepare("decoder_step", {"encoder_mask": self.mask, **self.cross}, keep=self.present)
        feeds = {"input_ids": ids.reshape(-1, 1).astype(np.int64)}
        feeds.update(zip(self.past, self.cache))
        out = self._step(feeds)
        self.cache = [out[n] for n in self.present]
        return _host_logits(out["logits"])


def attend(backend: Any, layers: int, states: Any, mask: np.ndarray, prompt_ids: Sequence[int],
           rows: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """The cross-attention that chose each generated token of `rows` (one per item of the batch `states`
    and `mask` describe): the explain decoder run along the prompt and the tokens, as HF's
    `cross_attentions[t]` (the last query row of the pass that produced token t). Per item, float32
    [len(row), layers, heads, encoder positions], the positions its mask holds (padding is at the end)."""
    B, n = len(rows), max((len(r) for r in rows), default=0)
    dec = _Decoder(backend, layers, states, mask, graph=backend.explain("decoder"))
    probs = []
    if n:
        dec.start(np.tile(np.asarray(prompt_ids, dtype=np.int64), (B, 1)))
        probs.append(dec.attention_probs)
        for t in range(n - 1):  # a finished row repeats its last token; what it attends to then is not kept
            dec.step(np.array([r[min(t, len(r) - 1)] if r else 0 for r in rows], dtype=np.int64))
            probs.append(dec.attention_probs)
    every = np.stack(probs, 1) if probs else np.zeros((B, 0, layers, 1, mask.shape[1]), dtype=np.float32)
    return [np.ascontiguousarray(every[b, : len(rows[b]), :, :, : int(mask[b].sum())]) for b in range(B)]


def generate(backend: Backend, layers: int, states: Any, mask: np.ndarray, prompt_ids: Sequence[int], eos_id: int,
             config: GenerationConfig, max_new_tokens: int, timings: Timings | None = None,
             defaults: dict[str, Any] | None = None, split: bool = False) -> list[list[int]]:
    """Generated ids per row, EOS included where it was produced, prompt excluded. `defaults` are
    the task's generation settings (manifest `tasks.<task>.generation`); `config` overrides them;
    `eos_id` and `max_new_tokens` are the task's EOS and length where neither says otherwise.
    `split`: a schema 1 bundle (Manifest.split_decoder)."""
    settings = resolve(config, {"eos_token_id": eos_id, **(defaults or {})}, len(prompt_ids), max_new_tokens)
    return run(backend, layers, states, mask, prompt_ids, settings, timings, split)


def cross_decoder(backend: Backend, layers: int, states: Any, mask: np.ndarray, split: bool = False):
    """The decoding loop's contract object for a cross-attention bundle (`split`: schema 1's two decoder graphs)."""
    return (_SplitDecoder if split else _Decoder)(backend, layers, states, mask)


def run(backend: Backend, layers: int, states: Any, mask: np.ndarray, prompt_ids: Sequence[int], settings: Settings,
        timings: Timings | None = None, split: bool = False) -> list[list[int]]:
    """The decoding loop with resolved settings (see `resolve`), on the cross-attention contract."""
    prompt = np.tile(np.asarray(prompt_ids, dtype=np.int64), (mask.shape[0], 1))
    return decode(cross_decoder(backend, layers, states, mask, split), prompt, settings, timings)


def decode(contract: Any, prompt: np.ndarray, settings: Settings, timings: Timings | None = None) -> list[list[int]]:
    """Greedy search, sampling or beam search over a contract object: `start(prompt) -> logits` runs
    the prompt ([rows, P] ids, what the logits processors read as the sequence so far), `step(ids) ->
    logits` one token per row, `expand(rows)` repeats rows for beams and `reorder(rows)` follows them.
    The loop never learns which graphs stand behind it."""
    if settings.num_beams == 1:
        steps = Steps(contract, prompt, settings, timings)
        for _ in steps:
            pass
        return steps.rows()
    t0 = time.perf_counter()
    logits = contract.start(prompt)
    return _beam(contract, logits, prompt, settings, Processors(settings), timings, t0)


def _mark(timings: Timings | None, t0: float, first: bool) -> float:
    now = time.perf_counter()
    if timings is not None:
        if first:
            timings.first_token += now - t0
        else:
            timings.tokens.append(now - t0)
    return now


class Steps:
    """Greedy search or sampling (one row per item) as an iterator: each step yields the token chosen
    for every row ([rows] ids; a row already finished repeats its last token), `finished` says which
    rows have ended (EOS or the length limit), `stop(rows)` ends rows whose caller has left, and
    `rows()` is every row's generated ids once the iterator is spent (EOS included where produced)."""

    def __init__(self, contract: Any, prompt: np.ndarray, settings: Settings, timings: Timings | None = None,
                 context: np.ndarray | None = None):
        assert settings.num_beams == 1, "beam search runs in _beam"
        self.contract, self.prompt, self.settings, self.timings = contract, prompt, settings, timings
        # tokens each row reads before its first (prompt without padding, and the states it attends to): usage counts
        self.context = np.full(len(prompt), prompt.shape[1]) if context is None else np.asarray(context)
        B, P = prompt.shape
        self.seqs = np.zeros((B, P + settings.max_new), dtype=np.int64)
        self.seqs[:, :P] = prompt
        self.lengths = np.zeros(B, dtype=np.int64)  # generated tokens per row
        self.finished = np.zeros(B, dtype=bool)
        self.rngs = generators(settings.options.get("seed"), B) if settings.sample else None

    def stop(self, rows: Sequence[int] | np.ndarray) -> None:
        """End these rows now: they keep the tokens they have; when every row has ended, the loop ends."""
        self.finished[np.asarray(rows, dtype=np.int64)] = True

    def ids(self, row: int) -> list[int]:
        """Row `row`'s generated ids so far."""
        P = self.prompt.shape[1]
        return self.seqs[row, P : P + self.lengths[row]].tolist()

    def rows(self) -> list[list[int]]:
        return [self.ids(b) for b in range(len(self.seqs))]

    def __iter__(self) -> Iterator[np.ndarray]:
        s, dec, timings = self.settings, self.contract, self.timings
        B, P = self.prompt.shape
        eos = np.asarray(s.eos, dtype=np.int64)
        procs = Processors(s)
        t0 = time.perf_counter()
        logits = dec.start(self.prompt)
        for step in range(s.max_new):
            scores = procs(self.seqs[:, : P + step], logits)
            nxt = draw(scores, self.rngs) if self.rngs is not None else scores.argmax(-1)
            live = ~self.finished
            nxt = np.where(live, nxt, self.seqs[:, P + step - 1])
            self.seqs[:, P + step] = nxt
            self.lengths[live] = step + 1
            self.finished |= live & (nxt[:, None] == eos).any(-1)  # np.isin costs more than a step of a small model
            if step == s.max_new - 1:
                self.finished[:] = True
            t0 = _mark(timings, t0, step == 0)
            yield nxt
            if self.finished.all():
                break
            logits = dec.step(nxt)


def _beam(dec: Any, logits, prompt, s: Settings, procs: Processors, timings, t0) -> list[list[int]]:
    k, lp, es, max_new = s.num_beams, s.length_penalty, s.early_stopping, s.max_new
    B, P = prompt.shape
    K = 2 * k  # candidates kept per item: enough to continue k beams even if k of them end in EOS
    V = logits.shape[-1]
    eos = np.asarray(s.eos, dtype=np.int64)
    dec.expand(np.repeat(np.arange(B), k))  # the prompt ran once per item; its beams start identical
    logits = np.repeat(logits, k, axis=0)
    top_k_slot = np.arange(K) < k
    run_seq = np.zeros((B, k, P + max_new), dtype=np.int64)
    run_seq[:, :, :P] = prompt[:, None, :]
    run_score = np.zeros((B, k), dtype=np.float32)
    run_score[:, 1:] = NEG
    fin_seq = np.zeros((B, k, P + max_new), dtype=np.int64)
    fin_len = np.zeros((B, k), dtype=np.int64)
    fin_score = np.full((B, k), NEG, dtype=np.float32)
    fin_done = np.zeros((B, k), dtype=bool)
    can_improve = np.ones((B, 1), dtype=bool)
    offset = (np.arange(B) * k)[:, None]
    for step in range(max_new):
        cur = P + step
        logp = procs(run_seq[:, :, :cur].reshape(B * k, cur), _log_softmax(logits))
        acc = (logp.reshape(B, k, V) + run_score[:, :, None]).reshape(B, k * V)
        idx = _topk(acc, K)
        cand_score = np.take_along_axis(acc, idx, -1)
        beam, token = idx // V, idx % V
        cand_seq = np.take_along_axis(run_seq, beam[:, :, None], 1)
        cand_seq[:, :, cur] = token
        cand_src = beam + offset
        hits = (token[..., None] == eos).any(-1) | (step + 1 >= max_new)

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
        logits = dec.step(run_seq[:, :, cur].reshape(-1))
    return [fin_seq[b, 0, P : P + fin_len[b, 0]].tolist() for b in range(B)]
