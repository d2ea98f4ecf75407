"""Dynamic batching: requests with the same task and generation options that arrive close together
run as one pipeline call, off the event loop.

A batch starts when a model worker is free. It takes the oldest waiting request and every waiting
request compatible with it (same task, same options), up to the batch capacity: `max_batch`
images, and images x beams within the bundle's batch range. While the batch is short and more
requests are on their way in (admitted, still being read or decoded), it waits for them, at most
`max_wait` after the oldest one arrived; a lone request on an idle server runs at once. Requests
with other options wait for a batch of their own. While a worker is busy, requests pile up and
the next batch takes them all, so under load batches fill without waiting.

Streams and OpenAI requests decode step by step (one beam): after each step, each row's new text goes
to its request's `Sink`, a row whose client has left stops (when all have, the batch ends), and a row
that ends (EOS, length, a stop string) tells its request at once, without waiting for the batch. A
seeded sampling request runs alone, so its draws are those of the same call in process.

In-flight batching (`inflight=True`, cross-attention bundles of schema 4): a request that decodes
one row (greedy or sampling, plain or streamed) does not wait for a batch to form or to finish. It
joins the running decode batch before its next step, up to `max_batch` rows, and leaves it when it
ends (vlmedge.runtime.inflight). Each row keeps its own options, so requests with different options
share the batch. Beam search, decoder-only chat and Florence-2's region tasks batch as above.

Admission is bounded: at most `max_queue` requests are admitted (waiting or running); the next one
gets `QueueFull` with a suggested Retry-After, so memory never grows with the offered load.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

from vlmedge.runtime.decoding import Timings
from vlmedge.runtime.inflight import Inflight
from vlmedge.runtime.pipeline import Generation, Pipeline, TextStream
from vlmedge.serving.inputs import Job


JOIN_GROUP = 4  # in-flight batching: requests that join the running batch together, at least (see _run_flight)


class QueueFull(Exception):
    """The server holds max_queue requests already; retry after `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is at its queue limit; retry after {retry_after} s")
        self.retry_after = retry_after


class Closing(Exception):
    """The server is shutting down and takes no new requests."""


@dataclass(frozen=True)
class Answered:
    """A step-by-step row's answer: its text and ids, the tokens it read, and why it ended."""

    generation: Generation
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


@dataclass(frozen=True)
class Result:
    """A request's answer, with the seconds it spent per stage (model stages are its batch's)."""

    generation: Generation
    timings: dict[str, float]
    batch_size: int
    prompt_tokens: int = 0  # step-by-step requests only
    finish_reason: str = ""


class Sink:
    """A stream's channel from the model thread to its request: ("start", None) once its batch has
    started, ("piece", text) as text is decoded, ("end", Answered) when its row ends. The request sets
    `cancelled` when its client leaves; the model thread then stops the row."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False

    def put(self, kind: str, value: Any = None) -> None:
        if not self.cancelled:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))


@dataclass
class _Waiting:
    job: Job
    future: asyncio.Future
    arrived: float


class Ticket:
    """A request's place in the server, from admission to answer; release it when answered."""

    def __init__(self, batcher: "Batcher"):
        self._batcher = batcher
        self._submitted = False
        self._released = False

    async def run(self, job: Job) -> Result:
        """Queue the job and wait for its batch; cancelling the wait takes it out of the queue."""
        return await self.submit(job)

    def submit(self, job: Job) -> asyncio.Future:
        """Queue the job; the future is its Result (cancel it to take the job out of the queue)."""
        b = self._batcher
        self._submitted = True
        b._incoming -= 1
        fut = asyncio.get_running_loop().create_future()
        w = _Waiting(job, fut, time.perf_counter())
        if not b._join_flight(w):  # joins the running in-flight batch, or waits for a batch
            b._waiting.append(w)
            b._wake.set()
        return fut

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        b = self._batcher
        if not self._submitted:
            b._incoming -= 1
        b._admitted -= 1
        b._on_depth(b._admitted)
        if b._admitted == 0:
            b._idle.set()

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Batcher:
    """Groups jobs into pipeline calls run by `workers` threads; see the module docstring."""

    def __init__(self, pipe: Pipeline, max_batch: int = 16, max_wait_s: float = 0.005, max_queue: int = 64,
                 workers: int = 1, on_batch: Optional[Callable[[int, Timings], None]] = None,
                 on_depth: Optional[Callable[[int], None]] = None, inflight: bool = False):
        self.pipe = pipe
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.workers = workers
        self._on_batch = on_batch or (lambda n, t: None)
        self._on_depth = on_depth or (lambda n: None)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vlmedge-model")
        self._waiting: deque[_Waiting] = deque()
        self._admitted = 0  # requests holding a ticket
        self._incoming = 0  # admitted, not yet queued (being read and decoded)
        self._batch_seconds = 0.05  # running mean of a model call, for Retry-After
        self._closing = False
        self._task: Optional[asyncio.Task] = None
        self._running: set[asyncio.Task] = set()
        manifest = getattr(pipe, "manifest", None)
        # in-flight batching: the running batch's queue of joiners, guarded by a lock the model thread shares
        self.inflight = inflight and manifest is not None and manifest.contract == "cross-attention" \
            and not manifest.split_decoder
        self._flight: deque[_Waiting] = deque()
        self._flight_lock = threading.Lock()
        self._flying = False  # an in-flight batch is running (it takes joiners until it empties)

    # -- admission ---------------------------------------------------------------------------
    def admit(self) -> Ticket:
        """A place for one request, or QueueFull (Closing while shutting down)."""
        if self._closing:
            raise Closing()
        if self._admitted >= self.max_queue:
            raise QueueFull(self.retry_after())
        self._admitted += 1
        self._incoming += 1
        self._idle.clear()
        self._on_depth(self._admitted)
        return Ticket(self)

    def retry_after(self) -> int:
        """Seconds until the queue has room, estimated from the mean model call."""
        batches = self._admitted / max(1, self.max_batch * self.workers)
        return max(1, math.ceil(batches * self._batch_seconds))

    @property
    def depth(self) -> int:
        return self._admitted

    def capacity(self, job: Job) -> int:
        """Images per model call for this job's options: max_batch, and images x beams within the bundle's
        range; one for a seeded sampling job (its draws must not depend on its place in a batch)."""
        if job.config.do_sample and job.config.seed is not None:
            return 1
        return max(1, min(self.max_batch, self.pipe.max_batch // max(1, job.config.num_beams or 1)))

    # -- life cycle --------------------------------------------------------------------------
    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._slots = asyncio.Semaphore(self.workers)
        self._task = asyncio.create_task(self._schedule(), name="vlmedge-batcher")

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on a model worker thread (warm-up), in turn with the batches."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def close(self, timeout: float = 60.0) -> None:
        """Stop admitting, answer everything admitted (drain), then stop the workers."""
        self._closing = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for w in list(self._waiting):
            if not w.future.done():
                w.future.set_exception(Closing())
        self._executor.shutdown(wait=True)

    # -- in-flight batching ------------------------------------------------------------------
    def _flies(self, job: Job) -> bool:
        """Whether a job decodes in the in-flight batch: one row, text out, on a bundle that allows it."""
        if not self.inflight or job.conversation is not None:
            return False
        try:
            task = self.pipe.caption_task if job.task == "caption" else job.task
            if self.pipe.manifest.tasks[task].get("postprocess", "text") != "text":
                return False
            options = {k: v for k, v in asdict(job.config).items() if v is not None}
            return self.pipe.settings(task, self.pipe._config(task, options)).num_beams == 1
        except Exception:  # options the pipeline refuses: the batch path says why
            return False

    def _join_flight(self, w: _Waiting) -> bool:
        """Hand a job to the running in-flight batch; False if none runs or the job does not fly."""
        if not self._flies(w.job):
            return False
        with self._flight_lock:
            if not self._flying:
                return False
            self._flight.append(w)
            return True

    def _run_flight(self, loop: asyncio.AbstractEventLoop) -> None:
        """The in-flight batch, on a model thread: joiners run their prompts, every row steps, rows that
        end (or whose client left) answer and leave; it returns when no row is left and none waits."""
        pipe = self.pipe
        fl = Inflight(pipe.backend, pipe.layers)
        rows: dict[int, list] = {}  # key -> [waiting job, its text stream, its stages so far, most rows it ran with]
        settle = lambda fut, value: loop.call_soon_threadsafe(_settle, fut, value)  # noqa: E731
        while True:
            with self._flight_lock:
                joining = []
                # joiners run their encoder and prompt together: they wait for a group (JOIN_GROUP, or the
                # free rows) unless the batch is empty or the oldest has waited two steps
                free = self.max_batch - len(rows)
                waited = time.perf_counter() - self._flight[0].arrived if self._flight else 0.0
                if not rows or len(self._flight) >= min(JOIN_GROUP, free) or waited >= 2 * self._batch_seconds:
                    while self._flight and len(rows) + len(joining) < self.max_batch:
                        joining.append(self._flight.popleft())
                if not joining and not rows:
                    self._flying = False
                    return
            for task, group in _by_task(w for w in joining if not w.future.done()):
                self._join(fl, rows, task, group, settle)
            for key in [k for k, (w, *_) in rows.items() if w.future.done() or (w.job.sink and w.job.sink.cancelled)]:
                self._leave(fl, rows, key, Closing(), settle)  # timed out, or its client left
            if not len(fl):
                continue
            started = time.perf_counter()
            try:
                tokens = fl.step()
            except Exception as e:  # every running row fails with it; joiners start a fresh batch
                for key in list(rows):
                    settle(rows.pop(key)[0].future, e)
                fl = Inflight(pipe.backend, pipe.layers)
                continue
            self._on_batch(len(fl), Timings())
            for row in rows.values():
                row[3] = max(row[3], len(fl))
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (time.perf_counter() - started)
            self._emit(fl, rows, tokens, settle)

    def _join(self, fl: Inflight, rows: dict, task: str, group: list[_Waiting], settle) -> None:
        pipe, t0 = self.pipe, time.perf_counter()
        try:
            name = pipe.caption_task if task == "caption" else task
            px = pipe.images([w.job.image for w in group])
            q = pipe.question_ids([w.job.question for w in group]) if task == "vqa" else None
            t1 = time.perf_counter()
            states, mask = pipe.encode(name, px, q)
            t2 = time.perf_counter()
            settings, seeds = [], []
            for w in group:
                options = {k: v for k, v in asdict(w.job.config).items() if v is not None}
                settings.append(pipe._checked_settings(name, options))
                seeds.append(w.job.config.seed)
            keys = [id(w) for w in group]
            prompt = pipe.manifest.tasks[name]["prompt_ids"]
            # tokens read before the first generated one, as Pipeline.generate_steps counts them
            image = int(pipe.manifest.dims.get("image_tokens", 0)) if q is not None else 0
            context = [len(prompt) + int(m.sum()) + image for m in mask]
            tokens = fl.add(keys, states, mask, prompt, settings, seeds, context)
        except Exception as e:  # these requests fail; the rows running go on
            for w in group:
                settle(w.future, e)
            return
        t3 = time.perf_counter()
        stages = {"start": t0, "preprocess": t1 - t0, "encoder": t2 - t1, "first_token": t3 - t2, "joined": t3}
        for w in group:
            rows[id(w)] = [w, TextStream(pipe.raw_text, w.job.stop), stages, len(fl)]
            if w.job.sink is not None:
                w.job.sink.put("start")
        self._emit(fl, rows, tokens, settle)

    def _emit(self, fl: Inflight, rows: dict, tokens: dict, settle) -> None:
        """Each row's new text to its stream; rows that ended answer and leave."""
        by_key = {r.key: r for r in fl.live}
        for key in tokens:
            w, text, *_ = rows[key]
            row = by_key[key]
            piece = text.push(row.generated, final=row.finished)
            if piece and w.job.sink is not None:
                w.job.sink.put("piece", piece)
            if row.finished or text.stopped:
                ids = row.generated
                finish = "stop" if text.stopped or (ids and ids[-1] in row.settings.eos) else "length"
                self._leave(fl, rows, key, (text, ids, row.context, finish), settle)

    def _leave(self, fl: Inflight, rows: dict, key: int, outcome, settle) -> None:
        w, text, times, shared = rows.pop(key)
        fl.remove([key])
        if isinstance(outcome, BaseException):
            settle(w.future, outcome)
            return
        text, ids, context, finish = outcome
        now = time.perf_counter()
        job = w.job
        stages = {"queue": times["start"] - w.arrived, **{k: times[k] for k in ("preprocess", "encoder", "first_token")},
                  "decode": now - times["joined"], "model": now - times["start"]}
        if job.sink is not None or job.stepwise:
            answered = Answered(Generation(text.sent, tuple(ids)), int(context), finish)
            if job.sink is not None:
                job.sink.put("end", answered)
            settle(w.future, Result(answered.generation, stages, shared, answered.prompt_tokens, finish))
        else:
            settle(w.future, Result(Generation(self.pipe.decode(ids), tuple(ids)), stages, shared))

    async def _start_flight(self, first: _Waiting) -> bool:
        """With a worker slot held: start an in-flight batch with every waiting job that flies (the batch
        keeps the slot until it empties). False if `first` does not fly."""
        if not self._flies(first.job):
            return False
        joining = [w for w in self._waiting if self._flies(w.job)]
        for w in joining:
            self._waiting.remove(w)
        loop = asyncio.get_running_loop()
        with self._flight_lock:
            self._flight.extend(joining)
            self._flying = True

        async def run() -> None:
            try:
                await loop.run_in_executor(self._executor, self._run_flight, loop)
            except BaseException as e:  # never leave a request without an answer
                with self._flight_lock:
                    left, self._flying = list(self._flight), False
                    self._flight.clear()
                for w in left:
                    _settle(w.future, e if isinstance(e, Exception) else RuntimeError(repr(e)))
                if not isinstance(e, Exception):
                    raise
            finally:
                self._slots.release()

        task = loop.create_task(run())
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return True

    # -- scheduling --------------------------------------------------------------------------
    def _compatible(self, first: Job) -> list[_Waiting]:
        chat = first.conversation is not None
        return [w for w in self._waiting if w.job.task == first.task and w.job.config == first.config
                and (w.job.conversation is not None) == chat]

    async def _next_waiting(self) -> _Waiting:
        while True:
            while self._waiting and self._waiting[0].future.done():  # timed out or cancelled while waiting
                self._waiting.popleft()
            if self._waiting:
                return self._waiting[0]
            self._wake.clear()
            await self._wake.wait()

    async def _schedule(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                await self._start_batch()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug here must not leave requests waiting for their timeout
                self._slots.release()
                for w in list(self._waiting):
                    if not w.future.done():
                        w.future.set_exception(e)
                self._waiting.clear()

    async def _start_batch(self) -> None:
        """With a worker slot held: wait for a request, gather its batch, start it (the batch releases the slot)."""
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next_waiting()
            if await self._start_flight(first):
                return
            cap = self.capacity(first.job)
            deadline = first.arrived + self.max_wait_s
            while len(self._compatible(first.job)) < cap and self._incoming > 0:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch = [w for w in self._compatible(first.job) if not w.future.done()][:cap]
            for w in batch:
                self._waiting.remove(w)
            if not batch:  # the first one timed out meanwhile
                continue
            task = loop.create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            return

    async def _execute(self, batch: list[_Waiting]) -> None:
        try:
            started = time.perf_counter()
            loop = asyncio.get_running_loop()
            outcomes, timings = await loop.run_in_executor(self._executor, self._run_batch, [w.job for w in batch])
            model = time.perf_counter() - started
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * model
            self._on_batch(len(batch), timings)
            stages = {"preprocess": timings.preprocess, "encoder": timings.encoder, "first_token": timings.first_token,
                      "decode": sum(timings.tokens), "model": model}
            for w, out in zip(batch, outcomes):
                if w.future.done():
                    continue
                if isinstance(out, BaseException):
                    w.future.set_exception(out)
                elif isinstance(out, Answered):
                    w.future.set_result(Result(out.generation, {"queue": started - w.arrived, **stages}, len(batch),
                                               out.prompt_tokens, out.finish_reason))
                else:
                    w.future.set_result(Result(out, {"queue": started - w.arrived, **stages}, len(batch)))
        except BaseException as e:  # never leave a request without an answer
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(e if isinstance(e, Exception) else RuntimeError(repr(e)))
            if not isinstance(e, Exception):
                raise
        finally:
            self._slots.release()

    def _run_batch(self, jobs: list[Job]) -> tuple[list[Any], Timings]:
        """One pipeline call for the batch (in a worker thread). If it fails, each job runs alone, so
        one request that breaks the model fails alone."""
        timings = Timings()
        try:
            return list(self._call(jobs, timings)), timings
        except Exception as e:
            if len(jobs) == 1:
                return [e], timings
        outcomes: list[Any] = []
        for job in jobs:
            try:
                outcomes.extend(self._call([job], Timings()))
            except Exception as e:
                outcomes.append(e)
        return outcomes, timings

    def _call(self, jobs: list[Job], timings: Timings) -> list[Any]:
        task, config = jobs[0].task, {k: v for k, v in asdict(jobs[0].config).items() if v is not None}  # None: the model's
        if any(j.sink is not None or j.stepwise or j.conversation is not None for j in jobs):
            return self._call_steps(jobs, config, timings)
        images = [j.image for j in jobs]
        if task == "caption":
            return self.pipe.caption(images, return_ids=True, batch_size=len(jobs), timings=timings, **config)
        return self.pipe.vqa(images, [j.question for j in jobs], return_ids=True, batch_size=len(jobs),
                             timings=timings, **config)


    def _call_steps(self, jobs: list[Job], config: dict, timings: Timings) -> list[Any]:
        """The batch decoded step by step, each row's text sent to its sink as it comes. Whatever fails
        before the first step raises (each job is then tried alone); what fails later is every unfinished
        row's outcome, as its stream has begun."""
        pipe = self.pipe
        if jobs[0].conversation is not None:
            steps = pipe.generate_steps(jobs[0].task, [], conversations=[j.conversation for j in jobs], timings=timings,
                                        **config)
        elif jobs[0].task == "caption":
            steps = pipe.generate_steps(pipe.caption_task, [j.image for j in jobs], timings=timings, **config)
        else:
            steps = pipe.generate_steps("vqa", [j.image for j in jobs], [j.question for j in jobs], timings=timings, **config)
        eos = set(steps.settings.eos)
        texts = [TextStream(pipe.raw_text, j.stop) for j in jobs]
        outcomes: list[Any] = [None] * len(jobs)
        for j in jobs:
            if j.sink is not None:
                j.sink.put("start")

        def end(b: int) -> None:
            ids = steps.ids(b)
            finish = "stop" if texts[b].stopped or (ids and ids[-1] in eos) else "length"
            outcomes[b] = Answered(Generation(texts[b].sent, tuple(ids)), int(steps.context[b]), finish)
            if jobs[b].sink is not None:
                jobs[b].sink.put("end", outcomes[b])

        try:
            for _ in steps:
                for b, j in enumerate(jobs):
                    if outcomes[b] is not None:
                        continue
                    if j.sink is not None and j.sink.cancelled:  # its client left: free the row
                        steps.stop([b])
                        outcomes[b] = Closing()
                        continue
                    piece = texts[b].push(steps.ids(b), final=bool(steps.finished[b]))
                    if piece and j.sink is not None:
                        j.sink.put("piece", piece)
                    if steps.finished[b] or texts[b].stopped:
                        steps.stop([b])
                        end(b)
        except Exception as e:
            return [e if o is None else o for o in outcomes]
        for b in range(len(jobs)):  # rows the loop ended at once (all finished in its last step)
            if outcomes[b] is None:
                end(b)
        return outcomes


def _settle(fut: asyncio.Future, value) -> None:
    """A future's result, or its exception, unless it is done already (timed out, cancelled)."""
    if fut.done():
        return
    if isinstance(value, BaseException):
        fut.set_exception(value)
    else:
        fut.set_result(value)


def _by_task(waiting) -> list[tuple[str, list[_Waiting]]]:
    groups: dict[str, list[_Waiting]] = {}
    for w in waiting:
        groups.setdefault(w.job.task, []).append(w)
    return list(groups.items())


__all__ = ["Answered", "Batcher", "Closing", "QueueFull", "Result", "Sink", "Ticket"]
