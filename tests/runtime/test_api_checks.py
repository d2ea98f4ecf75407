"""The Python API's input checks: options of the wrong type, NaN images, closed PIL images, bad
question text, and images x beams against the bundle's batch maximum. Every refusal is one
InputError line naming the option or input."""

import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image

import vlmedge
from vlmedge.data.scenes import scenes
from vlmedge.errors import InputError
from vlmedge.runtime.decoding import GenerationConfig


@pytest.fixture(scope="module")
def world():
    return [s.image for s in scenes("test", 300, 5)]


def _refused(fn, *words):
    with pytest.raises(InputError) as e:
        fn()
    text = str(e.value)
    assert "\n" not in text and all(w in text for w in words), text
    return text


@pytest.mark.parametrize("option, value, words", [
    ("max_new_tokens", 3.0, "max_new_tokens: expected an integer >= 1, got float 3.0"),
    ("max_new_tokens", "5", "max_new_tokens: expected an integer >= 1, got str '5'"),
    ("max_new_tokens", True, "max_new_tokens: expected an integer >= 1, got bool True"),
    ("max_new_tokens", math.inf, "max_new_tokens: expected an integer"),
    ("max_new_tokens", 10**30, "max_new_tokens: 1000000000000000000000000000000 is over this bundle's limit"),
    ("max_new_tokens", -3, "max_new_tokens: expected >= 1, got -3"),
    ("num_beams", 2.5, "num_beams: expected an integer >= 1, got float 2.5"),
    ("num_beams", False, "num_beams: expected an integer >= 1, got bool False"),
    ("num_beams", None, "num_beams: expected an integer >= 1, got NoneType"),
    ("min_new_tokens", "two", "min_new_tokens: expected an integer >= 0"),
    ("length_penalty", math.nan, "length_penalty: expected a finite number"),
    ("length_penalty", math.inf, "length_penalty: expected a finite number"),
    ("length_penalty", "1.0", "length_penalty: expected a finite number"),
    ("length_penalty", True, "length_penalty: expected a finite number"),
    ("length_penalty", 1e308, "length_penalty: expected a finite number in [-10, 10]"),
    ("early_stopping", 1, "early_stopping: expected True, False or 'never', got int 1"),
    ("early_stopping", "always", "early_stopping"),
    ("eos_token_id", 4.0, "eos_token_id: expected an integer >= 0"),
    ("eos_token_id", 10_000, "eos_token_id: token id 10000 is outside the vocabulary (0..57)"),
    ("batch_size", 0, "batch_size: expected >= 1, got 0"),
    ("batch_size", 2.0, "batch_size: expected an integer >= 1"),
    ("return_ids", "yes", "return_ids: expected True or False"),
])
def test_options_of_the_wrong_type_or_range_are_one_line(ort_pipe, world, option, value, words):
    _refused(lambda: ort_pipe.caption(world[0], **{option: value}), words)


def test_numpy_integers_are_integers(ort_pipe, world):
    expected = ort_pipe.caption(world[0], max_new_tokens=5, num_beams=2)
    assert ort_pipe.caption(world[0], max_new_tokens=np.int64(5), num_beams=np.int32(2), length_penalty=np.float32(1.0)) \
        == expected
    GenerationConfig(early_stopping="never", length_penalty=0).check()


def test_load_arguments_are_checked(shapes):
    _refused(lambda: vlmedge.load(shapes, batch_size="8"), "batch_size: expected an integer >= 1, got str")
    _refused(lambda: vlmedge.load(shapes, max_pixels=0), "max_pixels: expected >= 1")
    _refused(lambda: vlmedge.load(shapes, device=None), "device: expected 'cpu', 'cuda' or 'tensorrt'")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_infinite_pixels_are_refused(ort_pipe, world, bad):
    a = np.asarray(world[0], dtype=np.float32) / 255.0
    a[3, 5, 1] = bad
    _refused(lambda: ort_pipe.caption([world[1], a]), "image 1: 1 pixels are NaN or infinite")


def test_a_closed_pil_image_is_one_line(ort_pipe, world, tmp_path):
    Image.fromarray(np.asarray(world[0])).save(tmp_path / "a.png")
    img = Image.open(tmp_path / "a.png")
    img.close()
    _refused(lambda: ort_pipe.caption(img), "image 0: cannot read this PIL image (Operation on closed image)")


def test_question_text_problems_are_named(ort_pipe, world):
    _refused(lambda: ort_pipe.vqa(world[0], 42), "question 0: expected a string, got int")
    _refused(lambda: ort_pipe.vqa([world[0]] * 2, ["what color is the circle ?", b"what ?"]),
             "question 1: expected a string, got bytes")
    _refused(lambda: ort_pipe.vqa(world[0], "what color \ud800 is it ?"),
             "question 0: not valid Unicode text (a lone surrogate at character 11)")
    _refused(lambda: ort_pipe.vqa(world[0], "  "), "question 0: empty")


class _Counting:
    """A backend that records the batch of every graph run, around the real one."""

    def __init__(self, inner):
        self.inner, self.name, self.batches = inner, inner.name, []

    def run(self, graph, feeds, keep=()):
        self.batches.append((graph, _rows(feeds)))
        return self.inner.run(graph, feeds, keep)

    def prepare(self, graph, fixed, keep=()):
        call = self.inner.prepare(graph, fixed, keep)

        def step(feeds):
            self.batches.append((graph, _rows(feeds)))
            return call(feeds)
        return step

    def to_host(self, value):
        return self.inner.to_host(value)

    def take(self, value, rows):
        return self.inner.take(value, rows)


def _rows(feeds):
    v = next(iter(feeds.values()))
    return int((v.shape if isinstance(v, np.ndarray) else v.shape())[0])


def test_images_times_beams_stay_within_the_batch_maximum(ort_pipe, world, tmp_path):
    """The README's promise: a decoder batch of images x beams stays within axes.batch.max."""
    d = tmp_path / "b"
    shutil.copytree(ort_pipe.bundle.path, d)
    m = json.loads((d / "manifest.json").read_text())
    m["axes"]["batch"]["max"] = 6
    (d / "manifest.json").write_text(json.dumps(m))
    pipe = vlmedge.load(d)
    pipe.backend = _Counting(pipe.backend)
    out = pipe.caption(world, num_beams=3, batch_size=8)
    assert out == ort_pipe.caption(world, num_beams=3)  # chunking does not change results
    rows = [n for _, n in pipe.backend.batches]
    assert max(rows) == 6 and 3 in rows  # chunks of 2 images x 3 beams, then the last image's 3 beams
    _refused(lambda: pipe.caption(world[0], num_beams=7),
             "num_beams: 7 beams are over this bundle's batch maximum of 6 (axes.batch.max)")
