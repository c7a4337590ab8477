"""Mixtral's sparse mixture of experts: each token runs its top-k experts, and only those experts' weights are read.

The experts are one array per expert and weight (gate_e, up_e [dim, F], down_e [F, dim]), not stacked [E, ...]:
XLA's CPU backend copies any slice of a stacked array, static or dynamic, before a matrix product, so a chosen
expert is read in place only when it is an array of its own (docs/hire.md, "Mixture of experts").

Three paths compute the same sum (up to float rounding); ModelConfig.moe_dispatch names one or "auto":

- **all**: every expert on every token, the unchosen ones weighted 0 (the mixture as first written): reads every
  expert. The reference, and what `hire bench decode` times a mixture model against.
- **per-token**: each (token, chosen expert) pair in turn, a `lax.switch` on the expert running that expert's
  arrays on that token: reads k experts per token (decode at small batch).
- **grouped**: the pairs sorted by expert; each expert runs on its tokens in tiles of `tile_rows` rows (twice the
  mean pairs an expert gets, rounded up to a power of two, at most `TILE`), a loop of ceil(tokens / tile) matrix
  products (none for an expert no token chose). Nothing is dropped: the tile bounds the rows of one product, not
  the tokens an expert takes; each expert with tokens is read once per tile, and a tile's spare rows are computed
  for nothing, so smaller tiles trade reads for computation.

"auto" takes per-token while a call has at most `PER_TOKEN_PAIRS` pairs, grouped above (prefill included:
it computes about k / E of the all path's products). Both thresholds follow `hire bench decode --shape moe-1g`
(docs/hire.md, "Mixture of experts").

Over a mesh (hire.sharding.on_mesh, weights split as hire.sharding says: each expert's neurons over the devices,
tensor parallelism inside every expert), each device runs the path on its own slices of the chosen experts inside
one `jax.shard_map` and one psum adds them: no weight moves, and every device reads an equal share of whatever
experts were chosen (docs/cluster.md says why hire does not split the experts themselves over the devices).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from hire.sharded_sparse import AXIS, model_mesh

PER_TOKEN_PAIRS = 8  # "auto" runs per-token up to this many (token, expert) pairs in a call
TILE = 16  # the most rows one grouped matrix product takes

Expert = tuple[jax.Array, jax.Array, jax.Array]  # gate [dim, F], up [dim, F], down [F, dim]
Act = Callable[[jax.Array], jax.Array]


def route(x: jax.Array, router: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Mixtral's router for x [N, dim]: softmax over the experts, the top k, their weights renormalised over those k:
    weights [N, k] (float32) and expert indices [N, k]."""
    probs = jax.nn.softmax((x @ router).astype(jnp.float32), axis=-1)
    top, idx = jax.lax.top_k(probs, k)
    return top / top.sum(-1, keepdims=True), idx


def expert_ffn(x: jax.Array, expert: Expert, act: Act) -> jax.Array:
    """One expert, SwiGLU-shaped: down(act(gate x) * up x), in float32."""
    gate, up, down = expert
    return ((act(x @ gate) * (x @ up)) @ down).astype(jnp.float32)


def all_experts(x: jax.Array, experts: tuple[Expert, ...], weights: jax.Array, idx: jax.Array, act: Act) -> jax.Array:
    """Every expert on every token x [N, dim], weighted by `weights` [N, k] at `idx` [N, k] and 0 elsewhere."""
    dense = jnp.zeros((x.shape[0], len(experts)), jnp.float32).at[jnp.arange(x.shape[0])[:, None], idx].set(weights)
    return sum(dense[:, e, None] * expert_ffn(x, expert, act) for e, expert in enumerate(experts))


def per_token(x: jax.Array, experts: tuple[Expert, ...], weights: jax.Array, idx: jax.Array, act: Act) -> jax.Array:
    """Each token's chosen experts one pair at a time, each reading only its expert's arrays."""
    branches = [lambda row, expert=expert: expert_ffn(row, expert, act) for expert in experts]

    def pair(out: jax.Array, entry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        row, expert, weight = entry
        y = jax.lax.switch(expert, branches, jax.lax.dynamic_slice_in_dim(x, row, 1))
        return out.at[row].add(weight * y[0]), None

    rows = jnp.repeat(jnp.arange(x.shape[0]), idx.shape[1])
    return jax.lax.scan(pair, jnp.zeros(x.shape, jnp.float32), (rows, idx.ravel(), weights.ravel()))[0]


def tile_rows(tokens: int, k: int, n_experts: int) -> int:
    """Rows of one grouped product for a call of `tokens` tokens: twice the mean pairs an expert gets, rounded up to
    a power of two, at most TILE and at most `tokens` (an expert takes each token at most once)."""
    mean = -(-tokens * k // n_experts)
    return min(TILE, 1 << (2 * mean - 1).bit_length(), tokens)


def grouped(x: jax.Array, experts: tuple[Expert, ...], weights: jax.Array, idx: jax.Array, act: Act,
            tile: int | None = None) -> jax.Array:
    """The pairs sorted by expert; each expert runs over its tokens `tile` rows at a time (default tile_rows; the
    last tile's spare rows are other experts' tokens, weighted 0)."""
    n, k = idx.shape
    tile = min(tile or tile_rows(n, k, len(experts)), n)  # an expert takes each token at most once
    order = jnp.argsort(idx.ravel(), stable=True)  # pair indices, grouped by expert
    counts = jnp.bincount(idx.ravel(), length=len(experts))
    starts = jnp.cumsum(counts) - counts
    rows = jnp.concatenate([order // k, jnp.full(tile, n)])  # padded so that every tile's slice is in bounds
    pair_weights = jnp.concatenate([weights.ravel()[order], jnp.zeros(tile, jnp.float32)])
    x = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])
    out = jnp.zeros(x.shape, jnp.float32)
    for e, expert in enumerate(experts):
        def run_tile(t: jax.Array, out: jax.Array, e: int = e, expert: Expert = expert) -> jax.Array:
            first = starts[e] + t * tile
            tokens = jax.lax.dynamic_slice_in_dim(rows, first, tile)
            w = jnp.where(jnp.arange(tile) < counts[e] - t * tile,
                          jax.lax.dynamic_slice_in_dim(pair_weights, first, tile), 0.0)
            return out.at[tokens].add(w[:, None] * expert_ffn(x[tokens], expert, act))

        out = jax.lax.fori_loop(0, (counts[e] + tile - 1) // tile, run_tile, out)
    return out[:n]


PATHS = {"all": all_experts, "per-token": per_token, "grouped": grouped}


def pick(dispatch: str, tokens: int, k: int) -> str:
    """The path `dispatch` runs for a call of `tokens` tokens choosing `k` experts each."""
    if dispatch != "auto":
        return dispatch
    return "per-token" if tokens * k <= PER_TOKEN_PAIRS else "grouped"


def mixture(x: jax.Array, router: jax.Array, experts: tuple[Expert, ...], k: int, act: Act,
            dispatch: str = "auto") -> jax.Array:
    """The mixture's output [..., dim] for x [..., dim]: route, then the path `dispatch` picks (see the module
    docstring), over the context mesh's neuron shards when there is one."""
    lead, dim = x.shape[:-1], x.shape[-1]
    x = x.reshape(-1, dim)
    weights, idx = route(x, router, k)
    path = PATHS[pick(dispatch, x.shape[0], k)]
    mesh, neurons = model_mesh(), experts[0][0].shape[1]
    if mesh is None or neurons % mesh.shape[AXIS]:
        out = path(x, experts, weights, idx, act)
    else:
        def local(x: jax.Array, experts: tuple[Expert, ...], weights: jax.Array, idx: jax.Array) -> jax.Array:
            return jax.lax.psum(path(x, experts, weights, idx, act), AXIS)

        split = tuple((P(None, AXIS), P(None, AXIS), P(AXIS, None)) for _ in experts)
        # check_vma off: the paths start from zeros that are the same on every device
        out = jax.shard_map(local, mesh=mesh, in_specs=(P(), split, P(), P()), out_specs=P(),
                            check_vma=False)(x, experts, weights, idx)
    return out.astype(x.dtype).reshape(*lead, dim)


def experts_read(dispatch: str, tokens: int, k: int, n_experts: int) -> int:
    """An upper bound on the expert reads (one expert's three arrays each) a call of `tokens` tokens makes: every
    expert (all), one per pair (per-token), one per tile of an expert's pairs (grouped)."""
    pairs, path = tokens * k, pick(dispatch, tokens, k)
    if path == "all":
        return n_experts
    if path == "per-token":
        return pairs
    # an expert with c pairs is read ceil(c / tile) = 1 + (c - 1) // tile times (once when tile >= tokens >= c); at
    # most `used` experts have pairs, and every read past an expert's first takes `tile` more of them
    used, tile = min(n_experts, pairs), tile_rows(tokens, k, n_experts)
    return used if tile >= tokens else used + (pairs - used) // tile
