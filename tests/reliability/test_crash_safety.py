"""kill -9 (or a power cut) in the middle of a real export or quantize: the old output stays whole or
the new one is complete, and the next run clears what the killed one left."""

import json
import shutil
import signal

from crash_helpers import leftovers, tree

from vlmedge.runtime.bundle import load_bundle

KILLED = -signal.SIGKILL


def _calib_source(path):
    return json.loads((path / "manifest.json").read_text())["precision"]["calibration"]["source"]


def test_export_killed_before_the_swap_keeps_the_old_bundle_and_the_next_export_clears_up(
        cli, bundles, tiny_models, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(bundles["vit-gpt2"][2], out)  # the old bundle: batch up to 16
    old = tree(out)
    args = ["export", tiny_models["vit-gpt2"], "--out", out, "--max-batch", "4", "--force"]

    r = cli(*args, kill_at="commit")  # every graph written, validated and synced; killed before the swap
    assert r.returncode == KILLED, r.stderr
    assert tree(out) == old
    assert len(leftovers(out)) == 1  # the killed export's temp dir, as a power cut leaves it

    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert leftovers(out) == []
    assert load_bundle(out).manifest.axes["batch"].max == 4  # the new bundle, whole (hashes checked)


def test_quantize_killed_at_every_stage_leaves_old_or_new_whole(cli, bundles, tmp_path):
    src = bundles["vit-gpt2"][2]
    out = tmp_path / "fp16"

    def quantize(n, kill_at=None):
        return cli("quantize", src, "--out", out, "--precision", "fp16", "--calib", f"synthetic:{n}", "--held-out", "4", "--force",
                   kill_at=kill_at)

    assert quantize(8).returncode == 0
    old = tree(out)
    for stage in ("begin", "commit"):  # before the swap: the old variant, untouched
        r = quantize(10, stage)
        assert r.returncode == KILLED, r.stderr
        assert tree(out) == old, stage
        assert len(leftovers(out)) == 1, stage  # its own temp dir; the one before it was cleared
    r = quantize(10, "swapped")  # after the swap, before the old one is removed: the new variant, whole
    assert r.returncode == KILLED, r.stderr
    load_bundle(out)
    assert _calib_source(out) == "synthetic:14" and tree(out) != old
    assert len(leftovers(out)) == 1  # the old variant, swapped out and not yet removed

    r = quantize(12)
    assert r.returncode == 0, r.stderr
    assert leftovers(out) == []
    load_bundle(out)
    assert _calib_source(out) == "synthetic:16"
