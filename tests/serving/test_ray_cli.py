"""`vlmedge serve --ray` from the command line: it answers, and a SIGTERM stops everything it started
(the local Ray instance: GCS, raylet and its agents), exiting 0."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
from serving_helpers import free_port  # noqa: E402

pytestmark = pytest.mark.slow


def descendants(pid: int) -> dict[int, str]:
    """Every process below `pid`, from /proc, with its start time (so that a reused pid is not taken for it)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out: dict[int, str] = {}
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out and (started := _start(c)):
                out[c] = started
                todo.append(c)
    return out


def _start(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def alive(pid: int, started: str) -> bool:
    """The same process (same start time) is still running and not a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z" and fields[19] == started


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="walks /proc")
def test_sigterm_stops_the_local_ray_instance_it_started(shapes, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "vlmedge.cli", "serve", str(shapes), "--ray", "--port", str(port),
                             "--threads", "1", "--replica-cpus", "0.5"], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    seen: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            seen.update(descendants(proc.pid))
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "not ready"
            time.sleep(0.5)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["object"] == "list"
        seen.update(descendants(proc.pid))
        assert len(seen) >= 3  # GCS, raylet, workers and agents
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        deadline = time.monotonic() + 20
        while (left := [p for p, t in seen.items() if alive(p, t)]) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, [Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")[:80] for p in left]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for p, t in seen.items():  # never leave a Ray process of this test behind, even when it fails
            if alive(p, t):
                os.kill(p, signal.SIGKILL)
