"""A small built-in decoder-only VLM of the scene world: Hugging Face `SmolVLMForConditionalGeneration`.

SigLIP-style vision tower (64x64 image, 8x8 patches: 64 tokens, 4 layers, width 128) -> pixel shuffle x2
(16 image tokens of 512) -> linear projection -> a small Llama LM (grouped-query attention, tied
embeddings) whose sequence holds the 16 image tokens. Saved exactly as transformers 5 saves a model and
its processor (config.json, model.safetensors, generation_config.json, tokenizer.json,
tokenizer_config.json, processor_config.json with the image processor nested, chat_template.jinja), so
the SmolVLM export path reads it as it reads a published SmolVLM.

The vision tower starts from the trained ViT of the reference model `shapes-vlm` (its layout is the
SigLIP one: patch Conv2d, a position table, pre-LN layers with biased q/k/v/out projections and an
exact-GELU MLP, a final LayerNorm); the copy is checked numerically. The connector and the LM are
trained from scratch, the tower fine-tuned at a lower learning rate.

Training sequences are the runtime's own: the chat template rendered by `ChatPrompt` for one user turn
(the image, then the question, or "Describe the image." for captions), the image's placeholder text
from `process()`, then the answer and `<end_of_utterance>`; the loss is on the answer and the end token.
Every sequence of an image shares the prompt's first tokens (BOS, "User", ":", the image's 19 tokens),
so those run once per image and their K/V cache is expanded to the image's sequences.

Grounding (as the reference model's training): layer 0 at the word that names the question's object(s)
is asked to put its attention on their image tokens (the colour word of existence questions, the shape
or size word of count questions: every object counted); layer 2 at the answer position ("Assistant:"'s
colon) on the object the answer describes (relational: the target; attribute / position / existence:
the named object). Learned through the answers alone these lookups sit on a long plateau.

    python -m vlmedge.training.smolvlm --out runs/shapes-smolvlm [--steps N]

writes a resumable checkpoint every `checkpoint_every` steps (rerun to resume: the data of a step is a
function of (seed, step)), the model directory to OUT/model, and evaluates it on the test split.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vlmedge.data.scenes import PLURAL, QUESTION_TYPES, SIZES, Scene, questions_for, scenes, vocabulary
from vlmedge.models.prefix import CAPTION_INSTRUCTION

SMOLVLM_TEMPLATE = (  # HuggingFaceTB/SmolVLM's chat template (as tests/families.py)
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == 'image' %}"
    "{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
BOS, EOS, UNK = "<|im_start|>", "<end_of_utterance>", "<unk>"
IMAGE_TOKEN = "<image>"
SPECIAL = ["<fake_token_around_image>", IMAGE_TOKEN, "<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
SHAPES_VLM_DIR = Path(__file__).resolve().parent.parent / "models" / "weights" / "shapes-vlm"


@dataclass(frozen=True)
class ModelOptions:
    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 128  # = shapes-vlm's ViT, whose weights initialise the tower
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 512
    scale_factor: int = 2  # pixel shuffle: 8x8 patches -> 4x4 image tokens
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2  # grouped-query attention, as SmolVLM's LM
    text_intermediate: int = 384
    max_positions: int = 256
    init_vision: bool = True

    @property
    def image_seq_len(self) -> int:
        return (self.image_size // self.patch_size) ** 2 // self.scale_factor**2


@dataclass(frozen=True)
class TrainOptions:
    steps: int = 4500  # about 25 minutes on 2 idle CPU cores
    batch_size: int = 16  # scenes per step; each gives its caption and `questions_per_scene` questions
    questions_per_scene: int = 8
    lr: float = 1e-3
    vision_lr_scale: float = 0.3  # the tower starts trained
    warmup: int = 150
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # question-type weights by phase (fraction of the steps where the phase starts): position questions
    # are learned first and need few; counting and existence (binding a colour to a shape) come slowest,
    # relational questions last
    curriculum: tuple = (
        (0.0, (("attribute", 1.0), ("count", 1.5), ("existence", 1.5), ("position", 0.5), ("relational", 1.5))),
        (0.5, (("attribute", 1.0), ("count", 2.0), ("existence", 1.0), ("position", 0.5), ("relational", 2.0))),
    )
    grounding_weight: float = 0.5
    ref_layer: int = 0
    target_layer: int = 2
    checkpoint_every: int = 250
    log_every: int = 100
    eval_every: int = 500  # quick val-split evaluation (100 scenes) every N steps (0: none)
    seed: int = 0
    threads: int = 2


# ---------------------------------------------------------------------------------------------------
# tokenizer, processor, model


def build_tokenizer():
    """Word-level tokenizer over the scene world plus SmolVLM's special tokens and the template's words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in [UNK, BOS, EOS, *SPECIAL, "User", "Assistant", *CAPTION_INSTRUCTION.replace(".", " .").split(), ":", *vocabulary()]:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=UNK, unk_token=UNK,
                                   extra_special_tokens=SPECIAL)


def build_image_processor(mo: ModelOptions):
    """One 64x64 frame per image: no splitting, longest edge and tile both the tower's size."""
    from transformers import SmolVLMImageProcessorPil

    return SmolVLMImageProcessorPil(size={"longest_edge": mo.image_size}, max_image_size={"longest_edge": mo.image_size},
                                    do_image_splitting=False)


def build_model(tok, mo: ModelOptions, seed: int = 0):
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    ids = tok.get_vocab()
    cfg = SmolVLMConfig(
        vision_config=dict(hidden_size=mo.vision_hidden, intermediate_size=mo.vision_intermediate,
                           num_hidden_layers=mo.vision_layers, num_attention_heads=mo.vision_heads,
                           image_size=mo.image_size, patch_size=mo.patch_size, hidden_act="gelu", layer_norm_eps=1e-5),
        text_config=dict(model_type="llama", vocab_size=len(ids), hidden_size=mo.text_hidden,
                         intermediate_size=mo.text_intermediate, num_hidden_layers=mo.text_layers,
                         num_attention_heads=mo.text_heads, num_key_value_heads=mo.text_kv_heads,
                         max_position_embeddings=mo.max_positions, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[UNK]),
        image_token_id=ids[IMAGE_TOKEN], scale_factor=mo.scale_factor, tie_word_embeddings=True, pad_token_id=ids[UNK])
    cfg._attn_implementation = "eager"  # as vlmedge loads it; the grounding loss reads the attention weights
    torch.manual_seed(seed)
    model = SmolVLMForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = [ids[EOS]]
    model.generation_config.pad_token_id = ids[UNK]
    model.generation_config.bos_token_id = ids[BOS]
    if mo.init_vision:
        err = init_vision_from_shapes_vlm(model)
        print(f"vision tower initialised from shapes-vlm (max abs difference of the outputs {err:.2e})", flush=True)
    return model


def init_vision_from_shapes_vlm(model, src: Path = SHAPES_VLM_DIR) -> float:
    """Copy shapes-vlm's trained ViT into the SigLIP-style tower; returns the largest difference between the
    two encoders' outputs on real scenes (the layouts map one to one)."""
    from safetensors.torch import load_file

    from vlmedge.models.checkpoint import load_pretrained
    from vlmedge.runtime.preprocess import normalize

    sd = load_file(str(src / "model.safetensors"))
    vm = model.model.vision_model
    names = {"patch.weight": "embeddings.patch_embedding.weight", "patch.bias": "embeddings.patch_embedding.bias",
             "ln_f.weight": "post_layernorm.weight", "ln_f.bias": "post_layernorm.bias"}
    for i in range(len(vm.encoder.layers)):
        for a, b in (("ln1", "layer_norm1"), ("ln2", "layer_norm2"), ("attn.query", "self_attn.q_proj"),
                     ("attn.key", "self_attn.k_proj"), ("attn.value", "self_attn.v_proj"), ("attn.out", "self_attn.out_proj"),
                     ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            for p in ("weight", "bias"):
                names[f"layers.{i}.{a}.{p}"] = f"encoder.layers.{i}.{b}.{p}"
    state = {dst: sd[f"vision.{s}"] for s, dst in names.items()}
    state["embeddings.position_embedding.weight"] = sd["vision.pos"][0]
    vm.load_state_dict(state, strict=True)
    ref, _ = load_pretrained(src)
    px = torch.from_numpy(normalize(np.stack([s.image for s in scenes("val", 0, 8)]), ref.config.image_mean, ref.config.image_std))
    with torch.no_grad():
        want = ref.encode_image(px)
        got = vm(pixel_values=px, patch_attention_mask=torch.ones(len(px), 8, 8, dtype=torch.bool)).last_hidden_state
    err = float((want - got).abs().max())
    if err > 1e-4:
        raise RuntimeError(f"the SigLIP tower does not reproduce shapes-vlm's ViT (max abs difference {err:.3g})")
    return err


def save_model_dir(model, tok, mo: ModelOptions, out: Path) -> Path:
    """The save_pretrained layout of a transformers 5 SmolVLM: model, generation config, tokenizer, and the
    processor (processor_config.json with the image processor nested, chat_template.jinja)."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    image = build_image_processor(mo).to_dict()
    (out / "processor_config.json").write_text(json.dumps(
        {"processor_class": "SmolVLMProcessor", "image_processor": image, "image_seq_len": mo.image_seq_len}, indent=2))
    (out / "chat_template.jinja").write_text(SMOLVLM_TEMPLATE)
    return out


def preprocessing(model, mo: ModelOptions) -> dict:
    """The runtime's preprocessing settings of this model, made by the export's own adapter code."""
    from vlmedge.models.idefics3 import SmolVLMAdapter

    fake = SimpleNamespace(source="<training>", model=model, architecture=SmolVLMAdapter.architecture)
    prep = SmolVLMAdapter.preprocessing(fake, build_image_processor(mo).to_dict(), {"image_seq_len": mo.image_seq_len})
    return {k: v for k, v in asdict(prep).items() if v is not None}


# ---------------------------------------------------------------------------------------------------
# prompts and batches


class Prompts:
    """Token ids of the runtime's prompts (ChatPrompt over the saved template and tokenizer.json), cached per
    user text: every 64x64 scene has the same placeholder text."""

    def __init__(self, tok, prep: dict):
        from PIL import Image
        from tokenizers import Tokenizer

        from vlmedge.runtime.prefix import ChatPrompt
        from vlmedge.runtime.processors import process

        self.prep = prep
        self.tokenizer = Tokenizer.from_str(tok.backend_tokenizer.to_str())
        named = {k: getattr(tok, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.chat = ChatPrompt({"chat_template": SMOLVLM_TEMPLATE, "image_token": IMAGE_TOKEN, "special_tokens": named},
                               self.tokenizer, threading.Lock())
        self.image = process(Image.new("RGB", (64, 64)), prep)
        assert self.image.frames.shape[0] == 1, "one frame per scene"
        vocab = tok.get_vocab()
        self.eos, self.pad, self.image_id = vocab[EOS], vocab[UNK], vocab[IMAGE_TOKEN]
        self.cache: dict[str, list[int]] = {}
        # the prompt's part before the user text, identical for every sequence of an image
        a, b = self.ids("a"), self.ids("b")
        n = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        self.prefix = a[:n]
        self.image_pos = [i for i, t in enumerate(self.prefix) if t == self.image_id]
        assert len(self.image_pos) == prep["processor"]["image_tokens"]
        assert self.image_pos == list(range(self.image_pos[0], self.image_pos[-1] + 1))

    def ids(self, user_text: str) -> list[int]:
        if user_text not in self.cache:
            from vlmedge.runtime.prefix import user_turn

            self.cache[user_text] = self.chat.ids(self.chat.text([user_turn(user_text)]), [self.image])
        return self.cache[user_text]

    def suffix(self, user_text: str) -> list[int]:
        ids = self.ids(user_text)
        assert ids[: len(self.prefix)] == self.prefix
        return ids[len(self.prefix):]

    def words(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def frames(self, images: Sequence[np.ndarray]) -> np.ndarray:
        from PIL import Image

        from vlmedge.runtime.processors import process

        return np.concatenate([process(Image.fromarray(im), self.prep).frames for im in images])


@dataclass
class Group:
    image: torch.Tensor  # (S,) index of each sequence's image
    ids: torch.Tensor  # (S, T) suffix ids after the shared prefix, right-padded
    labels: torch.Tensor  # (S, T) next-token targets: the answer and EOS, -100 elsewhere
    ref_pos: torch.Tensor  # (S,) suffix index of the word naming the question's object, -1 if none
    ref_tokens: torch.Tensor  # (S, N) 1 on the image tokens the object covers
    final_pos: torch.Tensor  # (S,) suffix index of the answer position, -1 when no grounding target
    target_tokens: torch.Tensor  # (S, N) the image tokens of the object the answer describes


@dataclass
class Batch:
    pixel_values: torch.Tensor  # (B, 3, H, W)
    prefix_ids: torch.Tensor  # (B, P)
    captions: Group
    questions: Group | None


def _object_tokens(obj, mo: ModelOptions) -> np.ndarray:
    """(N,) 1 on the image tokens (after pixel shuffle, raster order) holding the object's patches."""
    grid = mo.image_size // mo.patch_size
    centres = (np.arange(grid) + 0.5) * mo.patch_size
    cy, cx = np.meshgrid(centres, centres, indexing="ij")
    d2 = (cx - obj.x) ** 2 + (cy - obj.y) ** 2
    on = d2 <= (SIZES[obj.size] + 2.0) ** 2
    if not on.any():
        on.reshape(-1)[np.argmin(d2)] = True
    s = mo.scale_factor
    return on.reshape(grid // s, s, grid // s, s).any(axis=(1, 3)).reshape(-1).astype(np.float32)


def grounding_of(q, objects) -> tuple[int, list[int], list[int]]:
    """(index of the word that names the question's objects, those objects, the objects the answer is about).

    The question's own reference where it has one; existence questions whose colour is present with
    another shape ("no") look at that object too, and count questions at every object of the counted
    shape or size (none for a count of 0). The answer is about: the target (relational), the named object
    (attribute, position, existence with the colour present); count questions have no single one."""
    words = q.text.split()
    if q.qtype == "count":
        attr = words[2]  # "how many circles are there ?" / "how many small objects are there ?"
        match = [i for i, o in enumerate(objects) if PLURAL[o.shape] == attr or o.size == attr]
        return (2 if match else -1), match, []
    if q.qtype == "existence":
        match = [i for i, o in enumerate(objects) if o.color == words[3]]  # "is there a red circle ?"
        return (3 if match else -1), match, match
    refs = [q.ref] if q.ref >= 0 else []
    return (q.ref_word if refs else -1), refs, ([q.target] if q.target >= 0 else refs)


def _tokens_of(indices: list[int], objects, mo: ModelOptions) -> np.ndarray | None:
    if not indices:
        return None
    return np.max([_object_tokens(objects[i], mo) for i in indices], axis=0)


def _group(rows: list[tuple], pad: int, n_tokens: int) -> Group:
    """rows: (image, prompt suffix, answer ids incl. EOS, ref_pos, ref_tokens, final_pos, target_tokens)."""
    width = max(len(r[1]) + len(r[2]) - 1 for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (_, prompt, answer, *_) in enumerate(rows):
        seq = prompt + answer[:-1]
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(prompt) - 1 : len(prompt) - 1 + len(answer)] = torch.tensor(answer)
    none = np.zeros(n_tokens, np.float32)
    return Group(
        image=torch.tensor([r[0] for r in rows]), ids=ids, labels=labels,
        ref_pos=torch.tensor([r[3] for r in rows]),
        ref_tokens=torch.from_numpy(np.stack([none if r[4] is None else r[4] for r in rows])),
        final_pos=torch.tensor([r[5] for r in rows]),
        target_tokens=torch.from_numpy(np.stack([none if r[6] is None else r[6] for r in rows])),
    )


def make_batch(batch_scenes: Sequence[Scene], prompts: Prompts, mo: ModelOptions, rng: np.random.Generator,
               type_weights: dict, questions_per_scene: int) -> Batch:
    n_tok = mo.image_seq_len
    caps = []
    cap_prompt = prompts.suffix(CAPTION_INSTRUCTION)
    for i, s in enumerate(batch_scenes):
        caps.append((i, cap_prompt, prompts.words(s.caption) + [prompts.eos], -1, None, -1, None))
    types = list(QUESTION_TYPES)
    p = np.array([type_weights.get(t, 0.0) for t in types], dtype=np.float64)
    qs = []
    for i, s in enumerate(batch_scenes):
        if not questions_per_scene:
            break
        by_type = questions_for(s)
        w = p * np.array([len(by_type[t]) > 0 for t in types])
        if not w.any():
            continue
        for _ in range(questions_per_scene):
            t = types[rng.choice(len(types), p=w / w.sum())]
            q = by_type[t][rng.integers(len(by_type[t]))]
            prompt = prompts.suffix(q.text)
            words = q.text.split()
            assert prompts.words(q.text) == prompt[: len(words)], "the question's words open the suffix"
            ref_word, refs, targets = grounding_of(q, s.objects)
            ref = _tokens_of(refs, s.objects, mo)
            target = _tokens_of(targets, s.objects, mo)
            qs.append((i, prompt, prompts.words(q.answer) + [prompts.eos], ref_word if ref is not None else -1, ref,
                       len(prompt) - 1 if target is not None else -1, target))
    frames = prompts.frames([s.image for s in batch_scenes])
    prefix = torch.tensor(prompts.prefix)[None].repeat(len(batch_scenes), 1)
    return Batch(torch.from_numpy(frames), prefix, _group(caps, prompts.pad, n_tok), _group(qs, prompts.pad, n_tok) if qs else None)


# ---------------------------------------------------------------------------------------------------
# training


class AttentionTap:
    """Keeps the attention probabilities of chosen LM layers (eager attention returns them)."""

    def __init__(self, lm, layers: Sequence[int]):
        self.probs: dict[int, torch.Tensor] = {}
        self.on = False
        self.handles = [lm.layers[i].self_attn.register_forward_hook(self._hook(i)) for i in layers]

    def _hook(self, i):
        def hook(module, args, output):
            if self.on:
                self.probs[i] = output[1]
        return hook


def _grounding(probs: torch.Tensor, pos: torch.Tensor, tokens: torch.Tensor, image_pos: torch.Tensor) -> torch.Tensor | None:
    """-log attention mass (every head, at suffix position `pos`) on the marked image tokens, rows with pos >= 0."""
    rows = torch.nonzero(pos >= 0).flatten()
    if len(rows) == 0:
        return None
    attn = probs[rows, :, pos[rows]][:, :, image_pos]  # (k, H, N)
    mass = (attn * tokens[rows][:, None, :]).sum(-1)
    return -(mass + 1e-6).log().mean()


def step_losses(model, b: Batch, image_pos: torch.Tensor, tap: AttentionTap | None, o: TrainOptions):
    from transformers.cache_utils import DynamicCache

    lm = model.model.text_model
    B = b.pixel_values.shape[0]
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    h = model.model.vision_model(pixel_values=b.pixel_values,
                                 patch_attention_mask=torch.ones(B, grid, grid, dtype=torch.bool)).last_hidden_state
    img = model.model.connector(h)  # (B, N, D)
    emb = lm.embed_tokens(b.prefix_ids)
    P = emb.shape[1]
    a, z = int(image_pos[0]), int(image_pos[-1]) + 1  # the image's tokens are one run in the prefix
    emb = torch.cat([emb[:, :a], img.to(emb.dtype), emb[:, z:]], 1)
    if tap:
        tap.on = False
    out = lm(inputs_embeds=emb, use_cache=True)  # no padding: the causal mask alone
    kv = [(layer.keys, layer.values) for layer in out.cache.layers]
    losses = {}
    ground = []
    for name, g in (("caption", b.captions), ("answer", b.questions)):
        if g is None:
            losses[name] = torch.zeros(())
            continue
        S, T = g.ids.shape
        cache = DynamicCache([(k[g.image], v[g.image]) for k, v in kv])
        if tap:
            tap.on = name == "answer"
            tap.probs.clear()
        # right padding: a real token never sees a later pad, so the causal mask alone serves; positions
        # continue the prefix's (one row, broadcast over the batch)
        o_ = lm(inputs_embeds=lm.embed_tokens(g.ids), position_ids=torch.arange(P, P + T)[None], cache=cache, use_cache=True)
        if tap:
            tap.on = False
        logits = model.lm_head(o_.last_hidden_state)
        losses[name] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), g.labels.reshape(-1), ignore_index=-100)
        if tap and name == "answer":
            for layer, pos, tokens in ((o.ref_layer, g.ref_pos, g.ref_tokens), (o.target_layer, g.final_pos, g.target_tokens)):
                # probs keys: [prefix (P), suffix (T)]; image tokens are prefix positions
                x = _grounding(tap.probs[layer], pos, tokens, image_pos)
                if x is not None:
                    ground.append(x)
    losses["grounding"] = torch.stack(ground).sum() if ground else torch.zeros(())
    return losses


from vlmedge.training.train import lr_at, mix_at  # noqa: E402  the same schedule and question mix as shapes-vlm's


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _optimizer(model, o: TrainOptions):
    """AdamW; no decay on norms, biases and embedding tables; the vision tower at vision_lr_scale."""
    groups: dict[tuple[bool, bool], list] = {}
    for n, p in model.named_parameters():
        vision = n.startswith("model.vision_model.")
        decay = p.ndim >= 2 and "position_embedding" not in n and "embed_tokens" not in n
        groups.setdefault((vision, decay), []).append(p)
    return torch.optim.AdamW(
        [{"params": ps, "weight_decay": o.weight_decay if decay else 0.0, "lr_scale": o.vision_lr_scale if vision else 1.0}
         for (vision, decay), ps in sorted(groups.items())], lr=o.lr, betas=(0.9, 0.98))


def train(out_dir: Path, o: TrainOptions = TrainOptions(), mo: ModelOptions = ModelOptions()):
    torch.set_num_threads(o.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    model = build_model(tok, mo, o.seed)
    prompts = Prompts(tok, preprocessing(model, mo))
    image_pos = torch.tensor(prompts.image_pos)
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
    print(f"model: {n_params / 1e6:.2f} M parameters ({n_params * 4 / 1e6:.1f} MB float32); prefix {len(prompts.prefix)} tokens, "
          f"{len(image_pos)} image tokens; steps {o.steps}, batch {o.batch_size} scenes x (1 caption + {o.questions_per_scene} questions)",
          flush=True)
    tap = AttentionTap(model.model.text_model, sorted({o.ref_layer, o.target_layer})) if o.grounding_weight > 0 else None
    model.train()
    t0 = time.time()
    sums, n_sum = {}, 0
    for step in range(start, o.steps):
        mix = mix_at(step, o)
        rng = np.random.default_rng([o.seed, step])
        batch_scenes = list(scenes("train", step * o.batch_size, o.batch_size))
        b = make_batch(batch_scenes, prompts, mo, rng, mix, o.questions_per_scene if mix else 0)
        lr = lr_at(step, o)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        losses = step_losses(model, b, image_pos, tap, o)
        loss = losses["caption"] + losses["answer"] + o.grounding_weight * losses["grounding"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        n_sum += 1
        done = step + 1
        if done % o.log_every == 0 or done == o.steps or step == start:
            el = elapsed_before + time.time() - t0
            print(f"step {done:5d}/{o.steps}  lr {lr:.2e}  " + "  ".join(f"{k} {v / n_sum:.4f}" for k, v in sums.items())
                  + f"  elapsed {el:7.1f}s  ({(time.time() - t0) / (done - start):.2f} s/step)", flush=True)
            sums, n_sum = {}, 0
        if done % o.checkpoint_every == 0 or done == o.steps:
            _save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": done, "config": config,
                          "elapsed": elapsed_before + time.time() - t0}, ckpt_path)
        if o.eval_every and done % o.eval_every == 0 and done != o.steps:
            model.eval()
            r = evaluate(model, tok, prompts, split="val", n_scenes=100)
            print("  val: " + summary(r), flush=True)
            model.train()
    model.eval()
    total = elapsed_before + time.time() - t0
    print(f"training done: {o.steps} steps, {total:.0f} s ({total / 60:.1f} min)", flush=True)
    save_model_dir(model, tok, mo, out_dir / "model")
    return model, tok, prompts


# ---------------------------------------------------------------------------------------------------
# evaluation: HF generate (greedy) on prompts built by the runtime's functions


@torch.no_grad()
def generate(model, prompts: Prompts, images: Sequence[np.ndarray], user_texts: Sequence[str], max_new_tokens: int,
             batch_size: int = 64) -> list[list[int]]:
    from vlmedge.models.hf import strip_prompt
    from vlmedge.models.prefix import left_pad

    out: list[list[int]] = []
    for s in range(0, len(images), batch_size):
        rows = [prompts.ids(t) for t in user_texts[s : s + batch_size]]
        ids, mask = left_pad(rows, prompts.pad)
        px = torch.from_numpy(prompts.frames(images[s : s + batch_size]))[:, None]
        pmask = torch.ones(px.shape[0], 1, px.shape[-2], px.shape[-1], dtype=torch.long)
        gen = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, pixel_attention_mask=pmask,
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        out += strip_prompt(gen, ids.shape[1], prompts.eos)
    return out


def evaluate(model, tok, prompts: Prompts, split: str = "test", n_scenes: int = 500, batch_size: int = 64) -> dict:
    """Caption exact match / BLEU-4 / CIDEr and VQA accuracy (overall, per type and template) on `split`,
    scored by vlmedge.evaluation (metrics.caption_scores and metrics.vqa_accuracy)."""
    from vlmedge.evaluation.scene_eval import evaluation_set, score

    es = evaluation_set(split, n_scenes)
    dec = lambda r: tok.decode([t for t in r if t != prompts.eos], skip_special_tokens=True)  # noqa: E731
    images = [s.image for s in es.scenes]
    caps = generate(model, prompts, images, [CAPTION_INSTRUCTION] * len(images), 32, batch_size)
    qimgs = [es.scenes[i].image for i, _ in es.questions]
    ans = generate(model, prompts, qimgs, [q.text for _, q in es.questions], 4, batch_size)
    return score(es, [dec(r) for r in caps], [dec(r) for r in ans])


def summary(r: dict) -> str:
    v, c = r["vqa"], r["caption"]
    types = "  ".join(f"{t} {x['accuracy']:.1%}" for t, x in v["by_type"].items())
    return (f"{r['split']} {r['scenes']} scenes: VQA {v['accuracy']:.1%} ({types}; relational-hard {v['relational_hard']['accuracy']:.1%})"
            f"  caption BLEU-4 {c['bleu4']:.4f} exact {c['exact_match']:.1%} CIDEr {c['cider']:.3f}")


def load_model_dir(path: Path):
    from transformers import SmolVLMForConditionalGeneration

    from vlmedge.models.hf import load_hf_model

    return load_hf_model(SmolVLMForConditionalGeneration, str(path))


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="run directory: checkpoint.pt, model/, eval.json")
    ap.add_argument("--steps", type=int, default=TrainOptions.steps)
    ap.add_argument("--batch-size", type=int, default=TrainOptions.batch_size)
    ap.add_argument("--questions-per-scene", type=int, default=TrainOptions.questions_per_scene)
    ap.add_argument("--lr", type=float, default=TrainOptions.lr)
    ap.add_argument("--grounding-weight", type=float, default=TrainOptions.grounding_weight)
    ap.add_argument("--text-hidden", type=int, default=ModelOptions.text_hidden)
    ap.add_argument("--text-layers", type=int, default=ModelOptions.text_layers)
    ap.add_argument("--text-intermediate", type=int, default=ModelOptions.text_intermediate)
    ap.add_argument("--text-heads", type=int, default=ModelOptions.text_heads)
    ap.add_argument("--text-kv-heads", type=int, default=ModelOptions.text_kv_heads)
    ap.add_argument("--no-init-vision", action="store_true", help="train the vision tower from scratch")
    ap.add_argument("--eval-every", type=int, default=TrainOptions.eval_every, help="quick val-split evaluation (100 scenes) every N steps")
    ap.add_argument("--log-every", type=int, default=TrainOptions.log_every)
    ap.add_argument("--eval-scenes", type=int, default=1000)
    ap.add_argument("--eval-only", action="store_true", help="evaluate OUT/model without training")
    a = ap.parse_args(argv)
    o = replace(TrainOptions(), steps=a.steps, batch_size=a.batch_size, questions_per_scene=a.questions_per_scene, lr=a.lr,
                grounding_weight=a.grounding_weight, eval_every=a.eval_every, log_every=a.log_every)
    mo = replace(ModelOptions(), text_hidden=a.text_hidden, text_layers=a.text_layers, text_intermediate=a.text_intermediate,
                 text_heads=a.text_heads, text_kv_heads=a.text_kv_heads, init_vision=not a.no_init_vision)
    if a.eval_only:
        torch.set_num_threads(o.threads)
        tok = build_tokenizer()
        model = load_model_dir(a.out / "model")
        prompts = Prompts(tok, preprocessing(model, mo))
    else:
        model, tok, prompts = train(a.out, o, mo)
    t0 = time.time()
    r = evaluate(model, tok, prompts, "test", a.eval_scenes)
    (a.out / "eval.json").write_text(json.dumps(r, indent=2))
    print(summary(r), flush=True)
    for k, x in r["vqa"]["by_template"].items():
        print(f"  {k:32s} {x['n']:5d} {x['accuracy']:.1%}", flush=True)
    size = sum(f.stat().st_size for f in (a.out / "model").glob("*.safetensors"))
    print(f"evaluation {time.time() - t0:.0f} s; weights {size / 1e6:.2f} MB", flush=True)


if __name__ == "__main__":
    main()
