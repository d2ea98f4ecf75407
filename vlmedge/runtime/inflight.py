"""In-flight batching on the cross-attention contract: requests join a running decode batch between
two steps and leave it when they end, instead of waiting for the batch they started in to finish.

The `decoder` graph takes an attention mask over its cache and a position per row, so rows of
different lengths share one call. A row that joins runs its prompt (after the hidden slot) with the
others that join with it; then its cache is left-padded with hidden slots to the batch's length (or
the batch's to its own), and its cross-attention K/V right-padded, `encoder_mask` hiding the padding
where encoder lengths differ (VQA questions). A hidden slot gets exactly zero attention weight, so a
row's logits are those of a call of its own.

A row that leaves leaves a vacant row behind: its tensors stay where they are (it attends to one slot
of its own and is never read) until a joiner is written over it in place. Copying the batch to drop
a row, at every departure, cost more than the step on small models; the batch is compacted only
once most of its rows are vacant, and cache slots no row uses are trimmed.

Each row decodes with its own settings (greedy or sampling, processors, seed, EOS, length), as
`decoding.Steps` would for it alone: its processors read its own sequence, its draws its own
generator (seeded by (seed, 0), as a call of one row is). Beam search is not batched in flight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence

import numpy as np

from vlmedge.runtime.backends import Backend
from vlmedge.runtime.bundle import kv_names
from vlmedge.runtime.decoding import Processors, Settings, _host_logits, draw, generators

TRIM = 8  # cache slots no row uses, trimmed once there are this many (each trim copies the cache)


@dataclass
class Row:
    key: Hashable
    settings: Settings
    seq: list[int]  # prompt and generated ids
    procs: Processors = field(repr=False)
    rng: np.random.Generator | None = field(repr=False)
    context: int  # tokens read before the first generated one (usage): prompt and attended states
    finished: bool = False

    @property
    def generated(self) -> list[int]:
        return self.seq[self.settings.prompt_len:]


class Inflight:
    """A decode batch whose rows come and go: `add` runs new rows' prompts and picks their first
    tokens, `step` gives every live row its next token, `remove` drops rows (ended, or whose caller
    left). Rows that end (EOS, their length) are marked `finished` and stay until removed."""

    def __init__(self, backend: Backend, layers: int):
        self.backend = backend
        self.present, self.past = kv_names("present", layers), kv_names("past", layers)
        self.cross_names = kv_names("cross", layers)
        self.rows: list[Row | None] = []  # None: a vacant row (its caller left), until a joiner takes it
        self.cache: list[Any] = []  # per layer K, V: [rows, heads, slots, head_dim], on the backend
        self.attention = np.zeros((0, 0), dtype=np.int64)  # [rows, slots]: 1 where a slot holds a token
        self.positions = np.zeros(0, dtype=np.int64)  # each row's next position
        self.cross: dict[str, np.ndarray] = {}
        self.encoder_mask = np.zeros((0, 0), dtype=np.int64)
        self._runner = None  # the decoder with cross K/V and the encoder mask bound, until the rows change

    def __len__(self) -> int:
        """Rows that are not vacant."""
        return sum(r is not None for r in self.rows)

    @property
    def live(self) -> list[Row]:
        """The rows that are not vacant, in batch order."""
        return [r for r in self.rows if r is not None]

    def add(self, keys: Sequence[Hashable], states: Any, mask: np.ndarray, prompt_ids: Sequence[int],
            settings: Sequence[Settings], seeds: Sequence[int | None] | None = None,
            context: Sequence[int] | None = None) -> dict[Hashable, int]:
        """New rows (one per key, their encoder states and mask as `encode` gives them) join: their prompt
        runs, and each row's first token is chosen. `context`: each row's tokens read before its first
        (usage; default the prompt and the states attended to). Returns key -> first token."""
        be, n, P = self.backend, len(keys), len(prompt_ids)
        cross = be.run("cross_kv", {"encoder_states": states})
        first = cross[self.cross_names[0]]
        empty = np.zeros((n, first.shape[1], 1, first.shape[3]), dtype=first.dtype)
        attention = np.concatenate([np.zeros((n, 1), dtype=np.int64), np.ones((n, P), dtype=np.int64)], 1)
        prompt = np.tile(np.asarray(prompt_ids, dtype=np.int64), (n, 1))
        feeds = {"input_ids": prompt, "attention_mask": attention, "position_ids": np.tile(np.arange(P, dtype=np.int64), (n, 1)),
                 "encoder_mask": mask.astype(np.int64, copy=False), **cross, **{p: empty for p in self.past}}
        out = be.run("decoder", feeds)
        seeds = seeds or [None] * n
        new = []
        for b, key in enumerate(keys):
            s = settings[b]
            rng = generators(seeds[b], 1)[0] if s.sample else None
            new.append(Row(key, s, list(prompt_ids), Processors(s), rng, P + int(mask[b].sum()) if context is None else int(context[b])))
        self._place(new, [out[p] for p in self.present], attention, np.full(n, P, dtype=np.int64), cross,
                    mask.astype(np.int64))
        return self._choose(new, _host_logits(out["logits"]))

    def step(self) -> dict[Hashable, int]:
        """Every unfinished row's next token (one decoder call for all rows)."""
        if len(self.rows) > 2 * len(self):  # mostly vacant: drop the vacant rows (one copy of the batch)
            self._compact()
        live = [r for r in self.rows if r is not None and not r.finished]
        if not live:
            return {}
        dead = int(np.argmax(self.attention.any(0)))  # leading slots no row uses
        if dead >= TRIM:
            self.cache = [self.backend.to_host(v)[:, :, dead:] for v in self.cache]
            self.attention = self.attention[:, dead:]
        B = len(self.rows)
        vacant = np.array([r is None for r in self.rows])
        ids = np.array([0 if r is None else r.seq[-1] for r in self.rows], dtype=np.int64)[:, None]
        self.attention = np.concatenate([self.attention, np.ones((B, 1), dtype=np.int64)], 1)
        self.attention[vacant, :-1] = 0  # a vacant row attends to its newest slot only, at position 0
        self.positions[vacant] = 0
        if self._runner is None:
            self._runner = self.backend.prepare("decoder", {"encoder_mask": self.encoder_mask, **self.cross}, keep=self.present)
        feeds = {"input_ids": ids, "attention_mask": self.attention, "position_ids": self.positions[:, None],
                 **dict(zip(self.past, self.cache))}
        out = self._runner(feeds)
        self.cache = [out[p] for p in self.present]
        self.positions = self.positions + 1
        logits = _host_logits(out["logits"])
        index = {id(r): i for i, r in enumerate(self.rows) if r is not None}
        return self._choose(live, logits[[index[id(r)] for r in live]])

    def remove(self, keys: Sequence[Hashable]) -> None:
        """Drop these rows (their caller has its answer, or has left): their places become vacant."""
        gone = set(keys)
        self.rows = [None if r is not None and r.key in gone else r for r in self.rows]
        if not len(self):
            self.rows, self.cache, self.cross = [], [], {}
            self.attention = np.zeros((0, 0), dtype=np.int64)
            self.positions = np.zeros(0, dtype=np.int64)
            self.encoder_mask = np.zeros((0, 0), dtype=np.int64)
            self._runner = None

    # -- internals ----------------------------------------------------------------------------

    def _choose(self, rows: list[Row], logits: np.ndarray) -> dict[Hashable, int]:
        """Each row's next token: greedy rows whose settings process nothing take the argmax of all of
        them at once; the others go through their own processors and generator."""
        plain = [i for i, r in enumerate(rows) if r.rng is None and not r.procs.active]
        tokens = np.zeros(len(rows), dtype=np.int64)
        if plain:
            tokens[plain] = logits[plain].argmax(-1)
        for i in sorted(set(range(len(rows))) - set(plain)):
            row = rows[i]
            scores = row.procs(np.asarray(row.seq, dtype=np.int64)[None], logits[i][None].copy())
            tokens[i] = draw(scores, [row.rng])[0] if row.rng is not None else scores.argmax(-1)[0]
        out = {}
        for row, token in zip(rows, tokens.tolist()):
            s = row.settings
            row.seq.append(token)
            done = len(row.seq) - s.prompt_len >= s.max_new or token in s.eos
            row.finished = row.finished or done
            out[row.key] = token
        return out

    def _place(self, new: list[Row], cache: list, attention: np.ndarray, positions: np.ndarray,
               cross: dict[str, np.ndarray], mask: np.ndarray) -> None:
        """New rows into the batch: over vacant rows in place first, the rest stacked under the running
        ones. Caches are left-padded to one length, cross K/V and the encoder mask right-padded to one
        length (padding hidden by the masks)."""
        self._runner = None
        if not self.rows:
            self.rows, self.cache, self.attention, self.positions = new, cache, attention, positions
            self.cross, self.encoder_mask = cross, mask
            return
        to_host = self.backend.to_host
        T = max(self.attention.shape[1], attention.shape[1])
        E = max(self.encoder_mask.shape[1], mask.shape[1])
        if T > self.attention.shape[1] or E > self.encoder_mask.shape[1]:  # the batch grows to hold them
            self.cache = [_pad(to_host(v), T, 2, left=True) for v in self.cache]
            self.attention = _pad(self.attention, T, 1, left=True)
            self.cross = {k: _pad(v, E, 2) for k, v in self.cross.items()}
            self.encoder_mask = _pad(self.encoder_mask, E, 1)
        cache = [_pad(to_host(v), T, 2, left=True) for v in cache]
        attention, mask = _pad(attention, T, 1, left=True), _pad(mask, E, 1)
        cross = {k: _pad(v, E, 2) for k, v in cross.items()}
        slots = [i for i, r in enumerate(self.rows) if r is None][:len(new)]
        if slots:  # written in place (on the CPU the cache is ONNX Runtime's own output, not a copy)
            k = len(slots)
            self.cache = [to_host(v) for v in self.cache]
            for v, c in zip(self.cache, cache):
                v[slots] = c[:k]
            for name, v in self.cross.items():
                v[slots] = cross[name][:k]
            self.attention[slots], self.encoder_mask[slots] = attention[:k], mask[:k]
            self.positions[slots] = positions[:k]
            for i, row in zip(slots, new):
                self.rows[i] = row
        k = len(slots)
        if k < len(new):
            self.cache = [np.concatenate([to_host(a), b[k:]]) for a, b in zip(self.cache, cache)]
            self.attention = np.concatenate([self.attention, attention[k:]])
            self.cross = {name: np.concatenate([v, cross[name][k:]]) for name, v in self.cross.items()}
            self.encoder_mask = np.concatenate([self.encoder_mask, mask[k:]])
            self.positions = np.concatenate([self.positions, positions[k:]])
            self.rows = self.rows + new[k:]

    def _compact(self) -> None:
        """Drop the vacant rows from every tensor, and encoder positions no remaining row attends to."""
        keep = np.array([i for i, r in enumerate(self.rows) if r is not None], dtype=np.int64)
        self.rows = [self.rows[i] for i in keep]
        take = self.backend.take
        self.cache = [take(v, keep) for v in self.cache]
        self.attention, self.positions = self.attention[keep], self.positions[keep]
        self.cross = {k: v[keep] for k, v in self.cross.items()}
        self.encoder_mask = self.encoder_mask[keep]
        self._runner = None
        used = self.encoder_mask.any(0)
        end = len(used) - int(np.argmax(used[::-1]))  # trailing encoder positions no row attends to
        if end < len(used):
            self.cross = {k: v[:, :, :end] for k, v in self.cross.items()}
            self.encoder_mask = self.encoder_mask[:, :end]


def _pad(x: np.ndarray, size: int, axis: int, left: bool = False) -> np.ndarray:
    """Zeros added along `axis` up to `size` (before the data with `left`)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (extra, 0) if left else (0, extra)
    return np.pad(x, widths)
