"""Florence-2 answers read as `Florence2Processor.post_process_generation` reads them, torch-free.

Region tasks answer with text and `<loc_N>` tokens: N is one of 1000 bins along the image's width
or height, and a box corner is the centre of its bin, `int((N + 0.5) * size / 1000)`, computed in
float32 as the processor's torch code computes it. The text is rebuilt token by token as the
processor's `decode_with_spans` does (special tokens verbatim, every other token through the
tokenizer's decoder), then parsed with the processor's own patterns:

- `pure_text` (captions, OCR): the text without `<s>` and `</s>`, stripped.
- `description_with_bboxes` (OD, dense region captions): `label<loc_x1><loc_y1><loc_x2><loc_y2>...`;
  a label with several boxes gives one region per box; a run of fewer than four location tokens,
  or a label without one, gives nothing; labels lose `<ground>`/`<obj>` once, and non-ASCII.
- `ocr` (OCR with regions): `text` followed by eight location tokens, a quadrilateral's four
  points; regions under `area_threshold` of the image (the processor's shoelace sum) are dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from vlmedge.errors import InputError

BINS = (1000, 1000)  # the processor's quantize_bins (width, height)
PURE_TEXT, BOXES, OCR = "pure_text", "description_with_bboxes", "ocr"
KINDS = (PURE_TEXT, BOXES, OCR)

_PHRASE = re.compile(r"([^<]+(?:<loc_\d+>){4,})")
_LABEL = re.compile(r"^\s*(.*?)(?=<od>|</od>|<box>|</box>|<bbox>|</bbox>|<loc_)")
_BOX = re.compile(r"<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>")
_QUAD = re.compile(r"(.+?)" + r"<loc_(\d+)>" * 8)


@dataclass(frozen=True)
class TaskResult:
    """One image's answer to a task: its text and, for region tasks, labelled boxes."""

    task: str
    text: str  # the answer text (region tasks: with their location tokens, as generated)
    labels: tuple[str, ...] = ()  # one per box
    boxes: tuple[tuple[int, ...], ...] = ()  # pixels of the original image: (x1, y1, x2, y2), or 8 values (OCR quads)
    ids: tuple[int, ...] = ()  # generated ids, EOS included where it was produced

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "text": self.text, "labels": list(self.labels), "boxes": [list(b) for b in self.boxes]}


def dequantize(bins: Sequence[Sequence[int]], image_size: tuple[int, int]) -> list[list[int]]:
    """Bins (rows of 4 for boxes, of 2 for points) -> bin centres in pixels, as ints."""
    width, height = image_size
    try:
        b = np.asarray(bins, dtype=np.int64).astype(np.float32)
    except OverflowError:
        raise InputError("a location token's number is too large to be a bin") from None
    per_bin = np.asarray([width / BINS[0], height / BINS[1]], dtype=np.float32)
    scale = np.tile(per_bin, b.shape[-1] // 2)
    return ((b + np.float32(0.5)) * scale).astype(np.int32).tolist()  # float32 as torch; int() truncates


def tokens_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """The text of generated ids as the processor's decode_with_spans builds it. (The processor drops a
    leading BOS first; its `<s>` is removed from the text by every parser anyway.)"""
    special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    decoder = tokenizer.decoder
    parts = []
    for i in ids:
        token = tokenizer.id_to_token(int(i))
        if token is None:
            raise InputError(f"token id {i} is outside the tokenizer's vocabulary")
        parts.append(token if i in special or decoder is None else decoder.decode([token]))
    return "".join(parts)


def _boxes(text: str, image_size: tuple[int, int]) -> tuple[list[str], list[list[int]]]:
    labels, boxes = [], []
    for phrase in _PHRASE.findall(text):
        phrase = phrase.replace("<ground>", "", 1).replace("<obj>", "", 1)
        match = _LABEL.search(phrase)
        found = [[int(m.group(j)) for j in range(1, 5)] for m in _BOX.finditer(phrase)]
        if not phrase or not match or not found:
            continue
        label = match.group().strip().encode("ascii", "ignore").decode("ascii")
        for box in dequantize(found, image_size):
            labels.append(label)
            boxes.append(box)
    return labels, boxes


def _quads(text: str, image_size: tuple[int, int], area_threshold: float) -> tuple[list[str], list[list[int]]]:
    width, height = image_size
    labels, quads = [], []
    for content, *corners in _QUAD.findall(text):
        quad = [v for point in dequantize(np.asarray([int(c) for c in corners]).reshape(-1, 2), image_size) for v in point]
        if area_threshold > 0:
            xs, ys = quad[0::2], quad[1::2]
            area = 0.5 * abs(sum(xs[i] * ys[i + 1] - xs[i + 1] * ys[i] for i in range(3)))  # the processor's sum
            if area < width * height * area_threshold:
                continue
        labels.append(content.strip())
        quads.append(quad)
    return labels, quads


def parse(task: str, kind: str, text: str, image_size: tuple[int, int], ids: Sequence[int] = (),
          area_threshold: float = 0.0) -> TaskResult:
    """A task's decoded text (from `tokens_text`) -> its result; `image_size` is (width, height)."""
    if kind == PURE_TEXT:
        return TaskResult(task, text.replace("<s>", "").replace("</s>", "").strip(), ids=tuple(ids))
    if kind not in KINDS:
        raise InputError(f"{task}: post-processing {kind!r} is not one of {', '.join(KINDS)}")
    clean = text.replace("<s>", "").replace("</s>", "").replace("<pad>", "")
    labels, boxes = _boxes(clean, image_size) if kind == BOXES else _quads(clean, image_size, area_threshold)
    return TaskResult(task, clean.strip(), tuple(labels), tuple(tuple(b) for b in boxes), tuple(ids))
