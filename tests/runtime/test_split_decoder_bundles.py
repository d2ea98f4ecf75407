"""Bundles of vlmedge 0.1 (schema 1: decoder_init and decoder_step, each holding the decoder's weights)
still load and give the tokens they gave then. The bundle in tests/data is a tiny ViT-GPT2 exported by
vlmedge 0.1, with the ids it produced for three scenes."""

import json
from pathlib import Path

import pytest

import vlmedge
from vlmedge.data.scenes import make_scene
from vlmedge.runtime.bundle import SPLIT_SCHEMA_VERSION, load_bundle

OLD = Path(__file__).parents[1] / "data" / "legacy-vit-gpt2"


@pytest.fixture(scope="module")
def old():
    expected = json.loads((OLD / "expected_ids.json").read_text())
    return vlmedge.load(OLD), [make_scene(s).pil() for s in expected["scenes"]], expected


def test_schema_1_bundles_load_with_their_two_decoder_graphs():
    m = load_bundle(OLD).manifest
    assert m.schema_version == SPLIT_SCHEMA_VERSION and m.split_decoder
    assert set(m.graphs) == {"vision_encoder", "decoder_init", "decoder_step"}


@pytest.mark.parametrize("beams", [1, 3])
def test_schema_1_bundles_give_the_tokens_they_gave(old, beams):
    pipe, images, expected = old
    assert [list(r.ids) for r in pipe.caption(images, num_beams=beams, return_ids=True)] == expected[f"beams{beams}"]
    assert [list(pipe.caption(im, num_beams=beams, return_ids=True).ids) for im in images] == expected[f"beams{beams}"]


def test_schema_1_bundles_stream_and_quantize(old, tmp_path):
    from vlmedge.cli import main

    pipe, images, expected = old
    assert "".join(pipe.stream(images[0])) == pipe.caption(images[0])
    assert main(["quantize", str(OLD), "--precision", "int8-wo", "--out", str(tmp_path / "q")]) == 0
    q = load_bundle(tmp_path / "q").manifest
    assert q.split_decoder and q.precision["nodes"]["decoder_step"] > 0
