"""Helpers for the reliability tests: run the real `vlmedge` command in its own process, as a user does."""

import hashlib
import subprocess
import sys
from pathlib import Path

from vlmedge.outdir import KILL_ENV


def tree(root: Path) -> dict[str, str]:
    """Every file under `root` with its sha256: equal trees, equal outputs."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(target: Path) -> list[str]:
    """Temp or set-aside directories a writer of `target` left beside it."""
    sides = (f".{target.name}.tmp-", f".{target.name}.old-")
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(sides))


class Cli:
    def __init__(self, env: dict[str, str]):
        self.env = env

    def start(self, *args, kill_at: str | None = None, **env) -> subprocess.Popen:
        e = {k: v for k, v in {**self.env, **env}.items() if k != KILL_ENV}
        if kill_at:
            e[KILL_ENV] = kill_at
        return subprocess.Popen([sys.executable, "-m", "vlmedge.cli", *map(str, args)], env=e, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def __call__(self, *args, kill_at: str | None = None, **env) -> subprocess.CompletedProcess:
        p = self.start(*args, kill_at=kill_at, **env)
        out, err = p.communicate(timeout=600)
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def one_line(r: subprocess.CompletedProcess | str) -> str:
    """The error line of a refused command, from it or its stderr: one line, the last (progress may
    come before it), and no traceback."""
    stderr = r if isinstance(r, str) else r.stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert "Traceback" not in stderr and len(errors) == 1 and lines[-1] == errors[0], stderr
    return errors[0]
