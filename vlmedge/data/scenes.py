"""The synthetic scene world the reference model is trained and evaluated on.

Sort-of-CLEVR-like scenes (Santoro et al. 2017): 2-5 objects, each with a colour unique to its
scene, a shape, a size and a position, drawn anti-aliased on a lightly shaded, noisy background.
Every scene comes with a caption that names every object from left to right (so exact match is
achievable) and question/answer pairs of five types. Everything is a pure function of the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 60, 180),
    "orange": (250, 130, 20),
    "cyan": (30, 200, 215),
    "pink": (245, 120, 190),
}
SHAPES = ("circle", "square", "triangle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
SIZES = {"small": 4.5, "large": 7.5}  # half-extent in pixels
QUESTION_TYPES = ("attribute", "count", "existence", "position", "relational")
NUMBER_WORDS = ("0", "1", "2", "3", "4", "5")

_SUPERSAMPLE = 4  # draw at 4x and downsample with a box filter: anti-aliased edges
_MIN_X_GAP = 4.0  # centres at least this far apart horizontally: left-to-right order is clear
_MIN_CLEARANCE = 2.0  # pixels between the bounding circles of two objects
_CENTRE_MARGIN = 5.0  # position questions only about objects this far from the centre line
_REL_MARGIN = 0.8  # relational answer only if its distance is <= 0.8x (>= 1.25x) the runner-up

# Disjoint seed ranges per split: a scene is identified by (split, index) and never shared.
SPLIT_OFFSETS = {"test": 0, "val": 1_000_000, "train": 10_000_000}
SPLIT_SIZES = {"test": 1_000_000, "val": 9_000_000, "train": 2**31 - 10_000_000}


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    size: str
    x: float  # centre, pixels from the left edge
    y: float  # centre, pixels from the top edge

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    qtype: str  # one of QUESTION_TYPES
    subtype: str  # template name, e.g. "closest_color"
    n_objects: int  # objects in the scene
    chance: float  # accuracy of a blind guess: a random other object (relational), else a random answer
    ref: int = -1  # index (in Scene.objects) of the object the question names, -1 if none
    ref_word: int = -1  # index of the word that names it (its colour, or its shape), -1 if none
    target: int = -1  # relational: index of the object the answer describes, -1 otherwise
    relation_word: int = -1  # relational: index of "closest" / "furthest" / "left", -1 otherwise


def _naming(text: str, objs, o: SceneObject, word: str) -> dict:
    return {"ref": objs.index(o), "ref_word": text.split().index(word)}


@dataclass(frozen=True)
class Scene:
    seed: int
    objects: tuple[SceneObject, ...]
    background: int  # grey level of the background
    image: np.ndarray  # (H, W, 3) uint8

    @property
    def caption(self) -> str:
        return caption_for(self.objects)

    def pil(self) -> Image.Image:
        return Image.fromarray(self.image)


def scene_seed(split: str, index: int) -> int:
    """The global seed of scene `index` of `split`; splits never share a seed."""
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"unknown split {split!r}: expected one of {sorted(SPLIT_OFFSETS)}")
    if not 0 <= index < SPLIT_SIZES[split]:
        raise ValueError(f"scene index {index} out of range for split {split!r}")
    return SPLIT_OFFSETS[split] + index


def split_of_seed(seed: int) -> str:
    for split, offset in SPLIT_OFFSETS.items():
        if offset <= seed < offset + SPLIT_SIZES[split]:
            return split
    raise ValueError(f"seed {seed} belongs to no split")


def caption_for(objects: tuple[SceneObject, ...]) -> str:
    """Canonical caption: every object, left to right, e.g. 'a small red circle and a large ...'."""
    phrases = [f"a {o.phrase}" for o in sorted(objects, key=lambda o: o.x)]
    if len(phrases) == 1:
        return phrases[0]
    return " , ".join(phrases[:-1]) + " and " + phrases[-1]


def _bounding_radius(size: str) -> float:
    return SIZES[size] * 1.25


def _place_objects(rng: np.random.Generator, n: int) -> list[SceneObject] | None:
    colors = rng.choice(len(COLORS), size=n, replace=False)
    names = list(COLORS)
    placed: list[SceneObject] = []
    for i in range(n):
        shape = SHAPES[rng.integers(len(SHAPES))]
        size = "small" if rng.random() < 0.5 else "large"
        r = _bounding_radius(size)
        for _ in range(100):
            x = float(rng.uniform(r + 1, IMAGE_SIZE - r - 1))
            y = float(rng.uniform(r + 1, IMAGE_SIZE - r - 1))
            ok = all(
                abs(x - o.x) >= _MIN_X_GAP
                and math.hypot(x - o.x, y - o.y) >= r + _bounding_radius(o.size) + _MIN_CLEARANCE
                for o in placed
            )
            if ok:
                placed.append(SceneObject(names[colors[i]], shape, size, x, y))
                break
        else:
            return None
    return placed


def _draw(objects: list[SceneObject], background: int, rng: np.random.Generator) -> np.ndarray:
    s = _SUPERSAMPLE
    canvas = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), (background,) * 3)
    draw = ImageDraw.Draw(canvas)
    for o in objects:
        cx, cy, h = o.x * s, o.y * s, SIZES[o.size] * s
        jitter = rng.integers(-12, 13, size=3)
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[o.color], jitter))
        if o.shape == "circle":
            draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
        elif o.shape == "square":
            q = h * 0.9
            draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fill)
        else:  # equilateral triangle pointing up, centred on its centroid
            t = h * 1.2
            pts = [(cx + t * math.cos(a), cy - t * math.sin(a)) for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]
            draw.polygon(pts, fill=fill)
    small = canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    pixels = np.asarray(small, dtype=np.float32)
    pixels = pixels + rng.normal(0.0, 3.0, size=pixels.shape)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def make_scene(seed: int, n_objects: int | None = None) -> Scene:
    """The scene of a global seed (deterministic: same seed, same objects, same pixels)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 6)) if n_objects is None else n_objects
    if not 1 <= n <= 5:
        raise ValueError(f"a scene holds 1 to 5 objects, not {n}")
    while (objects := _place_objects(rng, n)) is None:
        pass
    background = int(rng.integers(185, 240))
    image = _draw(objects, background, rng)
    return Scene(seed=seed, objects=tuple(objects), background=background, image=image)


def scenes(split: str, start: int, count: int) -> Iterator[Scene]:
    for i in range(start, start + count):
        yield make_scene(scene_seed(split, i))


# --------------------------------------------------------------------------- questions


def _attribute(objs: tuple[SceneObject, ...]) -> list[Question]:
    out: list[Question] = []
    n = len(objs)
    for o in objs:
        t = f"what shape is the {o.color} object ?"
        out.append(Question(t, o.shape, "attribute", "shape_of", n, 1 / 3, **_naming(t, objs, o, o.color)))
        t = f"what size is the {o.color} object ?"
        out.append(Question(t, o.size, "attribute", "size_of", n, 1 / 2, **_naming(t, objs, o, o.color)))
        if sum(p.size == o.size and p.shape == o.shape for p in objs) == 1:
            t = f"what color is the {o.size} {o.shape} ?"
            out.append(Question(t, o.color, "attribute", "color_of", n, 1 / n, **_naming(t, objs, o, o.shape)))
    return out


def _count(objs: tuple[SceneObject, ...]) -> list[Question]:
    out = [
        Question(f"how many {PLURAL[s]} are there ?", NUMBER_WORDS[sum(o.shape == s for o in objs)], "count", "shapes", len(objs), 1 / 6)
        for s in SHAPES
    ]
    out += [
        Question(f"how many {z} objects are there ?", NUMBER_WORDS[sum(o.size == z for o in objs)], "count", "sizes", len(objs), 1 / 6)
        for z in SIZES
    ]
    return out


def _existence(objs: tuple[SceneObject, ...], rng: np.random.Generator) -> list[Question]:
    present = {(o.color, o.shape) for o in objs}
    yes = [
        Question(f"is there a {o.color} {o.shape} ?", "yes", "existence", "color_shape", len(objs), 1 / 2,
                 **_naming(f"is there a {o.color} {o.shape} ?", objs, o, o.color))
        for o in sorted(objs, key=lambda o: (o.color, o.shape))
    ]
    # "no" questions mostly reuse a colour that is present with another shape: binding, not colour spotting
    no: list[Question] = []
    for c, s in sorted(present):
        for s2 in SHAPES:
            if (c, s2) not in present:
                no.append(Question(f"is there a {c} {s2} ?", "no", "existence", "color_shape", len(objs), 1 / 2))
    absent = [c for c in COLORS if c not in {o.color for o in objs}]
    c = absent[rng.integers(len(absent))]
    no.append(Question(f"is there a {c} {SHAPES[rng.integers(3)]} ?", "no", "existence", "color_shape", len(objs), 1 / 2))
    k = min(len(yes), len(no))
    return [yes[i] for i in rng.permutation(len(yes))[:k]] + [no[i] for i in rng.permutation(len(no))[:k]]


def _position(objs: tuple[SceneObject, ...]) -> list[Question]:
    out: list[Question] = []
    mid = IMAGE_SIZE / 2
    for o in objs:
        if abs(o.x - mid) >= _CENTRE_MARGIN:
            ans = "left" if o.x < mid else "right"
            t = f"is the {o.color} object on the left or the right ?"
            out.append(Question(t, ans, "position", "horizontal", len(objs), 1 / 2, **_naming(t, objs, o, o.color)))
        if abs(o.y - mid) >= _CENTRE_MARGIN:
            ans = "top" if o.y < mid else "bottom"
            t = f"is the {o.color} object at the top or the bottom ?"
            out.append(Question(t, ans, "position", "vertical", len(objs), 1 / 2, **_naming(t, objs, o, o.color)))
    return out


def _relational(objs: tuple[SceneObject, ...]) -> list[Question]:
    out: list[Question] = []
    n = len(objs)

    for o in objs:

        def ask(text: str, target: SceneObject, attr: str, subtype: str, pool: list[SceneObject]) -> Question:
            # a blind guess picks a random object of `pool`: right when it shares the target's attribute
            chance = sum(getattr(p, attr) == getattr(target, attr) for p in pool) / len(pool)
            words = text.split()
            relation = next(i for i, w in enumerate(words) if w in ("closest", "furthest", "left"))
            return Question(text, getattr(target, attr), "relational", subtype, n, chance, **_naming(text, objs, o, o.color),
                            target=objs.index(target), relation_word=relation)

        others = [p for p in objs if p is not o]
        n_other = len(others)
        by_dist = sorted(others, key=lambda p: math.hypot(p.x - o.x, p.y - o.y))
        dists = [math.hypot(p.x - o.x, p.y - o.y) for p in by_dist]
        if n_other == 1 or dists[0] <= _REL_MARGIN * dists[1]:
            near = by_dist[0]
            out.append(ask(f"what color is the object closest to the {o.color} object ?", near, "color", "closest_color", others))
            out.append(ask(f"what shape is the object closest to the {o.color} object ?", near, "shape", "closest_shape", others))
        if n_other == 1 or dists[-2] <= _REL_MARGIN * dists[-1]:
            far = by_dist[-1]
            out.append(ask(f"what color is the object furthest from the {o.color} object ?", far, "color", "furthest_color", others))
            out.append(ask(f"what shape is the object furthest from the {o.color} object ?", far, "shape", "furthest_shape", others))
        left = sorted((p for p in others if p.x < o.x), key=lambda p: p.x)
        if left:
            out.append(ask(f"what color is the nearest object left of the {o.color} object ?", left[-1], "color", "left_of_color", left))
    return out


def questions_for(scene: Scene) -> dict[str, list[Question]]:
    """Every question the scene answers unambiguously, by type (deterministic by seed)."""
    rng = np.random.default_rng([scene.seed, 1])
    objs = scene.objects
    return {
        "attribute": _attribute(objs),
        "count": _count(objs),
        "existence": _existence(objs, rng),
        "position": _position(objs),
        "relational": _relational(objs),
    }


def pick_questions(scene: Scene, per_type: int = 1) -> list[Question]:
    """A fixed sample of up to `per_type` questions of every type, for evaluation splits."""
    rng = np.random.default_rng([scene.seed, 2])
    picked: list[Question] = []
    for qtype, qs in questions_for(scene).items():
        for i in rng.permutation(len(qs))[:per_type]:
            picked.append(qs[i])
    return picked


def vocabulary() -> list[str]:
    """Every word a caption, question or answer of this world can contain."""
    words: set[str] = {",", "?", "a", "and"}
    words |= set(COLORS) | set(SHAPES) | set(PLURAL.values()) | set(SIZES) | set(NUMBER_WORDS)
    for template in (
        "what shape is the object ?", "what size is the object ?", "what color is the ?",
        "how many objects are there ?", "is there a ?", "is the object on the left or the right ?",
        "is the object at the top or the bottom ?", "yes no",
        "what color is the object closest to the object ?", "furthest from", "nearest left of",
    ):
        words |= set(template.split())
    return sorted(words)
