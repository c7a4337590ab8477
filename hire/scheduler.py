"""Continuous batching, the one decode loop: requests come and go between the steps of a batch.

A server starts the scheduler's thread and submits from any thread; `hire generate` and the other in-process
callers `drain` a list of requests on their own thread instead (each turn of the loop is `tick`).

Requests wait in a queue: a request is refused (QueueFull) when `queue_size` already wait beyond
the free slots. Each turn frees the slots of cancelled requests, prefills up to `prefills` waiting
requests into free slots (so prefill interleaves with decoding), then steps the batch (every slot `chunk`
tokens for the plain one). Each request's events go to its own sink, called on the thread that turns the
loop; `Stream` turns them into an asyncio iterator. The stopping rules are `hire.request.Request`'s and the
slots a `hire.batch.Batch`'s.

When the engine fails as a whole (hire.engine_api.EngineUnavailable: a host of a sharded engine died or hung),
the streams cut mid-way (a token already sent) end at once with EngineUnavailable (gRPC UNAVAILABLE, HTTP 503);
then the scheduler calls `engine.recover()` and puts the requests that had no token yet back at the head of
the queue, each at most `retries` times. A request past its retries, or every one when the engine cannot be
rebuilt, ends with EngineUnavailable. `recover(grow=True)` (a health check found a sharded engine on fewer
hosts than configured) rebuilds it between requests: once none is decoding or waiting.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass

from hire.batch import Batch, PlainBatch
from hire.engine_api import Engine, EngineUnavailable
from hire.request import Completion, Event, Request, make_requests
from hire.sampling import SamplingParams

log = logging.getLogger(__name__)

Sink = Callable[[Event | Exception], None]


class QueueFull(Exception):
    """The queue already holds as many waiting requests as the scheduler allows."""


def check_room(waiting: int, running: int, slots: int, queue_size: int) -> None:
    """QueueFull when `queue_size` requests already wait beyond the slots the `running` ones leave free."""
    if waiting >= queue_size + slots - running:
        raise QueueFull(f"all {slots} slots are busy and {queue_size} requests wait; retry later")


def deliver(job: Job, item: Event | Exception, cancel: Callable[[Job], None]) -> None:
    """Call the job's sink with `item`; a sink that fails (e.g. the caller's event loop has closed) is logged and
    the job cancelled with `cancel`."""
    try:
        job.sink(item)
    except Exception:  # noqa: BLE001 - one caller's failure must not stop the loop that serves the others
        log.exception("request %d: its sink failed; cancelling it", job.request.index)
        cancel(job)


@dataclass(eq=False)
class Job:
    """A submitted request and where its events go."""

    request: Request
    sink: Sink
    cancelled: bool = False
    done: bool = False
    retries: int = 0  # times it went back to the queue because the engine was rebuilt


class Scheduler:
    """Owns an engine and its decode state; `submit` and `cancel` may be called from any thread."""

    def __init__(self, engine: Engine, queue_size: int = 128, chunk: int = 4, prefills: int = 4, retries: int = 1,
                 batch: Callable[[], Batch] | None = None):
        """`batch` makes a fresh hire.batch.Batch over `engine` (at start and after a failure); by default a
        hire.batch.PlainBatch decoding `chunk` tokens a step."""
        if queue_size < 1 or chunk < 1 or prefills < 1 or retries < 0:
            raise ValueError("queue_size, chunk and prefills must be >= 1, retries >= 0")
        self.engine, self.queue_size, self.prefills, self.retries = engine, queue_size, prefills, retries
        self._chunk = chunk
        self._new_batch = batch or (lambda: PlainBatch(engine, chunk))
        self._batch: Batch | None = None  # None while the engine is down: rebuilt before the next admission
        try:
            self._batch = self._new_batch()
        except EngineUnavailable:
            log.warning("the engine is down; the first request will rebuild it")
        self._recover_asked = False
        self._grow_asked = False
        self._waiting: deque[Job] = deque()
        self._cancelled: list[Job] = []
        self._running: dict[int, Job] = {}  # by request index: the jobs in (or entering) a slot
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="hire-scheduler", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def chunk(self) -> int:
        """Decode steps between admissions."""
        return self._chunk

    @property
    def queue_depth(self) -> int:
        """Requests not yet in a slot."""
        return len(self._waiting)

    @property
    def busy_slots(self) -> int:
        return len(self._batch.live) if self._batch else 0

    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread; requests still waiting or decoding get a RuntimeError."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    def recover(self, grow: bool = False) -> None:
        """Ask the scheduler thread to call `engine.recover()` before its next engine call (a health check found
        the engine down), or with `grow`, `engine.recover(grow=True)` once no request is decoding or waiting."""
        with self._cond:
            if grow:
                self._grow_asked = True
            else:
                self._recover_asked = True
            self._cond.notify()

    def submit(self, prompt: Sequence[int], params: SamplingParams, adapter: int, sink: Sink) -> Job:
        """Queue a request. Raises ValueError naming the field the engine cannot run, QueueFull when full."""
        return self.enqueue(Request(next(self._ids), list(prompt), params, adapter, self.engine), sink)

    def enqueue(self, request: Request, sink: Sink) -> Job:
        """Queue a built request, its index unused by the scheduler's other requests (`submit` numbers its own).
        Raises QueueFull when full."""
        job = Job(request, sink)
        with self._cond:
            if self._stopping:
                raise RuntimeError("the scheduler has stopped")
            check_room(len(self._waiting), len(self._running), self.engine.slots, self.queue_size)
            self._waiting.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """End `job` with no further events: out of the queue now, out of its slot before the next chunk."""
        with self._cond:
            if job.cancelled or job.done:
                return
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)
            else:
                self._cancelled.append(job)
                self._cond.notify()

    def drain(self, requests: Sequence[Request]) -> Iterator[Event]:
        """Decode `requests` on the caller's thread (the scheduler's own not started), yielding their events as they
        come, each request's in order, until the scheduler is idle; raises the first request's failure. Leaving the
        iteration early cancels the requests not done."""
        if self.alive:
            raise RuntimeError("the scheduler's thread is running: submit to it instead")
        items: deque[Event | Exception] = deque()
        jobs = [self.enqueue(request, items.append) for request in requests]
        try:
            while self._has_work():
                self.tick()
                while items:
                    if isinstance(item := items.popleft(), Exception):
                        raise item
                    yield item
        finally:
            for job in jobs:
                self.cancel(job)

    def _has_work(self) -> bool:
        return bool(self._waiting or self._cancelled or self._recover_asked or (self._batch and self._batch.live)
                    or (self._grow_asked and not self._running))

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or self._has_work())
                if self._stopping:
                    break
            self.tick()
        with self._cond:
            left = [*self._waiting, *self._running.values()]
            self._waiting.clear()
        for job in left:
            self._send(job, RuntimeError("the scheduler has stopped"))

    def tick(self) -> None:
        """One turn of the loop: free the slots of cancelled requests, rebuild the engine if asked, admit up to
        `prefills` waiting requests, step the batch; events go to the jobs' sinks. Turned by the scheduler's thread
        once started, else by the caller (`drain`)."""
        with self._cond:
            asked, self._recover_asked = self._recover_asked, False
            grow = self._grow_asked and not self._running and not self._waiting and not self._cancelled
            self._grow_asked &= not grow
            for job in self._cancelled:
                if self._batch:
                    self._batch.drop(job.request)
                self._running.pop(job.request.index, None)
            self._cancelled.clear()
            free = self._batch.free_slots() if self._batch else list(range(self.engine.slots))
            admitted = [(slot, self._waiting.popleft()) for slot in free[: min(self.prefills, len(self._waiting))]]
            self._running.update((job.request.index, job) for _, job in admitted)
        if asked or grow or (admitted and self._batch is None):
            self._recover(None if asked or grow else EngineUnavailable("the engine failed before this request"),
                          grow=grow)
        for slot, job in admitted:
            if self._running.get(job.request.index) is job:  # not sent back to the queue or failed by _recover
                self._admit(job, slot)
        if self._batch and self._batch.live:
            self._step()

    def _admit(self, job: Job, slot: int) -> None:
        try:
            event = self._batch.admit(job.request, slot)
        except EngineUnavailable as e:
            self._recover(e, job)
            return
        except Exception as e:  # noqa: BLE001 - one request the engine fails on must not stop the others
            log.exception("prefill failed for request %d", job.request.index)
            self._send(job, e)
            return
        self._send(job, event)

    def _step(self) -> None:
        try:
            events = self._batch.step()
        except EngineUnavailable as e:
            self._recover(e)
            return
        except Exception as e:  # noqa: BLE001 - fail the batch's requests, keep serving
            log.exception("decode step failed; failing the %d requests decoding", len(self._batch.live))
            for req in self._batch.live.values():
                self._send(self._running[req.index], e)
            try:
                self._batch = self._new_batch()  # the old state was donated to the failed call
            except EngineUnavailable:
                self._batch = None  # rebuilt before the next admission
            return
        for event in events:
            self._send(self._running[event.index], event)

    def _recover(self, error: EngineUnavailable | None, failed: Job | None = None, grow: bool = False) -> None:
        """Rebuild the engine after `error` (with None, only if `engine.recover(grow=grow)` finds it down, or with
        `grow` on fewer hosts than configured). After an error the streams cut mid-way end at once; the other
        requests in flight go back to the head of the queue, those that were in the engine (`failed` while being
        prefilled) using up one retry, or fail with EngineUnavailable when none is left. When the engine cannot be
        rebuilt, every request in flight fails."""
        tried = set(self._batch.live.values()) if self._batch else set()
        tried |= {failed.request} if failed else set()
        if error is None and not hasattr(self.engine, "recover"):
            return
        if error is not None:
            self._cut(error)
        try:
            rebuilt = self.engine.recover(grow=grow)  # AttributeError: this engine cannot rebuild itself
            if error is None and not rebuilt:
                return
            self._batch = self._new_batch()
            ok = True
        except EngineUnavailable as e:  # its message says what is lost and when to retry
            log.warning("the engine could not be rebuilt: %s", e)
            self._batch, ok, error = None, False, e
        except Exception as e:  # noqa: BLE001 - whatever stops the rebuild fails the requests, not the thread
            log.exception("the engine could not be rebuilt")
            self._batch, ok = None, False
            error = EngineUnavailable(f"{error or 'the engine is down'}; rebuilding it failed: {e}")
        error = error or EngineUnavailable("grown back: more hosts could be placed" if grow
                                           else "a health check found the engine down")
        self._cut(error)  # after a health check's rebuild: the streams that were decoding through it
        failing = []
        with self._cond:
            jobs = list(self._running.values())
            self._running.clear()
            retry = []
            for job in jobs:
                again = ok and not job.cancelled and (job.request not in tried or job.retries < self.retries)
                job.retries += again and job.request in tried
                (retry if again else failing).append(job)
            self._waiting.extendleft(reversed(retry))
        if ok:
            log.warning("the engine was rebuilt (%s); %d requests go back to the queue, %d fail", error, len(retry),
                        len(failing))
        for job in failing:
            self._send(job, error)

    def _cut(self, error: EngineUnavailable) -> None:
        """End the requests that have sent tokens with `error`: their stream cannot go on from a rebuilt engine."""
        with self._cond:
            cut = [job for job in self._running.values() if job.request.out.tokens]
        for job in cut:
            n = len(job.request.out.tokens)
            self._send(job, EngineUnavailable(f"the stream was cut after {n} token{'s' * (n != 1)}: {error}",
                                              getattr(error, "retry_after", None)))

    def _send(self, job: Job, item: Event | Exception) -> None:
        if isinstance(item, Exception) or item.finish_reason is not None:
            job.done = True
            self._running.pop(job.request.index, None)
        if not job.cancelled:
            deliver(job, item, self.cancel)


class Stream:
    """A request submitted from an asyncio loop: `async for event in stream` (or `stream.batches()`);
    leaving `with` cancels it."""

    def __init__(self, scheduler: Scheduler, prompt: Sequence[int], params: SamplingParams, adapter: int = -1):
        loop = asyncio.get_running_loop()
        self._items: deque[Event | Exception] = deque()
        self._ready = asyncio.Event()
        self._scheduler, self._finished = scheduler, False
        self.job = scheduler.submit(prompt, params, adapter, lambda item: loop.call_soon_threadsafe(self._put, item))

    def _put(self, item: Event | Exception) -> None:
        self._items.append(item)
        self._ready.set()

    @property
    def completion(self) -> Completion:
        """The request's output so far (complete once the last event has arrived)."""
        return self.job.request.out

    def cancel(self) -> None:
        self._scheduler.cancel(self.job)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()

    async def batches(self) -> AsyncIterator[list[Event]]:
        """Every event that has arrived, as one list (never empty), until the last; raises the request's failure.

        A consumer slower than the engine gets several tokens per item instead of falling behind.
        """
        while not self._finished:
            await self._ready.wait()
            batch = []
            while self._items and not self._finished:
                item = self._items.popleft()
                if isinstance(item, Exception):
                    self._finished = True
                    if batch:
                        yield batch
                    raise item
                batch.append(item)
                self._finished = item.finish_reason is not None
            if not self._items:
                self._ready.clear()
            yield batch

    async def __aiter__(self) -> AsyncIterator[Event]:
        async for batch in self.batches():
            for event in batch:
                yield event


def run(engine: Engine, requests: Sequence[Request], batch: Callable[[], Batch]) -> Iterator[Event]:
    """Decode every request on this thread through a Scheduler of `batch()`es, each request entering as soon as a
    slot is free; yields the events as tokens arrive."""
    return Scheduler(engine, queue_size=max(len(requests), 1), prefills=engine.slots, batch=batch).drain(requests)


def warm_up(engine: Engine, batch: Callable[[], Batch]) -> None:
    """Compile what `batch()`es run before a client's request: a prompt at every prompt bucket of the engine, and one
    greedy request from a one-token prompt to the end of the context, through every attention span; on this
    thread."""
    prompts = [[0] * min(b, engine.max_len - 1) for b in engine.buckets] + [[0]]
    params = [SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)] * len(engine.buckets)
    params.append(SamplingParams(temperature=0.0, max_tokens=engine.max_len, ignore_eos=True))
    for _ in run(engine, make_requests(engine, prompts, params, None), batch):
        pass
