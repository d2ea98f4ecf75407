"""`vlmedge index` and `vlmedge search` on Milvus Lite (a local file; nothing outside this machine is started):
index, kill mid-way, resume without duplicates, and search results equal to brute-force numpy cosine."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vlmedge.cli import main

pytest.importorskip("milvus_lite")


@pytest.fixture(scope="module")
def indexed(encoder_bundles, photos, tmp_path_factory):
    """The CLIP bundle's index of `photos`, made by a run killed after two batches and a second run that resumes."""
    db = tmp_path_factory.mktemp("milvus") / "photos.db"
    cmd = [sys.executable, "-m", "vlmedge.cli", "index", str(encoder_bundles["clip"][2]), str(photos), "--db", str(db),
           "--batch-size", "3"]
    killed = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "VLMEDGE_KILL_AT": "index-batch-2"})
    assert killed.returncode == -9, killed.stderr
    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    return db, resumed.stdout


def _rows(db):
    from vlmedge.retrieval.milvus import connect

    c = connect(str(db))
    c.load_collection("images")
    rows = c.query("images", filter="", output_fields=["path", "embedding"], limit=1000)
    c.close()
    return rows


def test_a_killed_index_resumes_without_duplicates(indexed, photos):
    db, out = indexed
    assert "4 images indexed, 6 already there, 0 failed" in out and "holds 10" in out
    rows = _rows(db)
    paths = [r["path"] for r in rows]
    assert sorted(paths) == sorted(str(p.resolve()) for p in photos.iterdir()) and len(set(paths)) == 10


def test_the_index_holds_the_pipelines_embeddings(indexed, encoder_pipes):
    rows = {r["path"]: np.array(r["embedding"], np.float32) for r in _rows(indexed[0])}
    want = encoder_pipes["clip"].embed_images(sorted(rows))
    np.testing.assert_allclose(np.stack([rows[p] for p in sorted(rows)]), want, atol=1e-6)


def test_a_second_run_adds_nothing(indexed, encoder_bundles, photos, capsys):
    db, _ = indexed
    assert main(["index", str(encoder_bundles["clip"][2]), str(photos), "--db", str(db)]) == 0
    assert "0 images indexed, 10 already there" in capsys.readouterr().out
    assert len(_rows(db)) == 10


def search_equals_brute_force_cosine(db: str, query: str, bundle, pipe, photos, capsys) -> None:
    """`vlmedge search --db DB "text"` lists what a brute-force numpy cosine over the pipeline's embeddings
    ranks first, with its scores; then an image query finds that image first (score 1). Shared with
    test_milvus_server.py, which runs it on a Milvus server."""
    assert main(["search", str(bundle), "--db", db, query, "-k", "4", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["results"]
    paths = sorted(str(p.resolve()) for p in photos.iterdir())
    scores = pipe.embed_images(paths) @ pipe.embed_texts(query)
    order = np.argsort(-scores, kind="stable")[:4]
    assert [g["image"] for g in got] == [paths[i] for i in order]
    assert [g["score"] for g in got] == pytest.approx([float(scores[i]) for i in order], abs=1e-5)
    img = photos / "scene-03.png"
    assert main(["search", str(bundle), "--db", db, "--image", str(img), "-k", "2"]) == 0
    score, path = capsys.readouterr().out.strip().splitlines()[0].split(maxsplit=1)
    assert path == str(img.resolve()) and float(score) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("query", ["a photo of a red circle.", "two large blue squares", "x"])
def test_search_equals_brute_force_cosine(query, indexed, encoder_bundles, encoder_pipes, photos, capsys):
    search_equals_brute_force_cosine(str(indexed[0]), query, encoder_bundles["clip"][2], encoder_pipes["clip"], photos, capsys)


def test_a_bad_image_is_reported_and_the_rest_indexed(encoder_bundles, photos, tmp_path, capsys):
    d = tmp_path / "mixed"
    d.mkdir()
    for name in ("scene-00.png", "scene-01.png"):
        (d / name).write_bytes((photos / name).read_bytes())
    (d / "broken.png").write_text("not an image")
    assert main(["index", str(encoder_bundles["siglip"][2]), str(d), "--db", str(tmp_path / "m.db")]) == 2
    cap = capsys.readouterr()
    assert "2 images indexed, 0 already there, 1 failed" in cap.out
    assert len([e for e in cap.err.splitlines() if e.startswith("error:")]) == 1


@pytest.mark.parametrize("args, words", [
    (["search", "{siglip}", "--db", "{db}", "a cat"], "holds embeddings of 20, this bundle makes 36"),
    (["search", "{clip}", "--db", "{db}", "--collection", "other", "a cat"], "no collection 'other'"),
    (["search", "{clip}", "--db", "{db}"], "give a text or --image"),
    (["search", "{clip}", "--db", "{db}", "a cat", "--image", "x.png"], "give a text or --image"),
    (["search", "{clip}", "--db", "{db}", "  "], "the text is empty"),
    (["search", "{clip}", "--db", "{tmp}/x.sqlite", "a cat"], "a file ending in .db"),
    (["index", "{clip}", "{tmp}", "--db", "{tmp}/nowhere/x.db"], "does not exist"),
    (["index", "{clip}", "{tmp}", "--db", "{db}", "--collection", "bad-name!"], "--collection"),
    (["search", "{clip}", "--db", "http://127.0.0.1:{closed}", "a cat"], "cannot open"),  # a server URI: nothing listens
])
def test_bad_retrieval_input_is_one_line(args, words, indexed, encoder_bundles, tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(b"")
    import socket

    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    sub = {"clip": str(encoder_bundles["clip"][2]), "siglip": str(encoder_bundles["siglip"][2]), "db": str(indexed[0]),
           "tmp": str(tmp_path), "closed": closed}
    assert main([a.format(**sub) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err


def test_another_model_is_refused(indexed):
    """A collection another model of the same width wrote (its fingerprint differs) is refused."""
    from vlmedge.retrieval.milvus import Collection

    with pytest.raises(Exception, match="another model's embeddings"):
        Collection.open(str(indexed[0]), "images", 20, "0" * 32, create=False)


@pytest.mark.slow
def test_index_on_ray_data_writes_what_a_plain_run_writes(encoder_bundles, encoder_pipes, photos, tmp_path):
    pytest.importorskip("ray")
    db = tmp_path / "ray.db"
    cmd = [sys.executable, "-m", "vlmedge.cli", "index", str(encoder_bundles["clip"][2]), str(photos), "--db", str(db),
           "--batch-size", "4", "--ray"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "10 images indexed, 0 already there, 0 failed" in r.stdout
    rows = {x["path"]: np.array(x["embedding"], np.float32) for x in _rows(db)}
    np.testing.assert_allclose(np.stack([rows[p] for p in sorted(rows)]), encoder_pipes["clip"].embed_images(sorted(rows)), atol=1e-6)


def test_a_file_named_twice_is_one_row(encoder_bundles, photos, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(photos.parent)
    img = photos / "scene-00.png"
    args = [str(img), f"{photos.name}/scene-00.png", str(photos / "scene-01.png")]
    assert main(["index", str(encoder_bundles["clip"][2]), *args, "--db", str(tmp_path / "d.db")]) == 0
    assert "2 images indexed, 0 already there" in capsys.readouterr().out
    assert len(_rows(tmp_path / "d.db")) == 2


def test_an_index_file_a_kill_cut_short_is_rebuilt(indexed, tmp_path, encoder_bundles, photos):
    """Milvus Lite writes a segment's index file after the flush returns: a kill right then leaves it cut short and
    the collection would not load. The next run rebuilds the index from the rows, which are whole."""
    import shutil

    db, _ = indexed
    copy = tmp_path / "photos.db"
    shutil.copytree(db, copy)
    files = sorted(copy.rglob("*.idx"))
    assert files
    files[-1].write_bytes(files[-1].read_bytes()[:128])  # the header alone, as a kill mid-write leaves it
    cmd = [sys.executable, "-m", "vlmedge.cli", "index", str(encoder_bundles["clip"][2]), str(photos), "--db", str(copy),
           "--batch-size", "3"]
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert sorted(r["path"] for r in _rows(copy)) == sorted(r["path"] for r in _rows(db))
