"""Joint captioning + VQA training of the reference model on freshly generated scenes.

Every step draws new training scenes (the world is unlimited), so there is no epoch and no
over-fitting to a fixed set. The step fixes the data: scene indices and question choices are
functions of (seed, step), which makes a resumed run see exactly what an uninterrupted one would.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vlmedge.data.scenes import scenes
from vlmedge.data.tokenizer import build_tokenizer
from vlmedge.models.shapes_vlm import ShapesVLM, ShapesVLMConfig
from vlmedge.training.batches import Batch, make_batch


@dataclass(frozen=True)
class TrainOptions:
    steps: int = 8400  # about 47 minutes on 2 CPU cores
    batch_size: int = 32  # scenes per step; each gives one caption and `questions_per_scene` questions
    questions_per_scene: int = 8
    lr: float = 1e-3
    warmup: int = 300
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # Question mix by phase (fraction of the steps where the phase starts). Captions train
    # throughout and alone at first, so that the image encoder knows objects before questions
    # ask for them; the last part leans on relational questions, the hardest type.
    curriculum: tuple[tuple[float, tuple[tuple[str, float], ...]], ...] = (
        (0.0, ()),
        (0.05, (("attribute", 1.0), ("count", 1.0), ("existence", 1.0), ("position", 1.0), ("relational", 2.0))),
        (0.7, (("attribute", 1.0), ("count", 1.0), ("existence", 0.7), ("position", 0.5), ("relational", 4.0))),
    )
    grounding_weight: float = 0.5
    checkpoint_every: int = 250
    seed: int = 0
    threads: int = 2


def mix_at(step: int, o: TrainOptions) -> dict[str, float]:
    frac = step / o.steps
    return dict([mix for start, mix in o.curriculum if start <= frac][-1])


def lr_at(step: int, o: TrainOptions) -> float:
    if step < o.warmup:
        return o.lr * (step + 1) / o.warmup
    t = (step - o.warmup) / max(1, o.steps - o.warmup)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _grounding(probs: torch.Tensor, word: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """-log of the attention mass (every head, at token `word`) on `patches`, for rows with word >= 0."""
    rows = torch.nonzero(word >= 0).flatten()
    if len(rows) == 0:
        return torch.zeros(())
    attn = probs[rows, :, word[rows]]  # (k, nh, N)
    mass = (attn * patches[rows][:, None, :]).sum(-1)
    return -(mass + 1e-6).log().mean()


def step_loss(model: ShapesVLM, b: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Caption loss, answer loss, and the grounding loss of the question encoder's lookups.

    Grounding: the first cross-attention layer, read at the word that names the question's object
    ("red" in "what shape is the red object ?"), is asked to put its attention on that object's
    patches; for relational questions the second layer, read at the relation word ("closest"),
    on the object the answer describes. These lookups are what the questions rely on; supervised
    directly they are learned in a few hundred steps, where through the answer alone they sit on
    a long plateau.
    """
    image_states = model.encode_image(b.pixel_values)
    image_mask = torch.ones(image_states.shape[:2], dtype=torch.long)
    caption_loss = model.loss(image_states, image_mask, b.caption_ids)
    zero = torch.zeros(())
    if b.question_ids.numel() == 0:  # a captions-only phase
        return caption_loss, zero, zero
    q_states, attention = model.question.forward_with_attention(b.question_ids, b.question_mask, image_states[b.question_image])
    answer_loss = model.loss(q_states, b.question_mask, b.answer_ids)
    grounding = _grounding(attention[0], b.ref_word, b.ref_patches)
    if len(attention) > 1:
        grounding = grounding + _grounding(attention[1], b.relation_word, b.target_patches)
    return caption_loss, answer_loss, grounding


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(out_dir: Path, options: TrainOptions = TrainOptions(), config: ShapesVLMConfig | None = None, progress=None) -> ShapesVLM:
    """Train (or resume) into out_dir; writes checkpoint.pt as it goes and the model files at the end."""
    from vlmedge.models.checkpoint import save_pretrained

    torch.set_num_threads(options.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    cfg = config or ShapesVLMConfig(vocab_size=tokenizer.get_vocab_size())
    torch.manual_seed(options.seed)
    model = ShapesVLM(cfg)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and not n.endswith(".pos")]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or n.endswith(".pos")]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": options.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=options.lr, betas=(0.9, 0.98),
    )
    ckpt_path = out_dir / "checkpoint.pt"
    start = 0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        if state["config"] != cfg.to_dict():
            raise ValueError(f"{ckpt_path}: checkpoint was trained with another model config; use a new --out")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
    log = open(out_dir / "train_log.tsv", "a")
    model.train()
    task = progress.add_task("training", total=options.steps, completed=start) if progress else None
    t0, ema = time.time(), None
    for step in range(start, options.steps):
        mix = mix_at(step, options)
        rng = np.random.default_rng([options.seed, step])
        batch_scenes = list(scenes("train", step * options.batch_size, options.batch_size))
        b = make_batch(batch_scenes, tokenizer, cfg, rng, mix, options.questions_per_scene if mix else 0)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, options)
        cap_loss, ans_loss, ground_loss = step_loss(model, b)
        loss = cap_loss + ans_loss + options.grounding_weight * ground_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 25 == 0:
            log.write(f"{step}\t{time.time() - t0:.1f}\t{cap_loss.item():.4f}\t{ans_loss.item():.4f}\t{ground_loss.item():.4f}\n")
            log.flush()
        if progress:
            progress.update(task, advance=1, description=f"training loss {ema:.3f}")
        if (step + 1) % options.checkpoint_every == 0 or step + 1 == options.steps:
            _save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step + 1, "config": cfg.to_dict()}, ckpt_path)
    model.eval()
    save_pretrained(model, tokenizer, out_dir / "model")
    return model
