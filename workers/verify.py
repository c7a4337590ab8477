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

import numpy as np
import ray

from hire.engine import Engine, use_compilation_cache
from hire.speculative import verify_lengths
from protos import internal_pb2 as pb
from protos import internal_pb2_grpc
from workers.rpc import check_slot, handler, message_limit, pack, rows_mask, sampling_params, serve, unpack
from workers.verify_programs import GroupPrograms, VerifierPrograms

SERVICE = pb.DESCRIPTOR.services_by_name["Verifier"].full_name


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
              group: dict[str, Any] | None = None, hire: dict[str, Any] | None = None,
              lora: dict[str, str] | None = None) -> dict[str, Any]:
        """Load `model` (with the HiRE overrides `hire`, hire.checkpoint.load_model's, and the PEFT adapters `lora`,
        name -> folder), build its engine and serve calls that carry `secret` (blocks of up to `gamma` drafts); where
        to reach it, the model's shape and each adapter's index ("adapters"). With `group`
        (workers.shards.ShardedEngine's keywords: hosts, devices_per_host, ...) the model is sharded over a group of
        host actors that this actor drives ("hosts": each host's rank, node and process)."""
        if compilation_cache:
            use_compilation_cache(compilation_cache)
        info: dict[str, Any] = {"adapters": {}}
        if group:
            from workers.shards import ShardedEngine

            self.engine = ShardedEngine(model, slots=slots, max_len=max_len, dtype=dtype,
                                        compilation_cache=compilation_cache, hire=hire, **group)
            service = VerifierService(self.engine, GroupPrograms(self.engine.group))
            info["hosts"] = [{k: i[k] for k in ("rank", "node", "pid")} for i in self.engine.group.info]
        else:
            from hire.checkpoint import load_model
            from hire.lora import load_adapters

            loaded = load_model(model, dtype, **(hire or {}))
            if lora:
                loaded, info["adapters"] = load_adapters(loaded, lora)
            self.engine = Engine(loaded, slots, max_len)
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
