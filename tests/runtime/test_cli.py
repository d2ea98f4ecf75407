"""`vlmedge caption` / `vlmedge vqa`: output, JSON, and one line per bad input with the others still run."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from vlmedge.cli import main
from vlmedge.data.scenes import scenes


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    scs = list(scenes("test", 200, 3))
    for i, s in enumerate(scs):
        s.pil().save(d / f"scene-{i}.png")
    return d, scs


def test_caption_a_directory(shapes, images, capsys):
    d, scs = images
    assert main(["caption", str(shapes), str(d)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"{d / f'scene-{i}.png'}: {s.caption}" for i, s in enumerate(scs)]


def test_vqa_json_with_beams(shapes, images, capsys):
    d, scs = images
    q = "how many small objects are there ?"
    assert main(["vqa", str(shapes), str(d / "scene-0.png"), q, "--json", "--beams", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    (r,) = out["results"]
    assert r["answer"] == str(sum(o.size == "small" for o in scs[0].objects))
    assert r["ids"][-1] == 4 and out["question"] == q


def test_bad_images_are_reported_one_line_each_and_the_rest_still_run(shapes, images, tmp_path, capsys):
    d, scs = images
    (tmp_path / "empty.png").write_bytes(b"")
    data = (d / "scene-1.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("hello")
    Image.new("RGB", (2000, 1000)).save(tmp_path / "huge.png")
    args = [str(d / "scene-0.png"), str(tmp_path / "empty.png"), str(tmp_path / "cut.png"), str(tmp_path / "text.png"),
            str(tmp_path / "missing.png"), str(tmp_path / "huge.png"), str(d / "scene-2.png")]
    assert main(["caption", str(shapes), *args, "--max-pixels", "1000000", "--json"]) == 2
    cap = capsys.readouterr()
    results = json.loads(cap.out)["results"]
    assert [r.get("caption") for r in results] == [scs[0].caption, None, None, None, None, None, scs[2].caption]
    errors = cap.err.strip().splitlines()
    assert len(errors) == 5 and all(line.startswith("error: ") for line in errors)
    for name, words in [("empty.png", "empty file"), ("cut.png", "truncated"), ("text.png", "not an image"),
                        ("missing.png", "no such file"), ("huge.png", "over the limit of 1,000,000")]:
        assert any(name in e and words in e for e in errors), (name, errors)


@pytest.mark.parametrize("question, words", [("  ", "empty"), (" ".join(["what"] * 40), "maximum of 32")])
def test_bad_questions(shapes, images, capsys, question, words):
    assert main(["vqa", str(shapes), str(images[0] / "scene-0.png"), question]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_bad_bundles(shapes, images, tmp_path, capsys):
    import shutil

    img = str(images[0] / "scene-0.png")
    missing = tmp_path / "missing"
    shutil.copytree(shapes, missing)
    (missing / "decoder.onnx").unlink()
    schema = tmp_path / "schema"
    shutil.copytree(shapes, schema)
    m = json.loads((schema / "manifest.json").read_text())
    m["schema_version"] = 99
    (schema / "manifest.json").write_text(json.dumps(m))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(shapes, corrupt)
    (corrupt / "vision_encoder.onnx").write_bytes(b"\x00garbage")
    for bundle, words in [(missing, "decoder.onnx: missing"), (schema, "schema_version 99 is not supported"),
                          (corrupt, "sha256 does not match"), (tmp_path / "nope", "not a bundle directory")]:
        assert main(["caption", str(bundle), img]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err


def test_builtin_name_is_exported_once_then_cached(images, tmp_path):
    env = {"VLMEDGE_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "vlmedge.cli", "caption", "shapes-vlm", str(images[0] / "scene-0.png")]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr
    assert "exporting the built-in model shapes-vlm once" in first.stderr
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0 and "exporting" not in second.stderr
    assert first.stdout == second.stdout == images[1][0].caption + "\n"
