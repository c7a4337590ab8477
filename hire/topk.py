"""Fast top-k and DA-TOP-k (distributed approximate top-k) over the last axis of a score array.

API (all shapes static, so everything runs under `jax.jit`):

- `top_k(scores, k, method)` -> (values, indices), each [..., k], values in descending order:
  - "exact": `jax.lax.top_k`.
  - "approx": `jax.lax.approx_max_k` with its `recall_target` (approximate on TPU; XLA falls back to
    an exact top-k on CPU).
  - "statistical": a linear-time threshold (as in Gemma 3n): entries above mean + std * z pass, with z
    the inverse normal CDF of 1 - (capacity / 2) / N, so about capacity / 2 entries pass on Gaussian
    scores. The passing entries are compacted into `capacity` slots and the top k taken among them.
    When some row has fewer than k or more than `capacity` passing entries, the whole batch falls back
    to `jax.lax.top_k`, so the result is always the exact top-k; only the speed depends on the data.
- `da_top_k(score_fn, x, params, mesh=, axis=, k=, k_local=)`: DA-TOP-k. The rows of `params` are
  sharded over the mesh axis `axis`; each device scores its rows with `score_fn(x, params_shard)`,
  keeps its top `k_local` (value, global index) pairs, one `all_gather` merges them and the top k is
  taken; `logsumexp=True` adds the scores' log-sum-exp to the same all_gather; `rescore=` with
  `candidates=` makes `score_fn` a HiRE predictor whose top candidates each shard computes exactly.
  `gather_top_k` is the exact baseline: all_gather every score, then `jax.lax.top_k`.
- `shard_recall(k, shards, n, k_local)`: expected recall of keeping `k_local` per shard when the global
  top-k rows are spread at random over `shards` equal shards of `n` rows (hypergeometric).
- `k_local_for_recall(k, shards, n, target)`: the smallest `k_local` whose expected recall meets `target`.
- `bench_topk(...)`: the measurements behind `hire bench topk` (docs/hire.md; hire.recall.bench_host_devices).
"""
from __future__ import annotations

import math
import statistics
import time
from statistics import NormalDist
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

METHODS = ("exact", "approx", "statistical")

ScoreFn = Callable[[Any, Any], jax.Array]
RescoreFn = Callable[[Any, Any, jax.Array], jax.Array]


def top_k(scores: jax.Array, k: int, method: str = "exact", *, recall_target: float = 0.95,
          capacity: int | None = None) -> tuple[jax.Array, jax.Array]:
    """The k largest entries of `scores` along its last axis and their int32 indices.

    `recall_target` is for "approx"; `capacity` (default 4k) is the statistical method's slot count.
    """
    n = scores.shape[-1]
    if not 0 < k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if method == "exact":
        return tuple(jax.lax.top_k(scores, k))
    if method == "approx":
        return tuple(jax.lax.approx_max_k(scores, k, recall_target=recall_target))
    if method == "statistical":
        return _statistical_top_k(scores, k, min(n, capacity or 4 * k))
    raise ValueError(f"unknown top-k method {method!r}; known: {', '.join(METHODS)}")


def threshold_candidates(scores: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The entries above the Gaussian threshold, compacted into `capacity` slots in index order.

    Returns (values, indices, passed): values and indices are [..., capacity], slots past the number
    of passing entries hold -inf (index meaningless); `passed` [...] counts the passing entries (those
    past `capacity` are dropped). Linear time: one pass for the mean, std, mask and per-group counts
    (groups of `group` entries), then a prefix sum over the N / group group counts, a binary search per
    slot for its group, and a prefix sum inside the `capacity` groups gathered.
    """
    *lead, n = scores.shape
    group = 1 << max(0, round(math.log2(math.sqrt(n / capacity))))  # balances N / group against capacity * group
    x = scores.reshape(-1, n)
    if n % group:
        x = jnp.pad(x, ((0, 0), (0, group - n % group)), constant_values=-jnp.inf)
    rows, groups = x.shape[0], x.shape[1] // group
    stats = scores.reshape(-1, n).astype(jnp.float32)
    z = NormalDist().inv_cdf(1 - capacity / (2 * n))
    threshold = stats.mean(-1, keepdims=True) + z * stats.std(-1, keepdims=True)
    mask = (x >= threshold).reshape(rows, groups, group)
    counts = mask.sum(-1, dtype=jnp.int32)  # [R, G]
    ends = jnp.cumsum(counts, -1)  # passing entries up to and including each group
    slots = jnp.arange(1, capacity + 1, dtype=jnp.int32)  # slot j holds the j-th passing entry
    search = jax.vmap(lambda e: jnp.searchsorted(e, slots, side="left", method="scan_unrolled"))
    owner = jnp.minimum(search(ends), groups - 1)  # the group holding each slot's entry
    rank = slots - jnp.take_along_axis(ends - counts, owner, -1)  # its rank inside its group, from 1
    inner = jnp.cumsum(jnp.take_along_axis(mask, owner[..., None], 1), -1, dtype=jnp.int32)  # [R, capacity, group]
    indices = owner * group + jnp.argmax(inner >= rank[..., None], -1).astype(jnp.int32)
    passed = ends[:, -1]
    values = jnp.where(slots <= passed[:, None], jnp.take_along_axis(x, indices, -1), -jnp.inf)
    return (values.reshape(*lead, capacity), indices.reshape(*lead, capacity), passed.reshape(lead))


def _statistical_top_k(scores: jax.Array, k: int, capacity: int) -> tuple[jax.Array, jax.Array]:
    """Top k among the threshold candidates; exact `lax.top_k` for the batch when a row's count is off."""
    if capacity >= scores.shape[-1]:
        return tuple(jax.lax.top_k(scores, k))
    values, indices, passed = threshold_candidates(scores, capacity)

    def among_candidates() -> tuple[jax.Array, jax.Array]:
        best, slot = jax.lax.top_k(values, k)
        return best, jnp.take_along_axis(indices, slot, -1)

    captured = jnp.all((passed >= k) & (passed <= capacity))
    return jax.lax.cond(captured, among_candidates, lambda: tuple(jax.lax.top_k(scores, k)))


def _sharded_top_k(score_fn: ScoreFn, x: Any, params: Any, mesh: Mesh, axis: str, k: int,
                   k_local: int | None, method: str, logsumexp: bool = False,
                   rescore: RescoreFn | None = None, candidates: int = 0) -> tuple[jax.Array, ...]:
    """DA-TOP-k with `k_local` candidates per shard, or the gather-everything baseline when it is None; with
    `logsumexp`, also the log-sum-exp of all scores from each shard's (max, sum of exp) in the same all_gather;
    with `rescore`, each shard's top `candidates` by `score_fn` rescored before its top `k_local` is kept."""
    shards = mesh.shape[axis]

    def local(x: Any, params: Any) -> tuple[jax.Array, ...]:
        scores = score_fn(x, params)
        last, n_local = scores.ndim - 1, scores.shape[-1]
        if k_local is None:
            every = jax.lax.all_gather(scores, axis, axis=last, tiled=True, to="invarying")
            return tuple(jax.lax.top_k(every, k)) + ((jax.nn.logsumexp(every, -1),) if logsumexp else ())
        if rescore is None:
            values, indices = top_k(scores, min(k_local, n_local), method)
        else:
            _, rows = top_k(scores, min(candidates, n_local), method)
            values, pos = jax.lax.top_k(rescore(x, params, rows).astype(scores.dtype), min(k_local, rows.shape[-1]))
            indices = jnp.take_along_axis(rows, pos, -1)
        indices = indices + jax.lax.axis_index(axis).astype(jnp.int32) * n_local
        parts = [values.astype(jnp.float32), indices.astype(jnp.float32)]  # exact below 2**24 rows (checked)
        if logsumexp:  # this shard's max and sum of exp(score - max); merged below into the log-sum-exp
            most = jnp.max(scores, -1, keepdims=True).astype(jnp.float32)
            most = jnp.where(jnp.isfinite(most), most, 0.0)
            parts += [most, jnp.sum(jnp.exp(scores - most), -1, keepdims=True)]
        # one all_gather of every part side by side: XLA would issue one per array of a tuple
        sizes = [a.shape[-1] for a in parts]
        merged = jax.lax.all_gather(jnp.concatenate(parts, -1), axis, to="invarying")  # [shards, ..., sum(sizes)]
        values, indices, *sums = (jnp.moveaxis(a, 0, -2).reshape(*a.shape[1:-1], -1)
                                  for a in jnp.split(merged, np.cumsum(sizes)[:-1], -1))
        values, indices = values.astype(scores.dtype), indices.astype(jnp.int32)
        best, pos = jax.lax.top_k(values, k)
        out = best, jnp.take_along_axis(indices, pos, -1)
        if logsumexp:
            most, total = sums
            top = jnp.max(most, -1, keepdims=True)
            out += ((top + jnp.log(jnp.sum(total * jnp.exp(most - top), -1, keepdims=True)))[..., 0],)
        return out

    if k_local is not None and k_local * shards < k:
        raise ValueError(f"k_local={k_local} on {shards} shards gives fewer than k={k} candidates")
    if k_local is not None and jax.tree.leaves(params)[0].shape[0] > 2**24:
        raise ValueError("DA-TOP-k sends indices as float32: at most 2**24 rows")
    specs = (PartitionSpec(), PartitionSpec(axis))  # tree prefixes: x replicated, params' rows sharded
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=PartitionSpec())(x, params)


def da_top_k(score_fn: ScoreFn, x: Any, params: Any, *, mesh: Mesh, axis: str, k: int, k_local: int,
             method: str = "exact", logsumexp: bool = False, rescore: RescoreFn | None = None,
             candidates: int = 0) -> tuple[jax.Array, ...]:
    """DA-TOP-k: the top k of `score_fn` over all rows, from `k_local` candidates per shard of `axis`.

    `params` is a pytree whose leaves are sharded on their leading (row) axis over `axis`, `x` a pytree
    replicated on every device; `score_fn(x, params_shard)` returns the shard's scores [..., n_local]
    (e.g. `lambda h, w: h @ w.T`). Each shard keeps its top `k_local` by `method`; indices are global
    (shard i holds rows i * n_local ...). Returns replicated (values, indices) [..., k]. Works inside
    `jax.jit`, and across processes when the mesh spans hosts (`jax.distributed`). With an Explicit mesh
    the arrays must already be sharded so; with an Auto mesh (`jax.sharding.Mesh`) jit reshards them.

    With `logsumexp`, a third output [...] is the log-sum-exp of all N scores, a softmax's normalizer: each
    shard's max and sum of exp(score - max) travel in the same all_gather (hire.sharding samples with it).

    With `rescore` (HiRE inside DA-TOP-k), `score_fn` gives cheap approximate scores: each shard takes its top
    `candidates` (>= k_local) rows by them, `rescore(x, params_shard, local_rows)` [..., candidates] computes
    those rows exactly, and the shard's top `k_local` of the exact values go to the merge. Only the candidates'
    rows of the exact weight are read. `logsumexp` is then that of the approximate scores.
    """
    if rescore is not None and candidates < k_local:
        raise ValueError(f"candidates ({candidates}) must be at least k_local ({k_local})")
    return _sharded_top_k(score_fn, x, params, mesh, axis, k, k_local, method, logsumexp, rescore, candidates)


def gather_top_k(score_fn: ScoreFn, x: Any, params: Any, *, mesh: Mesh, axis: str, k: int
                 ) -> tuple[jax.Array, jax.Array]:
    """The exact baseline for `da_top_k` (same arguments): all_gather every shard's scores, `lax.top_k`."""
    return _sharded_top_k(score_fn, x, params, mesh, axis, k, None, "exact")


def shard_recall(k: int, shards: int, n: int, k_local: int) -> float:
    """Expected recall of DA-TOP-k keeping `k_local` per shard, for `shards` equal shards of `n` rows in all.

    With the global top-k at random rows, the count X in one shard of n / shards rows is
    hypergeometric(n, k, n / shards): P(X = x) = C(k, x) C(n - k, m - x) / C(n, m), m = n / shards.
    Recall = shards * E[min(X, k_local)] / k.
    """
    if n % shards:
        raise ValueError(f"{n} rows do not split into {shards} equal shards")
    m = n // shards
    x = np.arange(max(0, k + m - n), min(k, m) + 1)
    pmf = np.exp([_log_comb(k, i) + _log_comb(n - k, m - i) - _log_comb(n, m) for i in x])
    return float(min(1.0, shards * np.sum(np.minimum(x, k_local) * pmf) / k))


def _log_comb(a: int, b: int) -> float:
    """log C(a, b)."""
    return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)


def k_local_for_recall(k: int, shards: int, n: int, target: float) -> int:
    """The smallest k_local >= ceil(k / shards) (fewer cannot supply k candidates) with `shard_recall` >= `target`."""
    most = min(k, n // shards)
    for k_local in range(max(1, -(-k // shards)), most):
        if shard_recall(k, shards, n, k_local) >= target:
            return k_local
    return most


def bench_topk(devices: list[jax.Device], vocab: int, batch: int, k: int, dim: int = 2048,
               methods: tuple[str, ...] = METHODS, repeats: int = 5, recall_target: float = 0.99,
               seed: int = 0, predictor: str | None = "int8", oversample: int = 4,
               real: tuple[np.ndarray, np.ndarray] | None = None, shuffle_rows: bool = False) -> dict[str, Any]:
    """Time DA-TOP-k against the gather-everything baseline over `devices`, and the `top_k` methods on one.

    With `real` (W [vocab, dim], h [batch, dim]: a model's output embedding and hidden states its softmax read,
    hire.recall.model_softmax), those are used, their rows in a seeded random order with `shuffle_rows` (a
    tokenizer's ids are not: frequent tokens cluster, and a shard of consecutive rows then holds more of a top-k
    than k_local, the hypergeometric assumption of `shard_recall`). Otherwise a random softmax weight W [vocab, dim]
    (rows ~ N(0, I / dim), so about unit norm) is sharded by rows.
    Each hidden state is 16 random rows of W weighted by c ~ U(4, 12), plus N(0, I) noise: those 16 logits
    are about c, the others Gaussian with variance 1 + sum(c^2) / dim (std ~1.25 at dim 2048, so the peaks
    stand 3 to 10 std out), a peaked distribution whose top-k is a few clear winners, then the upper tail.
    Timed side by side, in rounds (each program once per round, medians kept, after a compiling warm-up):
    the sharded logits h @ W.T alone; the full step (logits on each shard, then top-k) of the baseline and
    of DA-TOP-k; the merge alone, the same two on precomputed sharded logits; and each single-device
    `top_k` method on the full [batch, vocab] logits. Recall is against `lax.top_k` of the same logits.

    With `predictor` ("int8" or "int4", hire.predictors' per-row copy of W), also the HiRE step: DA-TOP-k
    scoring with the predictor, k_local x `oversample` candidates per shard rescored exactly from W's rows.
    """
    shards = len(devices)
    mesh = Mesh(np.array(devices), ("rows",))
    by_rows = jax.sharding.NamedSharding(mesh, PartitionSpec("rows"))
    key_w, key_pick, key_weight, key_noise = jax.random.split(jax.random.key(seed), 4)
    if real is None:
        w = jax.jit(lambda key: jax.random.normal(key, (vocab, dim)) / math.sqrt(dim), out_shardings=by_rows)(key_w)
        peaks = jax.random.randint(key_pick, (batch, 16), 0, vocab)
        weights = jax.random.uniform(key_weight, (batch, 16), minval=4.0, maxval=12.0)
        h = jnp.einsum("bp,bpd->bd", weights, w[peaks]) + jax.random.normal(key_noise, (batch, dim))
    else:
        rows = np.random.default_rng(seed).permutation(len(real[0])) if shuffle_rows else slice(None)
        w, h = jax.device_put(jnp.asarray(real[0][rows], jnp.float32), by_rows), jnp.asarray(real[1], jnp.float32)
        (vocab, dim), batch = w.shape, h.shape[0]
    h = jax.device_put(h, jax.sharding.NamedSharding(mesh, PartitionSpec()))
    logits_t = jax.jit(lambda h, w: w @ h.T, out_shardings=by_rows)(h, w)  # [vocab, batch], rows sharded
    logits = jax.device_put(logits_t.T, devices[0])
    k_local = k_local_for_recall(k, shards, vocab, recall_target)

    def sharded(params: jax.Array, score_fn: ScoreFn, per_shard: int | None) -> Callable[[], Any]:
        run = jax.jit(lambda h, p: _sharded_top_k(score_fn, h, p, mesh, "rows", k, per_shard, "exact"))
        return lambda: run(h, params)

    def on_one(method: str) -> Callable[[], Any]:
        run = jax.jit(lambda s: top_k(s, k, method))
        return lambda: run(logits)

    def matmul(h: jax.Array, w: jax.Array) -> jax.Array:
        return h @ w.T

    def transposed(_: jax.Array, logits_t: jax.Array) -> jax.Array:
        return logits_t.T

    logits_only = jax.jit(matmul)  # the sharded logits alone, where both full steps start
    programs = {
        "logits": lambda: logits_only(h, w), "exact": sharded(w, matmul, None), "da_top_k": sharded(w, matmul, k_local),
        "merge_exact": sharded(logits_t, transposed, None), "merge_da_top_k": sharded(logits_t, transposed, k_local),
        **{f"single_{m}": on_one(m) for m in methods},
    }
    if predictor:
        from hire import predictors, sparse

        pred = jax.device_put(predictors.quantize(np.asarray(w).T, predictor), by_rows)
        candidates = k_local * oversample

        def rescore(h: jax.Array, p: dict, rows: jax.Array) -> jax.Array:
            return sparse.exact_logits(h, p["w"], rows, 0, gather=True)

        hire_step = jax.jit(lambda h, p: _sharded_top_k(
            lambda h, p: predictors.scores(p["pred"], h), h, p, mesh, "rows", k, k_local, "exact",
            rescore=rescore, candidates=candidates))
        programs["hire"] = lambda: hire_step(h, {"w": w, "pred": pred})
    results = {name: jax.block_until_ready(run()) for name, run in programs.items()}
    times: dict[str, list[float]] = {name: [] for name in programs}
    for _ in range(repeats):
        for name, run in programs.items():
            start = time.perf_counter()
            jax.block_until_ready(run())
            times[name].append((time.perf_counter() - start) * 1e3)
    ms = {name: statistics.median(t) for name, t in times.items()}
    truth = np.asarray(jax.lax.top_k(logits, k)[1])

    def recall(name: str) -> float:
        found = np.asarray(results[name][1])
        return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth)]))

    return {
        "weights": "random" if real is None else "model, rows shuffled" if shuffle_rows else "model",
        "devices": shards, "vocab": vocab, "batch": batch, "k": k, "dim": dim, "repeats": repeats,
        "recall_target": recall_target, "k_local": k_local,
        "expected_recall": round(shard_recall(k, shards, vocab, k_local), 4),
        "recall": recall("da_top_k"), "speedup_vs_exact": round(ms["exact"] / ms["da_top_k"], 3),
        "exact_ms": round(ms["exact"], 3), "da_top_k_ms": round(ms["da_top_k"], 3), "logits_ms": round(ms["logits"], 3),
        "merge_only": {"recall": recall("merge_da_top_k"), "exact_ms": round(ms["merge_exact"], 3),
                       "da_top_k_ms": round(ms["merge_da_top_k"], 3),
                       "speedup_vs_exact": round(ms["merge_exact"] / ms["merge_da_top_k"], 3)},
        "single_device": {m: {"ms": round(ms[f"single_{m}"], 3), "recall": recall(f"single_{m}"),
                              "speedup_vs_exact": round(ms["single_exact"] / ms[f"single_{m}"], 3)
                              if "exact" in methods else None} for m in methods},
        **({"hire": {
            "predictor": predictor, "candidates_per_shard": candidates, "recall": recall("hire"),
            "ms": round(ms["hire"], 3), "speedup_vs_exact": round(ms["exact"] / ms["hire"], 3),
            "bytes_read": sum(a.nbytes for a in jax.tree.leaves(pred)) + shards * batch * candidates * dim * 4,
            "exact_bytes_read": w.nbytes}} if predictor else {}),
        "device": devices[0].device_kind, "jax": jax.__version__,
    }

