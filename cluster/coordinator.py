"""The tandem coordinator: speculative decoding with the drafter and the large model in separate Ray actors,
driven over gRPC (hire.internal.v1, protos/internal.proto), with continuous batching over the cache slots.

`Workers` starts a `workers.verify.VerifyWorker` (the large model) and a `workers.draft.DraftWorker` (the small
model: a standalone draft model, the tandem small model, or n-gram) and connects to their gRPC servers.
`Coordinator` owns the requests (hire.request.Request: stop rules, max tokens, the end of the context), admits
them into free slots between rounds and runs rounds of Draft and Verify calls. It has hire.scheduler.Scheduler's
interface (`submit` with an event sink, `cancel`, queue depth and busy slots) and hire.engine.Engine's request
checks, so the servers' request path (hire.scheduler.Stream, cluster.serve_app.EngineServer) serves speculative
decoding through it unchanged (`hire serve --draft NAME`):

- unpipelined: draft block b for every live row, verify it, draft b + 1 (carrying b's verdicts), ...
- pipelined: while the verifier checks block b of a row, the drafter already drafts that row's block b + 1 from
  b's last draft, as if b were fully accepted; the verifier defers a fully accepted row's bonus token
  (hire.speculative.verify_block's `defer`), so that last draft becomes the row's pending token and the next
  block starts from it. A row whose new pending token is not the one its pre-draft started from (a draft was
  rejected) throws that pre-draft away and is drafted afresh while other rows verify; rows whose pre-drafts held
  go straight into the next verification. Greedy rows give the large model's output token for token and
  sampled rows its distribution, exactly, in both modes (docs/coordinator.md).

Faults: every call has a deadline; a worker that died or hangs (UNAVAILABLE, DEADLINE_EXCEEDED) is killed and
restarted, and every live slot is prefilled again on it (its committed tokens; the verifier resumes the pending
token rather than sampling one), then decoding goes on. A worker that fails `restarts` times in a row, or answers
a call with an error, ends the requests in flight and queued with a WorkerError that says so.

`CoordinatorActor` runs a Coordinator in its own actor. `python -m cluster.coordinator bench` measures it.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import secrets
import statistics
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from hire.checkpoint import resolve_model
from hire.engine import Engine, buckets
from hire.engine_api import EngineUnavailable
from hire.generate import _requests
from hire.request import Completion, Event, Request
from hire.sampling import SamplingParams
from hire.scheduler import Job, Sink, check_room, deliver
from hire.speculative import SpecStats
from hire.tokenizer import load_tokenizer
from protos import internal_pb2 as pb
from protos import internal_pb2_grpc
from workers.auth import WithKey
from workers.draft import DraftWorker
from workers.rpc import message_limit, options, pack, sampling_message, unpack
from workers.shards import remove_named_group
from workers.verify import VerifyWorker

log = logging.getLogger(__name__)

DOWN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)  # the worker died or hangs: restart it


class WorkerError(EngineUnavailable):
    """A worker could not be (re)started or failed a call; the requests it was serving end with this (servers
    answer it as an engine that is down: UNAVAILABLE, HTTP 503)."""


class _Down(Exception):
    """A worker died or did not answer in time (`which`: "verify" or "draft")."""

    def __init__(self, which: str, detail: str):
        super().__init__(f"{which} worker: {detail}")
        self.which = which


class Workers:
    """A VerifyWorker and a DraftWorker, their gRPC stubs, and restarts. `options` are Ray actor options for the
    "verify" and "draft" actors (default one CPU each); with `group` (workers.shards.ShardedEngine's keywords) the
    VerifyWorker drives the large model sharded over that group of hosts, and a restart starts a fresh group.

    The workers serve only calls that carry `secret`, made here and handed to them through Ray: whoever else reaches
    their ports is refused (UNAUTHENTICATED)."""

    def __init__(self, target: str, draft: str, slots: int, max_len: int | None, gamma: int, dtype: str | None = None,
                 compilation_cache: str | None = None, host: str | None = None, start_timeout: float = 300.0,
                 options: dict[str, dict] | None = None, group: dict[str, Any] | None = None):
        self.target, self.draft, self.slots, self.gamma, self.dtype = target, draft, slots, gamma, dtype
        self.group, self.group_name = group, ""  # the verifier's shard group, and its placement group's name
        self.max_len, self.compilation_cache, self.host = max_len, compilation_cache, host
        self.start_timeout = start_timeout
        self.options = {"verify": {"num_cpus": 1}, "draft": {"num_cpus": 1}} | (options or {})
        self.actors: dict[str, Any] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self.channels: dict[str, grpc.Channel] = {}
        self.secret = secrets.token_urlsafe(32)
        try:
            self.start("verify")
            self.start("draft")
        except BaseException:
            self.shutdown()
            raise

    @property
    def verifier(self) -> internal_pb2_grpc.VerifierStub:
        return internal_pb2_grpc.VerifierStub(self.channels["verify"])

    @property
    def drafter(self) -> internal_pb2_grpc.DrafterStub:
        return internal_pb2_grpc.DrafterStub(self.channels["draft"])

    def start(self, which: str) -> float:
        """(Re)start the `which` worker ("verify" or "draft") and connect to it; seconds it took."""
        began = time.perf_counter()
        self.stop(which)
        kind = VerifyWorker if which == "verify" else DraftWorker
        actor = kind.options(**self.options[which]).remote()
        self.actors[which] = actor
        if which == "verify":
            self.group_name = f"hire-verify-{uuid.uuid4().hex}" if self.group else ""
            call = actor.start.remote(self.target, self.slots, self.max_len, self.gamma, self.secret, self.dtype,
                                      self.compilation_cache, self.host,
                                      self.group and self.group | {"name": self.group_name})
        else:
            verify = self.info["verify"]
            call = actor.start.remote(self.draft, verify["cfg"], self.slots, verify["max_len"], self.gamma,
                                      self.secret, self.dtype, self.compilation_cache, self.host)
        name = self.target if which == "verify" else self.draft
        try:
            self.info[which] = ray.get(call, timeout=self.start_timeout)
            channel = grpc.insecure_channel(self.info[which]["address"], options=options(self.message_limit()))
            self.channels[which] = grpc.intercept_channel(channel, WithKey(self.secret))
            grpc.channel_ready_future(channel).result(timeout=self.start_timeout)
        except GetTimeoutError:
            raise WorkerError(f"the {which} worker ({name}) did not start within {self.start_timeout:.0f}s") from None
        except grpc.FutureTimeoutError:
            raise WorkerError(f"the {which} worker ({name}) serves no gRPC at {self.info[which]['address']}") from None
        except RayTaskError as e:
            raise WorkerError(f"the {which} worker ({name}) failed to start: {e.cause!r}") from None
        except RayActorError as e:
            raise WorkerError(f"the {which} worker ({name}) died while starting: {e}") from None
        return time.perf_counter() - began

    def message_limit(self) -> int:
        """The largest reply the coordinator takes: draft distributions from the drafter, hidden states from the
        verifier for the layers a tandem drafter reads (before the drafter has started: every layer)."""
        cfg, max_len = self.info["verify"]["cfg"], self.info["verify"]["max_len"]
        layers = len(self.info["draft"]["wants_hidden"]) if "draft" in self.info else cfg.n_layers + 1
        return message_limit(self.slots, max_len, self.gamma, cfg.vocab_size, layers * cfg.dim)

    def stop(self, which: str) -> None:
        """Close the channel to the `which` worker and kill its actor (if any)."""
        if (channel := self.channels.pop(which, None)) is not None:
            channel.close()
        if (actor := self.actors.pop(which, None)) is not None and ray.is_initialized():
            ray.kill(actor, no_restart=True)
            if which == "verify" and self.group_name:  # its hosts die with it, their placement group stays
                remove_named_group(self.group_name)

    def shutdown(self) -> None:
        for which in ("draft", "verify"):
            self.stop(which)


@dataclass
class Block:
    """A Draft reply and the pending tokens and positions its rows were drafted from."""

    reply: pb.DraftReply
    tokens: np.ndarray  # [B]
    positions: np.ndarray  # [B]
    drafts: np.ndarray = field(init=False)  # [B, γ]
    proposed: np.ndarray = field(init=False)  # [B, γ]

    def __post_init__(self) -> None:
        self.drafts = unpack(self.reply.drafts, "drafts", dtype="int32")
        self.proposed = unpack(self.reply.proposed, "proposed", dtype="bool")


@dataclass
class CoordinatorStats(SpecStats):
    """SpecStats over the coordinator's rounds, plus its calls, pre-drafts and restarts."""

    rounds: int = 0
    verify_calls: int = 0
    predrafts_used: int = 0  # rows whose block came from a draft made while their previous block was verified
    predrafts_discarded: int = 0  # pre-drafts thrown away: a draft of the previous block was rejected
    cancelled: int = 0  # requests that left their slot cancelled (the client went away)
    restarts: dict[str, int] = field(default_factory=lambda: {"verify": 0, "draft": 0})
    restart_seconds: list[float] = field(default_factory=list)
    call_seconds: dict[str, float] = field(default_factory=dict)  # by "worker.Method": time from send to answer

    def as_dict(self) -> dict[str, Any]:
        return super().as_dict() | {"proposed": self.proposed, "accepted": self.accepted, "rounds": self.rounds,
                                    "verify_calls": self.verify_calls,
                                    "predrafts_used": self.predrafts_used,
                                    "predrafts_discarded": self.predrafts_discarded, "cancelled": self.cancelled,
                                    "restarts": dict(self.restarts),
                                    "restart_seconds": [round(s, 2) for s in self.restart_seconds],
                                    "call_seconds": {k: round(v, 3) for k, v in self.call_seconds.items()}}


def pending(job: Job) -> tuple[int, int]:
    """A live request's last decided token (not yet in the large model's cache) and its position."""
    out = job.request.out
    return out.tokens[-1], len(out.prompt_tokens) + len(out.tokens) - 1


class Coordinator:
    """Speculative decoding of `target` drafted by `draft` (a name or path, or "ngram"), γ = `gamma`, over `slots`
    cache slots, in two Ray actors driven over gRPC; `pipelined` overlaps drafting with verification (see the
    module's docstring). Needs a running Ray (ray.init). `timeout` bounds every call, `start_timeout` every
    (re)start; `restarts` is how many restarts in a row a failure may take before requests fail. Up to
    `queue_size` requests wait beyond the free slots (then QueueFull). With `verify_hosts` > 1 or
    `devices_per_host` > 1 the large model is sharded over that many host actors of that many devices each
    (workers.shards), which its worker drives; a host that dies or hangs restarts the verifier with a fresh group."""

    check_request = Engine.check_request

    def __init__(self, target: str = "stdlib-9m", draft: str = "stdlib-9m-draft", slots: int = 8,
                 max_len: int | None = None, gamma: int = 4, pipelined: bool = True, dtype: str | None = None,
                 timeout: float = 120.0, start_timeout: float = 300.0, restarts: int = 3,
                 compilation_cache: str | None = None, host: str | None = None,
                 options: dict[str, dict] | None = None, queue_size: int = 128, verify_hosts: int = 1,
                 devices_per_host: int = 1):
        if min(gamma, slots, queue_size, verify_hosts, devices_per_host) < 1:
            raise ValueError(f"gamma, slots, queue_size, verify_hosts and devices_per_host must be >= 1, got {gamma}, "
                             f"{slots}, {queue_size}, {verify_hosts} and {devices_per_host}")
        group = {"hosts": verify_hosts, "devices_per_host": devices_per_host, "call_timeout": timeout,
                 "start_timeout": start_timeout} if verify_hosts * devices_per_host > 1 else None
        self.workers = Workers(target, draft, slots, max_len, gamma, dtype, compilation_cache, host, start_timeout,
                               options, group)
        verify, drafter = self.workers.info["verify"], self.workers.info["draft"]
        self.cfg, self.max_len, self.slots, self.gamma = verify["cfg"], verify["max_len"], slots, gamma
        self.buckets = buckets(self.max_len)
        self.tokenizer = load_tokenizer(resolve_model(target))
        self.hidden_layers, self.trims = list(drafter["wants_hidden"]), drafter["stops_early"]
        self.pipelined, self.timeout, self.restarts = pipelined, timeout, restarts
        self.stats = CoordinatorStats()
        self.queue_size = queue_size
        self.live: dict[int, Job] = {}  # by slot
        self.queue: deque[Job] = deque()
        self.ids = itertools.count()
        self.block: Block | None = None  # the last Draft reply
        self.ready = np.zeros(slots, bool)  # pipelined: rows whose block in self.block waits for verification
        self.update: pb.Verdicts | None = None  # verdicts the next Draft call carries
        self.closed = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="coordinator", daemon=True)
        self.thread.start()

    # -- requests --------------------------------------------------------------------------------------------------

    @property
    def engine(self) -> Coordinator:
        """What a server reads as the engine (cfg, slots, max_len, tokenizer, check_request): the coordinator."""
        return self

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self.queue)

    @property
    def busy_slots(self) -> int:
        return len(self.live)

    def submit(self, prompt: Sequence[int], params: SamplingParams, adapter: int, sink: Sink) -> Job:
        """Queue a request (Scheduler.submit): each token's hire.request.Event goes to `sink` on the coordinator's
        thread, the last with its finish_reason, or a WorkerError. ValueError names a field the model cannot run;
        QueueFull when `queue_size` requests already wait beyond the free slots."""
        job = Job(Request(next(self.ids), list(prompt), params, adapter, self), sink)
        self._queue(job)
        return job

    def _queue(self, job: Job) -> None:
        with self.cond:
            if self.closed:
                raise WorkerError("the coordinator is shut down")
            check_room(len(self.queue), len(self.live), self.slots, self.queue_size)
            self.queue.append(job)
            self.cond.notify()

    def cancel(self, job: Job) -> None:
        """End `job` with no further events: out of the queue now, out of its slot before the next round."""
        with self.cond:
            if job.cancelled or job.done:
                return
            job.cancelled = True
            if job in self.queue:
                self.queue.remove(job)

    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 adapters: Sequence[int] | None = None) -> list[Completion]:
        """Complete every prompt (text or token ids), in order, as hire.generate.generate does."""
        futures = []
        for request in _requests(self, prompts, params, adapters):
            future: Future = Future()

            def sink(item: Event | Exception, future: Future = future, out: Completion = request.out) -> None:
                if isinstance(item, Exception):
                    future.set_exception(item)
                elif item.finish_reason:
                    future.set_result(out)

            self._queue(Job(request, sink))
            futures.append(future)
        return [f.result() for f in futures]

    def warm_up(self) -> None:
        """Compile the workers' programs before a client's request: a prompt at every prompt bucket, and one greedy
        request from a one-token prompt to the end of the context, through every attention span."""
        prompts = [[0] * min(b, self.max_len - 1) for b in self.buckets] + [[0]]
        params = [SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)] * len(self.buckets)
        self.generate(prompts, [*params, SamplingParams(temperature=0.0, max_tokens=self.max_len, ignore_eos=True)])
        self.stats = CoordinatorStats()

    def set_pipelined(self, pipelined: bool) -> None:
        """Switch the mode (between runs: the coordinator must be idle)."""
        with self.cond:
            if self.live or self.queue:
                raise RuntimeError("switch modes only when no request is running")
            self.pipelined, self.block, self.ready[:] = pipelined, None, False

    def shutdown(self) -> None:
        """Fail what is queued or running, stop the loop and the workers."""
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(timeout=self.timeout)
        self.workers.shutdown()

    # -- the loop --------------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.cond:
                while not (self.queue or self.live or self.closed):
                    self.cond.wait()
                if self.closed:
                    break
            began = time.perf_counter()
            try:
                self._drop_cancelled()
                self._admit()
                if self.live:
                    self._round()
                    self.stats.rounds += 1
            except WorkerError as e:
                self._fail(e)
            except Exception as e:  # a bug: end the requests with it rather than leave them waiting
                log.exception("coordinator loop failed")
                self._fail(WorkerError(f"the coordinator failed: {type(e).__name__}: {e}"))
            self.stats.seconds += time.perf_counter() - began
        self._fail(WorkerError("the coordinator is shut down"))

    def _fail(self, error: WorkerError) -> None:
        with self.cond:
            failed = [*self.live.values(), *self.queue]
            self.live.clear()
            self.queue.clear()
        for job in failed:
            self._emit(job, error)
        self.block, self.update, self.ready[:] = None, None, False

    def _emit(self, job: Job, item: Event | Exception) -> None:
        """Send an event or the request's failure to its sink (nothing once it is cancelled or done)."""
        if job.done or job.cancelled:
            return
        job.done = isinstance(item, Exception) or item.finish_reason is not None
        deliver(job, item, self.cancel)

    def _push(self, job: Job, token: int, logprob: float) -> bool:
        """Add a decided token to the request and tell its sink; whether the request has ended."""
        self.stats.tokens += 1
        event = job.request.push(token, logprob)
        self._emit(job, event)
        return event.finish_reason is not None

    def _drop_cancelled(self) -> None:
        """Free the slots of cancelled requests, and take them out of the verdicts the next Draft call carries (a
        new request may take the slot before then)."""
        with self.cond:
            gone = [slot for slot, job in self.live.items() if job.cancelled]
            for slot in gone:
                del self.live[slot]
        self.stats.cancelled += len(gone)
        if gone:
            self.ready[gone] = False
            if self.update is not None:
                rows = unpack(self.update.rows, "rows", dtype="bool").copy()
                rows[gone] = False
                self.update.rows.CopyFrom(pack(rows))

    def _call(self, which: str, method: str, request: Any) -> Any:
        """A unary call to the `which` worker; _Down when it died or hangs, WorkerError when it answers an error."""
        return self._result(which, self._send(which, method, request))

    def _send(self, which: str, method: str, request: Any) -> grpc.Future:
        """Start a call to the `which` worker; its time to the answer adds to stats.call_seconds."""
        stub = self.workers.verifier if which == "verify" else self.workers.drafter
        began, name = time.perf_counter(), f"{which}.{method}"
        future = getattr(stub, method).future(request, timeout=self.timeout)
        seconds = self.stats.call_seconds

        def done(_: grpc.Future) -> None:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - began

        future.add_done_callback(done)
        return future

    def _result(self, which: str, future: grpc.Future) -> Any:
        try:
            return future.result()
        except grpc.RpcError as e:
            if e.code() in DOWN:
                raise _Down(which, f"{e.code().name}: {e.details()}") from None
            raise WorkerError(f"the {which} worker answered {e.code().name}: {e.details()}") from None

    def _recover(self, down: set[str]) -> None:
        """Restart the workers in `down` and prefill every live slot again; WorkerError after `restarts` tries."""
        for _ in range(self.restarts):
            try:
                for which in sorted(down, reverse=True):  # the verifier first: the drafter's prefill needs it
                    self.stats.restart_seconds.append(self.workers.start(which))
                    self.stats.restarts[which] += 1
                    log.warning("restarted the %s worker", which)
                self._resync(resume_verifier="verify" in down)
                return
            except _Down as e:
                down = down | {e.which}
        raise WorkerError(f"the {' and '.join(sorted(down))} worker failed {self.restarts} restarts in a row")

    def _resync(self, resume_verifier: bool) -> None:
        """Prefill every live slot's committed tokens on the drafter (and on the verifier, resuming its pending
        token, when it was restarted or the drafter needs the large model's states); pre-drafts are dropped."""
        self.block, self.update, self.ready[:] = None, None, False
        for slot, job in self.live.items():
            out = job.request.out
            committed, (token, _) = out.prompt_tokens + out.tokens[:-1], pending(job)
            hidden = None
            if resume_verifier or self.hidden_layers:
                reply = self._call("verify", "Prefill", self._verify_prefill(slot, job.request, committed, token))
                hidden = reply.hidden
            self._call("draft", "Prefill", pb.DraftPrefillRequest(slot=slot, tokens=committed, hidden=hidden,
                                                                  sampling=sampling_message(job.request.params)))

    def _verify_prefill(self, slot: int, request: Request, tokens: list[int],
                        resume: int | None = None) -> pb.VerifyPrefillRequest:
        return pb.VerifyPrefillRequest(slot=slot, tokens=tokens, sampling=sampling_message(request.params),
                                       adapter=request.adapter, hidden_layers=self.hidden_layers, resume_token=resume)

    def _admit(self) -> None:
        """Prefill queued requests into free slots (both workers); a request that ends at its first token is done."""
        for slot in range(self.slots):
            if slot in self.live:
                continue
            with self.cond:
                if not self.queue:
                    return
                job = self.queue.popleft()
            try:
                while True:
                    try:
                        self._start(slot, job)
                        break
                    except _Down as e:
                        self._recover({e.which})
                        if slot in self.live:  # the resync prefilled it
                            break
            except WorkerError as e:
                self._emit(job, e)
                raise

    def _start(self, slot: int, job: Job) -> None:
        request = job.request
        prompt = request.out.prompt_tokens
        reply = self._call("verify", "Prefill", self._verify_prefill(slot, request, prompt))
        self.stats.requests += 1
        if self._push(job, reply.token, reply.logprob):
            return
        self.live[slot], self.ready[slot] = job, False
        self._call("draft", "Prefill", pb.DraftPrefillRequest(slot=slot, tokens=prompt, hidden=reply.hidden,
                                                              sampling=sampling_message(request.params)))

    def _round(self) -> None:
        """One round: a Draft call, and a Verify call after it (unpipelined) or beside it (pipelined)."""
        B = self.slots
        live = np.zeros(B, bool)
        tokens, positions = np.zeros(B, np.int32), np.zeros(B, np.int32)
        for slot, job in self.live.items():
            live[slot] = True
            tokens[slot], positions[slot] = pending(job)
        block = self.block
        if self.pipelined and block is not None:
            verify = live & self.ready
            k = block.proposed.sum(axis=1)
            ahead = verify & (k > 0)  # drafted from the block's last draft, as if it were all accepted
            last = block.drafts[np.arange(B), np.maximum(k - 1, 0)]
            tokens = np.where(ahead, last, tokens).astype(np.int32)
            positions = np.where(ahead, block.positions + k, positions).astype(np.int32)
            # a row can go on past this block only if its pre-draft would start inside the context
            draft = live & ~(verify & (k == 0)) & (positions < self.max_len - 1)
        else:
            verify, ahead, draft = (np.zeros(B, bool) if self.pipelined else live), np.zeros(B, bool), live
        request = pb.DraftRequest(rows=pack(draft), tokens=pack(tokens), positions=pack(positions),
                                  reach=int(positions[draft].max(initial=0)) + self.gamma + 1, update=self.update)
        self.update = None
        try:
            if self.pipelined:
                drafting = self._send("draft", "Draft", request)
                verdicts, down = None, set()
                if verify.any():
                    try:
                        verdicts = self._call("verify", "Verify", self._verify_request(block, verify))
                    except _Down:
                        down.add("verify")
                try:
                    drafted = self._result("draft", drafting)
                except _Down:
                    down.add("draft")
                still = np.zeros(B, bool) if verdicts is None else self._apply(block, verify, verdicts)
                if down:
                    self._recover(down)
                    return
                held = self._ready(Block(drafted, tokens, positions), draft, ahead)
                if not self.hidden_layers:  # the steps of a held pre-draft fed every token the update commits
                    still &= ~held
                self._verdicts(block, still, verdicts)
            else:
                block = Block(self._call("draft", "Draft", request), tokens, positions)
                verdicts = self._call("verify", "Verify", self._verify_request(block, verify))
                self._verdicts(block, self._apply(block, verify, verdicts), verdicts)
        except _Down as e:
            self._recover({e.which})

    def _verify_request(self, block: Block, rows: np.ndarray) -> pb.VerifyRequest:
        reply = block.reply
        return pb.VerifyRequest(rows=pack(rows), drafts=reply.drafts, proposed=reply.proposed, sampled=reply.sampled,
                                q=reply.q if reply.HasField("q") else None, defer=self.pipelined, trims=self.trims,
                                hidden_layers=self.hidden_layers,
                                reach=int(block.positions[rows].max(initial=0)) + self.gamma + 1)

    def _apply(self, block: Block, rows: np.ndarray, reply: pb.VerifyReply) -> np.ndarray:
        """Push each verified row's tokens to its request, freeing the slots of those that end; the verified rows
        still live [B]."""
        self.stats.verify_calls += 1
        B = self.slots
        tokens = unpack(reply.tokens, "tokens", (B, self.gamma + 1), "int32")
        logprobs = unpack(reply.logprobs, "logprobs", (B, self.gamma + 1), "float32")
        accepted = unpack(reply.accepted, "accepted", (B,), "int32")
        kept = np.cumprod((tokens[:, :-1] == block.drafts) & block.proposed, axis=1).sum(axis=1)
        for slot in np.flatnonzero(rows):
            job = self.live[slot]
            self.stats.blocks += 1
            self.stats.proposed += int(block.proposed[slot].sum())
            self.stats.accepted += int(min(kept[slot], accepted[slot] + 1))
            for i in range(accepted[slot] + 1):
                if self._push(job, int(tokens[slot, i]), float(logprobs[slot, i])):
                    with self.cond:
                        del self.live[slot]
                    break
        return rows & np.isin(np.arange(B), list(self.live))

    def _verdicts(self, block: Block, rows: np.ndarray, reply: pb.VerifyReply | None) -> None:
        """Keep the verdicts of `rows` for the next Draft call (Drafter.update)."""
        if rows.any():
            block_tokens = np.concatenate([block.tokens[:, None], block.drafts], axis=1)
            hidden = reply.hidden if reply.HasField("hidden") else None
            self.update = pb.Verdicts(rows=pack(rows), tokens=pack(block_tokens), positions=pack(block.positions),
                                      accepted=reply.accepted, hidden=hidden)

    def _ready(self, block: Block, drafted: np.ndarray, ahead: np.ndarray) -> np.ndarray:
        """Pipelined: mark the rows whose blocks in the new Draft reply can be verified next. A row drafted afresh
        can; a row drafted ahead can when its pending token and position are the ones the pre-draft started from
        (its pre-draft held: returned, [B])."""
        self.block = block
        self.ready[:] = False
        held = np.zeros(self.slots, bool)
        for slot, job in self.live.items():
            if drafted[slot]:
                held[slot] = ahead[slot] and pending(job) == (block.tokens[slot], block.positions[slot])
                self.ready[slot] = held[slot] or not ahead[slot]
                self.stats.predrafts_used += int(held[slot])
                self.stats.predrafts_discarded += int(ahead[slot] and not held[slot])
        return held


@ray.remote(max_concurrency=16)
class CoordinatorActor:
    """A Coordinator in its own Ray actor: `generate` calls from any number of callers share its slots."""

    def __init__(self, **options: Any):
        self.coordinator = Coordinator(**options)

    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 adapters: Sequence[int] | None = None) -> list[Completion]:
        return self.coordinator.generate(prompts, params, adapters)

    def stats(self) -> dict[str, Any]:
        return self.coordinator.stats.as_dict()

    def worker(self, which: str) -> Any:
        """The actor handle of the "verify" or "draft" worker."""
        return self.coordinator.workers.actors[which]

    def set_pipelined(self, pipelined: bool) -> None:
        self.coordinator.set_pipelined(pipelined)

    def shutdown(self) -> None:
        self.coordinator.shutdown()


# ---------------------------------------------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------------------------------------------


def held_out_text() -> str:
    """The default model's held-out text: the standard library modules in hire.data.STDLIB_VALID."""
    from hire.data import CorpusConfig, split_corpus

    return "".join(d.text for d in split_corpus(CorpusConfig(), 0).valid)


def bench(target: str, draft: str, slots: int, gamma: int, max_tokens: int, prompt_len: int, temperature: float,
          repeats: int, text: str | None = None, verify_hosts: int = 1) -> dict[str, Any]:
    """Tokens/s of the coordinator unpipelined and pipelined (one pair of workers, the mode switched between runs),
    of the in-process Speculator and of the large model alone, on `slots` held-out prompts at once (`max_tokens`
    each, no stop token): medians of `repeats` interleaved runs after one untimed run of each, and the paired
    ratios. A local Ray (its own temporary folder) holds the two workers (and the verifier's `verify_hosts` hosts,
    one device each, when more than one)."""
    from hire.bench import text_prompts
    from hire.checkpoint import load_model
    from hire.generate import generate
    from hire.speculative import speculative_generate
    from workers.draft import load_any_drafter

    large = load_model(target)
    max_len = prompt_len + max_tokens + gamma + 2
    prompts = text_prompts(large.tokenizer.encode(text or held_out_text()), slots, prompt_len)
    params = [SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True, seed=i)
              for i in range(slots)]
    engine = Engine(large, slots, max_len)
    drafter = load_any_drafter(draft, large.cfg)
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="hire-ray-") as tmp:
        ray.init(address="local", num_cpus=3 + verify_hosts, include_dashboard=False, _temp_dir=tmp,
                 namespace=f"hire-bench-{os.getpid()}")
        coordinator = None
        try:
            coordinator = Coordinator(target, draft, slots, max_len, gamma, compilation_cache=os.path.join(tmp, "xla"),
                                      verify_hosts=verify_hosts)
            stats: dict[str, list[dict[str, Any]]] = {"unpipelined": [], "pipelined": [], "speculator": []}

            def mode(pipelined: bool):
                def run() -> list[Completion]:
                    coordinator.set_pipelined(pipelined)
                    coordinator.stats = CoordinatorStats()
                    outs = coordinator.generate(prompts, params)
                    stats["pipelined" if pipelined else "unpipelined"].append(coordinator.stats.as_dict())
                    return outs
                return run

            def speculator() -> list[Completion]:
                outs, s = speculative_generate(engine, drafter, prompts, params, gamma)
                stats["speculator"].append(s.as_dict())
                return outs

            paths = {"large_alone": lambda: generate(engine, prompts, params), "speculator": speculator,
                     "unpipelined": mode(False), "pipelined": mode(True)}
            seconds: dict[str, list[float]] = {name: [] for name in paths}
            tokens: dict[str, int] = {}
            for rep in range(repeats + 1):
                for name, run in paths.items():
                    began = time.perf_counter()
                    outs = run()
                    if rep:
                        seconds[name].append(time.perf_counter() - began)
                    tokens[name] = sum(len(o.tokens) for o in outs)
                    if rep == 0:
                        stats.get(name, []).clear()
        finally:
            if coordinator is not None:
                coordinator.shutdown()
            ray.shutdown()
    loads.append(os.getloadavg()[0])

    def speedup(a: str, b: str) -> float:
        """How many times faster `a` ran than `b`: the median of the paired ratios of b's seconds to a's."""
        return round(statistics.median(tb / ta for ta, tb in zip(seconds[a], seconds[b])), 3)

    rows = {name: {"tokens_per_s": round(tokens[name] / statistics.median(s), 1), "tokens": tokens[name],
                   "seconds": [round(x, 3) for x in s]} | ({"stats": stats[name][-1]} if stats.get(name) else {})
            for name, s in seconds.items()}
    return {"target": target, "draft": draft, "verify_hosts": verify_hosts, "slots": slots, "gamma": gamma,
            "max_tokens": max_tokens, "prompt_len": prompt_len, "temperature": temperature, "repeats": repeats,
            "cpus": os.cpu_count(), "load_avg_1min": [round(x, 1) for x in loads], "paths": rows,
            "speedup": {"pipelined_vs_unpipelined": speedup("pipelined", "unpipelined"),
                        "pipelined_vs_speculator": speedup("pipelined", "speculator"),
                        "pipelined_vs_large_alone": speedup("pipelined", "large_alone"),
                        "speculator_vs_large_alone": speedup("speculator", "large_alone")}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cluster.coordinator", description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("bench",))
    parser.add_argument("--target", default="stdlib-9m")
    parser.add_argument("--draft", default="stdlib-9m-draft")
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--text", help="a text file to cut prompts from (default: the held-out stdlib modules)")
    parser.add_argument("--verify-hosts", type=int, default=1, help="shard the large model over this many hosts")
    a = parser.parse_args(argv)
    text = open(a.text).read() if a.text else None
    print(json.dumps(bench(a.target, a.draft, a.slots, a.gamma, a.max_tokens, a.prompt_len, a.temperature,
                           a.repeats, text, a.verify_hosts)))


if __name__ == "__main__":
    main()
