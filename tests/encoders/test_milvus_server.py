"""`vlmedge index` and `vlmedge search` against a real Milvus server (`--db http://127.0.0.1:PORT`): the standalone
server that the `milvus` package (2.3.x) embeds, started from its own virtual environment, on loopback, with its
data in a temporary folder, and killed (its whole process group) when the module is done.

That environment is not the project's (the package pins its own dependencies); make it once with

    python3.11 -m venv /work/milvusvenv && /work/milvusvenv/bin/pip install milvus==2.3.5

and name its Python in VLMEDGE_MILVUS_SERVER_PYTHON to run the module; without that variable it is skipped.
It is opt-in because Milvus 2.3 listens on every interface, not only loopback (its gRPC ports and its metrics
port have no bind address setting; the embedded etcd is put on free loopback ports here), with authentication
off: run it only on a machine whose other interfaces nobody else reaches."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_milvus import search_equals_brute_force_cosine
from vlmedge.cli import main

pytest.importorskip("pymilvus")

SERVER_PYTHON = os.environ.get("VLMEDGE_MILVUS_SERVER_PYTHON", "")
START_TIMEOUT = 120  # seconds for the server to answer its health check

if not SERVER_PYTHON or not Path(SERVER_PYTHON).is_file():
    pytest.skip("a Milvus server listens beyond loopback: opt in with VLMEDGE_MILVUS_SERVER_PYTHON, a Python with the "
                f"`milvus` package (pip install milvus==2.3.5){f'; {SERVER_PYTHON} is missing' if SERVER_PYTHON else ''}",
                allow_module_level=True)
_probe = subprocess.run([SERVER_PYTHON, "-c", "import milvus; print(milvus.__version__)"], capture_output=True, text=True,
                        timeout=60)
if _probe.returncode != 0:
    pytest.skip(f"{SERVER_PYTHON} has no `milvus` package (pip install milvus==2.3.5)", allow_module_level=True)

# Run by SERVER_PYTHON: argv = data folder, proxy port. The embedded etcd gets free loopback ports (its peer port is
# otherwise a fixed 2380, and two servers on one machine collide); the other ports are picked free by the package.
# It prints "ready" once the server answers, and kills the server when its parent (pytest) is gone.
_STARTER = r'''
import os, signal, socket, sys, time
import milvus
from milvus import MilvusServer, MilvusServerConfig

base, port = sys.argv[1], int(sys.argv[2])
parent = os.getppid()

def free():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

os.makedirs(base, exist_ok=True)
client, peer = free(), free()
etcd = os.path.join(base, "etcd.yaml")
with open(etcd, "w") as f:
    f.write(f"listen-client-urls: http://127.0.0.1:{client}\nadvertise-client-urls: http://127.0.0.1:{client}\n"
            f"listen-peer-urls: http://127.0.0.1:{peer}\ninitial-advertise-peer-urls: http://127.0.0.1:{peer}\n"
            f"initial-cluster: default=http://127.0.0.1:{peer}\n")
data = os.path.join(os.path.dirname(milvus.__file__), "data")
with open(os.path.join(data, "config.yaml.template")) as f:
    template = f.read()
hook = "  use:\n    embed: true"
assert hook in template, "the package's config template changed"
template = template.replace(hook, f"  config:\n    path: {etcd}\n{hook}", 1)
with open(os.path.join(base, "template.yaml"), "w") as f:
    f.write(template)
config = MilvusServerConfig(template=os.path.join(base, "template.yaml"), etcd_port=client)
config.glog_conf_file = os.path.join(data, "glog.conf")  # (the package sets it only for its own template)
server = MilvusServer(config, wait_for_started=False)
server.set_base_dir(base)
server.listen_port = port
for role in ("rootCoord", "proxy", "queryCoord", "queryNode", "indexCoord", "indexNode", "dataCoord", "dataNode"):
    server.config.set(f"{role}.ip", "127.0.0.1")  # the address it registers (not a bind address)
server.start()
print("pid", server.server_proc.pid, flush=True)
server.wait_started(timeout=int(sys.argv[3]) * 1000)
print("ready", flush=True)
while server.server_proc.poll() is None and os.getppid() == parent:
    time.sleep(0.5)
server.server_proc.kill()
'''


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The URI of a Milvus server started for this module (killed, with its process group, at the end)."""
    base = tmp_path_factory.mktemp("milvus-server")
    port = _free_port()
    log = open(base / "starter.log", "w+")
    proc = subprocess.Popen([SERVER_PYTHON, "-c", _STARTER, str(base / "server"), str(port), str(START_TIMEOUT)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def stop():
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the starter and the server (a graceful stop can take minutes)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
        log.close()
        shutil.rmtree(base / "server" / "bin", ignore_errors=True)  # the unpacked binaries (~250 MB)

    try:
        deadline = time.monotonic() + START_TIMEOUT + 30  # (unpacking the binaries comes first)
        while True:
            log.seek(0)
            out = log.read()
            if "\nready" in "\n" + out:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (base / "server" / "logs" / "milvus-stderr.log")
                tail = tail.read_text()[-1500:] if tail.is_file() else ""
                pytest.fail(f"the Milvus server did not start (exit {proc.poll()}): {out[-1500:]} {tail}")
            time.sleep(0.5)
    except BaseException:
        stop()
        raise
    yield f"http://127.0.0.1:{port}"
    stop()


def _index(bundle, photos, uri, *more, env=None):
    cmd = [sys.executable, "-m", "vlmedge.cli", "index", str(bundle), str(photos), "--db", uri, "--batch-size", "3", *more]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def indexed(server, encoder_bundles, photos):
    """The CLIP bundle's index of `photos` on the server, made by a run killed (SIGKILL) after two batches and a
    second run that resumes."""
    bundle = encoder_bundles["clip"][2]
    killed = _index(bundle, photos, server, env={**os.environ, "VLMEDGE_KILL_AT": "index-batch-2"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = _index(bundle, photos, server)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return server, resumed.stdout


def _rows(uri, collection="images"):
    from pymilvus import MilvusClient

    c = MilvusClient(uri)
    try:
        return c.query(collection, filter="", output_fields=["path", "embedding"], limit=1000, consistency_level="Strong")
    finally:
        c.close()


def test_a_killed_index_resumes_without_duplicates(indexed, photos, encoder_pipes):
    uri, out = indexed
    assert "4 images indexed, 6 already there, 0 failed" in out and "holds 10" in out, out
    rows = _rows(uri)
    paths = [r["path"] for r in rows]
    assert sorted(paths) == sorted(str(p.resolve()) for p in photos.iterdir()) and len(set(paths)) == 10
    got = {r["path"]: np.array(r["embedding"], np.float32) for r in rows}
    want = encoder_pipes["clip"].embed_images(sorted(got))
    np.testing.assert_allclose(np.stack([got[p] for p in sorted(got)]), want, atol=1e-6)


def test_a_second_run_adds_nothing(indexed, encoder_bundles, photos, capsys):
    uri, _ = indexed
    assert main(["index", str(encoder_bundles["clip"][2]), str(photos), "--db", uri]) == 0
    assert "0 images indexed, 10 already there" in capsys.readouterr().out
    assert len(_rows(uri)) == 10


def test_a_batch_written_twice_is_still_one_row_per_image(indexed, encoder_bundles, encoder_pipes, photos, capsys):
    """A batch upserted again (as a run killed between its write and the next run's read leaves it) replaces its rows;
    the count the index prints is of the rows there, not of every row ever written (a server's statistics are)."""
    from vlmedge.retrieval.milvus import Collection, model_fingerprint

    uri, _ = indexed
    pipe = encoder_pipes["clip"]
    paths = sorted(str(p.resolve()) for p in photos.iterdir())[:3]
    col = Collection.open(uri, "images", pipe.dim, model_fingerprint(pipe.manifest), create=False)
    try:
        col.write(paths, pipe.embed_images(paths))
    finally:
        col.close()
    assert main(["index", str(encoder_bundles["clip"][2]), str(photos), "--db", uri]) == 0
    out = capsys.readouterr().out
    assert "0 images indexed, 10 already there" in out and "holds 10" in out, out
    rows = _rows(uri)
    assert len(rows) == 10 and len({r["path"] for r in rows}) == 10


@pytest.mark.parametrize("query", ["a photo of a red circle.", "two large blue squares", "x"])
def test_search_equals_brute_force_cosine_on_a_server(query, indexed, encoder_bundles, encoder_pipes, photos, capsys):
    search_equals_brute_force_cosine(indexed[0], query, encoder_bundles["clip"][2], encoder_pipes["clip"], photos, capsys)


@pytest.mark.parametrize("args, words", [
    (["search", "{siglip}", "--db", "{uri}", "a cat"], "holds embeddings of 20, this bundle makes 36"),
    (["search", "{clip}", "--db", "{uri}", "--collection", "other", "a cat"], "no collection 'other'"),
])
def test_a_refusal_from_the_server_is_one_line(args, words, indexed, encoder_bundles, capsys):
    sub = {"clip": str(encoder_bundles["clip"][2]), "siglip": str(encoder_bundles["siglip"][2]), "uri": indexed[0]}
    assert main([a.format(**sub) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("command", ["index", "search"])
def test_a_server_uri_nothing_listens_on_is_one_line(command, encoder_bundles, photos):
    uri = f"http://127.0.0.1:{_free_port()}"
    args = [str(photos), "--db", uri] if command == "index" else ["--db", uri, "a cat"]
    r = subprocess.run([sys.executable, "-m", "vlmedge.cli", command, str(encoder_bundles["clip"][2]), *args],
                       capture_output=True, text=True, timeout=120)
    err = r.stderr.strip()
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr, r.stderr[-2000:]
    assert len(err.splitlines()) == 1 and err.startswith("error:") and f"--db {uri}: cannot open" in err, err
