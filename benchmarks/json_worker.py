"""A contender in a subprocess of its own (another venv, or a clean process): one JSON line in, one
JSON line out. Its first line describes it (`info`)."""

from __future__ import annotations

import json
import subprocess


class JsonWorker:
    def __init__(self, cmd: list[str], cwd: str | None = None):
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, cwd=cwd)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker ended (exit status {self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        """End the worker: its input closes (a worker that reads until EOF stops), killed if it does not."""
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except Exception:  # noqa: BLE001 - already gone, or stuck
            self.proc.kill()
