import io
import math

import numpy as np
import pytest

from vlmedge.data import scenes as W
from vlmedge.data.tokenizer import SPECIAL_TOKENS, build_tokenizer


def png_bytes(scene) -> bytes:
    buf = io.BytesIO()
    scene.pil().save(buf, format="PNG")
    return buf.getvalue()


def test_same_seed_gives_byte_identical_png():
    for seed in (0, 17, 10_000_123):
        assert png_bytes(W.make_scene(seed)) == png_bytes(W.make_scene(seed))
    assert png_bytes(W.make_scene(1)) != png_bytes(W.make_scene(2))


def test_splits_use_disjoint_seeds_and_scenes():
    ranges = sorted((W.SPLIT_OFFSETS[s], W.SPLIT_OFFSETS[s] + W.SPLIT_SIZES[s]) for s in W.SPLIT_OFFSETS)
    for (a0, a1), (b0, b1) in zip(ranges, ranges[1:]):
        assert a1 <= b0
    for split in W.SPLIT_OFFSETS:
        assert W.split_of_seed(W.scene_seed(split, 5)) == split
    with pytest.raises(ValueError):
        W.scene_seed("test", W.SPLIT_SIZES["test"])  # would run into the val range
    test = {s.objects for s in W.scenes("test", 0, 300)}
    train = {s.objects for s in W.scenes("train", 0, 3000)}
    assert not test & train


def test_scene_contents():
    for s in W.scenes("val", 0, 300):
        assert s.image.shape == (W.IMAGE_SIZE, W.IMAGE_SIZE, 3) and s.image.dtype == np.uint8
        assert 2 <= len(s.objects) <= 5
        assert len({o.color for o in s.objects}) == len(s.objects)  # colours unique: every object nameable
        xs = sorted(o.x for o in s.objects)
        assert all(b - a >= 4 for a, b in zip(xs, xs[1:]))  # left-to-right order is clear
        # the caption names every object, left to right
        phrases = s.caption.replace(" and ", " , ").split(" , ")
        assert phrases == [f"a {o.phrase}" for o in sorted(s.objects, key=lambda o: o.x)]
        # the object's colour really is at its centre
        o = s.objects[0]
        px = s.image[int(round(o.y)), int(round(o.x))].astype(int)
        assert np.abs(px - np.array(W.COLORS[o.color])).max() < 40


def test_answers_agree_with_the_scene():
    for s in W.scenes("val", 0, 200):
        objs = s.objects
        by_color = {o.color: o for o in objs}
        for qtype, qs in W.questions_for(s).items():
            for q in qs:
                assert q.qtype == qtype and len(q.answer.split()) == 1
                words = q.text.split()
                if q.subtype == "shapes":
                    shape = words[2][:-1]
                    assert q.answer == str(sum(o.shape == shape for o in objs))
                elif q.subtype == "closest_color":
                    ref = by_color[words[-3]]
                    d = sorted((math.dist((o.x, o.y), (ref.x, ref.y)), o.color) for o in objs if o is not ref)
                    assert q.answer == d[0][1]
                elif q.subtype == "horizontal":
                    assert q.answer == ("left" if by_color[words[2]].x < W.IMAGE_SIZE / 2 else "right")
                elif q.subtype == "color_shape":
                    present = any(o.color == words[3] and o.shape == words[4] for o in objs)
                    assert q.answer == ("yes" if present else "no")
        ex = W.questions_for(s)["existence"]
        assert sum(q.answer == "yes" for q in ex) == sum(q.answer == "no" for q in ex)  # balanced


def test_every_text_is_in_the_vocabulary():
    tok = build_tokenizer()
    unk = tok.token_to_id("[UNK]")
    for s in W.scenes("train", 0, 200):
        texts = [s.caption] + [q.text for qs in W.questions_for(s).values() for q in qs]
        texts += [q.answer for qs in W.questions_for(s).values() for q in qs]
        for t in texts:
            ids = tok.encode(t).ids
            assert unk not in ids, t
            assert tok.decode(ids) == t
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.encode("What color is the object closest to the RED object?").ids == tok.encode(
        "what color is the object closest to the red object ?").ids
