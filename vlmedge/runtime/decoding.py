"""The decoding loop over a bundle's graphs, written once for every family and backend."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from vlmedge.runtime.backends import Backend


def kv_names(prefix: str, layers: int) -> list[str]:
    """present.{i}.self.key / value ..., past.{i}.self.key / value ..., cross.{i}.key / value ..."""
    if prefix == "cross":
        return [f"cross.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    return [f"{prefix}.{i}.self.{k}" for i in range(layers) for k in ("key", "value")]


def encode(backend: Backend, pixel_values: np.ndarray, question_ids: np.ndarray | None = None,
           question_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The states the decoder cross-attends to, and their mask."""
    image_states = backend.run("vision_encoder", {"pixel_values": pixel_values})["image_states"]
    if question_ids is None:
        return image_states, np.ones(image_states.shape[:2], dtype=np.int64)
    states = backend.run("text_encoder", {"question_ids": question_ids, "question_mask": question_mask,
                                          "image_states": image_states})["encoder_states"]
    return states, question_mask


def greedy(backend: Backend, layers: int, encoder_states: np.ndarray, encoder_mask: np.ndarray,
           prompt_ids: Sequence[int], eos_id: int, max_new_tokens: int) -> list[list[int]]:
    """Greedy decoding; per row the generated ids up to and including EOS."""
    B = encoder_states.shape[0]
    input_ids = np.tile(np.asarray(prompt_ids, dtype=np.int64), (B, 1))
    out = backend.run("decoder_init", {"input_ids": input_ids, "encoder_states": encoder_states, "encoder_mask": encoder_mask})
    past = [out[n] for n in kv_names("present", layers)]
    cross = {n: out[n] for n in kv_names("cross", layers)}
    past_names = kv_names("past", layers)
    present_names = kv_names("present", layers)
    logits = out["logits"]
    rows: list[list[int]] = [[] for _ in range(B)]
    done = np.zeros(B, dtype=bool)
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1)
        for b in np.flatnonzero(~done):
            rows[b].append(int(nxt[b]))
        done |= nxt == eos_id
        if done.all() or step == max_new_tokens - 1:
            break
        feeds = {"input_ids": nxt[:, None].astype(np.int64), "encoder_mask": encoder_mask, **cross}
        feeds.update(zip(past_names, past))
        out = backend.run("decoder_step", feeds)
        logits = out["logits"]
        past = [out[n] for n in present_names]
    return rows
