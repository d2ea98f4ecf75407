"""A bundle or an engine directory is untrusted input: every hostile one below is refused with one
line naming the field (a BundleError or BuildError; through the CLI, exit status 2 and one stderr
line), never a KeyError, TypeError, MemoryError, RecursionError or a read outside the directory.

Each case copies the session's bundle of the shipped model and edits it; nothing is exported again.
"""

import json
import math
import shutil
import subprocess
import sys

import pytest

import vlmedge
from vlmedge.cli import main
from vlmedge.errors import BuildError, BundleError
from vlmedge.runtime.bundle import check_graph_io, load_bundle, sha256_file
from vlmedge.tensorrt.engines import read_engine_manifest, verify_plans, write_engine_manifest


def _set(path: str, value):
    """An edit that sets manifest[path] (dotted, list indices as numbers)."""
    def edit(m, d):
        *head, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        for k in head:
            m = m[k]
        m[last] = value
    return edit


def _both(*edits):
    """Edits applied in turn (a field the production graph and its explain graph both state)."""
    def edit(m, d):
        for e in edits:
            e(m, d)
    return edit


def _rehash(graph: str):
    def edit(m, d):
        m["graphs"][graph]["sha256"] = sha256_file(d / m["graphs"][graph]["file"])
    return edit


def _swap_cross_kv(m, d):
    """cross_kv's file replaced by decoder's ONNX, its hash rewritten to match."""
    shutil.copy(d / "decoder.onnx", d / "cross_kv.onnx")
    m["graphs"]["cross_kv"]["sha256"] = sha256_file(d / "cross_kv.onnx")


def _tamper_weights(m, d):
    with open(d / "decoder.onnx.data", "r+b") as f:
        f.write(b"\x7f" * 16)  # the graph file is intact; its weights are not


def _symlink_weights_out(m, d):
    outside = d.parent / "weights.data"
    shutil.copy(d / "decoder.onnx.data", outside)
    (d / "decoder.onnx.data").unlink()
    (d / "decoder.onnx.data").symlink_to(outside)


def _symlink_tokenizer_out(m, d):
    outside = d.parent / "elsewhere.json"
    shutil.copy(d / "tokenizer.json", outside)
    (d / "tokenizer.json").unlink()
    (d / "tokenizer.json").symlink_to(outside)


def _garbage_tokenizer(m, d):
    (d / "tokenizer.json").write_text('{"model": 42}')
    m["tokenizer"]["sha256"] = sha256_file(d / "tokenizer.json")


def _drop_axis(m, d):
    del m["axes"]["past_len"]


def _fewer_layers(m, d):
    m["dims"]["decoder_layers"] = 2


def _raw(text: str):
    """The manifest file replaced by this text."""
    def edit(m, d):
        return text
    return edit


DEEP = "[" * 100_000 + "]" * 100_000

# (case, edit, where it fails: "load" = load_bundle, "open" = when the graphs' sessions open, words in the message)
MANIFESTS = [
    ("traversal", _set("graphs.vision_encoder.file", "../vision_encoder.onnx"), "load", "graphs.vision_encoder.file"),
    ("traversal-deep", _set("tokenizer.file", "a/../../../etc/passwd"), "load", "tokenizer.file"),
    ("absolute", _set("tokenizer.file", "/etc/passwd"), "load", "tokenizer.file: '/etc/passwd' is an absolute path"),
    ("nul-in-name", _set("graphs.decoder.file", "decoder.onnx\u0000x"), "load", "graphs.decoder.file"),
    ("symlink-escape", _symlink_tokenizer_out, "load", "leads outside"),
    ("weights-tampered", _tamper_weights, "load", "decoder.onnx.data: sha256 does not match manifest.json graphs.decoder.data_sha256"),
    ("weights-missing", lambda m, d: (d / "decoder.onnx.data").unlink(), "load", "decoder.onnx.data: missing"),
    ("weights-symlink-escape", _symlink_weights_out, "load", "leads outside"),
    ("swapped-graph", _swap_cross_kv, "open", "graphs.cross_kv.inputs"),
    ("wrong-dtype", _set("graphs.vision_encoder.inputs.0.dtype", "float16"), "open",
     "pixel_values is float32, but manifest.json graphs.vision_encoder.inputs[0].dtype says float16"),
    ("wrong-fixed-dim", _both(_set("graphs.decoder.inputs.4.shape.1", 8), _set("explain.graphs.decoder.inputs.4.shape.1", 8)),
     "open", "graphs.decoder.inputs[4].shape says 8"),
    ("explain-inputs-differ", _set("explain.graphs.decoder.inputs.4.shape.1", 8), "load",
     "explain.graphs.decoder.inputs: not the inputs of graphs.decoder"),
    ("unknown-dtype", _set("graphs.vision_encoder.outputs.0.dtype", "complex128"), "load",
     "graphs.vision_encoder.outputs[0].dtype"),
    ("negative-dim", _set("dims.decoder_heads", -4), "load", "dims.decoder_heads"),
    ("huge-axis", _set("axes.batch.max", 10**30), "load", "axes.batch.max"),
    ("huge-volume", _set("axes.batch.max", 1 << 20), "load", "graphs.vision_encoder.inputs[0].shape"),
    ("min-over-max", _set("axes.past_len.min", 60), "load", "axes.past_len"),
    ("string-for-int", _set("dims.vocab_size", "58"), "load", "dims.vocab_size: expected an integer, got a string"),
    ("bool-for-int", _set("tasks.caption.eos_id", True), "load", "tasks.caption.eos_id"),
    ("deep-nesting", _raw('{"provenance": ' + DEEP + "}"), "load", "nested too deeply"),
    ("nested-free-part", _set("provenance.x", json.loads("[" * 100 + "]" * 100)), "load", "provenance"),
    ("nested-unknown-field", _set("precision.calibration", json.loads("[" * 100 + "]" * 100)), "load",
     "precision.calibration: nested deeper than 32 levels"),
    ("not-an-object", _raw("[1, 2, 3]"), "load", "expected an object"),
    ("bad-resample", _set("preprocessing.resample", "fancy"), "load", "preprocessing.resample"),
    ("bad-mean-length", _set("preprocessing.mean", [0.5, 0.5]), "load", "preprocessing.mean"),
    ("zero-std", _set("preprocessing.std.1", 0), "load", "preprocessing.std[1]"),
    ("nan-mean", _set("preprocessing.mean.0", math.nan), "load", "preprocessing.mean[0]"),
    ("bgr", _set("preprocessing.channel_order", "BGR"), "load", "preprocessing.channel_order"),
    ("pixel-size-mismatch", _set("preprocessing.height", 32), "load", "graphs.vision_encoder.inputs[0].shape[2]"),
    ("empty-prompt", _set("tasks.caption.prompt_ids", []), "load", "tasks.caption.prompt_ids"),
    ("prompt-outside-vocab", _set("tasks.caption.prompt_ids", [58]), "load", "tasks.caption.prompt_ids[0]"),
    ("negative-max-new", _set("tasks.caption.max_new_tokens", -5), "load", "tasks.caption.max_new_tokens"),
    ("max-new-too-long", _set("tasks.caption.max_new_tokens", 48), "load", "tasks.caption.max_new_tokens"),
    ("pad-outside-vocab", _set("tasks.vqa.pad_id", 1000), "load", "tasks.vqa.pad_id"),
    ("unknown-task", _set("tasks.translate", {"encoder": "vision_encoder"}), "load", "tasks.translate"),
    ("undefined-axis", _drop_axis, "load", "axis 'past_len' is not defined"),
    ("layers-mismatch", _fewer_layers, "load", "graphs.cross_kv.outputs"),
    ("lone-surrogate", _set("family", "\ud800"), "load", "family"),
    ("tokenizer-garbage", _garbage_tokenizer, "open", "tokenizer.json: not a tokenizer"),
    ("sha-not-hex", _set("graphs.decoder.sha256", "zz"), "load", "graphs.decoder.sha256"),
]


def _make(src, root, edit):
    d = root / "b"
    shutil.copytree(src, d)
    m = json.loads((d / "manifest.json").read_text())
    text = edit(m, d)
    (d / "manifest.json").write_text(text if isinstance(text, str) else json.dumps(m))
    return d


def _one_line(e) -> str:
    text = str(e.value)
    assert "\n" not in text and text
    return text


@pytest.mark.parametrize("case, edit, stage, words", MANIFESTS, ids=[c[0] for c in MANIFESTS])
def test_hostile_manifest_is_one_line_naming_the_field(shapes, tmp_path, case, edit, stage, words):
    d = _make(shapes, tmp_path, edit)
    if stage == "load":
        with pytest.raises(BundleError) as e:
            load_bundle(d)
    else:
        load_bundle(d)  # the manifest itself is fine: the graph or tokenizer behind it is not
        with pytest.raises(BundleError) as e:
            vlmedge.load(d)
    assert words in _one_line(e)


def test_a_huge_manifest_is_refused_before_it_is_read(shapes, tmp_path):
    d = _make(shapes, tmp_path, lambda m, d: None)
    with open(d / "manifest.json", "r+b") as f:
        f.truncate(17 << 20)  # sparse: nothing is written, the size alone is over the limit
    with pytest.raises(BundleError) as e:
        load_bundle(d)
    assert "over the limit" in _one_line(e)


@pytest.mark.parametrize("case", ["traversal", "swapped-graph", "huge-axis", "deep-nesting", "tokenizer-garbage"])
def test_the_cli_says_one_line_and_exits_2(shapes, tmp_path, capsys, case):
    _, edit, _, words = next(c for c in MANIFESTS if c[0] == case)
    d = _make(shapes, tmp_path, edit)
    assert main(["caption", str(d), "scene.png"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err


def test_the_cli_in_a_fresh_process_prints_no_traceback(shapes, tmp_path):
    d = _make(shapes, tmp_path, _swap_cross_kv)
    r = subprocess.run([sys.executable, "-m", "vlmedge.cli", "caption", str(d), "scene.png"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "graphs.cross_kv.inputs" in lines[0] and "Traceback" not in r.stderr


# -- engine directories -------------------------------------------------------------------------


@pytest.fixture
def engine_dir(shapes, tmp_path):
    """An engine directory as vlmedge build writes it, with stand-in plan files (checked by hash
    before TensorRT is involved, so stand-ins are enough)."""
    d = tmp_path / "engines"
    d.mkdir()
    shutil.copy(shapes / "manifest.json", d)
    shutil.copy(shapes / "tokenizer.json", d)
    m = load_bundle(shapes).manifest
    graphs = {}
    for g, spec in m.graphs.items():
        (d / f"{g}.plan").write_bytes(f"plan of {g}".encode())
        graphs[g] = {"file": f"{g}.plan", "sha256": sha256_file(d / f"{g}.plan"), "source": spec.file,
                     "source_sha256": spec.sha256, "profile": {"x": {"min": [1], "opt": [1], "max": [8]}}, "dla_core": None}
    write_engine_manifest(d, {"tensorrt": "10.3.0", "gpu": {"name": "Orin", "compute_capability": "8.7"},
                              "flags": {"strongly_typed": True, "workspace_gib": 4.0, "dla_core": None,
                                        "version_compatible": False, "hardware_compatible": False},
                              "precision": "float32", "bundle": str(shapes), "graphs": graphs})
    return d


def _edit_engines(d, fn):
    em = json.loads((d / "engines.json").read_text())
    fn(em, d)
    (d / "engines.json").write_text(json.dumps(em))


def _tamper(em, d):
    with open(d / "decoder.plan", "ab") as f:
        f.write(b"\0")


def _plan_symlink_out(em, d):
    (d.parent / "other.plan").write_bytes((d / "vision_encoder.plan").read_bytes())
    (d / "vision_encoder.plan").unlink()
    (d / "vision_encoder.plan").symlink_to(d.parent / "other.plan")


def _eset(path, value):
    def edit(em, d):
        *head, last = path.split(".")
        for k in head:
            em = em[k]
        em[last] = value
    return edit


def _edel(path):
    def edit(em, d):
        *head, last = path.split(".")
        for k in head:
            em = em[k]
        del em[last]
    return edit


ENGINE_DIRS = [
    ("tampered-plan", _tamper, "decoder.plan: sha256 does not match engines.json graphs.decoder.sha256"),
    ("plan-traversal", _eset("graphs.vision_encoder.file", "../vision_encoder.plan"), "graphs.vision_encoder.file"),
    ("plan-absolute", _eset("graphs.text_encoder.file", "/dev/zero"), "graphs.text_encoder.file"),
    ("plan-symlink-escape", _plan_symlink_out, "leads outside"),
    ("plan-missing", lambda em, d: (d / "cross_kv.plan").unlink(), "cross_kv.plan: missing"),
    ("no-plan-hash", _edel("graphs.vision_encoder.sha256"), "graphs.vision_encoder.sha256: missing"),
    ("bad-version", _eset("tensorrt", "ten"), "tensorrt: 'ten' is not a version number"),
    ("cc-as-number", _eset("gpu.compute_capability", 8.7), "gpu.compute_capability"),
    ("huge-profile", _eset("graphs.decoder.profile", {"x": {"min": [1], "opt": [1], "max": [10**30]}}),
     "graphs.decoder.profile.x.max[0]"),
    ("flag-as-string", _eset("flags.version_compatible", "yes"), "flags.version_compatible"),
    ("unknown-graph", _eset("graphs.extra", {"file": "x.plan", "sha256": "0" * 64}), "graphs.extra"),
]


@pytest.mark.parametrize("case, edit, words", ENGINE_DIRS, ids=[c[0] for c in ENGINE_DIRS])
def test_hostile_engine_directory_is_one_line_before_tensorrt(engine_dir, case, edit, words):
    _edit_engines(engine_dir, edit)
    with pytest.raises(BuildError) as e:
        verify_plans(engine_dir, read_engine_manifest(engine_dir))
    assert words in _one_line(e)


def test_a_sound_engine_directory_passes_and_the_cli_refuses_a_tampered_plan(engine_dir, capsys):
    verify_plans(engine_dir, read_engine_manifest(engine_dir))
    _tamper(None, engine_dir)
    assert main(["caption", str(engine_dir), "scene.png"]) == 2  # refused before TensorRT is imported
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "decoder.plan: sha256 does not match" in err[0]


def test_engine_io_is_checked_against_the_manifest_as_tensorrt_reports_it(shapes):
    """The TensorRT backend's view of an engine: numpy dtype names, -1 for a dynamic dimension,
    inputs the family ignores left out."""
    m = load_bundle(shapes).manifest
    io = lambda g: [[(t.name, t.dtype, tuple(-1 if isinstance(d, str) else d for d in t.shape)) for t in ts]  # noqa: E731
                    for ts in (m.graphs[g].inputs, m.graphs[g].outputs)]
    ins, outs = io("decoder")
    check_graph_io("decoder.plan", "decoder", m.graphs["decoder"], ins[:2], outs, unused_inputs_ok=True)
    with pytest.raises(BundleError, match="decoder.plan: not the graph manifest.json describes for graphs.decoder.inputs"):
        check_graph_io("decoder.plan", "decoder", m.graphs["decoder"], *io("cross_kv"), unused_inputs_ok=True)
    half = [(n, "float16" if dt == "float32" else dt, s) for n, dt, s in outs]
    with pytest.raises(BundleError, match="logits is float16, but manifest.json graphs.decoder.outputs\\[0\\].dtype"):
        check_graph_io("decoder.plan", "decoder", m.graphs["decoder"], ins, half)
    with pytest.raises(BundleError, match="has rank 3"):
        check_graph_io("vision_encoder.plan", "vision_encoder", m.graphs["vision_encoder"],
                       [("pixel_values", "float32", (-1, 3, 64))], io("vision_encoder")[1])
