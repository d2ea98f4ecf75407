"""Crash-safe outputs: a directory or a file appears whole, or the old one stays.

Every command that writes a directory (export, quantize, compare, build, the built-in model
cache) writes it through `OutputDir`:

    with OutputDir(out, force=force) as w:   # locks `out`, clears what dead writers left
        write_files_into(w.path)             # a temp dir beside `out`, mode from the umask
        w.commit()                           # fsync, then swap it in atomically

- The temp dir sits beside the target (same file system, so the swap is a rename) and is named
  `.NAME.tmp-PID-RANDOM@HOST`; a later writer of the same target removes those whose writer is dead
  (same host, pid not running), so a kill -9 or a power cut leaves nothing behind for good.
- The swap exchanges the two directories in one step where the OS can (Linux renameat2
  RENAME_EXCHANGE); elsewhere the old one is renamed aside (`.NAME.old-...`), the new one in, and the
  old one removed. If a writer dies between those two renames, the next writer puts the old one back.
- A lock (`flock` on `.NAME.lock` beside the target) admits one writer: a second one fails at once
  with one line, or waits (`wait=True`, as the cache does).
- Without `force`, a target that holds files is refused, checked again under the lock and at commit.

`write_file_atomic` does the same for one file (reports, JSON).

Crash tests only: when the environment variable VLMEDGE_KILL_AT names a stage ("begin": temp dir
made; "commit": contents written and synced, before the swap; "aside": old renamed aside in the
fallback swap; "swapped": new in place, old not yet removed), the writer SIGKILLs its own process
there, as a power cut would.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Callable

from vlmedge.errors import InputError, OutputError

KILL_ENV = "VLMEDGE_KILL_AT"
TMP, OLD = "tmp", "old"


def _host() -> str:
    return "".join(c if c.isalnum() or c in ".-_" else "_" for c in socket.gethostname()) or "host"


def _kill_at(stage: str) -> None:
    """The crash-test hook: die here, without cleanup, when VLMEDGE_KILL_AT names this stage."""
    if os.environ.get(KILL_ENV) == stage:
        os.kill(os.getpid(), signal.SIGKILL)


def _side_name(target: Path, kind: str) -> Path:
    """A sibling of `target` that names its writer: .NAME.KIND-PID-RANDOM@HOST"""
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}@{_host()}"


def _writer_of(side: Path) -> tuple[int, str] | None:
    """(pid, host) from a side name, or None if it is not one."""
    stem, at, host = side.name.rpartition("@")  # ".NAME.KIND-PID-RANDOM", HOST (no "@" in it)
    if not at:
        return None
    parts = stem.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return int(parts[1]), host


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove(path: Path) -> None:
    """Best effort: what cannot be removed now, the next writer's `clear_stale` removes."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def clear_stale(target: Path) -> list[Path]:
    """Remove the temp (and set-aside) siblings of `target` whose writer died on this host; an old
    copy set aside by a writer that died before putting the new one in goes back in place."""
    target = Path(target)
    parent = target.parent
    removed = []
    try:
        siblings = list(parent.iterdir())
    except FileNotFoundError:
        return removed
    host = _host()
    mine = (f".{target.name}.{TMP}-", f".{target.name}.{OLD}-")
    for side in sorted(siblings, key=lambda p: not p.name.startswith(mine[1])):  # restores first
        if not side.name.startswith(mine):
            continue
        writer = _writer_of(side)
        if writer is None or writer[1] != host or writer[0] == os.getpid() or _alive(writer[0]):
            continue
        if side.name.startswith(mine[1]) and not os.path.lexists(target):
            os.rename(side, target)  # the writer died between its two renames: the old one stays
            _fsync_dir(parent)
            continue
        _remove(side)
        removed.append(side)
    return removed


# -- durability -------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # e.g. Windows: directories cannot be opened
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF):  # file systems that cannot sync a directory
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Every file and directory under `root` on disk before it is renamed into place."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


# -- the swap ---------------------------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # glibc < 2.28, musl
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # the kernel or the file system cannot exchange
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(new: Path, target: Path) -> None:
    """Put `new` at `target`; the old target (if any) is removed only once the new one is in."""
    parent = target.parent
    if not os.path.lexists(target):
        os.rename(new, target)
        _fsync_dir(parent)
        _kill_at("swapped")
        return
    if _exchange(new, target):  # `new` now holds the old contents
        _fsync_dir(parent)
        _kill_at("swapped")
        _remove(new)
        return
    aside = _side_name(target, OLD)
    os.rename(target, aside)
    _kill_at("aside")
    os.rename(new, target)
    _fsync_dir(parent)
    _kill_at("swapped")
    _remove(aside)


# -- the lock ---------------------------------------------------------------------------------
_thread_locks: dict[str, threading.RLock] = {}
_thread_locks_guard = threading.Lock()
_held: dict[str, tuple[int, int]] = {}  # lock path -> (fd, depth), for this process


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


class TargetLock:
    """One writer per target across processes (flock) and threads; re-entrant in one thread, so the
    cache can hold the lock while export takes it again."""

    def __init__(self, target: Path, wait: bool = False, on_wait: Callable[[str], None] | None = None,
                 label: str = "--out"):
        self.target = Path(target).absolute()
        self.path = _lock_path(self.target)
        self.wait, self.on_wait, self.label = wait, on_wait, label
        key = str(self.path)
        with _thread_locks_guard:
            self._rlock = _thread_locks.setdefault(key, threading.RLock())

    def _busy(self, holder: str) -> InputError:
        who = f" ({holder})" if holder else ""
        return InputError(f"{self.label} {self.target}: another vlmedge process is writing it{who}; "
                          "wait for it to finish or choose another path")

    def __enter__(self) -> TargetLock:
        key = str(self.path)
        if not self._rlock.acquire(blocking=False):
            if not self.wait:
                raise self._busy("another thread of this process")
            self._rlock.acquire()
        if key in _held:
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            self._rlock.release()
            raise InputError(f"{self.label} {self.target}: cannot write there ({e.strerror or e})") from None
        try:
            _flock(fd, self.wait, lambda: self.on_wait and self.on_wait(_holder(fd)), lambda: self._busy(_holder(fd)))
            _say_holder(fd)
        except BaseException:
            os.close(fd)
            self._rlock.release()
            raise
        _held[key] = (fd, 1)
        return self

    def __exit__(self, *exc) -> None:
        key = str(self.path)
        fd, depth = _held[key]
        if depth == 1:
            del _held[key]
            os.close(fd)  # releases the flock
        else:
            _held[key] = (fd, depth - 1)
        self._rlock.release()


def _say_holder(fd: int) -> None:
    """Write who holds the lock into it, for the message a refused writer prints (best effort: on a
    full disk the lock still works without it)."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {_host()}\n".encode(), 0)
    except OSError:
        pass


def _holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def _flock(fd: int, wait: bool, on_wait: Callable[[], None], busy: Callable[[], Exception]) -> None:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): one writer is not enforced
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        if not wait:
            raise busy() from None
    on_wait()
    fcntl.flock(fd, fcntl.LOCK_EX)


# -- the writer -------------------------------------------------------------------------------
def _has_files(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _check_target(out: Path, force: bool, label: str) -> None:
    if os.path.lexists(out) and not out.is_dir():
        raise InputError(f"{label} {out}: exists and is not a directory")
    if not force and _has_files(out):
        raise InputError(f"{label} {out}: exists and is not empty; pass --force to replace it")


def check_out(out: Path, force: bool, label: str = "--out") -> None:
    """Refuse an output directory that could not be written, before any heavy work: not a directory,
    not empty without `force`, an unwritable parent, or another writer at work on it."""
    out = Path(out)
    _check_target(out, force, label)
    with OutputDir(out, force=force, label=label):
        pass  # takes the lock, makes and removes a temp dir: the same steps the real write takes


class OutputDir:
    """A directory written into a temp dir beside `target` and swapped in whole by `commit()`;
    left uncommitted (an exception, a kill), the target is untouched and the temp dir goes."""

    def __init__(self, target: str | os.PathLike, force: bool = False, *, wait: bool = False,
                 on_wait: Callable[[str], None] | None = None, label: str = "--out"):
        self.target = Path(target)
        self.force, self.label = force, label
        self._lock = TargetLock(self.target, wait, on_wait, label)
        self.path: Path | None = None
        self.committed = False

    def __enter__(self) -> OutputDir:
        _check_target(self.target, self.force, self.label)
        self._lock.__enter__()
        try:
            clear_stale(self.target.absolute())  # may put back an old copy a dead writer set aside
            _check_target(self.target, self.force, self.label)  # again, now that no one else writes it
            self.path = _side_name(self.target.absolute(), TMP)
            try:
                os.mkdir(self.path, 0o777)  # mode from the umask, unlike mkdtemp's 0700
            except OSError as e:
                raise InputError(f"{self.label} {self.target}: cannot write there ({e.strerror or e})") from None
            _kill_at("begin")
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def commit(self) -> Path:
        """Sync the temp dir and swap it in for the target; the old target is removed after."""
        assert self.path is not None and not self.committed
        if not self.force and _has_files(self.target):  # something else wrote it while we worked
            raise InputError(f"{self.label} {self.target}: appeared while this was written; pass --force to replace it")
        try:
            _fsync_tree(self.path)
            _kill_at("commit")
            _swap_in(self.path, self.target.absolute())
        except OSError as e:
            raise _named(e, self.target) from e
        self.committed = True
        return self.target

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if not self.committed and self.path is not None:
                _remove(self.path)
        finally:
            self._lock.__exit__(None, None, None)
        if isinstance(exc, OSError):
            raise _named(exc, self.target) from exc


def _named(e: OSError, target: Path) -> OutputError:
    """An OS error while writing `target`, as one line naming the file (or the target)."""
    where = e.filename or target
    return OutputError(f"{where}: {e.strerror or e}; {target} was left as it was")


def write_file_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write one file whole or not at all: a temp file beside it, fsync, rename over it."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    tmp = _side_name(path.absolute(), TMP)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clear_stale(path.absolute())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode from the umask
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        _remove(tmp)
        raise OutputError(f"{e.filename if e.filename and e.filename != str(tmp) else path}: "
                          f"{e.strerror or e}; {path} was not written") from e
    return path
