"""In-flight batching in the server's batcher, in process with the real pipeline: requests that arrive
while a batch decodes join it at its next step and leave it when they end, each with the answer a
call of its own gives (options of its own too); a row whose client leaves stops at once."""

import asyncio
import dataclasses

from vlmedge.runtime.decoding import GenerationConfig
from vlmedge.serving.batcher import Batcher, Closing, Sink
from vlmedge.serving.inputs import Job

from test_streams import LeavingSink

GREEDY = GenerationConfig(num_beams=1)
SAMPLED = GenerationConfig(num_beams=1, do_sample=True, top_k=20, temperature=1.2, seed=11)
LONG = GenerationConfig(num_beams=1, min_new_tokens=45, max_new_tokens=45)


def test_requests_join_the_running_batch_and_answer_as_alone(pipe, scene_pngs):
    images = [s.image for s, _ in scene_pngs[:6]]
    jobs = [Job("caption", images[0], None, LONG, stepwise=True), Job("caption", images[1], None, GREEDY),
            Job("caption", images[2], None, SAMPLED), Job("vqa", images[3], "what color is the circle?", GREEDY),
            Job("caption", images[4], None, GREEDY, stepwise=True), Job("caption", images[5], None, SAMPLED)]
    calls: list[int] = []

    async def main():
        b = Batcher(pipe, max_batch=4, inflight=True, on_batch=lambda n, t: calls.append(n))
        await b.start()
        tickets = [b.admit() for _ in jobs]
        sink = Sink(asyncio.get_running_loop())
        jobs[0] = dataclasses.replace(jobs[0], sink=sink)
        first = tickets[0].submit(jobs[0])  # a long caption starts the batch alone
        while (await sink.queue.get())[0] != "piece":  # it is decoding
            pass
        rest = [t.submit(j) for t, j in zip(tickets[1:], jobs[1:])]  # the others arrive while it decodes
        results = await asyncio.gather(first, *rest)
        for t in tickets:
            t.release()
        await b.close(5)
        return results

    results = asyncio.run(main())
    opts = lambda c: {k: v for k, v in c.__dict__.items() if v is not None}  # noqa: E731
    for r, j in zip(results, jobs):
        alone = pipe.vqa(j.image, j.question, return_ids=True, **opts(j.config)) if j.task == "vqa" else \
            pipe.caption(j.image, return_ids=True, **opts(j.config))
        assert r.generation == alone, (j, r.generation, alone)
    assert results[0].batch_size > 1  # the long one ran with those that joined it
    assert max(calls) <= 4 and max(calls) > 1  # never more rows than max_batch
    assert results[4].finish_reason in ("stop", "length") and results[4].prompt_tokens > 0


def test_a_row_whose_client_leaves_stops_and_the_others_go_on(pipe, scene_pngs):
    images = [s.image for s, _ in scene_pngs[:2]]

    async def main():
        loop = asyncio.get_running_loop()
        b = Batcher(pipe, max_batch=4, inflight=True)
        await b.start()
        stay, leave = Sink(loop), LeavingSink(loop)
        tickets = [b.admit(), b.admit()]
        futures = [tickets[0].submit(Job("caption", images[0], None, LONG, sink=stay, stepwise=True)),
                   tickets[1].submit(Job("caption", images[1], None, LONG, sink=leave, stepwise=True))]
        got = await asyncio.gather(*futures, return_exceptions=True)
        for t in tickets:
            t.release()
        await b.close(5)
        events = []
        while not leave.queue.empty():
            events.append(leave.queue.get_nowait()[0])
        return got, events

    (kept, left), events = asyncio.run(main())
    assert kept.generation == pipe.caption(images[0], min_new_tokens=45, max_new_tokens=45, return_ids=True)
    assert isinstance(left, Closing) and events == ["start", "piece"]


def test_beam_search_keeps_to_the_batch_path_and_a_bad_question_fails_alone(pipe, scene_pngs):
    image = scene_pngs[0][0].image

    async def main():
        b = Batcher(pipe, inflight=True)
        await b.start()
        with b.admit() as t1, b.admit() as t2:
            beam = await t1.submit(Job("caption", image, None, GenerationConfig(num_beams=3)))
            bad = await asyncio.gather(t2.submit(Job("vqa", image, "red " * 40, GREEDY)), return_exceptions=True)
        await b.close(5)
        return beam, bad[0]

    beam, bad = asyncio.run(main())
    assert beam.generation == pipe.caption(image, num_beams=3, return_ids=True)
    assert "over the model's maximum of 32" in str(bad)
