"""hire.sparse's HiRE operators over the mesh axis "model" that the engine traces its functions under.

hire.model calls `hire_logits` and `group_sparse_ffn` from here. Outside a mesh (no context mesh with AXIS over
more than one device: every single-device caller) they are hire.sparse's. Inside `hire.sharding.on_mesh`, with the
weights sharded as hire.sharding says, each device works on its own rows inside one `jax.shard_map`:

- **softmax**: the approximate logits [N, V] stay split over the vocabulary; DA-TOP-k (hire.topk.da_top_k, with
  k_local = k', so the merge is exact: the candidates are the single-device ones) merges each device's top k' in one
  all_gather; each device computes the exact logits of the candidates in its own rows, one psum of [N, k'] gives
  them all, and each device caps and fills its own slice of the logits, which stay split for the sampler
  (hire.sharding.sample_sharded). GSPMD alone would gather the approximate logits [N, V] and all-reduce the
  gathered candidate rows [N, k', dim].
- **group-sparse FFN, decode path** (per-token candidates read one group at a time): the approximate
  pre-activations are gathered ([N, 2F], small), every device ranks the groups (the same candidates as on one
  device), each scans the candidate entries, computes those in its own groups (other shards' groups are padding
  that adds nothing) and one psum sums the outputs (with `keep`, a psum of the candidates' h [N k', g] first, so
  every device ranks them alike). GSPMD alone would all-gather the whole bundle [G, parts, g, dim] for the
  dynamic slices. The mask path (many tokens) and `union` are left to GSPMD: see docs/cluster.md.

A vocabulary or group count the devices do not divide is replicated (hire.sharding) and runs hire.sparse's code.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hire import sparse
from hire.topk import da_top_k

AXIS = "model"


def model_mesh() -> AbstractMesh | None:
    """The context mesh (hire.sharding.on_mesh) when it splits AXIS over more than one device, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh if AXIS in mesh.axis_names and mesh.shape[AXIS] > 1 else None


def _own(idx: jax.Array, rows: int) -> tuple[jax.Array, jax.Array]:
    """Global row indices -> (indices into this device's `rows` rows, whether this device holds them)."""
    local = idx - jax.lax.axis_index(AXIS).astype(idx.dtype) * rows
    return local, (local >= 0) & (local < rows)


def hire_logits(x: jax.Array, weight: jax.Array, approx: jax.Array, candidates: int,
                rows_axis: int = 0, gather: bool | None = None) -> jax.Array:
    """hire.sparse.hire_logits, over the context mesh's vocabulary shards when there is one."""
    mesh, vocab = model_mesh(), approx.shape[-1]
    if mesh is None or vocab % mesh.shape[AXIS]:
        return sparse.hire_logits(x, weight, approx, candidates, rows_axis, gather)
    lead, dim = x.shape[:-1], x.shape[-1]
    x, approx = x.reshape(-1, dim), approx.reshape(-1, vocab)
    gather = sparse.use_gather(x.shape[0], candidates, vocab) if gather is None else gather
    k_local = min(candidates, vocab // mesh.shape[AXIS])
    _, idx = da_top_k(lambda _, by_vocab: by_vocab.T, None, approx.T, mesh=mesh, axis=AXIS, k=candidates,
                      k_local=k_local)

    def local(x: jax.Array, weight: jax.Array, approx: jax.Array, idx: jax.Array) -> jax.Array:
        rows, mine = _own(idx, approx.shape[-1])
        exact = sparse.exact_logits(x, weight, jnp.where(mine, rows, 0), rows_axis, gather)
        exact = jax.lax.psum(jnp.where(mine, exact, 0.0), AXIS)  # each candidate's logit from the device holding it
        return sparse.cap_logits(approx, jnp.where(mine, rows, approx.shape[-1]), exact)

    rows_spec = P(AXIS) if rows_axis == 0 else P(None, AXIS)
    logits = jax.shard_map(local, mesh=mesh, in_specs=(P(), rows_spec, P(None, AXIS), P()),
                           out_specs=P(None, AXIS))(x, weight, approx, idx)
    return logits.reshape(*lead, vocab)


def group_sparse_ffn(x: jax.Array, bundle: jax.Array, approx: jax.Array, act: Callable[[jax.Array], jax.Array],
                     candidates: int, union: bool = False, gather: bool | None = None, keep: int = 0) -> jax.Array:
    """hire.sparse.group_sparse_ffn; its per-token decode path over the context mesh's group shards when there is
    one (other paths: hire.sparse's, partitioned by GSPMD)."""
    mesh, (groups, _, group, _), dim = model_mesh(), bundle.shape, x.shape[-1]
    n = x.size // dim
    if (mesh is None or union or groups % mesh.shape[AXIS]
            or not (sparse.use_gather(n, candidates, groups) if gather is None else gather)):
        return sparse.group_sparse_ffn(x, bundle, approx, act, candidates, union, gather, keep)
    lead = x.shape[:-1]
    approx = jax.lax.with_sharding_constraint(approx.reshape(n, -1), NamedSharding(mesh, P()))
    _, idx = jax.lax.top_k(sparse.approx_group_scores(approx, act, groups, group), candidates)  # [N, k'], everywhere

    def local(x: jax.Array, bundle: jax.Array, idx: jax.Array) -> jax.Array:
        rows, mine = _own(idx, bundle.shape[0])
        out = sparse.per_token_groups(x, bundle, jnp.where(mine, rows, bundle.shape[0]), act, keep,
                                      lambda h: jax.lax.psum(h, AXIS))
        return jax.lax.psum(out, AXIS)

    # check_vma off: hire.sparse's scans start from a zero carry that is the same on every device
    out = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(AXIS), P()), out_specs=P(),
                        check_vma=False)(x.reshape(n, dim), bundle, idx)
    return out.astype(x.dtype).reshape(*lead, dim)
