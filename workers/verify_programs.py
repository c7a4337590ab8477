"""The Verifier's programs (hire.speculative's prefill_target and verify_block for the rows a call names) on a decode
state they hold: in this process (`VerifierPrograms`, also what each host of a shard group runs:
workers.shard.ShardWorker.verifier), or broadcast to a workers.shards.ShardGroup (`GroupPrograms`).
workers.verify.VerifierService serves them.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from hire import sharding
from hire.config import ModelConfig
from hire.engine import DecodeState, Engine, _layouts
from hire.sampling import RowSampling, SamplingParams
from hire.speculative import Verdict, prefill_target, verify_block


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
