"""`vlmedge classify`: output, JSON, and one line per bad input with the others still run."""

import json

import pytest
from PIL import Image

from vlmedge.cli import main


@pytest.fixture(scope="module")
def folder(tmp_path_factory, scene_images):
    d = tmp_path_factory.mktemp("photos")
    for i, a in enumerate(scene_images[:4]):
        Image.fromarray(a).save(d / f"scene-{i}.png")
    return d


def test_classify_json_equals_the_api(encoder_bundles, encoder_pipes, folder, capsys):
    path = encoder_bundles["clip"][2]
    labels = ["red circle", "blue square", "green triangle"]
    assert main(["classify", str(path), str(folder), "--labels", ",".join(labels), "--json", "--batch-size", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["activation"] == "softmax" and len(out["results"]) == 4
    for r in out["results"]:
        want = encoder_pipes["clip"].classify(r["image"], labels)
        assert [x["label"] for x in r["labels"]] == [w.label for w in want]
        assert [x["score"] for x in r["labels"]] == pytest.approx([w.score for w in want], abs=1e-6)


def test_classify_prints_the_top_k_per_image(encoder_bundles, encoder_pipes, folder, capsys):
    path = encoder_bundles["siglip"][2]
    img = folder / "scene-0.png"
    assert main(["classify", str(path), str(img), "--labels", "cat, dog ,forklift", "--top-k", "2",
                 "--template", "a picture of a {}"]) == 0
    line = capsys.readouterr().out.strip()
    want = encoder_pipes["siglip"].classify(str(img), ["cat", "dog", "forklift"], template="a picture of a {}", top_k=2)
    assert line == ", ".join(f"{w.label} {w.score:.4f}" for w in want)


def test_a_bad_image_is_one_line_and_the_others_still_run(encoder_bundles, folder, tmp_path, capsys):
    (tmp_path / "text.png").write_text("hello")
    args = [str(folder / "scene-0.png"), str(tmp_path / "text.png"), str(tmp_path / "missing.png"), str(folder / "scene-1.png")]
    assert main(["classify", str(encoder_bundles["clip"][2]), *args, "--labels", "a,b", "--json"]) == 2
    cap = capsys.readouterr()
    results = json.loads(cap.out)["results"]
    assert ["labels" in r for r in results] == [True, False, False, True]
    errors = cap.err.strip().splitlines()
    assert len(errors) == 2 and all(e.startswith("error: ") for e in errors)


@pytest.mark.parametrize("args, words", [
    (["--labels", ","], "--labels"),
    (["--labels", "a,,b"], "--labels"),
    (["--labels", "a,a"], "given twice"),
    (["--labels", "a,b", "--template", "a photo"], "template"),
])
def test_bad_options_are_one_line_and_exit_2(args, words, encoder_bundles, folder, capsys):
    assert main(["classify", str(encoder_bundles["clip"][2]), str(folder), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1


def test_not_a_bundle_is_one_line(tmp_path, folder, capsys):
    assert main(["classify", str(tmp_path), str(folder), "--labels", "a,b"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a vlmedge bundle" in err and len(err.splitlines()) == 1


def test_a_built_in_captioning_model_is_refused_before_any_export(folder, capsys):
    assert main(["classify", "shapes-vlm", str(folder), "--labels", "a,b"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a dual encoder" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("args", [["caption", "{b}", "{img}"], ["vqa", "{b}", "{img}", "what is it ?"],
                                  ["chat", "{b}", "--image", "{img}", "hi"], ["run", "{b}", "{img}", "--task", "<OD>"]])
def test_generating_commands_refuse_a_dual_encoder_in_one_line(args, encoder_bundles, folder, capsys):
    sub = {"b": str(encoder_bundles["clip"][2]), "img": str(folder / "scene-0.png")}
    assert main([a.format(**sub) for a in args]) == 2
    errors = [e for e in capsys.readouterr().err.splitlines() if e.startswith("error:")]
    assert len(errors) == 1 and "bug" not in errors[0], errors
