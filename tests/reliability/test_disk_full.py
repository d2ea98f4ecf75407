"""A disk that fills up during quantize or compare, or a read-only one: one line naming the path,
exit 2, no traceback, the old output untouched and nothing half-written beside it. Runs on small
tmpfs mounts, so as root only."""

import os
import subprocess
from pathlib import Path

import pytest
from crash_helpers import leftovers, one_line, tree

from vlmedge.runtime.bundle import load_bundle


def _mount(mnt: Path, options: str):
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    """A 1.8 MB tmpfs: room for one tiny FP16 variant (~1.2 MB), not for a second beside it."""
    yield from _mount(tmp_path / "disk", "size=1800k")


@pytest.fixture
def read_only_disk(tmp_path):
    yield from _mount(tmp_path / "ro", "ro,size=64k")


def test_a_read_only_file_system_is_one_line(cli, read_only_disk):
    for args in (["scenes", "--out", read_only_disk / "scenes", "--count", "1"],  # an OSError the command does not expect
                 ["export", "shapes-vlm", "--out", read_only_disk / "bundle"]):
        r = cli(*args)
        assert r.returncode == 2, r.stderr
        line = one_line(r)
        assert str(read_only_disk) in line and "Read-only file system" in line, line
    r = cli("--verbose", "scenes", "--out", read_only_disk / "scenes", "--count", "1")
    assert r.returncode == 2 and "Traceback" in r.stderr and "EROFS" in r.stderr.splitlines()[-1]


def _fill(disk: Path) -> None:
    """Take all the space left."""
    with open(disk / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def test_quantize_onto_a_full_disk_is_one_line_and_keeps_the_old_variant(cli, bundles, small_disk):
    src, out = bundles["vit-gpt2"][2], small_disk / "fp16"
    args = ["quantize", src, "--out", out, "--precision", "fp16", "--calib", "synthetic:8", "--force"]
    assert cli(*args).returncode == 0
    old = tree(out)
    _fill(small_disk)

    r = cli(*args)  # the new variant does not fit beside the old one
    assert r.returncode == 2, r.stderr
    line = one_line(r)
    assert "No space left on device" in line and str(out) in line, line
    assert tree(out) == old and leftovers(out) == []
    load_bundle(out)

    r = cli("--verbose", *args)  # a traceback only when asked for
    assert r.returncode == 2 and "Traceback" in r.stderr and "No space left on device" in r.stderr


def test_compare_onto_a_full_disk_keeps_the_old_report_whole(cli, bundles, small_disk):
    src, out = bundles["vit-gpt2"][2], small_disk / "report"
    args = ["compare", src, src, "--eval", "synthetic:2", "--runs", "1", "--out", out]
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    old = tree(out)
    assert sorted(old) == ["plot.png", "report.json", "report.md"]
    _fill(small_disk)

    r = cli(*args)
    assert r.returncode == 2, r.stderr
    line = one_line(r)
    assert "No space left on device" in line and str(out) in line, line
    assert tree(out) == old and leftovers(out) == []
