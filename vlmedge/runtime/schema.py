"""A small declarative checker for the JSON documents vlmedge trusts least: a bundle's
`manifest.json` and an engine directory's `engines.json`.

A schema is a tree of nodes (`Int`, `Num`, `Str`, `Bool`, `List`, `Obj`, `Map`, `Either`,
`Nullable`, `Free`); `node.check(value, path)` returns the value or raises `Invalid` naming the
field by its path (`tasks.caption.prompt_ids[0]`) and what was expected. Integers are never
booleans, numbers are always finite, strings carry no control characters or lone surrogates, every
number and length has an upper bound, and free-form parts (provenance, validation results) are
bounded in depth and size, so nothing a bundle says can later turn into a TypeError, an
OverflowError, a MemoryError or a RecursionError.

Why not pydantic or jsonschema: the runtime must start fast on an edge CPU, and a bundle is loaded
on every `vlmedge caption`. Measured on this project's 2-core VM (`python -X importtime`, best of
15): `import vlmedge.runtime.bundle` took 31 ms before this checker and 35 ms with it; importing
pydantic with `BaseModel` takes 50-150 ms more, jsonschema 140-240 ms, and either would be a new
runtime dependency (pydantic-core is a compiled extension to ship to every Jetson). Both would
still need their multi-line error reports flattened into this project's one-line, field-naming
messages. The checks needed are few and flat (types, ranges, lengths, choices), so ~150 lines
here do them with no import cost; cross-field rules (axis names defined, ids within the
vocabulary, paths inside the bundle) are plain code beside each schema.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable, Mapping

FREE_DEPTH = 32  # nesting allowed in free-form parts
FREE_ITEMS = 100_000  # values allowed in a free-form part


class Invalid(Exception):
    """A value that does not match its schema: `path` names the field, `message` what was expected."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}" if path else message)
        self.path, self.message = path, message


def show(value: Any, limit: int = 40) -> str:
    """A short repr of a value for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def join(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


class Node:
    def check(self, value: Any, path: str = "") -> Any:
        raise NotImplementedError


class Int(Node):
    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi

    def check(self, value, path=""):
        if type(value) is not int:  # bool is an int subclass: refused
            raise Invalid(path, f"expected an integer, got {_kind(value)} {show(value)}")
        if not self.lo <= value <= self.hi:
            raise Invalid(path, f"expected an integer in [{self.lo}, {self.hi}], got {show(value)}")
        return value


class Num(Node):
    """A finite number (an int or a float, never a bool) in [lo, hi]; `positive` excludes 0."""

    def __init__(self, lo: float, hi: float, positive: bool = False):
        self.lo, self.hi, self.positive = lo, hi, positive

    def check(self, value, path=""):
        if type(value) not in (int, float) or not math.isfinite(value):
            raise Invalid(path, f"expected a finite number, got {_kind(value)} {show(value)}")
        if not self.lo <= value <= self.hi or (self.positive and value <= 0):
            bound = f"in ({self.lo}, {self.hi}]" if self.positive else f"in [{self.lo}, {self.hi}]"
            raise Invalid(path, f"expected a number {bound}, got {show(value)}")
        return value


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_BUT_LINES = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # text that may hold newlines and tabs


def _clean(value: str, path: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Invalid(path, f"not valid Unicode text (a lone surrogate): {show(value)}") from None


class Str(Node):
    """A string of 1..max_len characters, without control characters (`lines`: newlines and tabs
    allowed, for templates); optionally one of `choices`, or accepted by `test` (a callable
    returning an error message or None)."""

    def __init__(self, choices: Iterable[str] | None = None, max_len: int = 256, pattern: str | None = None,
                 test: Callable[[str], str | None] | None = None, what: str = "a string", lines: bool = False):
        self.control = _CONTROL_BUT_LINES if lines else _CONTROL
        self.choices = tuple(choices) if choices is not None else None
        self.max_len, self.test, self.what = max_len, test, what
        self.pattern = re.compile(pattern) if pattern else None

    def check(self, value, path=""):
        if not isinstance(value, str):
            raise Invalid(path, f"expected {self.what}, got {_kind(value)} {show(value)}")
        _clean(value, path)
        if self.choices is not None:
            if value not in self.choices:
                raise Invalid(path, f"{show(value)} is not one of {', '.join(self.choices)}")
            return value
        if not value or len(value) > self.max_len or self.control.search(value):
            raise Invalid(path, f"expected {self.what} of 1 to {self.max_len} printable characters, got {show(value)}")
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise Invalid(path, f"expected {self.what}, got {show(value)}")
        if self.test is not None and (problem := self.test(value)):
            raise Invalid(path, problem)
        return value


class Bool(Node):
    def check(self, value, path=""):
        if not isinstance(value, bool):
            raise Invalid(path, f"expected true or false, got {_kind(value)} {show(value)}")
        return value


class Nullable(Node):
    def __init__(self, node: Node):
        self.node = node

    def check(self, value, path=""):
        return None if value is None else self.node.check(value, path)


class Either(Node):
    """The first of several nodes whose type matches (e.g. a fixed dimension or an axis name)."""

    def __init__(self, *options: tuple[type, Node], what: str):
        self.options, self.what = options, what

    def check(self, value, path=""):
        for kind, node in self.options:
            if type(value) is kind:
                return node.check(value, path)
        raise Invalid(path, f"expected {self.what}, got {_kind(value)} {show(value)}")


class List(Node):
    def __init__(self, item: Node, min_len: int = 0, max_len: int = 4096):
        self.item, self.min_len, self.max_len = item, min_len, max_len

    def check(self, value, path=""):
        if not isinstance(value, list):
            raise Invalid(path, f"expected a list, got {_kind(value)} {show(value)}")
        if not self.min_len <= len(value) <= self.max_len:
            size = f"{self.min_len}" if self.min_len == self.max_len else f"{self.min_len} to {self.max_len}"
            raise Invalid(path, f"expected a list of {size} items, got {len(value)}")
        return [self.item.check(v, join(path, i)) for i, v in enumerate(value)]


class Obj(Node):
    """An object with `required` and `optional` fields; fields the schema does not name are kept
    (a later vlmedge of the same schema version may add some), bounded in depth and size only."""

    def __init__(self, required: Mapping[str, Node], optional: Mapping[str, Node] | None = None):
        self.required, self.optional = dict(required), dict(optional or {})

    def check(self, value, path=""):
        if not isinstance(value, dict):
            raise Invalid(path, f"expected an object, got {_kind(value)} {show(value)}")
        out = dict(value)
        for key, v in value.items():
            if key not in self.required and key not in self.optional:
                _clean(key, path)
                Free(None).check(v, join(path, key))
        for key, node in self.required.items():
            if key not in value:
                raise Invalid(join(path, key), "missing")
            out[key] = node.check(value[key], join(path, key))
        for key, node in self.optional.items():
            if key in value:
                out[key] = node.check(value[key], join(path, key))
        return out


class Map(Node):
    """An object used as a mapping: every key checked by `key`, every value by `value`."""

    def __init__(self, key: Str, value: Node, min_len: int = 0, max_len: int = 4096):
        self.key, self.value, self.min_len, self.max_len = key, value, min_len, max_len

    def check(self, value, path=""):
        if not isinstance(value, dict):
            raise Invalid(path, f"expected an object, got {_kind(value)} {show(value)}")
        if not self.min_len <= len(value) <= self.max_len:
            raise Invalid(path, f"expected {self.min_len} to {self.max_len} entries, got {len(value)}")
        out = {}
        for k, v in value.items():
            try:
                self.key.check(k, "")
            except Invalid as e:
                raise Invalid(join(path, k), f"not an allowed name ({e.message})") from None
            out[k] = self.value.check(v, join(path, k))
        return out


class Free(Node):
    """Any JSON value, bounded in depth and size (records such as provenance, kept as they are)."""

    def __init__(self, kind: type | None = dict):
        self.kind = kind

    def check(self, value, path=""):
        if self.kind is not None and not isinstance(value, self.kind):
            raise Invalid(path, f"expected {_kind(self.kind())}, got {_kind(value)}")
        stack, count = [(value, 0)], 0
        while stack:  # iterative: a deep document cannot exhaust the interpreter's stack here
            v, depth = stack.pop()
            count += 1
            if depth > FREE_DEPTH:
                raise Invalid(path, f"nested deeper than {FREE_DEPTH} levels")
            if count > FREE_ITEMS:
                raise Invalid(path, f"more than {FREE_ITEMS:,} values")
            if isinstance(v, dict):
                for k in v:
                    _clean(k, path)
                stack.extend((x, depth + 1) for x in v.values())
            elif isinstance(v, list):
                stack.extend((x, depth + 1) for x in v)
            elif isinstance(v, str):
                _clean(v, path)
        return value


# -- a task's generation settings (manifest.json tasks.<task>.generation) ------------------------

_TOKEN = Int(0, (1 << 22) - 1)
_COUNT = Int(0, 1 << 20)
_TOKENS = Either((int, _TOKEN), (list, List(_TOKEN, 1, 64)), what="a token id or a list of token ids")
GENERATION = Obj({}, {
    "decoder_start_token_id": _TOKEN, "bos_token_id": _TOKEN, "pad_token_id": _TOKEN,
    "eos_token_id": _TOKENS, "forced_eos_token_id": _TOKENS, "forced_bos_token_id": _TOKEN,
    "max_length": Int(1, 1 << 20), "max_new_tokens": Int(1, 1 << 20), "min_length": _COUNT, "min_new_tokens": _COUNT,
    "num_beams": Int(1, 1024), "length_penalty": Num(-10, 10),
    "early_stopping": Either((bool, Bool()), (str, Str(choices=("never",))), what="true, false or \"never\""),
    "repetition_penalty": Num(0, 1.0e4, positive=True), "no_repeat_ngram_size": _COUNT,
    "bad_words_ids": List(List(_TOKEN, 1, 64), 1, 4096),
    "exponential_decay_length_penalty": List(Num(0, 1 << 20), 2, 2),
    "suppress_tokens": List(_TOKEN, 0, 4096), "begin_suppress_tokens": List(_TOKEN, 0, 4096),
    "remove_invalid_values": Bool(), "renormalize_logits": Bool(),
})


def check_generation(gen: Any, vocab: int, path: str) -> dict:
    """A task's generation settings: the schema above, then every token id within the vocabulary
    and the decay penalty's start an integer and its factor in (0, 100]."""
    gen = GENERATION.check(gen, path)
    for key in ("decoder_start_token_id", "bos_token_id", "pad_token_id", "eos_token_id", "forced_eos_token_id",
                "forced_bos_token_id", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens"):
        if key not in gen:
            continue
        stack = [(gen[key], join(path, key))]
        while stack:
            v, where = stack.pop()
            if isinstance(v, list):
                stack.extend((x, join(where, i)) for i, x in enumerate(v))
            elif v >= vocab:
                raise Invalid(where, f"token id {v} is outside the vocabulary (dims.vocab_size {vocab})")
    decay = gen.get("exponential_decay_length_penalty")
    if decay is not None:
        if type(decay[0]) is not int:
            raise Invalid(join(path, "exponential_decay_length_penalty") + "[0]", f"expected an integer start, got {show(decay[0])}")
        if not 0 < decay[1] <= 100:
            raise Invalid(join(path, "exponential_decay_length_penalty") + "[1]", f"expected a factor in (0, 100], got {show(decay[1])}")
    return gen
