"""The tandem coordinator: speculative decoding with the drafter and the large model in separate Ray actors,
driven over gRPC (hire.internal.v1, protos/internal.proto), as a hire.batch.Batch whose step runs on the actors.
hire.scheduler.Scheduler drives it like any batch: queueing, admission, cancellation and retries are its.

`Workers` starts a `workers.verify.VerifyWorker` (the large model) and a `workers.draft.DraftWorker` (the small
model: a standalone draft model, the tandem small model, or n-gram) and connects to their gRPC servers.
`CoordinatorEngine` is what the scheduler and the servers see as the engine (hire.engine_api.Engine's limits,
tokenizer, request checks and warm-up, and `recover`): it owns the workers, the calls to them and the stats, and
makes the batches (`batch`). A `CoordinatorBatch` `admit`s a request by prefilling it on both workers (its first
token is the verifier's), `drop`s one by freeing its row, and each `step` is one round of Draft and Verify calls
over the live rows (`hire serve --draft NAME`):

- unpipelined: draft block b for every live row, verify it, draft b + 1 (carrying b's verdicts), ...
- pipelined: while the verifier checks block b of a row, the drafter already drafts that row's block b + 1 from
  b's last draft, as if b were fully accepted; the verifier defers a fully accepted row's bonus token
  (hire.speculative.verify_block's `defer`), so that last draft becomes the row's pending token and the next
  block starts from it. A row whose new pending token is not the one its pre-draft started from (a draft was
  rejected) throws that pre-draft away and is drafted afresh while other rows verify; rows whose pre-drafts held
  go straight into the next verification (the batch keeps the pre-drafts between steps). Greedy rows give the
  large model's output token for token and sampled rows its distribution, exactly, in both modes
  (docs/coordinator.md).

Faults: every call has a deadline; a worker that died or hangs (UNAVAILABLE, DEADLINE_EXCEEDED) is killed and
restarted inside the batch, and every live slot is prefilled again on it (its committed tokens; the verifier
resumes the pending token rather than sampling one), then decoding goes on: the scheduler sees nothing. A worker
that fails `restarts` times in a row, or answers a call with an error, makes the batch raise WorkerError
(hire.engine_api.EngineUnavailable): the scheduler ends the streams cut mid-way with it, `recover` restarts what
is down, and the requests that had no token yet are retried on a fresh batch.

`Coordinator` is an engine with a scheduler running over its batches (`generate` for callers in this process),
`CoordinatorActor` one in its own actor. `python -m workers.coordinator bench` measures it.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from hire.batch import SlotBatch
from hire.checkpoint import resolve_model
from hire.engine import Engine, buckets
from hire.engine_api import EngineUnavailable
from hire.request import Completion, Event, Request, make_requests
from hire.sampling import SamplingParams
from hire.scheduler import Scheduler, warm_up
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
    """A worker could not be (re)started or failed a call: the batch is lost (hire.scheduler retries its requests
    that had no token yet; the others end with this, which servers answer as an engine that is down: UNAVAILABLE,
    HTTP 503)."""


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
                 options: dict[str, dict] | None = None, group: dict[str, Any] | None = None,
                 hire: dict[str, Any] | None = None, lora: dict[str, str] | None = None):
        self.hire, self.lora = hire, lora
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
                                      self.group and self.group | {"name": self.group_name}, self.hire, self.lora)
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


def pending(request: Request) -> tuple[int, int]:
    """A live request's last decided token (not yet in the large model's cache) and its position."""
    out = request.out
    return out.tokens[-1], len(out.prompt_tokens) + len(out.tokens) - 1


class CoordinatorEngine:
    """Speculative decoding of `target` drafted by `draft` (a name or path, or "ngram"), γ = `gamma`, over `slots`
    cache slots, in two Ray actors driven over gRPC; `pipelined` overlaps drafting with verification (see the
    module's docstring). Needs a running Ray (ray.init). `timeout` bounds every call, `start_timeout` every
    (re)start; `restarts` is how many restarts in a row a failure may take before the batch gives up. With
    `verify_hosts` > 1 or `devices_per_host` > 1 the large model is sharded over that many host actors of that many
    devices each (workers.shards), which its worker drives; a host that dies or hangs restarts the verifier with a
    fresh group. What a scheduler needs of an engine (hire.engine_api.Engine: cfg, tokenizer, slots, max_len,
    check_request, warm_up; `recover`), not its prefill and decode calls: the batches make those. `hire` overrides
    the large model's HiRE fields (hire.checkpoint.load_model's keywords; the drafter drafts for that model), `lora`
    names the PEFT adapter folders it serves (`adapters`: name -> the index a request passes; in one process only),
    which prefill and verification run row by row; the drafter drafts with the base model."""

    check_request = Engine.check_request

    def __init__(self, target: str = "stdlib-9m", draft: str = "stdlib-9m-draft", slots: int = 8,
                 max_len: int | None = None, gamma: int = 4, pipelined: bool = True, dtype: str | None = None,
                 timeout: float = 120.0, start_timeout: float = 300.0, restarts: int = 3,
                 compilation_cache: str | None = None, host: str | None = None,
                 options: dict[str, dict] | None = None, verify_hosts: int = 1, devices_per_host: int = 1,
                 hire: dict[str, Any] | None = None, lora: dict[str, str] | None = None):
        if min(gamma, slots, verify_hosts, devices_per_host) < 1:
            raise ValueError(f"gamma, slots, verify_hosts and devices_per_host must be >= 1, got {gamma}, {slots}, "
                             f"{verify_hosts} and {devices_per_host}")
        group = {"hosts": verify_hosts, "devices_per_host": devices_per_host, "call_timeout": timeout,
                 "start_timeout": start_timeout} if verify_hosts * devices_per_host > 1 else None
        if group and lora:
            raise ValueError("lora: LoRA adapters are not served over several hosts; serve them with --hosts 1")
        self.workers = Workers(target, draft, slots, max_len, gamma, dtype, compilation_cache, host, start_timeout,
                               options, group, hire, lora)
        verify, drafter = self.workers.info["verify"], self.workers.info["draft"]
        self.cfg, self.max_len, self.slots, self.gamma = verify["cfg"], verify["max_len"], slots, gamma
        self.adapters: dict[str, int] = verify["adapters"]
        self.buckets = buckets(self.max_len)
        self.tokenizer = load_tokenizer(resolve_model(target))
        self.hidden_layers, self.trims = list(drafter["wants_hidden"]), drafter["stops_early"]
        self.pipelined, self.timeout, self.restarts = pipelined, timeout, restarts  # switch modes between batches
        self.stats = CoordinatorStats()
        self.down: set[str] = set()  # workers a batch failed to bring back: `recover` restarts them

    def batch(self) -> CoordinatorBatch:
        """A batch with every slot free (the scheduler's `batch` factory)."""
        return CoordinatorBatch(self)

    def warm_up(self, chunk: int = 0) -> None:
        """Compile the workers' programs before a client's request: a prompt at every prompt bucket, and one greedy
        request from a one-token prompt to the end of the context, through every attention span; on this thread,
        through a scheduler of its own (hire.scheduler.warm_up). (`chunk`, a plain engine's decode steps per call,
        means nothing here.)"""
        warm_up(self, self.batch)
        self.stats = CoordinatorStats()

    def recover(self, grow: bool = False) -> bool:
        """Restart the workers a batch left down (hire.engine_api.Recoverable); True when it restarted any,
        WorkerError when one does not start. Nothing grows (`grow`: False)."""
        if grow or not self.down:
            return False
        self.restart(set(self.down))
        return True

    def restart(self, down: set[str]) -> None:
        """(Re)start the workers in `down`, the verifier first (the drafter's start reads its model); WorkerError
        when one does not start (it stays in `self.down`)."""
        self.down |= down
        for which in sorted(down, reverse=True):
            self.stats.restart_seconds.append(self.workers.start(which))
            self.stats.restarts[which] += 1
            self.down.discard(which)
            log.warning("restarted the %s worker", which)

    def call(self, which: str, method: str, request: Any) -> Any:
        """A unary call to the `which` worker; _Down when it died or hangs, WorkerError when it answers an error."""
        return self.result(which, self.send(which, method, request))

    def send(self, which: str, method: str, request: Any) -> grpc.Future:
        """Start a call to the `which` worker; its time to the answer adds to stats.call_seconds."""
        stub = self.workers.verifier if which == "verify" else self.workers.drafter
        began, name = time.perf_counter(), f"{which}.{method}"
        future = getattr(stub, method).future(request, timeout=self.timeout)
        seconds = self.stats.call_seconds

        def done(_: grpc.Future) -> None:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - began

        future.add_done_callback(done)
        return future

    def result(self, which: str, future: grpc.Future) -> Any:
        try:
            return future.result()
        except grpc.RpcError as e:
            if e.code() in DOWN:
                raise _Down(which, f"{e.code().name}: {e.details()}") from None
            raise WorkerError(f"the {which} worker answered {e.code().name}: {e.details()}") from None

    def shutdown(self) -> None:
        """Stop the workers."""
        self.workers.shutdown()


class CoordinatorBatch(SlotBatch):
    """hire.batch.Batch over a CoordinatorEngine's two workers: each step one round of Draft and Verify calls.
    The rows' state lives on the workers; the batch keeps each live request (its pending token and position are
    its last token's) and, pipelined, the last Draft reply with the rows ready for verification."""

    def __init__(self, engine: CoordinatorEngine):
        self.engine = engine
        self.live: dict[int, Request] = {}  # by slot
        self.block: Block | None = None  # the last Draft reply
        self.ready = np.zeros(engine.slots, bool)  # pipelined: rows whose block in self.block waits for verification
        self.update: pb.Verdicts | None = None  # verdicts the next Draft call carries
        self.events: list[Event] = []  # the step's so far

    @property
    def stats(self) -> CoordinatorStats:
        return self.engine.stats

    def admit(self, req: Request, slot: int) -> Event:
        """Prefill `req` on the verifier, which samples its first token, and on the drafter, with the large model's
        hidden states a tandem drafter reads; the token goes to the request once both have its row, so that a
        failure on the way leaves it without one (the scheduler retries such a request)."""
        began, engine = time.perf_counter(), self.engine
        tokens = self.context(req)
        while True:
            try:
                reply = engine.call("verify", "Prefill", self._verify_prefill(slot, req, tokens))
                engine.call("draft", "Prefill", pb.DraftPrefillRequest(slot=slot, tokens=tokens, hidden=reply.hidden,
                                                                       sampling=sampling_message(req.params)))
                break
            except _Down as e:
                self._recover({e.which})  # the live slots; this one is prefilled afresh
        self.stats.requests += 1
        event = self._push(req, reply.token, reply.logprob)
        if event.finish_reason is None:
            self.live[slot], self.ready[slot] = req, False
        self.stats.seconds += time.perf_counter() - began
        return event

    def step(self) -> list[Event]:
        """One round: a Draft call, and a Verify call after it (unpipelined) or beside it (pipelined)."""
        began, self.events = time.perf_counter(), []
        self._round()
        self.stats.rounds += 1
        self.stats.seconds += time.perf_counter() - began
        return self.events

    def drop(self, req: Request) -> None:
        """Free `req`'s slot, and take its row out of the verdicts the next Draft call carries (a new request may
        take the slot before then); the workers leave a row no call names as it is."""
        gone = [slot for slot, r in self.live.items() if r is req]
        for slot in gone:
            del self.live[slot]
        self.stats.cancelled += len(gone)
        if gone:
            self.ready[gone] = False
            if self.update is not None:
                rows = unpack(self.update.rows, "rows", dtype="bool").copy()
                rows[gone] = False
                self.update.rows.CopyFrom(pack(rows))

    def _push(self, req: Request, token: int, logprob: float) -> Event:
        self.stats.tokens += 1
        return req.push(int(token), float(logprob))

    def _recover(self, down: set[str]) -> None:
        """Restart the workers in `down` and prefill every live slot again; WorkerError after `restarts` tries
        (what is still down is left to the engine's `recover`)."""
        engine = self.engine
        for _ in range(engine.restarts):
            try:
                engine.restart(down)
                self._resync(resume_verifier="verify" in down)
                return
            except _Down as e:
                down = down | {e.which}
        engine.down |= down
        raise WorkerError(f"the {' and '.join(sorted(down))} worker failed {engine.restarts} restarts in a row")

    def _resync(self, resume_verifier: bool) -> None:
        """Prefill every live slot's committed tokens on the drafter (and on the verifier, resuming its pending
        token, when it was restarted or the drafter needs the large model's states); pre-drafts are dropped."""
        self.block, self.update, self.ready[:] = None, None, False
        engine = self.engine
        for slot, req in self.live.items():
            out = req.out
            committed, (token, _) = out.prompt_tokens + out.tokens[:-1], pending(req)
            hidden = None
            if resume_verifier or engine.hidden_layers:
                reply = engine.call("verify", "Prefill", self._verify_prefill(slot, req, committed, token))
                hidden = reply.hidden
            engine.call("draft", "Prefill", pb.DraftPrefillRequest(slot=slot, tokens=committed, hidden=hidden,
                                                                   sampling=sampling_message(req.params)))

    def _verify_prefill(self, slot: int, req: Request, tokens: list[int],
                        resume: int | None = None) -> pb.VerifyPrefillRequest:
        return pb.VerifyPrefillRequest(slot=slot, tokens=tokens, sampling=sampling_message(req.params),
                                       adapter=req.adapter, hidden_layers=self.engine.hidden_layers,
                                       resume_token=resume)

    def _round(self) -> None:
        engine, B = self.engine, self.engine.slots
        pipelined, gamma = engine.pipelined, engine.gamma
        live = np.zeros(B, bool)
        tokens, positions = np.zeros(B, np.int32), np.zeros(B, np.int32)
        for slot, req in self.live.items():
            live[slot] = True
            tokens[slot], positions[slot] = pending(req)
        block = self.block
        if pipelined and block is not None:
            verify = live & self.ready
            k = block.proposed.sum(axis=1)
            ahead = verify & (k > 0)  # drafted from the block's last draft, as if it were all accepted
            last = block.drafts[np.arange(B), np.maximum(k - 1, 0)]
            tokens = np.where(ahead, last, tokens).astype(np.int32)
            positions = np.where(ahead, block.positions + k, positions).astype(np.int32)
            # a row can go on past this block only if its pre-draft would start inside the context
            draft = live & ~(verify & (k == 0)) & (positions < engine.max_len - 1)
        else:
            verify, ahead, draft = (np.zeros(B, bool) if pipelined else live), np.zeros(B, bool), live
        request = pb.DraftRequest(rows=pack(draft), tokens=pack(tokens), positions=pack(positions),
                                  reach=int(positions[draft].max(initial=0)) + gamma + 1, update=self.update)
        self.update = None
        try:
            if pipelined:
                drafting = engine.send("draft", "Draft", request)
                verdicts, down = None, set()
                if verify.any():
                    try:
                        verdicts = engine.call("verify", "Verify", self._verify_request(block, verify))
                    except _Down:
                        down.add("verify")
                try:
                    drafted = engine.result("draft", drafting)
                except _Down:
                    down.add("draft")
                still = np.zeros(B, bool) if verdicts is None else self._apply(block, verify, verdicts)
                if down:
                    self._recover(down)
                    return
                held = self._ready(Block(drafted, tokens, positions), draft, ahead)
                if not engine.hidden_layers:  # the steps of a held pre-draft fed every token the update commits
                    still &= ~held
                self._verdicts(block, still, verdicts)
            else:
                block = Block(engine.call("draft", "Draft", request), tokens, positions)
                verdicts = engine.call("verify", "Verify", self._verify_request(block, verify))
                self._verdicts(block, self._apply(block, verify, verdicts), verdicts)
        except _Down as e:
            self._recover({e.which})

    def _verify_request(self, block: Block, rows: np.ndarray) -> pb.VerifyRequest:
        reply, engine = block.reply, self.engine
        return pb.VerifyRequest(rows=pack(rows), drafts=reply.drafts, proposed=reply.proposed, sampled=reply.sampled,
                                q=reply.q if reply.HasField("q") else None, defer=engine.pipelined,
                                trims=engine.trims, hidden_layers=engine.hidden_layers,
                                reach=int(block.positions[rows].max(initial=0)) + engine.gamma + 1)

    def _apply(self, block: Block, rows: np.ndarray, reply: pb.VerifyReply) -> np.ndarray:
        """Push each verified row's tokens to its request (the step's events), freeing the slots of those that
        end; the verified rows still live [B]."""
        self.stats.verify_calls += 1
        B, gamma = self.engine.slots, self.engine.gamma
        tokens = unpack(reply.tokens, "tokens", (B, gamma + 1), "int32")
        logprobs = unpack(reply.logprobs, "logprobs", (B, gamma + 1), "float32")
        accepted = unpack(reply.accepted, "accepted", (B,), "int32")
        kept = np.cumprod((tokens[:, :-1] == block.drafts) & block.proposed, axis=1).sum(axis=1)
        for slot in np.flatnonzero(rows):
            req = self.live[slot]
            self.stats.blocks += 1
            self.stats.proposed += int(block.proposed[slot].sum())
            self.stats.accepted += int(min(kept[slot], accepted[slot] + 1))
            for i in range(accepted[slot] + 1):
                self.events.append(event := self._push(req, tokens[slot, i], logprobs[slot, i]))
                if event.finish_reason is not None:
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
        held = np.zeros(self.engine.slots, bool)
        for slot, req in self.live.items():
            if drafted[slot]:
                held[slot] = ahead[slot] and pending(req) == (block.tokens[slot], block.positions[slot])
                self.ready[slot] = held[slot] or not ahead[slot]
                self.stats.predrafts_used += int(held[slot])
                self.stats.predrafts_discarded += int(ahead[slot] and not held[slot])
        return held


class Coordinator:
    """A CoordinatorEngine (its arguments) with a hire.scheduler.Scheduler running over its batches, up to
    `queue_size` requests waiting beyond the free slots: `generate` for callers in this process, `scheduler`'s
    submit / cancel for streams."""

    def __init__(self, *args: Any, queue_size: int = 128, **kwargs: Any):
        self.engine = CoordinatorEngine(*args, **kwargs)
        self.scheduler = Scheduler(self.engine, queue_size, prefills=self.engine.slots,
                                   batch=self.engine.batch).start()

    @property
    def workers(self) -> Workers:
        return self.engine.workers

    @property
    def stats(self) -> CoordinatorStats:
        return self.engine.stats

    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 adapters: Sequence[int] | None = None) -> list[Completion]:
        """Complete every prompt (text or token ids), in order, as hire.generate.generate does; a request's failure
        raises. Safe from any number of threads: their requests share the slots."""
        def sink(end: Future):
            def put(item: Event | Exception) -> None:
                if isinstance(item, Exception):
                    end.set_exception(item)
                elif item.finish_reason is not None:
                    end.set_result(None)
            return put

        ends, jobs = [], []
        for r in make_requests(self.engine, prompts, params, adapters):  # checked and numbered here, again by submit
            ends.append(end := Future())
            jobs.append(self.scheduler.submit(r.out.prompt_tokens, r.params, r.adapter, sink(end)))
        for end in ends:
            end.result()
        return [job.request.out for job in jobs]

    def set_pipelined(self, pipelined: bool) -> None:
        """Switch the mode (between runs: no request may be running or waiting)."""
        if self.scheduler.busy_slots or self.scheduler.queue_depth:
            raise RuntimeError("switch modes only when no request is running")
        self.engine.pipelined = pipelined

    def shutdown(self) -> None:
        """Fail what is queued or running, stop the scheduler and the workers."""
        self.scheduler.stop()
        self.engine.shutdown()


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
                    coordinator.engine.stats = CoordinatorStats()
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
    parser = argparse.ArgumentParser(prog="python -m workers.coordinator", description=__doc__.splitlines()[0])
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
