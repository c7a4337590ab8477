"""A JetStream-shaped engine over a fixed number of KV-cache slots.

`prefill` runs a prompt (padded to a length bucket) and samples its first token, `insert` copies
that prompt's cache into a free slot, `generate` runs one decode step for every slot at once and
`generate_steps` runs n of them inside one jitted `lax.scan` (no Python per token). Continuous
batching sits on top: requests enter and leave slots between steps.
"""
from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from hire import sharding
from hire.config import ModelConfig
from hire.engine_api import StepOutput
from hire.loaded import LoadedModel
from hire.model import KVCache, Transformer, init_cache
from hire.sampling import RowSampling, SamplingParams, sample

MIN_BUCKET = 16


class Prefix(NamedTuple):
    """A prefilled prompt, ready to insert: its cache, first token and per-row settings."""

    cache: KVCache  # per layer k [1, n_kv_heads, head_dim, bucket], v [1, n_kv_heads, bucket, head_dim]
    token: jax.Array  # [1] first generated token
    logprob: jax.Array  # [1]
    length: jax.Array  # [1] prompt length, the position `token` will be written at
    sampling: RowSampling
    adapter: jax.Array  # [1]


class DecodeState(NamedTuple):
    """Everything decoding carries per slot."""

    cache: KVCache  # per layer k [slots, n_kv_heads, head_dim, max_len], v [slots, n_kv_heads, max_len, head_dim]
    tokens: jax.Array  # [slots] the last sampled token, fed next
    positions: jax.Array  # [slots] its position
    sampling: RowSampling
    adapter: jax.Array  # [slots] LoRA adapter index, -1 for none


def buckets(max_len: int) -> list[int]:
    """Prompt lengths are padded up to one of these: powers of two, then max_len."""
    out, b = [], MIN_BUCKET
    while b < max_len:
        out.append(b)
        b *= 2
    return out + [max_len]


def _adapter(model: Transformer, adapter: jax.Array) -> jax.Array | None:
    return adapter if model.cfg.lora_adapters else None


Sampler = Callable[[jax.Array, RowSampling, jax.Array], tuple[jax.Array, jax.Array]]  # hire.sampling.sample's shape


def _prefill(model: Transformer, sampler: Sampler, variables, tokens, length, sampling, adapter) -> Prefix:
    positions = jnp.arange(tokens.shape[1])[None]
    cache = init_cache(model.cfg, 1, tokens.shape[1])
    logits, cache = model.apply(variables, tokens, positions, cache, _adapter(model, adapter), length - 1)
    token, logprob = sampler(logits, sampling, length - 1)
    return Prefix(cache, token, logprob, length, sampling, adapter)


def _insert(prefix: Prefix, state: DecodeState, slot: jax.Array) -> DecodeState:
    cache = tuple(tuple(jax.lax.dynamic_update_slice(c, p, (slot, 0, 0, 0)) for c, p in zip(layer, new))
                  for layer, new in zip(state.cache, prefix.cache))
    put = lambda whole, row: whole.at[slot].set(row[0])  # noqa: E731
    return DecodeState(cache, put(state.tokens, prefix.token), put(state.positions, prefix.length),
                       jax.tree.map(put, state.sampling, prefix.sampling), put(state.adapter, prefix.adapter))


def _step(model: Transformer, sampler: Sampler, variables, state: DecodeState, kv_len: int
          ) -> tuple[DecodeState, StepOutput]:
    logits, cache = model.apply(variables, state.tokens[:, None], state.positions[:, None], state.cache,
                                _adapter(model, state.adapter), jnp.zeros_like(state.positions), kv_len)
    tokens, logprobs = sampler(logits, state.sampling, state.positions)
    return state._replace(cache=cache, tokens=tokens, positions=state.positions + 1), StepOutput(tokens, logprobs)


def _steps(model: Transformer, sampler: Sampler, variables, state: DecodeState, n: int, kv_len: int
           ) -> tuple[DecodeState, StepOutput]:
    return jax.lax.scan(lambda s, _: _step(model, sampler, variables, s, kv_len), state, None, length=n)


def _init_state(cfg: ModelConfig, n: int, max_len: int) -> DecodeState:
    return DecodeState(init_cache(cfg, n, max_len), jnp.zeros(n, jnp.int32), jnp.zeros(n, jnp.int32),
                       RowSampling.of([SamplingParams(temperature=0.0, seed=0)] * n), jnp.full(n, -1, jnp.int32))


def _layouts(cfg: ModelConfig, mesh: Mesh | None) -> dict[str, dict]:
    """jax.jit keywords for the prefix, the decode state and generate_steps' outputs: none on one device; over
    a mesh the cache split as hire.sharding says and the rest replicated (every process can read the tokens)."""
    if mesh is None:
        return {"prefix": {}, "state": {}, "steps": {}}
    cache, rep = sharding.cache_sharding(cfg, mesh), sharding.replicated(mesh)
    state = DecodeState(cache, rep, rep, rep, rep)
    return {"prefix": {"out_shardings": Prefix(cache, rep, rep, rep, rep, rep)}, "state": {"out_shardings": state},
            "steps": {"out_shardings": (state, StepOutput(rep, rep))}}


class Engine:
    """The engine in this process (hire.engine_api.Engine's contract): a model's weights and the compiled
    prefill / insert / generate functions.

    `net` replaces Transformer(model.cfg) (anything with its `cfg` and `apply`: hire.flash.OnDiskNet). With a `mesh`,
    the variables are arrays sharded over it (hire.sharding.load_sharded), the cache is split over it too and
    everything else replicated; with jax.distributed, every process builds this same engine
    and makes the same calls in the same order (workers.shards drives that). `gather_logits` (with a mesh) samples
    every batch from the gathered logits (hire.sampling.sample on all of them), the baseline DA-TOP-k replaces.
    """

    def __init__(self, model: LoadedModel, slots: int = 8, max_len: int | None = None, mesh: Mesh | None = None,
                 net: Transformer | None = None, gather_logits: bool = False):
        self.cfg = model.cfg
        self.variables = model.variables
        self.tokenizer = model.tokenizer
        self.slots = slots
        self.max_len = min(max_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
        self.buckets = buckets(self.max_len)
        net, layout = Transformer(model.cfg) if net is None else net, _layouts(model.cfg, mesh)
        # over a mesh, sampling reads the vocabulary-sharded logits through DA-TOP-k where it can, and the model's
        # HiRE operators run sharded (traced on the mesh: hire.sharded_sparse)
        sampler = sample if mesh is None else functools.partial(sharding.sample_sharded, mesh=mesh,
                                                                path="gather" if gather_logits else None)
        self._prefill = jax.jit(sharding.on_mesh(functools.partial(_prefill, net, sampler), mesh), **layout["prefix"])
        self._insert = jax.jit(_insert, donate_argnums=1, **layout["state"])
        self._generate_steps = jax.jit(sharding.on_mesh(functools.partial(_steps, net, sampler), mesh),
                                       static_argnums=(2, 3), donate_argnums=1, **layout["steps"])
        fresh = functools.partial(_init_state, self.cfg, slots, self.max_len)
        self._init_state = fresh if mesh is None else jax.jit(fresh, **layout["state"])

    def init_state(self) -> DecodeState:
        return self._init_state()

    def check_request(self, tokens: list[int], adapter: int = -1) -> None:
        """Raise ValueError, naming the field, for a prompt or adapter this engine cannot run."""
        if not -1 <= adapter < self.cfg.lora_adapters:
            raise ValueError(f"adapter: index {adapter} is not -1 (none) or one of the {self.cfg.lora_adapters} loaded")
        if not tokens:
            raise ValueError("prompt: empty prompt")
        if len(tokens) >= self.max_len:
            raise ValueError(f"prompt: {len(tokens)} tokens leave no room to generate in a context of {self.max_len}")
        bad = [t for t in tokens if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt: token ids {bad[:5]} outside the vocabulary [0, {self.cfg.vocab_size})")

    def prefill(self, tokens: list[int], params: SamplingParams, adapter: int = -1) -> Prefix:
        self.check_request(tokens, adapter)
        bucket = next(b for b in self.buckets if b >= len(tokens))
        padded = np.zeros((1, bucket), np.int32)
        padded[0, : len(tokens)] = tokens
        return self._prefill(self.variables, jnp.asarray(padded), jnp.array([len(tokens)], jnp.int32),
                             RowSampling.of([params]), jnp.array([adapter], jnp.int32))

    def insert(self, prefix: Prefix, state: DecodeState, slot: int) -> DecodeState:
        return self._insert(prefix, state, jnp.int32(slot))

    def generate(self, state: DecodeState, reach: int | None = None) -> tuple[DecodeState, StepOutput]:
        """One decode step for every slot; outputs are [slots]."""
        state, out = self.generate_steps(state, 1, reach)
        return state, StepOutput(out.tokens[0], out.logprobs[0])

    def generate_steps(self, state: DecodeState, n: int, reach: int | None = None) -> tuple[DecodeState, StepOutput]:
        """n decode steps in one compiled loop; outputs are [n, slots].

        `reach`, when the caller knows it, bounds every live slot's position after the n steps:
        attention then reads only the cache up to the bucket holding it.
        """
        kv_len = next(b for b in self.buckets if b >= min(reach or self.max_len, self.max_len))
        return self._generate_steps(self.variables, state, n, kv_len)

    def warm_up(self, chunk: int, buckets: Sequence[int] | None = None) -> None:
        """Compile prefill and insert for every prompt bucket (or those of `buckets`), and `chunk`-step decoding
        for every attention span (or those), so that no request waits for a compilation (a server calls this
        before it takes requests); a bucket left out is compiled by the first call that needs it."""
        state, params = self.init_state(), SamplingParams(temperature=0.0)
        for b in self.buckets if buckets is None else buckets:
            state = self.insert(self.prefill([0] * min(b, self.max_len - 1), params), state, 0)
            state, _ = self.generate_steps(state, chunk, b)
        jax.block_until_ready(state)


def compilation_cache_folder() -> str:
    """Where compiled programs are kept by default: $HIRE_CACHE, or ~/.cache/hire/xla."""
    return os.environ.get("HIRE_CACHE", str(Path.home() / ".cache" / "hire" / "xla"))


def use_compilation_cache(folder: str | None = None) -> None:
    """Keep compiled programs in `folder` (default `compilation_cache_folder()`) across processes, those of every
    process of a multi-process program included (`_write_from_every_process`)."""
    folder = folder or compilation_cache_folder()
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    _write_from_every_process()


def _write_from_every_process() -> None:
    """jax writes the compilation cache from process 0 only, and on CPU a program's cache key differs between the
    processes of one program (it hashes the process's own topology): a shard host of rank > 0 compiled every program
    again in each new process (~3 s each for a 30-layer model) while rank 0 waited in the first collective. Each
    process writes its own entries instead (jax 0.10-0.11's private `_cache_write`; a no-op for one process)."""
    from jax._src import compilation_cache, compiler

    def write(key: str, seconds: float, name: str, backend, executable, host_callbacks) -> None:
        if host_callbacks or seconds < jax.config.jax_persistent_cache_min_compile_time_secs:
            return
        try:
            compilation_cache.put_executable_and_time(key, name, executable, backend, int(seconds))
        except Exception as e:  # a cache that cannot be written costs the next process a compile, not this call
            warnings.warn(f"could not keep the compiled program {name}: {type(e).__name__}: {e}")

    compiler._cache_write = write
