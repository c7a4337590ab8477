"""HiRE operators: the vocabulary softmax and a group-sparse FFN computed exactly on predicted candidates only.

Both take approximate scores from a predictor (hire.predictors), keep the top k' candidates, and compute
those exactly. Each has two execution paths with the same result: with few tokens (decode) the candidate
rows are gathered and only they are read ("gather"); with many tokens (prefill, evaluation), where the
gathers would read more than the whole weight, every row is computed and the others are masked ("mask").
`use_gather` picks between them from static shapes.

**Softmax** (`hire_logits`): the k' candidates get their exact logits. Every other token keeps its
approximate logit, capped just below the lowest exact candidate logit. So greedy decoding and top-k
sampling with k <= k' only ever pick candidates, while the full distribution (plain temperature
sampling, top-p past the candidates' mass, logprobs, perplexity) keeps the tail's approximate mass in
the normaliser instead of dropping it. With k' = vocabulary size the logits are the dense ones.

**Group-sparse FFN** (`group_sparse_ffn`): neurons in groups of g; a group's score is sum |h| over its
neurons, with h = act(gate x) * (up x) (act(up x) when not gated) computed from the predictor's
approximate gate and up pre-activations. The k' best groups are computed exactly. The weights are
bundled ("row-column bundling", LLM in a flash) as [groups, parts, g, dim]: a group's gate columns, up
columns and down rows lie together, so one gather reads a group. With `union`, every token of a call
uses the union of all its tokens' candidate groups, gathered once for the whole batch.

`keep_top_groups` is the same selection by exact activations, with nothing skipped: the forward-pass mask
of ModelConfig(ffn="group-topk"), for training a model whose FFN is group-sparse by construction.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from hire import quant


def use_gather(tokens: int, candidates: int, rows: int) -> bool:
    """Whether gathering `candidates` rows for each of `tokens` reads less than all `rows` (decode)."""
    return tokens * candidates < rows


def candidate_recall(exact: jax.Array, approx: jax.Array, k: int, candidates: int) -> jax.Array:
    """Per row: the fraction of the exact top-k [..., n] found among the approximate top-`candidates`."""
    exact, approx = exact.reshape(-1, exact.shape[-1]), approx.reshape(-1, approx.shape[-1])
    rows = jnp.arange(exact.shape[0])[:, None]
    chosen = jnp.zeros(approx.shape, bool).at[rows, jax.lax.top_k(approx, candidates)[1]].set(True)
    return jnp.take_along_axis(chosen, jax.lax.top_k(exact, k)[1], -1).mean(-1)


def hire_logits(x: jax.Array, weight: jax.Array, approx: jax.Array, candidates: int,
                rows_axis: int = 0, gather: bool | None = None) -> jax.Array:
    """Logits [..., V] for hidden states x [..., dim]: exact on the top-`candidates` of `approx` [..., V].

    `weight` is the output embedding with its V rows along `rows_axis` (0: a tied embedding [V, dim],
    1: an lm_head kernel [dim, V]); `gather` None picks the path with `use_gather`.
    """
    lead, vocab = x.shape[:-1], approx.shape[-1]
    x, approx = x.reshape(-1, x.shape[-1]), approx.reshape(-1, vocab)
    _, idx = jax.lax.top_k(approx, candidates)  # [N, k']
    gather = use_gather(x.shape[0], candidates, vocab) if gather is None else gather
    return cap_logits(approx, idx, exact_logits(x, weight, idx, rows_axis, gather)).reshape(*lead, vocab)


def exact_logits(x: jax.Array, weight: jax.Array, idx: jax.Array, rows_axis: int, gather: bool) -> jax.Array:
    """Exact logits [N, k'] (float32) of x [N, dim] for the rows idx [N, k'] of `weight` (as in `hire_logits`, or
    quantized by hire.quant): from the gathered rows (only they dequantized), or (`gather` False) from all rows
    computed."""
    if quant.is_quantized(weight):  # hire.quant's blocks, stored by row whatever rows_axis says
        if gather:
            return jnp.einsum("nd,nkd->nk", x.astype(jnp.float32), quant.take(weight, idx))
        return jnp.take_along_axis(quant.matmul_rows(x, weight), idx, -1)
    if gather:
        rows = jnp.take(weight, idx, axis=rows_axis)
        exact = jnp.einsum("nd,nkd->nk" if rows_axis == 0 else "nd,dnk->nk", x, rows)
    else:
        full = x @ (weight.T if rows_axis == 0 else weight)
        exact = jnp.take_along_axis(full, idx, -1)
    return exact.astype(jnp.float32)


def cap_logits(approx: jax.Array, idx: jax.Array, exact: jax.Array) -> jax.Array:
    """`approx` [N, V] capped just below the lowest of `exact` [N, k'], with `exact` set at idx [N, k'] (an index
    past V is dropped: a candidate another shard's rows hold, hire.sharded_sparse)."""
    floor = jnp.nextafter(exact.min(-1, keepdims=True), -jnp.inf)
    return jnp.minimum(approx, floor).at[jnp.arange(approx.shape[0])[:, None], idx].set(exact, mode="drop")


def bundle_ffn(up: jax.Array, down: jax.Array, gate: jax.Array | None, group: int) -> jax.Array:
    """Bundle FFN kernels up/gate [dim, F] and down [F, dim] as [F // group, parts, group, dim]: per group its
    gate columns (when gated), up columns and down rows, contiguous."""
    dim, ffn = up.shape
    parts = [up.T, down] if gate is None else [gate.T, up.T, down]
    return jnp.stack([p.reshape(ffn // group, group, dim) for p in parts], axis=1)


def _activations(pre: jax.Array, act: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """h from pre-activations [..., parts - 1, g]: act(gate) * up, or act(up) when there is one part."""
    return act(pre[..., 0, :]) * pre[..., 1, :] if pre.shape[-2] == 2 else act(pre[..., 0, :])


def approx_group_scores(approx: jax.Array, act: Callable[[jax.Array], jax.Array], groups: int,
                        group: int) -> jax.Array:
    """Group scores [..., G] from approximate [gate | up] pre-activations [..., (parts - 1) * F]."""
    pre = approx.reshape(*approx.shape[:-1], -1, groups, group)  # [..., parts - 1, G, g]
    return jnp.abs(_activations(jnp.moveaxis(pre, -3, -2), act)).sum(-1)


def exact_activations(x: jax.Array, bundle: jax.Array, act: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """h [N, G, g] of every neuron, from x [N, dim] and the bundle."""
    pre = jnp.einsum("nd,Gpgd->nGpg", x, bundle[:, :-1], preferred_element_type=jnp.float32)
    return _activations(pre, act)


def keep_top_groups(h: jax.Array, groups: int, k: int) -> jax.Array:
    """h [..., F] with every group but each token's k of largest sum |h| set to zero (ties may keep more)."""
    grouped = h.reshape(*h.shape[:-1], groups, -1)
    scores = jnp.abs(grouped).sum(-1)
    keep = scores >= jax.lax.top_k(scores, k)[0][..., -1:]
    return (grouped * keep[..., None].astype(h.dtype)).reshape(h.shape)


def _scan_groups(x: jax.Array, bundle: jax.Array, groups: jax.Array, rows: jax.Array | None,
                 act: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Sum of the FFN over the listed groups, reading one bundled group at a time (a dynamic slice, which XLA's
    CPU backend copies far faster than a gather, and plain matrix-vector products on it).

    With `rows` [M], entry i adds group groups[i] to token rows[i] only; without, every token gets every
    listed group. Entries past the last group (padding) add nothing.
    """
    n_groups = bundle.shape[0]

    def body(acc: jax.Array, entry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        group, row = entry
        w = jax.lax.dynamic_index_in_dim(bundle, jnp.minimum(group, n_groups - 1), 0, keepdims=False)
        if rows is None:
            pre = (x @ w[:-1].reshape(-1, x.shape[-1]).T).reshape(x.shape[0], w.shape[0] - 1, w.shape[1])
            h = _activations(pre, act) * (group < n_groups)
            return acc + h @ w[-1], None
        h = _activations(w[:-1] @ jax.lax.dynamic_index_in_dim(x, row, 0, keepdims=False), act) * (group < n_groups)
        return acc.at[row].add(h @ w[-1]), None

    entries = (groups, groups if rows is None else rows)
    return jax.lax.scan(body, jnp.zeros(x.shape, jnp.float32), entries)[0]


def _scan_kept_groups(x: jax.Array, bundle: jax.Array, groups: jax.Array, rows: jax.Array | None,
                      act: Callable[[jax.Array], jax.Array], keep: int,
                      combine: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """`_scan_groups`, but each token adds only the `keep` listed groups of largest exact sum |h|: a first scan
    reads the groups' gate and up parts and computes h, a second reads the down rows of the groups kept.

    With `rows` [M] (k' entries per token, in token order) each token ranks its own entries; without, every
    token ranks all listed groups (padding entries past the last group count as zero). `combine`, when given,
    maps h [M, tokens, g] before the ranking (hire.sharded_sparse: the sum over shards of each shard's entries).
    """
    (n_groups, parts, group, dim), n = bundle.shape, x.shape[0]
    part = lambda g, first, count: jax.lax.dynamic_slice(  # noqa: E731
        bundle, (jnp.minimum(g, n_groups - 1), first, 0, 0), (1, count, group, dim))[0]

    def activations(_, entry: tuple[jax.Array, jax.Array]) -> tuple[None, jax.Array]:
        g, row = entry
        inputs = x if rows is None else jax.lax.dynamic_slice_in_dim(x, row, 1)
        pre = (inputs @ part(g, 0, parts - 1).reshape(-1, dim).T).reshape(inputs.shape[0], parts - 1, group)
        return None, _activations(pre, act) * (g < n_groups)  # [tokens, g]

    h = jax.lax.scan(activations, None, (groups, groups if rows is None else rows))[1]  # [M, tokens, g]
    h = h if combine is None else combine(h)
    h = h.reshape(n, -1, group) if rows is not None else jnp.moveaxis(h, 0, 1)  # [n, entries, g]
    _, top = jax.lax.top_k(jnp.abs(h).sum(-1), keep)  # [n, keep]
    entries = groups.reshape(n, -1) if rows is not None else jnp.broadcast_to(groups, (n, groups.shape[0]))
    kept_h = jnp.take_along_axis(h, top[..., None], 1).reshape(n * keep, group)
    kept = jnp.take_along_axis(entries, top, 1).ravel()

    def down(acc: jax.Array, entry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        g, row, hg = entry
        return acc.at[row].add(hg @ part(g, parts - 1, 1)[0] * (g < n_groups)), None

    return jax.lax.scan(down, jnp.zeros(x.shape, jnp.float32), (kept, jnp.repeat(jnp.arange(n), keep), kept_h))[0]


def group_sparse_ffn(x: jax.Array, bundle: jax.Array, approx: jax.Array, act: Callable[[jax.Array], jax.Array],
                     candidates: int, union: bool = False, gather: bool | None = None, keep: int = 0) -> jax.Array:
    """FFN output [..., dim] computing only the top-`candidates` groups of `approx` [..., (parts - 1) * F].

    `union`: every token uses the union of all tokens' candidates; `gather` None picks the path. `keep` > 0:
    of the groups computed, each token keeps only the `keep` of largest exact sum |h| (a model trained with
    `keep_top_groups` uses exactly those), and the down rows of the others are not read.
    """
    lead, dim, (groups, _, group, _) = x.shape[:-1], x.shape[-1], bundle.shape
    x = x.reshape(-1, dim)
    scores = approx_group_scores(approx.reshape(x.shape[0], -1), act, groups, group)
    _, idx = jax.lax.top_k(scores, candidates)  # [N, k']
    n = x.shape[0]
    if not (use_gather(n, candidates, groups) if gather is None else gather):
        keep_mask = jnp.zeros((n, groups), x.dtype).at[jnp.arange(n)[:, None], idx].set(1)
        if union:
            keep_mask = jnp.broadcast_to(keep_mask.max(0), keep_mask.shape)
        h = exact_activations(x, bundle, act).astype(x.dtype) * keep_mask[..., None]
        if keep:
            h = keep_top_groups(h.reshape(n, -1), groups, keep).reshape(h.shape)
        out = jnp.einsum("nGg,Ggd->nd", h, bundle[:, -1])
    elif union:
        member = jnp.zeros(groups, bool).at[idx.ravel()].set(True)
        chosen = jnp.nonzero(member, size=min(groups, n * candidates), fill_value=groups)[0]
        out = _scan_kept_groups(x, bundle, chosen, None, act, keep) if keep else _scan_groups(x, bundle, chosen,
                                                                                               None, act)
    else:
        out = per_token_groups(x, bundle, idx, act, keep)
    return out.astype(x.dtype).reshape(*lead, dim)


def per_token_groups(x: jax.Array, bundle: jax.Array, idx: jax.Array, act: Callable[[jax.Array], jax.Array],
                     keep: int = 0, combine: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """The FFN [N, dim] (float32) of x [N, dim] over each token's own groups idx [N, k'], read one at a time
    (`group_sparse_ffn`'s decode path); `keep` as there, `combine` as in `_scan_kept_groups`. Indices past the
    bundle's last group add nothing."""
    rows = jnp.repeat(jnp.arange(x.shape[0]), idx.shape[1])
    return (_scan_kept_groups(x, bundle, idx.ravel(), rows, act, keep, combine) if keep
            else _scan_groups(x, bundle, idx.ravel(), rows, act))
