"""A small built-in dual encoder of the scene world: Hugging Face `CLIPModel`, trained contrastively.

A CLIP ViT (64x64 image, 8x8 patches + a class token, 4 layers, width 128) and a CLIP text transformer
(3 layers, width 128, causal, pooled at the end-of-text token) projected to 128 dimensions. Saved exactly
as transformers 5 saves a CLIPModel and its CLIPProcessor (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, processor_config.json with the image processor nested), so `vlmedge export` reads it
as it reads openai/clip-vit-base-patch32.

The tokenizer is CLIP's own (byte-level BPE with `</w>` word ends, lower-cased), its merges learned from
the scene world's words so that every one of them is a single token: word-level on this world, and any
other text still tokenises (into pieces) instead of turning into unknown tokens.

The vision tower starts from the trained ViT of `shapes-vlm` where the layouts map (patch projection,
position table, the four pre-LN layers, final LayerNorm); CLIP's layout adds what shapes-vlm has not: a
class token (new; CLIP pools it), a LayerNorm before the first layer (set to the scale of shapes-vlm's
embeddings, which the layers' own LayerNorms then read almost unchanged) and no patch bias (folded into the
position table). So it is an initialisation, not a reproduction: `init_vision_from_shapes_vlm` reports how
close the patch tokens' outputs come to shapes-vlm's.

Texts per scene: its caption, and a prompt in the export's default template naming one of its objects
partially ("a photo of a red object.", "a photo of a circle.", "a photo of a red circle.", "a photo of a
small red circle."), each with a hard negative (as NegCLIP's): the caption with one object's shape or size
changed or two objects' colours swapped, the prompt with one named attribute changed. Without them the
colours alone tell scenes apart and shape is barely learned (single-object shape 56% at step 500 on the
validation split, against 72% with them at step 500 and 97% at the end). A prompt is true of every scene in
the batch holding such an object, so the loss is CLIP's symmetric cross-entropy with several positives: each
text puts its probability mass on the images it is true of, each image on the texts true of it. One scene in
eight has a single object.

    python -m vlmedge.training.clip --out runs/shapes-clip [--steps N]

writes a resumable checkpoint every `checkpoint_every` steps (rerun to resume: the data of a step is a
function of (seed, step)), the model directory to OUT/model, and evaluates it on the test split
(vlmedge.evaluation.encoder_eval). Copy OUT/model to vlmedge/models/weights/shapes-clip/ to ship it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vlmedge.data.scenes import COLORS, SHAPES, Scene, caption_for, make_scene, scene_seed, vocabulary

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TEMPLATE = "a photo of a {}."
SHAPES_VLM_DIR = Path(__file__).resolve().parent.parent / "models" / "weights" / "shapes-vlm"
MEAN = STD = (0.5, 0.5, 0.5)  # shapes-vlm's normalisation, which the copied ViT expects


@dataclass(frozen=True)
class ModelOptions:
    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 128  # = shapes-vlm's ViT, whose weights initialise the tower
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 512
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4
    text_intermediate: int = 512
    text_positions: int = 32  # the longest caption (5 objects) is 27 tokens with BOS and EOS
    projection_dim: int = 128
    init_vision: bool = True


@dataclass(frozen=True)
class TrainOptions:
    steps: int = 1600  # 21 minutes measured on one thread of the 2-core VM, shared with other jobs
    batch_size: int = 64  # scenes per step; each gives its caption, a wrong caption, a prompt and a wrong prompt
    single_object_every: int = 8  # every 8th scene of a batch holds one object
    lr: float = 1e-3
    vision_lr_scale: float = 0.5  # the tower starts trained
    warmup: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    checkpoint_every: int = 100
    log_every: int = 50
    eval_every: int = 500  # quick val-split evaluation every N steps (0: none)
    seed: int = 0
    threads: int = 1


# ---------------------------------------------------------------------------------------------------
# tokenizer, processor, model


def scene_words() -> list[str]:
    """Every word a caption or a prompt of this world holds."""
    return sorted(set(vocabulary()) | set(TEMPLATE.replace("{}", "object").replace(".", " .").split()))


def _merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """BPE merges learned on `words` (each counted once) until every word is one symbol: the most frequent
    adjacent pair first, ties broken by the pair itself, so the same words always give the same merges."""
    from collections import Counter

    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    merges = []
    while True:
        pairs = Counter(p for s in seqs for p in zip(s, s[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for s in seqs:
            i = 0
            while i < len(s) - 1:
                if (s[i], s[i + 1]) == best:
                    s[i: i + 2] = [s[i] + s[i + 1]]
                i += 1


def build_tokenizer(max_length: int):
    """CLIP's tokenizer (byte-level BPE, `</w>` word ends, lower case) whose merges make every scene word one
    token; deterministic, so a resumed run rebuilds the same ids."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    words = scene_words()
    assert all(w.isascii() and w.isprintable() for w in words), "byte-level symbols are the characters themselves"
    merges = _merges(words)
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for ch in alphabet:  # every byte also as a word end, as CLIP's vocabulary has it
        vocab[ch + "</w>"] = len(vocab)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    split = [w for w in words if len(tok(w, add_special_tokens=False).input_ids) != 1]
    assert not split, f"scene words split into pieces: {split}"
    return tok


def build_image_processor(mo: ModelOptions):
    """CLIP's image processor at the tower's size (64x64 scenes pass through unchanged) with shapes-vlm's mean/std."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": mo.image_size}, crop_size={"height": mo.image_size, "width": mo.image_size},
                                 image_mean=list(MEAN), image_std=list(STD))


def build_model(tok, mo: ModelOptions, seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    V = len(tok)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=V, hidden_size=mo.text_hidden, intermediate_size=mo.text_intermediate,
                         num_hidden_layers=mo.text_layers, num_attention_heads=mo.text_heads,
                         max_position_embeddings=mo.text_positions, hidden_act="gelu", layer_norm_eps=1e-5,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=mo.vision_hidden, intermediate_size=mo.vision_intermediate,
                           num_hidden_layers=mo.vision_layers, num_attention_heads=mo.vision_heads,
                           image_size=mo.image_size, patch_size=mo.patch_size, hidden_act="gelu", layer_norm_eps=1e-5),
        projection_dim=mo.projection_dim)
    assert cfg.text_config.eos_token_id != 2, "2 selects CLIP's legacy pooling (at the highest id)"
    torch.manual_seed(seed)
    model = CLIPModel(cfg)
    if mo.init_vision:
        cos = init_vision_from_shapes_vlm(model)
        print(f"vision tower initialised from shapes-vlm (patch outputs' cosine to shapes-vlm's: mean {cos[0]:.4f}, "
              f"min {cos[1]:.4f})", flush=True)
    return model


def init_vision_from_shapes_vlm(model, src: Path = SHAPES_VLM_DIR) -> tuple[float, float]:
    """Copy shapes-vlm's trained ViT into CLIP's tower (module docstring); returns the mean and least cosine
    between the two towers' patch outputs (after their final LayerNorms) on validation scenes."""
    from safetensors.torch import load_file

    from vlmedge.models.checkpoint import load_pretrained

    sd = load_file(str(src / "model.safetensors"))
    vm = model.vision_model
    state = {"embeddings.patch_embedding.weight": sd["vision.patch.weight"],
             "post_layernorm.weight": sd["vision.ln_f.weight"], "post_layernorm.bias": sd["vision.ln_f.bias"]}
    for i in range(len(vm.encoder.layers)):
        for a, b in (("ln1", "layer_norm1"), ("ln2", "layer_norm2"), ("attn.query", "self_attn.q_proj"),
                     ("attn.key", "self_attn.k_proj"), ("attn.value", "self_attn.v_proj"), ("attn.out", "self_attn.out_proj"),
                     ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            for p in ("weight", "bias"):
                state[f"encoder.layers.{i}.{b}.{p}"] = sd[f"vision.layers.{i}.{a}.{p}"]
    pos = sd["vision.pos"][0] + sd["vision.patch.bias"]  # (N, D): CLIP's patch projection has no bias
    ref, _ = load_pretrained(src)
    px = pixel_values([s.image for s in _val_scenes(8)])
    with torch.no_grad():
        x = ref.vision.patch(px).flatten(2).transpose(1, 2) + ref.vision.pos  # (B, N, D) shapes-vlm's embeddings
        scale = float(x.std(-1).mean())
        state["embeddings.position_embedding.weight"] = torch.cat([pos.new_zeros(1, pos.shape[1]), pos])
        state["embeddings.class_embedding"] = torch.randn(pos.shape[1]) * scale
        state["pre_layrnorm.weight"] = torch.full((pos.shape[1],), scale)
        state["pre_layrnorm.bias"] = torch.zeros(pos.shape[1])
        vm.load_state_dict(state, strict=True)
        want = ref.encode_image(px)  # (B, N, D)
        got = vm.post_layernorm(vm(pixel_values=px).last_hidden_state[:, 1:])
        cos = F.cosine_similarity(want, got, dim=-1)
    if float(cos.mean()) < 0.9:
        raise RuntimeError(f"the CLIP tower is far from shapes-vlm's ViT after the copy (mean cosine {float(cos.mean()):.3f})")
    return float(cos.mean()), float(cos.min())


def _val_scenes(n: int) -> list[Scene]:
    return [make_scene(scene_seed("val", i)) for i in range(n)]


def pixel_values(images: Sequence[np.ndarray]) -> torch.Tensor:
    """64x64 uint8 scenes -> (B, 3, 64, 64) as the saved CLIP image processor makes them (rescale, mean/std)."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    return (x - mean) / std


def save_model_dir(model, tok, mo: ModelOptions, out: Path) -> Path:
    """The save_pretrained layout of a transformers 5 CLIPModel and its CLIPProcessor."""
    from transformers import CLIPProcessor

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    CLIPProcessor(image_processor=build_image_processor(mo), tokenizer=tok).save_pretrained(out)
    return out


def load_model_dir(path: Path):
    from transformers import AutoTokenizer, CLIPModel

    from vlmedge.models.hf import load_hf_model

    return load_hf_model(CLIPModel, str(path)), AutoTokenizer.from_pretrained(str(path), local_files_only=True)


# ---------------------------------------------------------------------------------------------------
# batches


def describe(o, kind: str) -> str:
    """A prompt naming some of an object's attributes."""
    label = {"color": f"{o.color} object", "shape": o.shape, "color_shape": f"{o.color} {o.shape}",
             "full": f"{o.size} {o.color} {o.shape}"}[kind]
    return TEMPLATE.replace("{}", label)


PROMPT_KINDS = ("color", "shape", "color_shape", "full")


def _true_of(kind: str, o, scene: Scene) -> bool:
    return any(all(getattr(p, k) == getattr(o, k) for k in KIND_ATTRS[kind]) for p in scene.objects)


def batch_scenes(step: int, o: TrainOptions) -> list[Scene]:
    """The scenes of a step: the train split's scenes step*B ... (step+1)*B-1, every `single_object_every`-th
    made from its seed with one object."""
    out = []
    for i in range(step * o.batch_size, (step + 1) * o.batch_size):
        one = o.single_object_every and i % o.single_object_every == 0
        out.append(make_scene(scene_seed("train", i), n_objects=1 if one else None))
    return out


def _changed(o, attrs: Sequence[str], scene: Scene, rng: np.random.Generator):
    """The object with one of `attrs` changed (a colour to one absent from the scene, when there is one)."""
    attr = attrs[rng.integers(len(attrs))]
    if attr == "size":
        return replace(o, size="large" if o.size == "small" else "small")
    if attr == "shape":
        return replace(o, shape=[x for x in SHAPES if x != o.shape][rng.integers(len(SHAPES) - 1)])
    absent = [c for c in COLORS if all(p.color != c for p in scene.objects)]
    return replace(o, color=absent[rng.integers(len(absent))])


def _negative_caption(s: Scene, rng: np.random.Generator) -> str:
    """The scene's caption with one thing wrong (a hard negative, as NegCLIP's): an object's shape (half the time)
    or size changed, or two objects' colours swapped (a scene of one object: its colour changed)."""
    objs = list(s.objects)
    i = int(rng.integers(len(objs)))
    r = rng.random()
    if r < 0.75:
        objs[i] = _changed(objs[i], ("shape",) if r < 0.5 else ("size",), s, rng)
    elif len(objs) > 1:
        j = [k for k in range(len(objs)) if k != i][rng.integers(len(objs) - 1)]
        objs[i], objs[j] = replace(objs[i], color=objs[j].color), replace(objs[j], color=objs[i].color)
    else:
        objs[i] = _changed(objs[i], ("color",), s, rng)
    return caption_for(tuple(objs))


KIND_ATTRS = {"color": ("color",), "shape": ("shape",), "color_shape": ("color", "shape"), "full": ("size", "color", "shape")}


def make_texts(scs: Sequence[Scene], rng: np.random.Generator) -> tuple[list[str], list[str], torch.Tensor]:
    """(captions, prompts, truth). Captions: each scene's, then each scene's with one thing wrong. Prompts: one naming
    an object of each scene, then the same with one named attribute changed. truth (T, B), T = the captions then
    the prompts, marks the scenes a text is true of (a changed text can still be true of another scene)."""
    captions = [s.caption for s in scs]
    negatives = [_negative_caption(s, rng) for s in scs]
    prompts, wrong, truth, wrong_truth = [], [], [], []
    for s in scs:
        obj = s.objects[rng.integers(len(s.objects))]
        kind = PROMPT_KINDS[rng.integers(len(PROMPT_KINDS))]
        other = _changed(obj, KIND_ATTRS[kind], s, rng)
        prompts.append(describe(obj, kind))
        wrong.append(describe(other, kind))
        truth.append([_true_of(kind, obj, t) for t in scs])
        wrong_truth.append([_true_of(kind, other, t) for t in scs])
    cap_truth = [[c == d for d in captions] for c in captions + negatives]
    return captions + negatives, prompts + wrong, torch.tensor(cap_truth + truth + wrong_truth)


def contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, scale: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy with several positives: -log of the softmax mass on the true pairs, texts
    over images and images over texts, averaged."""
    logits = scale * text_embeds @ image_embeds.T  # (T, B)
    neg = torch.finfo(logits.dtype).min
    has = truth.any(1)  # a text true of no image (most hard negatives) is a query of nothing, only a wrong answer
    t2i = torch.logsumexp(logits[has].masked_fill(~truth[has], neg), 1) - torch.logsumexp(logits[has], 1)
    i2t = torch.logsumexp(logits.masked_fill(~truth, neg), 0) - torch.logsumexp(logits, 0)
    return -(t2i.mean() + i2t.mean()) / 2


# ---------------------------------------------------------------------------------------------------
# training


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _optimizer(model, o: TrainOptions):
    """AdamW; no decay on norms, biases, embedding tables and the logit scale; the vision tower at vision_lr_scale."""
    groups: dict[tuple[bool, bool], list] = {}
    for n, p in model.named_parameters():
        vision = n.startswith("vision_model.")
        decay = p.ndim >= 2 and "embedding" not in n
        groups.setdefault((vision, decay), []).append(p)
    return torch.optim.AdamW(
        [{"params": ps, "weight_decay": o.weight_decay if decay else 0.0, "lr_scale": o.vision_lr_scale if vision else 1.0}
         for (vision, decay), ps in sorted(groups.items())], lr=o.lr, betas=(0.9, 0.98))


def _lr_at(step: int, o: TrainOptions) -> float:
    from vlmedge.training.train import lr_at  # linear warm-up, cosine decay: the same schedule as shapes-vlm's

    return lr_at(step, o)


class TorchEmbedder:
    """images / texts -> L2-normalised embeddings from the PyTorch model, as the bundle's two graphs give them."""

    def __init__(self, model, tok, batch_size: int = 128):
        self.model, self.tok, self.batch_size = model, tok, batch_size

    @torch.no_grad()
    def images(self, images: list) -> np.ndarray:
        out = [self.model.get_image_features(pixel_values=pixel_values(images[s: s + self.batch_size])).pooler_output
               for s in range(0, len(images), self.batch_size)]
        return F.normalize(torch.cat(out), dim=-1).numpy()

    @torch.no_grad()
    def texts(self, texts: list) -> np.ndarray:
        out = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tok(texts[s: s + self.batch_size], padding=True, truncation=True, return_tensors="pt")
            out.append(self.model.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask).pooler_output)
        return F.normalize(torch.cat(out), dim=-1).numpy()


def evaluate(model, tok, split: str = "test", n_single: int = 400, n_scenes: int = 1000, recall_n=(100, 1000)) -> dict:
    from vlmedge.evaluation.encoder_eval import encoder_evaluation_set, evaluate_encoder

    e = TorchEmbedder(model, tok)
    return evaluate_encoder(e.images, e.texts, encoder_evaluation_set(split, n_single, n_scenes), TEMPLATE, recall_n)


def train(out_dir: Path, o: TrainOptions = TrainOptions(), mo: ModelOptions = ModelOptions()):
    from vlmedge.evaluation.encoder_eval import summary

    torch.set_num_threads(o.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(mo.text_positions)
    model = build_model(tok, mo, o.seed)
    opt = _optimizer(model, o)
    ckpt_path = out_dir / "checkpoint.pt"
    config = {"model": asdict(mo), "train": {k: v for k, v in asdict(o).items() if k not in ("checkpoint_every", "log_every", "eval_every", "threads")}}
    start, elapsed_before = 0, 0.0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        if json.loads(json.dumps(state["config"])) != json.loads(json.dumps(config)):
            raise ValueError(f"{ckpt_path}: checkpoint was trained with other options; use a new --out")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, elapsed_before = state["step"], state.get("elapsed", 0.0)
        print(f"resumed at step {start} ({elapsed_before:.0f} s of training before)", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters ({n_params * 4 / 1e6:.1f} MB float32), vocabulary {len(tok)}; "
          f"steps {o.steps}, batch {o.batch_size} scenes x (caption, wrong caption, prompt, wrong prompt); {o.threads} thread(s)", flush=True)
    ids_cache: dict[str, list[int]] = {}
    model.train()
    t0 = time.time()
    loss_sum, n_sum = 0.0, 0
    for step in range(start, o.steps):
        rng = np.random.default_rng([o.seed, step])
        scs = batch_scenes(step, o)
        captions, prompts, truth = make_texts(scs, rng)
        lr = _lr_at(step, o)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        img = model.get_image_features(pixel_values=pixel_values([s.image for s in scs])).pooler_output
        txt = []
        for texts in (captions, prompts):  # each padded to its own longest: prompts are a third of a caption
            for t in texts:
                if t not in ids_cache:
                    ids_cache[t] = tok(t, truncation=True).input_ids
            enc = tok.pad({"input_ids": [ids_cache[t] for t in texts]}, return_tensors="pt")
            txt.append(model.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask).pooler_output)
        txt = torch.cat(txt)
        scale = model.logit_scale.clamp(max=math.log(100.0)).exp()  # CLIP's clip of the temperature at 100
        loss = contrastive_loss(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), scale, truth)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(max=math.log(100.0))
        loss_sum += float(loss.detach())
        n_sum += 1
        done = step + 1
        if done % o.log_every == 0 or done == o.steps or step == start:
            el = elapsed_before + time.time() - t0
            print(f"step {done:5d}/{o.steps}  lr {lr:.2e}  loss {loss_sum / n_sum:.4f}  scale {float(scale.detach()):.1f}  "
                  f"elapsed {el:7.1f}s  ({(time.time() - t0) / (done - start):.2f} s/step)", flush=True)
            loss_sum, n_sum = 0.0, 0
        if done % o.checkpoint_every == 0 or done == o.steps:
            _save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": done, "config": config,
                          "elapsed": elapsed_before + time.time() - t0}, ckpt_path)
        if o.eval_every and done % o.eval_every == 0 and done != o.steps:
            model.eval()
            print("  " + summary(evaluate(model, tok, "val", 200, 200, (100,))), flush=True)
            model.train()
    model.eval()
    total = elapsed_before + time.time() - t0
    print(f"training done: {o.steps} steps, {total:.0f} s ({total / 60:.1f} min)", flush=True)
    save_model_dir(model, tok, mo, out_dir / "model")
    return model, tok


def main(argv: Sequence[str] | None = None) -> None:
    from vlmedge.evaluation.encoder_eval import summary

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="run directory: checkpoint.pt, model/, eval.json")
    ap.add_argument("--steps", type=int, default=TrainOptions.steps)
    ap.add_argument("--batch-size", type=int, default=TrainOptions.batch_size)
    ap.add_argument("--lr", type=float, default=TrainOptions.lr)
    ap.add_argument("--threads", type=int, default=TrainOptions.threads)
    ap.add_argument("--no-init-vision", action="store_true", help="train the vision tower from scratch")
    ap.add_argument("--eval-every", type=int, default=TrainOptions.eval_every, help="quick val-split evaluation every N steps")
    ap.add_argument("--log-every", type=int, default=TrainOptions.log_every)
    ap.add_argument("--eval-only", action="store_true", help="evaluate OUT/model without training")
    a = ap.parse_args(argv)
    o = replace(TrainOptions(), steps=a.steps, batch_size=a.batch_size, lr=a.lr, threads=a.threads,
                eval_every=a.eval_every, log_every=a.log_every)
    mo = replace(ModelOptions(), init_vision=not a.no_init_vision)
    if a.eval_only:
        torch.set_num_threads(o.threads)
        model, tok = load_model_dir(a.out / "model")
    else:
        model, tok = train(a.out, o, mo)
    t0 = time.time()
    r = evaluate(model, tok, "test")
    (a.out / "eval.json").write_text(json.dumps(r, indent=2))
    print(summary(r), flush=True)
    size = sum(f.stat().st_size for f in (a.out / "model").glob("*.safetensors"))
    print(f"evaluation {time.time() - t0:.0f} s; weights {size / 1e6:.2f} MB", flush=True)


if __name__ == "__main__":
    main()
