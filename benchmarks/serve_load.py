"""Load on `vlmedge serve`: throughput and latency at concurrency 1, 8, 32 and 64, dynamic batching
against batch-1 serving, and the server's overhead over an in-process call.

What it does, in one run on the CPU with `shapes-vlm` (greedy captions of 5-object test scenes):

1. Server overhead: `Pipeline.caption(path)` in this process (PNG decode included) and the same
   caption posted to the batching server, one at a time, in alternating blocks of 16 back-to-back
   calls, p50 and p99 of each.
2. Servers (--configs): `vlmedge serve` with in-flight batching (--batching inflight: requests join
   the running decode batch between steps), with dynamic batching (--batching static, the default,
   --max-batch 16 --max-wait-ms 5: each batch runs to its end) and with batch-1 serving
   (--max-batch 1), child processes on free localhost ports, loaded in turn (never two at once),
   level by level, so that all see the machine alike. At each concurrency, that many clients
   (asyncio + aiohttp, one keep-alive connection each) post JSON requests with base64 PNGs back to
   back for --seconds (after a 2 s warm-up that is not counted; before the first level, 3 s at the
   highest concurrency bring memory to its steady state): requests per second, p50/p99
   latency, errors, mean batch size (from /metrics), and the server's resident memory at the start
   and the end of the level.
3. Streams: at --stream-concurrency levels (1 and 32), that many clients stream captions through
   `POST /v1/chat/completions` (stream=true) from the in-flight and the static server: the time to
   the first piece of text against the time to the whole answer, p50 and p99.
4. Checks: at concurrency 32 static batching gives >= 2x the throughput of batch-1; in-flight
   batching gives >= 1.5x static's throughput and <= 0.5x its p50 for the short requests with --mixed
   lengths (>= 0.5x the throughput when every request asks the same), and a lower time to the first
   piece; at concurrency 1 the
   batching server adds <= 2 ms to the in-process p50; RSS flat (grows < 10% from the first level's
   start to the last level's end); no
   errors below saturation (the queue limit, 64, is never reached by 64 clients).

Run:  .venv/bin/python benchmarks/serve_load.py [--seconds 60] [--concurrency 1,8,32,64] [--json PATH]
      .venv/bin/python benchmarks/serve_load.py --streams-only --seconds 10     # only step 3

Needs the serve extra and aiohttp (which Ray Serve brings). The load generator shares the machine
with the server: on a small CPU it takes part of the cores the server could use, for both
configurations alike.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import aiohttp  # noqa: E402

from vlmedge.data.scenes import scenes  # noqa: E402

PAUSE = 0.05  # seconds between blocks of in-process and HTTP calls
SHORT = 16  # --mixed: requests of at most this many tokens are the short ones
MIXED = (4, 40)  # --mixed: forced answer lengths, spread over this range (the built-in model allows 47 tokens)
BLOCK = 16  # calls per block
CONFIGS = {"inflight": ["--max-batch", "16", "--batching", "inflight"],
           "static": ["--max-batch", "16", "--max-wait-ms", "5", "--batching", "static"],
           "batch-1": ["--max-batch", "1", "--batching", "static"]}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def paired(bundle: str, paths: list[Path], bodies: list[bytes], url: str, seconds: float) -> dict:
    """The in-process call and the same request over HTTP (one at a time on a keep-alive connection),
    in alternating blocks of BLOCK back-to-back calls with a pause between blocks (so that neither
    side's spinning threads take the other's cores): both sides warm, both seeing the machine alike."""
    import vlmedge

    pipe = vlmedge.load(bundle, shared_threads=True)
    local: list[float] = []
    remote: list[float] = []
    async with aiohttp.ClientSession() as session:
        end = time.perf_counter() + seconds
        block = -1  # a warm-up block of each, not counted
        while time.perf_counter() < end:
            for k in range(BLOCK):
                p = paths[(block * BLOCK + k) % len(paths)]
                t = time.perf_counter()
                pipe.caption(str(p))
                if block >= 0:
                    local.append(time.perf_counter() - t)
            await asyncio.sleep(PAUSE)
            for k in range(BLOCK):
                body = bodies[(block * BLOCK + k) % len(bodies)]
                t = time.perf_counter()
                async with session.post(url + "/v1/caption", data=body, headers={"content-type": "application/json"}) as r:
                    await r.read()
                    assert r.status == 200, r.status
                if block >= 0:
                    remote.append(time.perf_counter() - t)
            await asyncio.sleep(PAUSE)
            block += 1
    del pipe
    return {"calls_each": len(local), "in_process_p50_ms": pct(local, 50) * 1000, "in_process_p99_ms": pct(local, 99) * 1000,
            "http_p50_ms": pct(remote, 50) * 1000, "http_p99_ms": pct(remote, 99) * 1000}


async def _metric_sums(session: aiohttp.ClientSession, url: str) -> tuple[float, float]:
    """(sum, count) of vlmedge_batch_size from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    async with session.get(url + "/metrics") as r:
        text = await r.text()
    s = c = 0.0
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name == "vlmedge_batch_size_sum":
                s = smp.value
            elif smp.name == "vlmedge_batch_size_count":
                c = smp.value
    return s, c


async def load_level(url: str, bodies: list[bytes], concurrency: int, seconds: float, warmup: float, pid: int,
                     lengths: list[int] | None = None) -> dict:
    """`concurrency` clients posting back to back; latencies of requests that start after the warm-up.
    `lengths`: each body's forced answer length (--mixed), to report the short requests apart."""
    lat: list[float] = []
    short: list[float] = []
    errors: dict[str, int] = {}
    t_start = time.perf_counter() + warmup
    t_end = t_start + seconds
    conn = aiohttp.TCPConnector(limit=concurrency + 2)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as session:
        rss_start = float("nan")
        b0 = None

        async def client(k: int) -> None:
            nonlocal b0
            i = k
            while True:
                now = time.perf_counter()
                if now >= t_end:
                    return
                t = time.perf_counter()
                try:
                    async with session.post(url + "/v1/caption", data=bodies[i % len(bodies)],
                                            headers={"content-type": "application/json"}) as r:
                        await r.read()
                        status = r.status
                except Exception as e:  # noqa: BLE001 - counted, reported
                    status = type(e).__name__
                dt = time.perf_counter() - t
                if t >= t_start:
                    if status == 200:
                        lat.append(dt)
                        if lengths and lengths[i % len(bodies)] <= SHORT:
                            short.append(dt)
                    else:
                        errors[str(status)] = errors.get(str(status), 0) + 1
                i += concurrency

        async def mark() -> None:
            nonlocal b0, rss_start
            await asyncio.sleep(max(0.0, t_start - time.perf_counter()))
            b0 = await _metric_sums(session, url)
            rss_start = rss_mb(pid)

        await asyncio.gather(mark(), *(client(k) for k in range(concurrency)))
        b1 = await _metric_sums(session, url)
        rss_end = rss_mb(pid)
    calls = b1[1] - b0[1]
    return {"concurrency": concurrency, "requests": len(lat), "rps": len(lat) / seconds,
            "p50_ms": pct(lat, 50) * 1000, "p99_ms": pct(lat, 99) * 1000, "errors": errors,
            "short_p50_ms": pct(short, 50) * 1000 if short else float("nan"),
            "mean_batch": (b1[0] - b0[0]) / calls if calls else float("nan"), "rss_start_mb": rss_start, "rss_end_mb": rss_end}


async def stream_level(url: str, images: list[str], concurrency: int, seconds: float, warmup: float) -> dict:
    """`concurrency` clients streaming chat completions back to back: seconds to the first piece of
    text and to `data: [DONE]`, of streams that start after the warm-up."""
    first: list[float] = []
    whole: list[float] = []
    errors: dict[str, int] = {}
    t_start = time.perf_counter() + warmup
    t_end = t_start + seconds
    conn = aiohttp.TCPConnector(limit=concurrency + 2)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as session:
        async def client(k: int) -> None:
            i = k
            while time.perf_counter() < t_end:
                body = {"stream": True, "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": images[i % len(images)]}}]}]}
                t = time.perf_counter()
                t_first = None
                status: Any = None
                try:
                    async with session.post(url + "/v1/chat/completions", json=body) as r:
                        status = r.status
                        async for line in r.content:
                            if t_first is None and line.startswith(b"data: {") and b'"content": "' in line \
                                    and b'"content": ""' not in line:
                                t_first = time.perf_counter()
                            if line.startswith(b"data: [DONE]"):
                                break
                except Exception as e:  # noqa: BLE001 - counted, reported
                    status = type(e).__name__
                if t >= t_start:
                    if status == 200 and t_first is not None:
                        first.append(t_first - t)
                        whole.append(time.perf_counter() - t)
                    else:
                        errors[str(status)] = errors.get(str(status), 0) + 1
                i += concurrency

        await asyncio.gather(*(client(k) for k in range(concurrency)))
    return {"concurrency": concurrency, "streams": len(first), "first_p50_ms": pct(first, 50) * 1000,
            "first_p99_ms": pct(first, 99) * 1000, "whole_p50_ms": pct(whole, 50) * 1000,
            "whole_p99_ms": pct(whole, 99) * 1000, "errors": errors}


def start_server(bundle: str, args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "vlmedge.cli", "serve", bundle, "--port", str(port), *args]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server not ready: {log.read_text()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="shapes-vlm", help="bundle directory or built-in name (exported once, cached)")
    ap.add_argument("--seconds", type=float, default=60.0, help="measured seconds per concurrency level")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--stream-concurrency", default="1,32", help="levels of the streaming step ('' to skip it)")
    ap.add_argument("--streams-only", action="store_true", help="run only the streaming step")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"servers to load, of {', '.join(CONFIGS)}")
    ap.add_argument("--mixed", action="store_true", help=f"requests ask for answers of {MIXED[0]} to {MIXED[1]} tokens "
                    f"(min_new_tokens = max_new_tokens); the p50 of those of at most {SHORT} is reported apart")
    args = ap.parse_args()
    configs = {name: CONFIGS[name] for name in args.configs.split(",")}
    levels = [int(x) for x in args.concurrency.split(",")]
    stream_levels = [int(x) for x in args.stream_concurrency.split(",") if x]

    from vlmedge.runtime.pipeline import resolve_bundle

    bundle = str(resolve_bundle(args.bundle).path)
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    paths, bodies = [], []
    for i, s in enumerate(scenes("test", 0, 32)):
        buf = io.BytesIO()
        s.pil().save(buf, "PNG")
        p = work / f"scene-{i:02d}.png"
        p.write_bytes(buf.getvalue())
        paths.append(p)
        bodies.append(json.dumps({"image": base64.b64encode(buf.getvalue()).decode()}).encode())
    lengths = None
    if args.mixed:  # the same images, each with a forced length: every length of the range in turn
        lengths = [MIXED[0] + (i * 7) % (MIXED[1] - MIXED[0] + 1) for i in range(len(bodies) * 4)]
        bodies = [json.dumps({**json.loads(bodies[i % len(bodies)]), "max_new_tokens": n, "min_new_tokens": n}).encode()
                  for i, n in enumerate(lengths)]

    print(f"bundle {bundle}; {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); "
          f"{args.seconds:g} s per level", flush=True)
    images = ["data:image/png;base64," + json.loads(b)["image"] for b in bodies]
    streamed = [n for n in ("inflight", "static") if n in configs]
    if args.streams_only:
        rows = []
        for name in streamed:
            proc, url = start_server(bundle, configs[name], work / f"{name}.log")
            try:
                rows += [{"server": name, **asyncio.run(stream_level(url, images, c, args.seconds, 2.0))} for c in stream_levels]
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
        for r in rows:
            _print_stream_row(r)
        if args.json:
            args.json.write_text(json.dumps({"seconds": args.seconds, "streams": rows}, indent=2) + "\n")
        return
    servers = {name: start_server(bundle, extra, work / f"{name}.log") for name, extra in configs.items()}
    results: dict[str, list[dict]] = {name: [] for name in configs}
    try:
        proc, url = next(iter(servers.values()))
        inproc = None if lengths else asyncio.run(paired(bundle, paths, bodies, url, min(args.seconds, 30.0)))
        if inproc:
            print(f"one at a time, in alternating blocks: in-process Pipeline.caption(path) p50 {inproc['in_process_p50_ms']:.2f} ms "
              f"(p99 {inproc['in_process_p99_ms']:.2f}), over HTTP p50 {inproc['http_p50_ms']:.2f} ms "
              f"(p99 {inproc['http_p99_ms']:.2f}); {inproc['calls_each']} calls each", flush=True)
        for proc, url in servers.values():  # steady state first: arenas grow to the largest batch before memory is watched
            asyncio.run(load_level(url, bodies, max(levels), 3.0, 0.0, proc.pid))
        for c in levels:  # the two servers take turns, level by level, so both see the machine alike
            for name, (proc, url) in servers.items():
                r = asyncio.run(load_level(url, bodies, c, args.seconds, 2.0, proc.pid, lengths))
                results[name].append(r)
                shorts = f"  short p50 {r['short_p50_ms']:7.2f} ms" if lengths else ""
                print(f"{name:8s} c={c:3d}: {r['rps']:7.1f} req/s  p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms{shorts}  "
                      f"batch {r['mean_batch']:5.2f}  errors {r['errors'] or 0}  RSS {r['rss_start_mb']:.0f} -> "
                      f"{r['rss_end_mb']:.0f} MB", flush=True)
        streams = [{"server": name, **asyncio.run(stream_level(servers[name][1], images, c, args.seconds, 2.0))}
                   for c in stream_levels for name in streamed]
        for r in streams:
            _print_stream_row(r)
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)

    by = {n: {r["concurrency"]: r for r in rows} for n, rows in results.items()}
    checks = {}
    if 32 in levels and {"static", "batch-1"} <= set(by):
        ratio = by["static"][32]["rps"] / by["batch-1"][32]["rps"]
        checks["batching_speedup_c32"] = {"value": ratio, "target": ">= 2", "ok": ratio >= 2}
    if 32 in levels and {"inflight", "static"} <= set(by):
        ratio = by["inflight"][32]["rps"] / by["static"][32]["rps"]
        floor = 1.5 if lengths else 0.5
        checks["inflight_over_static_rps_c32"] = {"value": ratio, "target": f">= {floor}", "ok": ratio >= floor}
    first = {(r["server"], r["concurrency"]): r["first_p50_ms"] for r in streams}
    if ("inflight", 32) in first and ("static", 32) in first:
        ratio = first[("inflight", 32)] / first[("static", 32)]
        checks["inflight_over_static_first_piece_p50_c32"] = {"value": ratio, "target": "< 1", "ok": ratio < 1}
    if inproc:
        over = inproc["http_p50_ms"] - inproc["in_process_p50_ms"]
        checks["server_overhead_p50_ms_c1"] = {"value": over, "target": "<= 2", "ok": over <= 2}
    if lengths and 32 in levels and {"inflight", "static"} <= set(by):
        ratio = by["inflight"][32]["short_p50_ms"] / by["static"][32]["short_p50_ms"]
        checks["inflight_over_static_short_p50_c32"] = {"value": ratio, "target": "<= 0.5", "ok": ratio <= 0.5}
    for name, rows in results.items():
        growth = (rows[-1]["rss_end_mb"] - rows[0]["rss_start_mb"]) / rows[0]["rss_start_mb"]
        checks[f"rss_growth_{name}"] = {"value": growth, "target": "< 0.1", "ok": growth < 0.10}
    errs = sum(sum(r["errors"].values()) for rs in results.values() for r in rs)
    checks["errors"] = {"value": errs, "target": "0", "ok": errs == 0}
    for k, v in checks.items():
        print(f"check {k}: {v['value']:.3g} (target {v['target']}) {'OK' if v['ok'] else 'FAIL'}")
    if args.json:
        args.json.write_text(json.dumps({"seconds": args.seconds, "in_process": inproc, "results": results,
                                         "streams": streams, "checks": checks}, indent=2) + "\n")


def _print_stream_row(r: dict) -> None:
    print(f"streams {r['server']:8s} c={r['concurrency']:3d}: first text p50 {r['first_p50_ms']:7.2f} ms (p99 {r['first_p99_ms']:.2f}), "
          f"whole answer p50 {r['whole_p50_ms']:7.2f} ms (p99 {r['whole_p99_ms']:.2f}); {r['streams']} streams, "
          f"errors {r['errors'] or 0}", flush=True)


if __name__ == "__main__":
    main()
