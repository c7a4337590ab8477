"""DraftWorker: the Ray actor holding the small model, serving hire.internal.v1.Drafter over gRPC.

Any hire.speculative drafter: a standalone small model (stdlib-9m-draft), the tandem small model (stdlib-9m-tandem),
or the n-gram drafter. It holds the drafter's state and each slot's sampling rows, and runs the drafter's half of
a speculative block (hire.speculative.draft_block) for the rows a Draft names, after the verdicts it carries
(Drafter.update). Rows a call does not name keep their state: the drafters' states have the slots as the leading
axis of every leaf (as hire.speculative.take_row assumes), and the new state is selected row by row.

In the pipelined coordinator the update of a fully accepted block comes after the drafter already drafted the next
block from that block's last draft, which fed it every token the update commits; the coordinator sends it late
only to a drafter that reads the large model's states (the tandem), whose update writes them by position, over
the verified block's positions, which every later block is meant to read as the large model's.
"""
from __future__ import annotations

import os
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import ray

from hire.checkpoint import detect_format, resolve_model
from hire.config import ModelConfig
from hire.drafters import load_drafter
from hire.engine import buckets, use_compilation_cache
from hire.formats import CheckpointError
from hire.loaded import LoadedModel
from hire.sampling import RowSampling, SamplingParams
from hire.speculative import Drafter, draft_block
from hire.tandem import tandem_drafter
from protos import internal_pb2 as pb
from protos import internal_pb2_grpc
from workers.rpc import check_slot, handler, message_limit, pack, rows_mask, sampling_params, serve, unpack

SERVICE = pb.DESCRIPTOR.services_by_name["Drafter"].full_name


def load_any_drafter(name: str, target: ModelConfig, dtype: str | None = None) -> Drafter:
    """The drafter called `name` for a large model of config `target`: a tandem model's (hire.tandem), else
    hire.drafters.load_drafter's (a small model, or "ngram")."""
    try:
        tandem = detect_format(resolve_model(name)) == "tandem"
    except CheckpointError:
        tandem = False
    shape = LoadedModel(target, {}, None)  # both loaders read only the large model's config
    return (tandem_drafter if tandem else load_drafter)(name, shape, dtype)


def _select(rows: jax.Array, new: Any, old: Any) -> Any:
    """Row by row (the leading axis of every leaf), `new` where rows [B] is True, else `old`."""
    return jax.tree.map(lambda n, o: jnp.where(rows.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old)


def _prefill(drafter: Drafter, dvars: Any, state: Any, rows: RowSampling, slot: jax.Array, tokens: jax.Array,
             length: jax.Array, hidden: jax.Array | None, sampling: RowSampling) -> tuple[Any, RowSampling]:
    put = lambda whole, row: whole.at[slot].set(row[0])  # noqa: E731
    return drafter.prefill(dvars, state, slot, tokens, length, hidden), jax.tree.map(put, rows, sampling)


def _draft(drafter: Drafter, gamma: int, kv_len: int, dvars: Any, state: Any, rows: RowSampling, update: tuple,
           active: jax.Array, tokens: jax.Array, positions: jax.Array
           ) -> tuple[Any, jax.Array, jax.Array, jax.Array]:
    """The verdicts `update` (rows, block tokens, pending positions, accepted, hidden) applied to their rows, then
    draft_block for the rows `active` names: the state, drafts [B, γ], q [B, γ, V] and proposed [B, γ]."""
    mask, block, start, accepted, hidden = update
    updated = drafter.update(dvars, state, block, start[:, None] + jnp.arange(gamma + 1), accepted, hidden)
    state = _select(mask, updated, state)
    new, drafts, q, proposed, _ = draft_block(drafter, None, False, gamma, kv_len, dvars, None, state, tokens,
                                              positions, rows, active)
    return _select(active, new, state), drafts, q, proposed


_prefill_jit = jax.jit(_prefill, static_argnums=(0,), donate_argnums=(2,))
_draft_jit = jax.jit(_draft, static_argnums=(0, 1, 2), donate_argnums=(4,))


class DrafterService(internal_pb2_grpc.DrafterServicer):
    """hire.internal.v1.Drafter over one drafter, `slots` rows of `max_len` positions, γ = `gamma`."""

    def __init__(self, drafter: Drafter, target: ModelConfig, slots: int, max_len: int, gamma: int):
        if gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {gamma}")
        self.drafter, self.vocab_size, self.slots, self.max_len, self.gamma = (drafter, target.vocab_size, slots,
                                                                               max_len, gamma)
        # the update of a call without verdicts: no rows (one compiled program either way)
        hidden = (jnp.zeros((slots, gamma + 1, len(drafter.wants_hidden), target.dim), jnp.float32)
                  if drafter.wants_hidden else None)
        self.no_update = (jnp.zeros(slots, bool), jnp.zeros((slots, gamma + 1), jnp.int32), jnp.zeros(slots, jnp.int32),
                          jnp.zeros(slots, jnp.int32), hidden)
        self.buckets = buckets(max_len)
        self.state = drafter.init(slots, max_len)
        self.rows = RowSampling.of([SamplingParams(temperature=0.0, seed=0)] * slots)
        self.temperature = np.zeros(slots, np.float32)
        self.lock = threading.Lock()

    def _tokens(self, tokens: np.ndarray, name: str) -> np.ndarray:
        if np.any((tokens < 0) | (tokens >= self.vocab_size)):
            raise ValueError(f"{name}: token ids outside the vocabulary [0, {self.vocab_size})")
        return tokens

    def _positions(self, positions: np.ndarray, name: str) -> np.ndarray:
        if np.any((positions < 0) | (positions >= self.max_len)):
            raise ValueError(f"{name}: positions outside the context [0, {self.max_len})")
        return positions

    def _hidden(self, m: pb.Array, name: str, shape: tuple[int | None, ...]) -> jax.Array | None:
        if not self.drafter.wants_hidden:
            return None
        return jnp.asarray(unpack(m, name, (*shape, len(self.drafter.wants_hidden), None), "float32"))

    @handler
    def Prefill(self, request: pb.DraftPrefillRequest, context) -> pb.DraftPrefillReply:
        slot = check_slot(request.slot, self.slots)
        tokens = self._tokens(np.array(request.tokens, np.int32), "tokens")
        if not 0 < len(tokens) < self.max_len:
            raise ValueError(f"tokens: {len(tokens)} tokens; need 1 to {self.max_len - 1}")
        params = sampling_params(request.sampling)
        bucket = next(b for b in self.buckets if b >= len(tokens))
        padded = np.zeros((1, bucket), np.int32)
        padded[0, : len(tokens)] = tokens
        hidden = self._hidden(request.hidden, "hidden", (1, bucket))
        with self.lock:
            self.state, self.rows = _prefill_jit(self.drafter, self.drafter.variables, self.state, self.rows,
                                                 jnp.int32(slot), jnp.asarray(padded),
                                                 jnp.array([len(tokens)], jnp.int32), hidden, RowSampling.of([params]))
            self.temperature[slot] = params.temperature
        return pb.DraftPrefillReply()

    @handler
    def Draft(self, request: pb.DraftRequest, context) -> pb.DraftReply:
        B, gamma = self.slots, self.gamma
        update = self.no_update
        if request.HasField("update"):
            u = request.update
            mask = rows_mask(u.rows, B, "update.rows")
            block = unpack(u.tokens, "update.tokens", (B, gamma + 1), "int32")
            start = unpack(u.positions, "update.positions", (B,), "int32")
            accepted = unpack(u.accepted, "update.accepted", (B,), "int32")
            self._tokens(block[mask], "update.tokens")
            self._positions(start[mask], "update.positions")
            if np.any((accepted[mask] < 0) | (accepted[mask] > gamma)):
                raise ValueError(f"update.accepted: counts outside [0, {gamma}]")
            update = tuple(jnp.asarray(a) for a in (mask, block, start, accepted)) + (
                self._hidden(u.hidden, "update.hidden", (B, gamma + 1)),)
        rows = rows_mask(request.rows, B)
        tokens = unpack(request.tokens, "tokens", (B,), "int32")
        positions = unpack(request.positions, "positions", (B,), "int32")
        self._tokens(tokens[rows], "tokens")
        self._positions(positions[rows], "positions")
        kv_len = next(b for b in self.buckets if b >= min(max(request.reach, 1), self.max_len))
        with self.lock:
            self.state, drafts, q, proposed = _draft_jit(self.drafter, gamma, kv_len, self.drafter.variables,
                                                         self.state, self.rows, update, jnp.asarray(rows),
                                                         jnp.asarray(tokens), jnp.asarray(positions))
            sampled = np.flatnonzero(rows & (self.temperature > 0)).astype(np.int32)
        reply = pb.DraftReply(drafts=pack(drafts), proposed=pack(proposed), sampled=pack(sampled))
        if len(sampled):
            reply.q.CopyFrom(pack(q[jnp.asarray(sampled)]))
        return reply


@ray.remote
class DraftWorker:
    """A Ray actor holding a drafter behind a Drafter gRPC server (`start`)."""

    def __init__(self) -> None:
        self.server = None

    def start(self, draft: str, target: ModelConfig, slots: int, max_len: int, gamma: int, secret: str,
              dtype: str | None = None, compilation_cache: str | None = None,
              host: str | None = None) -> dict[str, Any]:
        """Load the drafter `draft` for a large model of config `target` and serve calls that carry `secret`; where
        to reach it and what the verifier must know of it."""
        if compilation_cache:
            use_compilation_cache(compilation_cache)
        drafter = load_any_drafter(draft, target, dtype)
        service = DrafterService(drafter, target, slots, max_len, gamma)
        host = host or ray.util.get_node_ip_address()
        limit = message_limit(slots, max_len, gamma, hidden=len(drafter.wants_hidden) * target.dim)
        self.server, port = serve(lambda s: internal_pb2_grpc.add_DrafterServicer_to_server(service, s), SERVICE,
                                  secret, limit, host)
        return {"address": f"{host}:{port}", "node": ray.get_runtime_context().get_node_id(), "name": drafter.name,
                "wants_hidden": tuple(drafter.wants_hidden),
                "stops_early": bool(getattr(drafter, "stops_early", False)), "pid": os.getpid()}

    def ping(self) -> bool:
        return self.server is not None

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(None)
