"""Ray: the app as a Serve deployment of two replicas answering as in-process, surviving a killed
replica under load; Ray Data captioning a folder as a plain run does, and resuming. One local Ray
instance (2 CPUs, no dashboard) for the module."""

import json
import threading
import time

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
from serving_helpers import free_port, png_b64  # noqa: E402

from vlmedge.serving.offline import caption_to_jsonl, ray_caption_to_jsonl  # noqa: E402
from vlmedge.serving.options import ServeOptions  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, object_store_memory=100 * 1024**2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        yield
    finally:
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def folder(scene_pngs, tmp_path_factory):
    d = tmp_path_factory.mktemp("folder")
    for i, (_, png) in enumerate(scene_pngs):
        (d / f"scene-{i}.png").write_bytes(png)
    (d / "broken.png").write_bytes(scene_pngs[0][1][:300])
    return sorted(d.iterdir())


def test_ray_data_run_equals_the_plain_run_and_resumes(ray_local, pipe, shapes, folder, tmp_path):
    gen = {"num_beams": 2}
    plain = caption_to_jsonl(pipe, folder, tmp_path / "plain.jsonl", gen, batch_size=3)
    assert (plain.captioned, plain.errors) == (9, 1)
    run = ray_caption_to_jsonl(str(shapes), "cpu", folder, tmp_path / "ray.jsonl", gen, batch_size=3, actors=2,
                               cpus_per_actor=0.5)
    expected = (tmp_path / "plain.jsonl").read_text()
    assert (tmp_path / "ray.jsonl").read_text() == expected and run.captioned == 9
    assert json.loads(expected.splitlines()[1])["caption"] == pipe.caption(str(folder[1]), num_beams=2)

    # a run that was killed while writing its sixth line: the rerun cuts that line and finishes the rest
    lines = expected.splitlines(keepends=True)
    (tmp_path / "resumed.jsonl").write_text("".join(lines[:5]) + lines[5][:25])
    again = ray_caption_to_jsonl(str(shapes), "cpu", folder, tmp_path / "resumed.jsonl", gen, batch_size=3, actors=2,
                                 cpus_per_actor=0.5)
    assert (tmp_path / "resumed.jsonl").read_text() == expected
    assert (again.resumed, again.captioned) == (5, 4)


@pytest.fixture(scope="module")
def ray_server(ray_local, shapes):
    from ray import serve

    from vlmedge.serving.ray_serve import deployment

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(deployment(ServeOptions(bundle=str(shapes), threads=1), replicas=2, num_cpus=0.5),
              name="vlmedge", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while httpx.get(url + "/readyz", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "replicas not ready after 60 s"
        time.sleep(0.2)
    yield url
    serve.delete("vlmedge")


def _replicas() -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_REPLICA::")]


def _wait_for_replicas(n: int, timeout: float = 90.0) -> list[str]:
    """The deployment's replicas once there are n of them (Serve replaces a killed one), or the last seen."""
    deadline = time.monotonic() + timeout
    while len(names := _replicas()) != n and time.monotonic() < deadline:
        time.sleep(0.5)
    return names


def test_two_replicas_answer_as_in_process(ray_server, pipe, scene_pngs):
    assert len(_wait_for_replicas(2)) == 2  # (after the kill test, Serve has put the second one back)
    images = [s.image for s, _ in scene_pngs]
    q = "what color is the large square ?"
    with httpx.Client(base_url=ray_server, timeout=60) as c:
        got = [c.post("/v1/caption", json={"image": png_b64(p), "return_ids": True}).json() for _, p in scene_pngs]
        vqa = [c.post("/v1/vqa", files={"image": ("s.png", p)}, data={"question": q}).json()["text"] for _, p in scene_pngs[:4]]
        bad = c.post("/v1/caption", json={"image": png_b64(b"nope")})
    assert [g["text"] for g in got] == pipe.caption(images)
    assert [g["ids"] for g in got] == [list(g.ids) for g in pipe.caption(images, return_ids=True)]
    assert vqa == pipe.vqa(images[:4], [q] * 4)
    assert bad.status_code == 400 and bad.json()["error"] == "image: not an image Pillow can read"


def test_a_replica_killed_under_load_drops_no_request(ray_server, pipe, scene_pngs):
    expected = pipe.caption([s.image for s, _ in scene_pngs])
    outcomes: list = []  # (index, status, text) or (index, exception)
    stop = threading.Event()

    def load(worker: int) -> None:
        with httpx.Client(base_url=ray_server, timeout=60) as c:
            i = worker
            while not stop.is_set():
                k = i % len(scene_pngs)
                try:
                    r = c.post("/v1/caption", json={"image": png_b64(scene_pngs[k][1])})
                    outcomes.append((k, r.status_code, r.json().get("text") if r.status_code == 200 else r.text))
                except Exception as e:  # a request that got no answer at all
                    outcomes.append((k, e))
                i += 1

    threads = [threading.Thread(target=load, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    victim = _replicas()[0]
    before_kill = len(outcomes)
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    time.sleep(4)
    stop.set()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    dropped = [o for o in outcomes if len(o) == 2]
    assert not dropped, dropped[:3]
    ok = [o for o in outcomes if o[1] == 200]
    assert all(text == expected[k] for k, _, text in ok)
    assert all(status == 200 or status >= 500 for _, status, _ in outcomes)  # an error, never a silent drop
    assert len(ok) > before_kill + 10  # the endpoint kept answering after the kill
    with httpx.Client(base_url=ray_server, timeout=60) as c:
        assert c.post("/v1/caption", json={"image": png_b64(scene_pngs[0][1])}).json()["text"] == expected[0]
    replicas = _wait_for_replicas(2)  # Serve replaces the killed replica
    assert len(replicas) == 2 and victim not in replicas


def test_app_builder_reads_serve_run_arguments(shapes):
    from ray.serve import Application

    from vlmedge.serving.ray_serve import app_builder

    app = app_builder({"bundle": str(shapes), "replicas": "2", "max_batch": "8", "max_wait_ms": "2", "num_cpus": "0.5"})
    assert isinstance(app, Application)
    with pytest.raises(ValueError, match="unknown argument"):
        app_builder({"bundle": str(shapes), "max_batches": "8"})
    with pytest.raises(ValueError, match="missing argument bundle"):
        app_builder({})
