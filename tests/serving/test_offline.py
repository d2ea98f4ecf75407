"""`vlmedge caption DIR --out FILE.jsonl`: a killed run resumes to the file an uninterrupted run writes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from vlmedge.data.scenes import scenes
from vlmedge.errors import InputError
from vlmedge.serving.offline import read_done


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    d = tmp_path_factory.mktemp("many")
    for i, s in enumerate(scenes("test", 400, 40)):
        s.pil().save(d / f"scene-{i:03d}.png")
    return d


def _caption(shapes, d, out, *extra):
    cmd = [sys.executable, "-m", "vlmedge.cli", "caption", str(shapes), str(d), "--out", str(out), "--batch-size", "1", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_a_killed_run_resumes_to_the_uninterrupted_result(shapes, many, tmp_path):
    full, cut = tmp_path / "full.jsonl", tmp_path / "cut.jsonl"
    p = _caption(shapes, many, full, "--beams", "2")
    assert p.wait(120) == 0, p.stderr.read()
    expected = full.read_text()
    assert len(expected.splitlines()) == 40 and all("caption" in json.loads(x) for x in expected.splitlines())

    p = _caption(shapes, many, cut, "--beams", "2")
    while not (cut.exists() and cut.read_text().count("\n") >= 3):
        assert p.poll() is None, "the run finished before it could be killed"
        time.sleep(0.002)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    killed = cut.read_text()
    assert killed.count("\n") < 40
    with open(cut, "a") as f:  # as if it died in the middle of a line
        f.write('{"image": "half')
    p = _caption(shapes, many, cut, "--beams", "2")
    assert p.wait(120) == 0, p.stderr.read()
    assert cut.read_text() == expected
    assert f"{killed.count(chr(10))} already there" in p.stderr.read()


def test_a_file_that_is_not_an_earlier_run_is_refused(tmp_path):
    f = tmp_path / "notes.jsonl"
    f.write_text('{"image": "a.png", "caption": "x"}\nhello\n{"image": "b.png"}\n')
    with pytest.raises(InputError, match=r"notes.jsonl:2: not a JSON line of an earlier run"):
        read_done(f)
