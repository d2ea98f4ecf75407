"""What of the TensorRT path runs without a GPU: profiles from every family's manifest, the engine
manifest checks, ONNX Runtime's TensorRT EP options, and clear errors without TensorRT."""

import subprocess
import sys

import pytest

from vlmedge.cli import main
from vlmedge.errors import BuildError, InputError
from vlmedge.runtime.bundle import AxisRange, load_bundle, sha256_file
from vlmedge.tensorrt.engines import check_engine_manifest, read_engine_manifest, write_engine_manifest
from vlmedge.tensorrt.profiles import graph_profile, ort_tensorrt_options, parse_overrides, profiles

ALL = ["blip-caption", "blip-vqa", "vit-gpt2", "vit-bert", "shapes-vlm"]


@pytest.mark.parametrize("name", ALL)
def test_profiles_cover_every_input_within_the_declared_axes(bundles, name):
    m = load_bundle(bundles[name][2]).manifest
    ps = profiles(m)
    assert set(ps) == set(m.graphs)
    for graph, profile in ps.items():
        assert [t.name for t in m.graphs[graph].inputs] == list(profile)
        for t in m.graphs[graph].inputs:
            dims = profile[t.name]
            for i, d in enumerate(t.shape):
                lo, opt, hi = dims["min"][i], dims["opt"][i], dims["max"][i]
                assert 1 <= lo <= opt <= hi  # never a zero-length input
                if isinstance(d, int):
                    assert lo == opt == hi == d
                else:
                    assert (lo, opt, hi) == (m.axes[d].min, m.axes[d].opt, m.axes[d].max)
    step = ps["decoder_step"]
    past = step["past.0.self.key"]
    assert past["max"][0] == m.axes["batch"].max and past["max"][2] == m.axes["past_len"].max


def test_profile_overrides(bundles):
    m = load_bundle(bundles["shapes-vlm"][2]).manifest
    o = parse_overrides(["batch=1:2:4"])
    assert o == {"batch": AxisRange(1, 2, 4)}
    assert graph_profile(m, "vision_encoder", o)["pixel_values"] == {"min": (1, 3, 64, 64), "opt": (2, 3, 64, 64), "max": (4, 3, 64, 64)}
    with pytest.raises(InputError, match="expected AXIS=MIN:OPT:MAX"):
        parse_overrides(["batch=4"])
    with pytest.raises(InputError, match="outside the bundle's range"):
        graph_profile(m, "vision_encoder", parse_overrides(["batch=1:1:64"]))
    with pytest.raises(InputError, match="has no axis 'beams'"):
        graph_profile(m, "vision_encoder", parse_overrides(["beams=1:1:2"]))


def test_ort_tensorrt_ep_options(bundles, tmp_path):
    m = load_bundle(bundles["shapes-vlm"][2]).manifest
    opts = ort_tensorrt_options(graph_profile(m, "decoder_step"), str(tmp_path))
    assert opts["trt_profile_min_shapes"].startswith("input_ids:1x1,encoder_mask:1x1,past.0.self.key:1x4x1x32")
    assert "past.0.self.key:16x4x47x32" in opts["trt_profile_max_shapes"]
    assert opts["trt_engine_cache_path"] == str(tmp_path) and opts["trt_engine_cache_enable"] == "True"


def _engine_manifest(m, **over):
    em = {"tensorrt": "10.3.0", "gpu": {"name": "Orin", "compute_capability": "8.7"},
          "flags": {"version_compatible": False, "hardware_compatible": False},
          "graphs": {g: {"file": f"{g}.plan", "sha256": "0" * 64, "source_sha256": s.sha256} for g, s in m.graphs.items()}}
    em.update(over)
    return em


def test_engine_manifest_checks(bundles, tmp_path):
    m = load_bundle(bundles["shapes-vlm"][2]).manifest
    write_engine_manifest(tmp_path, _engine_manifest(m))
    em = read_engine_manifest(tmp_path)
    check_engine_manifest(em, m, "10.3.0", "8.7")  # the same TensorRT and GPU: fine
    with pytest.raises(BuildError, match="built with TensorRT 10.3.0, this is TensorRT 10.7.0; rebuild"):
        check_engine_manifest(em, m, "10.7.0", "8.7")
    with pytest.raises(BuildError, match="built for compute capability 8.7 \\(Orin\\), this GPU is 9.0; rebuild"):
        check_engine_manifest(em, m, "10.3.0", "9.0")
    changed = _engine_manifest(m)
    changed["graphs"]["decoder_step"]["source_sha256"] = "0" * 64
    with pytest.raises(BuildError, match="decoder_step.plan was built from a different decoder_step.onnx"):
        check_engine_manifest(changed, m, "10.3.0", "8.7")
    compatible = _engine_manifest(m, flags={"version_compatible": True, "hardware_compatible": True})
    check_engine_manifest(compatible, m, "10.8.0", "9.0")  # later 10.x, another Ampere+ GPU
    with pytest.raises(BuildError, match="run on 10.x >= 10.3.0, not 11.0.0"):
        check_engine_manifest(compatible, m, "11.0.0", "9.0")
    with pytest.raises(BuildError, match="need an Ampere or newer GPU"):
        check_engine_manifest(compatible, m, "10.3.0", "7.5")
    (tmp_path / "engines.json").write_text('{"schema_version": 9}')
    with pytest.raises(BuildError, match="schema_version 9 is not supported"):
        read_engine_manifest(tmp_path)
    with pytest.raises(BuildError, match="is not an engine directory"):
        read_engine_manifest(tmp_path / "nope")


def test_build_without_tensorrt_is_one_line_and_writes_nothing(bundles, tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401  (only whether it imports)
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    assert main(["build", str(bundles["shapes-vlm"][2]), "--out", str(tmp_path / "engines")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install tensorrt" in err and "system TensorRT" in err
    assert not (tmp_path / "engines").exists()


def test_tensorrt_modules_import_nothing_heavy():
    code = ("import sys, vlmedge.tensorrt.profiles, vlmedge.tensorrt.engines, vlmedge.tensorrt.builder;"
            "print([m for m in ('tensorrt', 'torch', 'pycuda', 'cuda') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_an_engine_directory_without_tensorrt_is_one_clear_error(bundles, tmp_path, capsys):
    import shutil

    try:
        import tensorrt  # noqa: F401  (only whether it imports)
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    src = bundles["shapes-vlm"][2]
    d = tmp_path / "engines"
    d.mkdir()
    for f in ("manifest.json", "tokenizer.json"):
        shutil.copy2(src / f, d / f)
    m = load_bundle(src).manifest
    em = _engine_manifest(m)
    for g, e in em["graphs"].items():  # stand-in plans with their hashes: the directory is sound
        (d / e["file"]).write_bytes(g.encode())
        e["sha256"] = sha256_file(d / e["file"])
    write_engine_manifest(d, em)
    img = tmp_path / "x.png"
    from vlmedge.data.scenes import scenes

    next(scenes("test", 0, 1)).pil().save(img)
    assert main(["caption", str(d), str(img)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install tensorrt" in err
