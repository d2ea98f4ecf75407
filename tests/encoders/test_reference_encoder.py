"""The built-in dual encoder `shapes-clip`: exported by name once per session, its zero-shot accuracy and
recall on the scene world's test split above floors a little under the measured values (docs/encoders.md),
and its FP16 variant within a small margin of FP32. Nothing here trains."""

import json

import numpy as np
import pytest

import vlmedge
from vlmedge.evaluation.encoder_eval import COLOR_LABELS, encoder_evaluation_set, evaluate_encoder

# measured on this set (the test split's first 200 one-object scenes and first 100 scenes), FP32 and FP16 alike:
# colour 100%, shape 95.5%, colour x shape 90.0%, recall@1 99%, recall@5 100% (docs/encoders.md has the larger set)
FLOORS = {"zero_shot_color": 0.97, "zero_shot_shape": 0.90, "zero_shot_color_shape": 0.84, "recall@1/100": 0.94,
          "recall@5/100": 0.98}
FP16_MARGIN = 0.02  # points of accuracy or recall (4 of 200 images, 2 of 100 queries)


@pytest.fixture(scope="session")
def shapes_clip(tmp_path_factory):
    """The shipped shapes-clip exported (and validated) by name, and its FP16 variant."""
    from vlmedge.calibration.dual_encoder import quantize_dual_encoder
    from vlmedge.export.exporter import export_bundle
    from vlmedge.models.registry import load_adapter

    root = tmp_path_factory.mktemp("shapes-clip")
    manifest = export_bundle(load_adapter("shapes-clip"), "all", root / "fp32")
    quantize_dual_encoder(root / "fp32", root / "fp16", "fp16", calib="synthetic:8", held_out=50)
    return manifest, root / "fp32", root / "fp16"


@pytest.fixture(scope="session")
def reports(shapes_clip):
    _, fp32, fp16 = shapes_clip
    es = encoder_evaluation_set("test", n_single=200, n_scenes=100)
    out = {}
    for name, path in (("fp32", fp32), ("fp16", fp16)):
        pipe = vlmedge.load(path, batch_size=64)
        out[name] = evaluate_encoder(pipe.embed_images, pipe.embed_texts, es, pipe.template, recall_n=(100,))
    return out


def test_shipped_directory_is_a_small_clip_model_saved_by_transformers():
    from vlmedge.models.checkpoint import BUILTIN_MODELS, HF_BUILTINS

    d = BUILTIN_MODELS["shapes-clip"]
    assert HF_BUILTINS["shapes-clip"] == "CLIPModel"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "processor_config.json"} <= \
        {f.name for f in d.iterdir()}
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["CLIPModel"] and cfg["model_type"] == "clip"
    assert (d / "model.safetensors").stat().st_size <= 10_000_000
    proc = json.loads((d / "processor_config.json").read_text())
    assert proc["image_processor"]["crop_size"] == {"height": 64, "width": 64}


def test_every_scene_word_is_one_token_of_the_shipped_tokenizer():
    from tokenizers import Tokenizer

    from vlmedge.models.checkpoint import BUILTIN_MODELS
    from vlmedge.training.clip import scene_words

    tok = Tokenizer.from_file(str(BUILTIN_MODELS["shapes-clip"] / "tokenizer.json"))
    assert [w for w in scene_words() if len(tok.encode(w, add_special_tokens=False).ids) != 1] == []
    assert len(tok.encode("forklift", add_special_tokens=False).ids) > 1  # other words: pieces, never unknown


def test_export_by_name_is_validated(shapes_clip):
    manifest, fp32, _ = shapes_clip
    raw = json.loads((fp32 / "manifest.json").read_text())
    assert raw["contract"] == "dual-encoder" and raw["architecture"] == "CLIPModel"
    v = raw["validation"]
    assert v["passed"] and v["tokenizer"]["equal"]
    assert raw["tasks"]["classify"]["template"] == "a photo of a {}."


@pytest.mark.parametrize("metric", sorted(FLOORS))
def test_fp32_is_above_its_floor(metric, reports):
    assert reports["fp32"][metric] >= FLOORS[metric], reports["fp32"]


def test_fp16_stays_within_a_small_margin_of_fp32(reports, shapes_clip):
    for metric in FLOORS:
        assert abs(reports["fp16"][metric] - reports["fp32"][metric]) <= FP16_MARGIN, (metric, reports)
    acc = json.loads((shapes_clip[2] / "manifest.json").read_text())["precision"]["accuracy"]
    assert acc["passed"] and acc["cosine"]["image_mean"] >= 0.999 and acc["cosine"]["text_mean"] >= 0.999


def test_classify_names_the_colour_of_a_one_object_scene(shapes_clip):
    """'a red circle' against 'a blue square', through the runtime's classify."""
    from vlmedge.data.scenes import make_scene, scene_seed

    pipe = vlmedge.load(shapes_clip[1])
    scenes = [make_scene(scene_seed("test", i), n_objects=1) for i in range(24)]
    rows = pipe.classify([s.image for s in scenes], list(COLOR_LABELS))
    right = np.mean([r[0].label == f"{s.objects[0].color} object" for r, s in zip(rows, scenes)])
    assert right >= FLOORS["zero_shot_color"] - 0.1


def test_the_built_in_opens_by_name(tmp_path, monkeypatch):
    """`vlmedge.load("shapes-clip")` exports it once into the cache, as the other built-ins, and opens the dual
    encoder's pipeline."""
    monkeypatch.setenv("VLMEDGE_CACHE", str(tmp_path))
    pipe = vlmedge.load("shapes-clip")
    assert pipe.contract == "dual-encoder"
    from vlmedge.data.scenes import scenes

    s = next(scenes("test", 0, 1))
    labels = pipe.classify(s.image, ["red circle", "blue square"])
    assert len(labels) == 2 and abs(sum(x.score for x in labels) - 1) < 1e-5
