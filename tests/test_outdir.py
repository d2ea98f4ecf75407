"""The output writer: a directory appears whole or the old one stays, one writer at a time, and what
dead writers left is cleared by the next one."""

import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest

from vlmedge import outdir
from vlmedge.errors import InputError, OutputError
from vlmedge.outdir import KILL_ENV, OutputDir, check_out, write_file_atomic


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _siblings(target):
    """What lies beside the target other than itself and its lock file."""
    return sorted(p.name for p in target.parent.iterdir() if p.name not in (target.name, f".{target.name}.lock"))


def _write(target, files, force=True):
    with OutputDir(target, force) as w:
        for name, text in files.items():
            (w.path / name).write_text(text)
        w.commit()


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# A writer in its own process: writes NEW into TARGET and, with VLMEDGE_KILL_AT set, dies at that stage.
WRITER = textwrap.dedent("""
    import sys
    from vlmedge import outdir
    if sys.argv[2] == "fallback":
        outdir._exchange = lambda a, b: False
    with outdir.OutputDir(sys.argv[1], force=True) as w:
        (w.path / "a.txt").write_text("new a")
        (w.path / "b.txt").write_text("new b")
        w.commit()
""")


def _run_writer(target, mode="exchange", kill=None):
    env = {**os.environ, KILL_ENV: kill} if kill else {k: v for k, v in os.environ.items() if k != KILL_ENV}
    return subprocess.run([sys.executable, "-c", WRITER, str(target), mode], env=env, capture_output=True, text=True,
                          timeout=60)


def test_commit_replaces_the_old_directory_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "out"
    _write(target, {"a.txt": "old", "gone.txt": "old"})
    _write(target, {"a.txt": "new"})
    assert _tree(target) == {"a.txt": b"new"}
    assert _siblings(target) == []


def test_a_failed_write_keeps_the_old_directory(tmp_path):
    target = tmp_path / "out"
    _write(target, {"a.txt": "old"})
    with pytest.raises(RuntimeError):
        with OutputDir(target, force=True) as w:
            (w.path / "a.txt").write_text("half")
            raise RuntimeError("the export failed")
    assert _tree(target) == {"a.txt": b"old"} and _siblings(target) == []


def test_without_exchange_the_swap_still_replaces_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(outdir, "_exchange", lambda a, b: False)
    target = tmp_path / "out"
    _write(target, {"a.txt": "old"})
    _write(target, {"a.txt": "new"})
    assert _tree(target) == {"a.txt": b"new"} and _siblings(target) == []


def test_exchange_is_used_where_the_os_has_it(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("renameat2 is Linux's")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b").mkdir()
    assert outdir._exchange(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b" / "x").read_text() == "a" and not any((tmp_path / "a").iterdir())


def test_a_non_empty_target_needs_force_checked_again_at_commit(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(InputError, match="--force"):
        with OutputDir(target) as w:
            (w.path / "a.txt").write_text("mine")
            target.mkdir()
            (target / "theirs.txt").write_text("written meanwhile")
            w.commit()
    assert _tree(target) == {"theirs.txt": b"written meanwhile"} and _siblings(target) == []


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_the_result_has_the_umask_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        _write(tmp_path / "out", {"a.txt": "x"})
        write_file_atomic(tmp_path / "report.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "out" / "a.txt").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o666 & ~umask


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    target = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from vlmedge.outdir import OutputDir
        with OutputDir({str(target)!r}) as w:
            print("holding", flush=True)
            sys.stdin.readline()
            (w.path / "a.txt").write_text("first")
            w.commit()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(InputError) as e:
            with OutputDir(target, force=True):
                pass
        assert "another vlmedge process" in str(e.value) and f"pid {holder.pid}" in str(e.value)
        assert "\n" not in str(e.value)
        with pytest.raises(InputError, match="another vlmedge process"):
            check_out(target, force=True)  # the CLI's early check says the same
    finally:
        holder.communicate("go\n", timeout=60)
    assert holder.returncode == 0
    assert _tree(target) == {"a.txt": b"first"}
    _write(target, {"a.txt": "second"})  # and once it is done, the next writer goes ahead
    assert _tree(target) == {"a.txt": b"second"}


def test_a_waiting_writer_goes_ahead_when_the_first_finishes(tmp_path):
    target = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from vlmedge.outdir import TargetLock
        with TargetLock(__import__("pathlib").Path({str(target)!r})):
            print("holding", flush=True)
            time.sleep(1.0)
            open({str(tmp_path / "finished")!r}, "w").close()
    """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    waited = []
    with OutputDir(target, wait=True, on_wait=waited.append) as w:
        assert (tmp_path / "finished").exists()  # it got the lock only once the holder was done
        w.commit()
    holder.wait()
    assert waited == [f"pid {holder.pid} on {outdir._host()}"]


def test_temp_dirs_of_dead_writers_go_and_those_of_live_ones_stay(tmp_path):
    target = tmp_path / "out"
    host = outdir._host()
    dead, live = _dead_pid(), os.getppid()
    leftovers = {
        f".out.tmp-{dead}-0000aaaa@{host}": False,    # a dead writer on this host: removed
        f".out.tmp-{live}-0000bbbb@{host}": True,     # a live one: kept
        f".out.tmp-{dead}-0000cccc@elsewhere": True,  # another host's (shared file system): kept
        f".other.tmp-{dead}-0000dddd@{host}": True,   # another target's: kept
    }
    for name in leftovers:
        (tmp_path / name).mkdir()
        (tmp_path / name / "graph.onnx").write_bytes(b"half")
    (tmp_path / f".out.json.tmp-{dead}-0000eeee@{host}").write_text("half a report")
    _write(target, {"a.txt": "new"})
    write_file_atomic(tmp_path / "out.json", "{}")
    for name, stays in leftovers.items():
        assert (tmp_path / name).exists() == stays, name
    assert not (tmp_path / f".out.json.tmp-{dead}-0000eeee@{host}").exists()


@pytest.mark.parametrize("mode,stage", [("exchange", "begin"), ("exchange", "commit"), ("exchange", "swapped"),
                                        ("fallback", "commit"), ("fallback", "aside"), ("fallback", "swapped")])
def test_a_writer_killed_at_any_stage_leaves_old_or_new_and_the_next_one_clears_up(tmp_path, mode, stage):
    target = tmp_path / "out"
    _write(target, {"a.txt": "old a", "b.txt": "old b"})
    r = _run_writer(target, mode, kill=stage)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert _siblings(target), "the kill left the writer's temp dir (as a power cut would)"
    state = _tree(target) if target.exists() else {}
    if stage in ("swapped",):
        assert state == {"a.txt": b"new a", "b.txt": b"new b"}
    elif stage != "aside":  # between the fallback's two renames the target is briefly absent
        assert state == {"a.txt": b"old a", "b.txt": b"old b"}
    # the next writer finds the dead one's leftovers: the old copy put back (if aside), the rest removed
    with OutputDir(target, force=True):
        assert _siblings(target) == [p for p in _siblings(target) if ".tmp-" in p and f"-{os.getpid()}-" in p]
        assert _tree(target) in ({"a.txt": b"old a", "b.txt": b"old b"}, {"a.txt": b"new a", "b.txt": b"new b"})
        if stage == "aside":
            assert _tree(target) == {"a.txt": b"old a", "b.txt": b"old b"}
    assert _siblings(target) == []


def test_write_file_atomic_replaces_whole_and_names_the_path_on_error(tmp_path):
    path = tmp_path / "r.json"
    write_file_atomic(path, "old")
    write_file_atomic(path, b"new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError) as e:
        write_file_atomic(blocker / "r.json", "x")
    assert str(blocker) in str(e.value) and "\n" not in str(e.value)
