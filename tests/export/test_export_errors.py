"""Bad input to `vlmedge export`: one line, non-zero exit, nothing left in --out."""

import json
import shutil
import subprocess
import sys



def run_cli(*args):
    r = subprocess.run([sys.executable, "-m", "vlmedge.cli", *map(str, args)], capture_output=True, text=True, timeout=300)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    return r.returncode, lines, r


def assert_one_line_error(args, *needles):
    code, lines, r = run_cli(*args)
    assert code != 0, r.stdout
    assert "Traceback" not in r.stderr
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def leftovers(parent, name):
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.tmp")]


def test_unknown_architecture_lists_the_supported_ones(tmp_path):
    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text(json.dumps({"architectures": ["FlamingoForCausalLM"]}))
    msg = assert_one_line_error(["export", m, "--out", tmp_path / "out"], "FlamingoForCausalLM", "BlipForQuestionAnswering")
    assert "shapes-vlm" in msg
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path, "out")


def test_unknown_name(tmp_path):
    assert_one_line_error(["export", "no-such-model", "--out", tmp_path / "out"], "no-such-model", "shapes-vlm")


def test_directory_with_no_model(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(["export", tmp_path / "empty", "--out", tmp_path / "out"], "config.json")


def test_weights_that_fail_to_load(tiny_models, tmp_path):
    m = tmp_path / "m"
    shutil.copytree(tiny_models["vit-gpt2"], m)
    (m / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    assert_one_line_error(["export", m, "--out", tmp_path / "out"], str(m), "fail to load")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path, "out")


def test_existing_out_needs_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_line_error(["export", "shapes-vlm", "--out", out], "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_unwritable_out(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    assert_one_line_error(["export", "shapes-vlm", "--out", blocker / "bundle"], "--out", "cannot write")


def test_task_the_family_does_not_support(tiny_models, tmp_path):
    assert_one_line_error(["export", tiny_models["vit-gpt2"], "--task", "vqa", "--out", tmp_path / "out"],
                          "--task vqa", "caption")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path, "out")


def test_export_and_inspect_from_the_cli(tmp_path):
    out = tmp_path / "bundle"
    code, _, r = run_cli("export", "shapes-vlm", "--out", out)
    assert code == 0, r.stderr
    assert {p.name for p in out.iterdir()} == {"manifest.json", "tokenizer.json", "vision_encoder.onnx", "text_encoder.onnx",
                                               "decoder_init.onnx", "decoder_step.onnx"}
    code, _, r = run_cli("inspect", out)
    assert code == 0, r.stderr
    for word in ("decoder_step", "past.0.self.key", "past_len", "validation", "passed"):
        assert word in r.stdout
