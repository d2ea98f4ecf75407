"""`make gpu-check`'s verdicts: token agreement with the differences shown, and parts that cannot run
reported as such while the rest goes on (the whole check runs in `make gpu-check`, not here)."""

from vlmedge.gpucheck import Check, NotRun, _agreement


def test_agreement_counts_identical_sequences_and_shows_differences():
    ref = {"captions": [("a red circle", [1, 2]), ("a blue square", [3, 4])], "answers": [("red", [1])]}
    got = {"captions": [("a red circle", [1, 2]), ("a blue circle", [3, 5])], "answers": [("red", [1])]}
    a = _agreement(got, ref)
    assert (a["identical"], a["total"], a["agreement"]) == (2, 3, 0.6667)
    assert a["differences"] == [{"kind": "captions", "index": 1, "cpu_fp32": "a blue square", "here": "a blue circle"}]


def test_a_part_that_cannot_run_says_why_and_the_rest_goes_on(capsys):
    c = Check()

    def no_gpu():
        raise NotRun("no CUDA device visible")

    def broken():
        raise RuntimeError("engine build failed\nsecond line")

    assert c.part("a", no_gpu) is None
    assert c.part("b", broken) is None
    assert c.part("c", lambda: {"x": 1}) == {"x": 1}
    assert [(p["name"], p["status"], p["reason"]) for p in c.parts] == [
        ("a", "not run", "no CUDA device visible"), ("b", "failed", "RuntimeError: engine build failed"), ("c", "ok", "")]
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[not run] a") and out[0].endswith(": no CUDA device visible")


def test_a_bundle_of_any_family_is_checked_against_its_own_cpu_tokens(prefix_bundles, tmp_path, capsys):
    """`--bundle`: the given bundle instead of the built-in models; on a machine without a GPU its CPU reference
    runs and every GPU part says why it did not (the exit status stays 0)."""
    import json

    from vlmedge.gpucheck import main

    path = prefix_bundles("idefics")[2]
    assert main(["--bundle", str(path), "--scenes", "2", "--out", str(tmp_path / "g.json"), "--work", str(tmp_path / "w")]) == 0
    parts = {p["name"]: p for p in json.loads((tmp_path / "g.json").read_text())["parts"]}
    assert parts[f"bundle idefics: {path}"]["status"] == "ok" and parts[f"bundle idefics: {path}"]["family"] == "idefics"
    assert parts["reference: idefics CPU FP32 tokens and latency"]["status"] == "ok"
    gpu = [p for name, p in parts.items() if name.startswith("idefics/fp32: ")]
    assert len(gpu) == 4 and all(p["status"] == "not run" and p["reason"] for p in gpu)  # build, TensorRT, ORT CUDA, ORT TRT
    assert not any("shapes" in name for name in parts)
