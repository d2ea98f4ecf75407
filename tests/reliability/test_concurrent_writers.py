"""Two processes writing one output: one export wins and the other is refused with one line; two
first uses of the built-in model share one export, and a broken cache entry is exported again."""

import shutil

from crash_helpers import leftovers, one_line

from vlmedge.data.scenes import scenes
from vlmedge.runtime.bundle import load_bundle


def test_two_exports_to_one_out_one_wins_one_is_refused(cli, tiny_models, tmp_path):
    out = tmp_path / "bundle"
    runs = [cli.start("export", tiny_models["vit-gpt2"], "--out", out) for _ in range(2)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in runs]
    assert sorted(code for code, _, _ in results) == [0, 2], results
    _, _, err = next(r for r in results if r[0] == 2)
    line = one_line(err)
    # refused while the other writes it, or (if it came late) because the other's bundle is there now
    assert str(out) in line and ("another vlmedge process" in line or "--force" in line), line
    load_bundle(out)  # the winner's bundle, whole
    assert leftovers(out) == []


def test_concurrent_first_uses_share_one_export_and_a_broken_entry_heals(cli, bundles, tmp_path, monkeypatch):
    from vlmedge.runtime.pipeline import cache_entry

    monkeypatch.setenv("VLMEDGE_CACHE", cli.env["VLMEDGE_CACHE"])
    entry = cache_entry("shapes-vlm")
    shutil.copytree(bundles["shapes-vlm"][2], entry)
    (entry / "decoder.onnx").unlink()  # half deleted: the manifest is there, a graph is not
    scene = next(scenes("test", 0, 1))
    image = tmp_path / "scene.png"
    scene.pil().save(image)

    users = [cli.start("caption", "shapes-vlm", image) for _ in range(2)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in users]
    for code, stdout, stderr in results:
        assert code == 0, stderr
        assert stdout.strip() == scene.caption
    stderr = "".join(err for _, _, err in results)
    assert stderr.count("exporting the built-in model shapes-vlm once") == 1, stderr
    load_bundle(entry)  # healed: every graph there and matching its hash
    assert leftovers(entry) == []
