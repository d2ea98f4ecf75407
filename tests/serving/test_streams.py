"""The batcher's streams, in process with the real pipeline: each row's text reaches its own sink as it
is decoded, and a row whose client has left stops decoding at once (its batch ends early)."""

import asyncio

from vlmedge.runtime.decoding import GenerationConfig
from vlmedge.serving.batcher import Answered, Batcher, Closing, Sink
from vlmedge.serving.inputs import Job

LONG = GenerationConfig(num_beams=1, min_new_tokens=45, max_new_tokens=45)


class LeavingSink(Sink):
    """A client that leaves after its first piece, as the HTTP layer marks it when the connection drops."""

    def put(self, kind, value=None):
        super().put(kind, value)
        if kind == "piece":
            self.cancelled = True


async def _drain(sink: Sink) -> list:
    out = []
    while not sink.queue.empty():
        out.append(sink.queue.get_nowait())
    return out


def test_rows_stream_to_their_own_sinks_and_a_leaving_row_stops(pipe, scene_pngs):
    images = [s.image for s, _ in scene_pngs[:3]]
    steps_run: list[int] = []

    async def main():
        loop = asyncio.get_running_loop()
        b = Batcher(pipe, max_batch=4, max_wait_s=0.05, on_batch=lambda n, t: steps_run.append(1 + len(t.tokens)))
        await b.start()
        sinks = [Sink(loop), Sink(loop), LeavingSink(loop)]
        tickets = [b.admit() for _ in sinks]
        futures = [t.submit(Job("caption", img, None, LONG, sink=s, stepwise=True)) for t, img, s in zip(tickets, images, sinks)]
        results = await asyncio.gather(*futures, return_exceptions=True)
        events = [await _drain(s) for s in sinks]
        alone = LeavingSink(loop)  # a batch of one row whose client leaves: the batch ends after its first piece
        t = b.admit()
        left = await asyncio.gather(t.submit(Job("caption", images[0], None, LONG, sink=alone, stepwise=True)),
                                    return_exceptions=True)
        for x in (*tickets, t):
            x.release()
        await b.close(5)
        return results, events, left

    results, events, left = asyncio.run(main())
    expected = pipe.caption(images[:2], min_new_tokens=45, max_new_tokens=45, return_ids=True)
    for r, e, g in zip(results[:2], events[:2], expected):
        assert r.generation == g and r.finish_reason == "length" and r.batch_size == 3
        assert e[0] == ("start", None) and e[-1][0] == "end" and isinstance(e[-1][1], Answered)
        assert "".join(v for k, v in e if k == "piece") == g.text
    assert isinstance(results[2], Closing)
    assert [k for k, _ in events[2]] == ["start", "piece"]  # nothing after its client left
    assert isinstance(left[0], Closing) and steps_run[-1] <= 3  # stopped, not decoded to its 45 tokens
    assert steps_run[0] == 45


def test_a_failing_start_is_an_error_not_a_stream(pipe, scene_pngs):
    async def main():
        loop = asyncio.get_running_loop()
        b = Batcher(pipe)
        await b.start()
        sink = Sink(loop)
        with b.admit() as t:
            fut = t.submit(Job("vqa", scene_pngs[0][0].image, "red " * 40, LONG, sink=sink, stepwise=True))
            got = await asyncio.gather(fut, return_exceptions=True)
        await b.close(5)
        return got[0], await _drain(sink)

    err, events = asyncio.run(main())
    assert "over the model's maximum of 32" in str(err) and events == []


def test_a_stream_past_its_deadline_ends_with_a_timeout_event():
    import json
    import time

    from vlmedge.serving.chat import native_chunks

    async def run() -> list[bytes]:
        sink = Sink(asyncio.get_running_loop())
        future = asyncio.get_running_loop().create_future()  # a batch that never finishes
        sink.put("piece", "a red")
        parts, t0 = [], time.perf_counter()
        async for part in native_chunks(sink, future, "m", lambda e: {"error": type(e).__name__}, deadline=t0 + 0.3):
            parts.append(part)
        assert 0.25 < time.perf_counter() - t0 < 5  # it waited for the deadline, not forever
        return parts

    parts = asyncio.run(run())
    events = [json.loads(p.decode().removeprefix("data: ").strip()) for p in parts]
    assert events == [{"text": "a red"}, {"error": "TimeoutError"}]
