"""Bad input to `vlmedge export`, and models that fail to export: one line naming the cause, non-zero exit,
nothing left in --out; `--verbose` adds the trace."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch



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
    graphs = ("vision_encoder", "text_encoder", "cross_kv", "decoder")
    explain = {"decoder_explain.onnx", "text_encoder_explain.onnx"}  # their weights: the production graphs' files
    assert {p.name for p in out.iterdir()} == {"manifest.json", "tokenizer.json", *explain,
                                               *(f"{g}.onnx{x}" for g in graphs for x in ("", ".data"))}
    code, _, r = run_cli("inspect", out)
    assert code == 0, r.stderr
    for word in ("decoder", "attention_mask", "past.0.self.key", "past_len", "validation", "passed", "explain graphs"):
        assert word in r.stdout


# Models that fail inside `vlmedge export`: the shipped model with one graph replaced. Each replacement
# outputs the shipped encoder's real states (so the other graphs prepare as usual) and fails in its own way.

class _Adapter:
    """The shipped model's adapter with some of its graphs replaced."""

    def __init__(self, base, **graphs):
        self._base, self._graphs = base, graphs

    def __getattr__(self, name):
        return self._graphs[name] if name in self._graphs else getattr(self._base, name)


class _States(torch.nn.Module):
    """pixel_values -> the shipped encoder's states for one image, repeated over the batch."""

    def __init__(self, states):
        super().__init__()
        self.register_buffer("states", states)

    def forward(self, pixel_values):
        return self.states.expand(pixel_values.shape[0], -1, -1) + self.extra(pixel_values)

    def extra(self, pixel_values):
        return 0.0


class DataDependentBranch(_States):
    def extra(self, pixel_values):
        if pixel_values.mean() > -1e9:  # a Python branch on a tensor's value: torch.export cannot trace it
            return 0.0
        return 1.0


class UnsupportedOp(_States):
    def extra(self, pixel_values):
        return torch.linalg.eig(pixel_values[:, 0, :3, :3])[0].real.sum() * 0  # no ONNX function for eig


class RaisesWhileExporting(_States):
    def extra(self, pixel_values):
        if torch.compiler.is_exporting():
            raise ValueError("pixel_values: this encoder refuses to be exported\nsecond line")
        return 0.0


class FlatStates(_States):
    def forward(self, pixel_values):  # [B, D], not [B, N, D]: the question encoder cannot attend to it
        return self.states[0].expand(pixel_values.shape[0], -1)


@pytest.fixture(scope="module")
def shipped_adapter():
    from vlmedge.export.samples import sample_inputs
    from vlmedge.models.registry import load_adapter

    adapter = load_adapter("shapes-vlm")
    with torch.no_grad():
        states = adapter.vision_encoder()(sample_inputs(adapter, n=1, tasks=["caption"]).pixel_values)
    return adapter, states


def export_in_process(monkeypatch, capfd, shipped_adapter, encoder, out, *flags):
    """`vlmedge [flags] export shapes-vlm` with the vision encoder replaced: (exit code, stderr lines, stderr)."""
    import vlmedge.models.registry as registry
    from vlmedge.cli import main

    adapter, states = shipped_adapter
    monkeypatch.setattr(registry, "load_adapter", lambda *a, **k: _Adapter(adapter, vision_encoder=lambda: encoder(states)))
    code = main([*flags, "export", "shapes-vlm", "--out", str(out)])
    err = capfd.readouterr().err
    return code, [l for l in err.splitlines() if l.strip()], err


def assert_one_line_export_error(result, *needles):
    code, lines, err = result
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert "Failed to export the model" not in err and "step 1/3" not in err  # torch's banner, not the cause
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_data_dependent_branch_names_the_graph_and_the_line(monkeypatch, capfd, shipped_adapter, tmp_path):
    line = assert_one_line_export_error(export_in_process(monkeypatch, capfd, shipped_adapter, DataDependentBranch, tmp_path / "out"),
                                        "graph vision_encoder: torch.export failed:", "data-dependent",
                                        f"(at {Path(__file__).name}:", "in extra)")
    assert "GuardOnDataDependentSymNode" in line
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path, "out")


def test_unsupported_op_names_the_op(monkeypatch, capfd, shipped_adapter, tmp_path):
    line = assert_one_line_export_error(export_in_process(monkeypatch, capfd, shipped_adapter, UnsupportedOp, tmp_path / "out"),
                                        "graph vision_encoder: ONNX conversion failed:", "aten.linalg_eig")
    assert "step 3/3" not in line


def test_error_raised_in_forward_is_the_cause(monkeypatch, capfd, shipped_adapter, tmp_path):
    line = assert_one_line_export_error(export_in_process(monkeypatch, capfd, shipped_adapter, RaisesWhileExporting, tmp_path / "out"),
                                        "graph vision_encoder: torch.export failed: ValueError: pixel_values: this encoder refuses",
                                        "in extra)")
    assert "second line" not in line


def test_failure_while_preparing_example_inputs(monkeypatch, capfd, shipped_adapter, tmp_path):
    assert_one_line_export_error(export_in_process(monkeypatch, capfd, shipped_adapter, FlatStates, tmp_path / "out"),
                                 "preparing example inputs:")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path, "out")


def test_verbose_shows_the_whole_trace(monkeypatch, capfd, shipped_adapter, tmp_path):
    code, lines, err = export_in_process(monkeypatch, capfd, shipped_adapter, RaisesWhileExporting, tmp_path / "out", "--verbose")
    assert code == 2
    assert "Traceback (most recent call last)" in err and "raise ValueError" in err  # the cause's own frames
    assert lines[-1].startswith("error: graph vision_encoder: torch.export failed: ValueError:"), lines[-1]
