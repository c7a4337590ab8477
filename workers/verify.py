"""VerifyWorker: the Ray actor holding the large model, serving hire.internal.v1.Verifier over gRPC.

It holds the large model's decode state for every slot (hire.engine's: KV cache, pending token and position,
sampling rows) and runs the large model's half of a speculative block (hire.speculative.verify_block) for the
rows a Verify names; rows it does not name are left exactly as they were (their positions are moved past the
cache for the pass, so nothing is written for them). The model is in this process, or sharded over a group of
host actors (workers.shards.ShardedEngine): every host then runs the same programs on its shard of the decode
state (the KV cache split by KV heads) and rank 0's verdicts come back.
"""
from __future__ import annotations

import os
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import ray
from jax.sharding import Mesh

from hire import sharding
from hire.config import ModelConfig
from hire.engine import DecodeState, Engine, _layouts, use_compilation_cache
from hire.sampling import RowSampling, SamplingParams
from hire.speculative import Verdict, prefill_target, verify_block, verify_lengths
from protos import internal_pb2 as pb
from protos import internal_pb2_grpc
from workers.rpc import check_slot, handler, message_limit, pack, rows_mask, sampling_params, serve, unpack

SERVICE = pb.DESCRIPTOR.services_by_name["Verifier"].full_name


def _prefill(cfg: ModelConfig, wants_hidden: tuple[int, ...], tvars: dict, t: DecodeState, slot: jax.Array,
             tokens: jax.Array, length: jax.Array, sampling: RowSampling, adapter: jax.Array, resume: jax.Array
             ) -> tuple[DecodeState, jax.Array, jax.Array, jax.Array | None]:
    """prefill_target, then the pending token is `resume` when it is >= 0 (a slot resumed after a restart)."""
    t, token, logprob, hidden = prefill_target(cfg, wants_hidden, tvars, t, slot, tokens, length, sampling, adapter)
    token = jnp.where(resume >= 0, resume, token[0])
    return t._replace(tokens=t.tokens.at[slot].set(token)), token, logprob[0], hidden


def _verify(cfg: ModelConfig, wants_hidden: tuple[int, ...], lengths: tuple[int, ...], kv_len: int,
            defer: jax.Array, tvars: dict, t: DecodeState, rows: jax.Array, drafts: jax.Array, q: jax.Array,
            proposed: jax.Array) -> tuple[DecodeState, Verdict]:
    """verify_block for the rows [B] named: the others propose nothing, write nothing (their block positions lie
    past the cache, where writes are dropped) and keep their pending token and position."""
    past = t.cache[0][0].shape[-1]
    off = t._replace(positions=jnp.where(rows, t.positions, past))
    new, verdict = verify_block(cfg, wants_hidden, lengths, kv_len, defer, tvars, off, drafts, q,
                                proposed & rows[:, None])
    keep = lambda n, o: jnp.where(rows, n, o)  # noqa: E731
    return new._replace(tokens=keep(new.tokens, t.tokens), positions=keep(new.positions, t.positions)), verdict


_prefill_jit = jax.jit(_prefill, static_argnums=(0, 1), donate_argnums=(3,))
_verify_jit = jax.jit(_verify, static_argnums=(0, 1, 2, 3), donate_argnums=(6,))


class VerifierPrograms:
    """The Verifier's programs (prefill_target and verify_block for the rows named) on an engine's decode state,
    held in this process. With the engine's `mesh`, they run as one program of a shard group's hosts
    (workers.shard.ShardWorker.verifier): the decode state laid out as the engine's (the KV cache split by KV heads),
    the outputs replicated, so rank 0 can read them."""

    def __init__(self, engine: Engine, mesh: Mesh | None = None):
        self.engine = engine
        self.state = engine.init_state()
        self.greedy_q: dict[int, jax.Array] = {}  # zeros [B, γ, V] by γ, the q of a block without sampled rows
        self._prefill, self._verify = _prefill_jit, _verify_jit
        if mesh is not None:
            state, rep = _layouts(engine.cfg, mesh)["state"]["out_shardings"], sharding.replicated(mesh)
            self._prefill = jax.jit(sharding.on_mesh(_prefill, mesh), static_argnums=(0, 1), donate_argnums=(3,),
                                    out_shardings=(state, rep, rep, rep))
            self._verify = jax.jit(sharding.on_mesh(_verify, mesh), static_argnums=(0, 1, 2, 3), donate_argnums=(6,),
                                   out_shardings=(state, rep))

    def prefill(self, wants_hidden: tuple[int, ...], slot: int, tokens: np.ndarray, length: int,
                params: SamplingParams, adapter: int, resume: int) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """`_prefill` of the prompt `tokens` [1, bucket] (`length` of them real) into `slot`: its pending token,
        logprob and hidden states."""
        e = self.engine
        self.state, token, logprob, hidden = self._prefill(
            e.cfg, wants_hidden, e.variables, self.state, jnp.int32(slot), jnp.asarray(tokens),
            jnp.array([length], jnp.int32), RowSampling.of([params]), jnp.array([adapter], jnp.int32),
            jnp.int32(resume))
        return token, logprob, hidden

    def verify(self, wants_hidden: tuple[int, ...], lengths: tuple[int, ...], kv_len: int, defer: bool,
               rows: np.ndarray, drafts: np.ndarray, q: np.ndarray | None, proposed: np.ndarray) -> Verdict:
        """`_verify` of the `rows` [B] named; `q` None: no row samples."""
        e, gamma = self.engine, drafts.shape[1]
        if q is None:
            if gamma not in self.greedy_q:
                self.greedy_q[gamma] = jnp.zeros((e.slots, gamma, e.cfg.vocab_size), jnp.float32)
            q = self.greedy_q[gamma]
        self.state, verdict = self._verify(e.cfg, wants_hidden, lengths, kv_len, jnp.bool_(defer), e.variables,
                                           self.state, jnp.asarray(rows), jnp.asarray(drafts), jnp.asarray(q),
                                           jnp.asarray(proposed))
        return verdict


class GroupPrograms:
    """VerifierPrograms' calls broadcast to a workers.shards.ShardGroup: every host runs them on its shard, rank 0's
    outputs (numpy) come back; a host that died or hangs raises ShardGroupError (EngineUnavailable)."""

    def __init__(self, group: Any):
        self.group = group

    def prefill(self, *args: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        return self.group.call("verifier", "prefill", *args)[0]

    def verify(self, *args: Any) -> Verdict:
        return Verdict(*self.group.call("verifier", "verify", *args)[0])


class VerifierService(internal_pb2_grpc.VerifierServicer):
    """hire.internal.v1.Verifier over an engine's slots: checks each request and runs it with `programs`
    (default: VerifierPrograms in this process); one call at a time changes the state."""

    def __init__(self, engine: Engine | Any, programs: VerifierPrograms | GroupPrograms | None = None):
        self.engine = engine
        self.programs = programs or VerifierPrograms(engine)
        self.temperature = np.zeros(engine.slots, np.float32)  # each slot's, to check that sampled rows bring q
        self.lock = threading.Lock()

    def _hidden_layers(self, layers: Any) -> tuple[int, ...]:
        layers = tuple(layers)
        if any(not 0 <= i <= self.engine.cfg.n_layers for i in layers):
            raise ValueError(f"hidden_layers: {layers} not all in [0, {self.engine.cfg.n_layers}]")
        return layers

    def _kv_len(self, reach: int) -> int:
        e = self.engine
        return next(b for b in e.buckets if b >= min(max(reach, 1), e.max_len))

    @handler
    def Prefill(self, request: pb.VerifyPrefillRequest, context) -> pb.VerifyPrefillReply:
        e = self.engine
        slot = check_slot(request.slot, e.slots)
        tokens = list(request.tokens)
        adapter = request.adapter if request.HasField("adapter") else -1
        e.check_request(tokens, adapter)
        params = sampling_params(request.sampling)
        resume = request.resume_token if request.HasField("resume_token") else -1
        if request.HasField("resume_token") and not 0 <= resume < e.cfg.vocab_size:
            raise ValueError(f"resume_token: {resume} outside the vocabulary [0, {e.cfg.vocab_size})")
        bucket = next(b for b in e.buckets if b >= len(tokens))
        padded = np.zeros((1, bucket), np.int32)
        padded[0, : len(tokens)] = tokens
        with self.lock:
            token, logprob, hidden = self.programs.prefill(self._hidden_layers(request.hidden_layers), slot, padded,
                                                           len(tokens), params, adapter, resume)
            self.temperature[slot] = params.temperature
        reply = pb.VerifyPrefillReply(token=int(token), logprob=float(logprob))
        if hidden is not None:
            reply.hidden.CopyFrom(pack(np.asarray(hidden, np.float32)))
        return reply

    @handler
    def Verify(self, request: pb.VerifyRequest, context) -> pb.VerifyReply:
        e, B = self.engine, self.engine.slots
        rows = rows_mask(request.rows, B)
        drafts = unpack(request.drafts, "drafts", (B, None), "int32")
        gamma = drafts.shape[1]
        if gamma < 1 or np.any((drafts[rows] < 0) | (drafts[rows] >= e.cfg.vocab_size)):
            raise ValueError(f"drafts: need [B, γ >= 1] token ids in [0, {e.cfg.vocab_size}) for the rows verified")
        proposed = unpack(request.proposed, "proposed", (B, gamma), "bool")
        q = None
        if request.HasField("q"):
            sampled = unpack(request.sampled, "sampled", (None,), "int32")
            if np.any((sampled < 0) | (sampled >= B)):
                raise ValueError(f"sampled: row indices outside [0, {B})")
            q = np.zeros((B, gamma, e.cfg.vocab_size), np.float32)
            q[sampled] = unpack(request.q, "q", (len(sampled), gamma, e.cfg.vocab_size), "float32")
        lengths = verify_lengths(gamma) if request.trims else (gamma + 1,)
        with self.lock:
            needs_q = rows & (self.temperature > 0)
            if needs_q.any() and (q is None or not set(np.flatnonzero(needs_q)) <= set(sampled.tolist())):
                raise ValueError(f"q: rows {np.flatnonzero(needs_q).tolist()} sample (temperature > 0) and need the "
                                 "distributions their drafts were drawn from")
            v = self.programs.verify(self._hidden_layers(request.hidden_layers), lengths, self._kv_len(request.reach),
                                     request.defer, rows, drafts, q, proposed)
            reply = pb.VerifyReply(tokens=pack(v.tokens), logprobs=pack(v.logprobs), accepted=pack(v.accepted))
        if v.hidden is not None:
            reply.hidden.CopyFrom(pack(np.asarray(v.hidden, np.float32)))
        return reply


@ray.remote
class VerifyWorker:
    """A Ray actor holding the large model (or driving the group of hosts it is sharded over) behind a Verifier gRPC
    server (`start`)."""

    def __init__(self) -> None:
        self.server = None
        self.engine: Engine | Any = None

    def start(self, model: str, slots: int, max_len: int | None, gamma: int, secret: str, dtype: str | None = None,
              compilation_cache: str | None = None, host: str | None = None,
              group: dict[str, Any] | None = None) -> dict[str, Any]:
        """Load `model`, build its engine and serve calls that carry `secret` (blocks of up to `gamma` drafts); where
        to reach it and the model's shape. With `group`
        (workers.shards.ShardedEngine's keywords: hosts, devices_per_host, ...) the model is sharded over a group of
        host actors that this actor drives ("hosts": each host's rank, node and process)."""
        if compilation_cache:
            use_compilation_cache(compilation_cache)
        info: dict[str, Any] = {}
        if group:
            from workers.shards import ShardedEngine

            self.engine = ShardedEngine(model, slots=slots, max_len=max_len, dtype=dtype,
                                        compilation_cache=compilation_cache, **group)
            service = VerifierService(self.engine, GroupPrograms(self.engine.group))
            info["hosts"] = [{k: i[k] for k in ("rank", "node", "pid")} for i in self.engine.group.info]
        else:
            from hire.checkpoint import load_model

            self.engine = Engine(load_model(model, dtype), slots, max_len)
            service = VerifierService(self.engine)
        host = host or ray.util.get_node_ip_address()
        limit = message_limit(slots, self.engine.max_len, gamma, self.engine.cfg.vocab_size)
        self.server, port = serve(lambda s: internal_pb2_grpc.add_VerifierServicer_to_server(service, s), SERVICE,
                                  secret, limit, host)
        return info | {"address": f"{host}:{port}", "node": ray.get_runtime_context().get_node_id(),
                       "cfg": self.engine.cfg, "max_len": self.engine.max_len, "pid": os.getpid()}

    def ping(self) -> bool:
        return self.server is not None

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(None)
        if hasattr(self.engine, "shutdown"):  # a shard group: its hosts go too
            self.engine.shutdown()
