"""Exact speculative decoding: a drafter proposes up to γ tokens, the large model checks the block in one pass.

The drafter interface (`Drafter`, `Proposal`) comes first; drafters live in hire.drafters (a standalone
small model, the model-free n-gram / prompt-lookup drafter) and hire.tandem (the tandem small model).

One block, for every row at once, inside one jitted function (`Speculator.block`):

1. Draft: the drafter steps γ times (`lax.scan`), fed first the row's pending token x_n at position n
   (the last token decided, not yet in the large model's cache), then its own drafts d_1 .. d_{γ-1}.
   Each step's logits are filtered with the row's temperature / top-k / top-p (hire.sampling) into q_i,
   and d_i is drawn from q_i (argmax for greedy rows). A row stops proposing where the drafter says so
   (`Proposal.proposed`) or a block-length router says its next draft will likely be rejected.
2. Verify: the large model runs [x_n, d_1 .. d_γ] at positions n .. n+γ in one forward pass, giving
   p_1 .. p_{γ+1} (p_i predicts position n+i) under the same filtering.
3. Accept: greedy rows keep the longest prefix of drafts equal to the large model's argmax, then take its
   argmax at the first mismatch; sampled rows accept d_i with probability min(1, p_i(d_i) / q_i(d_i)) and
   on the first rejection draw from normalise(max(0, p_i - q_i)); a row whose k proposed drafts are all
   accepted draws one more token from p_{k+1}. Each row emits its a accepted drafts plus that token, so
   the output is exactly the large model's (token for token when greedy, in distribution when sampled).
4. Roll back: both models' caches are indexed by absolute position, and a query attends only to keys at
   positions up to its own, so rolling a row back is setting its position to n + a + 1. The stale entries
   past it are overwritten by the next block (which writes every position from there on) before any
   query can see them. The drafter is told the accepted count and the large model's hidden states.

Randomness is per row: the row's seed folded with a stream (draft, accept, final) and the position being
decided, so a request's output depends only on its own seed, never on its batch neighbours, and every
(stream, position) draw influences the output at most once.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from hire.batch import SlotBatch
from hire.config import ModelConfig
from hire.engine import DecodeState, Engine
from hire.loaded import LoadedModel
from hire.model import KVCache, Transformer
from hire.request import Completion, Event, Request, make_requests
from hire.sampling import RowSampling, SamplingParams, argmax, filter_logits, sample, scale, token_logprobs
from hire.scheduler import run as run_scheduler

# ---------------------------------------------------------------------------------------------------------------
# The drafter interface
# ---------------------------------------------------------------------------------------------------------------


class Proposal(NamedTuple):
    """One drafting step's output for every row."""

    logits: jax.Array  # [B, V] f32 next-token logits; -inf where the drafter puts no mass (a one-hot drafter)
    proposed: jax.Array  # [B] bool: False ends the row's block here (e.g. the n-gram drafter found no match)
    features: jax.Array  # [B, F] f32 the drafter's state for a block-length router (F may be 0)


class Drafter(Protocol):
    """What the speculative loop needs from a drafter. Every method is pure and traced inside jit.

    The state is any pytree (NamedTuples of arrays) built by `init`; the loop carries it through every
    block and never looks inside. `variables` (the drafter's weights, a pytree, possibly empty) is passed
    to every method as a jit argument rather than closed over. The drafter object itself is a static jit
    argument, hashed by identity (a plain class, not a dataclass with eq), so one drafter object reuses its
    compiled programs.

    The protocol, for a row whose pending token x_n sits at position n:

    - `prefill` sees the prompt x_0 .. x_{n-1} (the pending token is the large model's first sample).
    - `step` is called up to γ times per block: first with x_n at n, then with each draft it made (drafting
      ends early once no row proposes). It returns the distribution of the token at position + 1. It may
      write whatever it likes at positions >= the one it is given: the loop never moves a row back past a
      position it has committed.
    - `update` follows verification: of the block tokens [x_n, d_1 .. d_γ] at positions n .. n+γ, the first
      `accepted + 1` are committed (x_n and the accepted drafts), and the next `step` is fed the large
      model's correction at position n + accepted + 1. Roll back here whatever state is not indexed by
      absolute position; a KV cache needs nothing: its stale entries lie past the next position and are
      overwritten before they are visible.

    `hidden` (prefill and update) holds the large model's residual stream at the same tokens: for each
    index i in `wants_hidden`, in that order, hire.model's "hidden_i" (0: embeddings, n_layers: the last
    block's output), stacked to [B, T, len(wants_hidden), large_dim]; None when `wants_hidden` is empty.

    Optional attribute `stops_early` (default False): True when `Proposal.proposed` can be False, so that
    verification is compiled for shorter blocks too (see Speculator).
    """

    name: str
    wants_hidden: tuple[int, ...]
    variables: Any

    def init(self, batch: int, max_len: int) -> Any:
        """The state of `batch` empty rows of `max_len` positions."""
        ...

    def prefill(self, variables: Any, state: Any, slot: jax.Array, tokens: jax.Array, length: jax.Array,
                hidden: jax.Array | None) -> Any:
        """Row `slot` starts on a prompt: tokens [1, S] at positions 0 .. S-1 (S a bucket; the first
        length[0] are the prompt, the rest padding), hidden [1, S, n, large_dim] or None."""
        ...

    def step(self, variables: Any, state: Any, token: jax.Array, position: jax.Array,
             kv_len: int) -> tuple[Any, Proposal]:
        """Feed token [B] at position [B]; propose the next. Every live position is below the static kv_len."""
        ...

    def update(self, variables: Any, state: Any, tokens: jax.Array, positions: jax.Array, accepted: jax.Array,
               hidden: jax.Array | None) -> Any:
        """After verification of tokens [B, γ+1] at positions [B, γ+1]: accepted [B] drafts were kept."""
        ...


def take_row(tree: Any, slot: jax.Array) -> Any:
    """Row `slot` of every leaf (leading axis the batch), keeping the axis: [1, ...]."""
    return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, slot, 1, 0), tree)


def put_row(tree: Any, row: Any, slot: jax.Array) -> Any:
    """`tree` with row `slot` of every leaf replaced by `row`'s [1, ...] leaf."""
    return jax.tree.map(lambda x, r: jax.lax.dynamic_update_slice_in_dim(x, r.astype(x.dtype), slot, 0), tree, row)


def run_model(cfg: ModelConfig, variables: dict, tokens: jax.Array, positions: jax.Array, cache: KVCache | None,
              adapter: jax.Array | None = None, logit_index: jax.Array | None = None, kv_len: int | None = None,
              hidden: Sequence[int] = (), stepwise: bool = False
              ) -> tuple[jax.Array, KVCache | None, jax.Array | None]:
    """hire.model.Transformer's forward pass (`stepwise`: attention one token at a time), plus the hidden states
    `hidden` names, stacked to [B, T, len(hidden), dim] (None when it names none)."""
    net = Transformer(cfg)
    adapter = adapter if cfg.lora_adapters else None
    if not hidden:
        return (*net.apply(variables, tokens, positions, cache, adapter, logit_index, kv_len, stepwise), None)
    (logits, cache), inter = net.apply(variables, tokens, positions, cache, adapter, logit_index, kv_len, stepwise,
                                       mutable=["intermediates"])
    states = inter["intermediates"]
    return logits, cache, jnp.stack([states[f"hidden_{i}"][0] for i in hidden], axis=2)


class BlockRouter(Protocol):
    """Adaptive block length (hire.router): a row stops proposing at the first draft whose predicted
    probability of acceptance is below `threshold`. `params` is a pytree passed as a jit argument; the
    router object is a static jit argument, hashed by identity."""

    params: Any
    threshold: float

    def accept(self, params: Any, inputs: jax.Array) -> jax.Array:
        """Predicted probability [B] that the draft is accepted, from router_inputs [B, F + 2]."""
        ...


def router_inputs(proposal: Proposal) -> jax.Array:
    """What a router sees of a drafting step, [B, F + 2]: the drafter's features, then its top probability
    and entropy (nats) at temperature 1."""
    p = jax.nn.softmax(proposal.logits, axis=-1)
    confidence = [jnp.max(p, -1, keepdims=True), jnp.sum(jax.scipy.special.entr(p), -1, keepdims=True)]
    return jnp.concatenate([proposal.features.astype(jnp.float32), *confidence], axis=-1)


# ---------------------------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------------------------

DRAFT, ACCEPT, FINAL = 1, 2, 3  # random streams


def _keys(rows: RowSampling, stream: int, positions: jax.Array) -> jax.Array:
    """Per-row keys [B, ..., 2] for `stream` at positions [B, ...] (of generated tokens, so >= 1): the row's
    key folded with 4 * position + stream, which never meets hire.sampling's fold with the position before
    the first generated token (what prefill samples with). One fold, as each is a threefry hash to compile."""
    fold = jax.random.fold_in
    for _ in range(positions.ndim - 1):
        fold = jax.vmap(fold, (None, 0))
    return jax.vmap(fold)(rows.key, 4 * positions + stream)


def filtered(logits: jax.Array, rows: RowSampling) -> jax.Array:
    """Logits [B, ..., V] scaled by each row's temperature, with what its top-k / top-p leaves out at -inf:
    softmax of this is the distribution a sampled row draws from (greedy rows' values are unused)."""
    shape = logits.shape
    flat = scale(logits, rows).reshape(-1, shape[-1])
    repeat = flat.shape[0] // shape[0]
    top_k, top_p = jnp.repeat(rows.top_k, repeat), jnp.repeat(rows.top_p, repeat)
    needs = jnp.any(rows.top_k > 0) | jnp.any(rows.top_p < 1)
    return jax.lax.cond(needs, filter_logits, lambda x, *_: x, flat, top_k, top_p).reshape(shape)


def _gumbel_argmax(logits: jax.Array, keys: jax.Array) -> jax.Array:
    """A draw from softmax(logits) [B, V] per row key [B, 2] (Gumbel-max)."""
    return argmax(logits + jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[-1:]))(keys))


def draw(logits: jax.Array, rows: RowSampling, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A draft token [B] from logits [B, V] and its distribution q [B, V] (zeros for greedy rows, which take
    the argmax; an all-greedy batch computes no distribution)."""
    def sampled(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
        scaled = filtered(logits, rows)
        token = jnp.where(rows.temperature > 0, _gumbel_argmax(scaled, keys), argmax(logits))
        return token, jax.nn.softmax(scaled, axis=-1)

    greedy = lambda logits: (argmax(logits), jnp.zeros_like(logits))  # noqa: E731
    return jax.lax.cond(jnp.any(rows.temperature > 0), sampled, greedy, logits)


def verify(logits: jax.Array, drafts: jax.Array, q: jax.Array, proposed: jax.Array, rows: RowSampling,
           positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Accepted draft count a [B] and the token [B] decided after them.

    logits [B, γ+1, V]: the large model's at the block (index i predicts the token after block token i);
    drafts [B, γ] and their distributions q [B, γ, V]; proposed [B, γ] (a prefix per row); positions [B]:
    the pending token's, so draft i (0-based) goes at positions + i + 1.
    """
    B, gamma = drafts.shape
    row = jnp.arange(B)
    target = argmax(logits)  # [B, γ+1]

    def greedy(_: Any) -> tuple[jax.Array, jax.Array]:
        a = jnp.sum(jnp.cumprod(proposed & (drafts == target[:, :gamma]), axis=1), axis=1)
        return a, target[row, a]

    def sampled(_: Any) -> tuple[jax.Array, jax.Array]:
        p = jax.nn.softmax(filtered(logits, rows), axis=-1)  # [B, γ+1, V]
        p_d = jnp.take_along_axis(p[:, :gamma], drafts[..., None], -1)[..., 0]
        q_d = jnp.take_along_axis(q, drafts[..., None], -1)[..., 0]
        draft_pos = positions[:, None] + 1 + jnp.arange(gamma)
        u = jax.vmap(jax.vmap(jax.random.uniform))(_keys(rows, ACCEPT, draft_pos))
        ok = jnp.where(rows.temperature[:, None] > 0, u * q_d < p_d, drafts == target[:, :gamma])
        a = jnp.sum(jnp.cumprod(proposed & ok, axis=1), axis=1)
        rejected = a < jnp.sum(proposed, axis=1)  # draft a was proposed and turned down
        p_a = p[row, a]
        residual = jnp.maximum(p_a - jnp.where(rejected[:, None], q[row, jnp.minimum(a, gamma - 1)], 0.0), 0.0)
        residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p_a)
        token = _gumbel_argmax(jnp.log(residual), _keys(rows, FINAL, positions + a + 1))
        return a, jnp.where(rows.temperature > 0, token, target[row, a])

    return jax.lax.cond(jnp.any(rows.temperature > 0), sampled, greedy, None)


# ---------------------------------------------------------------------------------------------------------------
# The block step and prefill, jitted once per (target config, drafter)
# ---------------------------------------------------------------------------------------------------------------


class SpecState(NamedTuple):
    """The large model's decode state (hire.engine's: cache, pending token and its position, sampling,
    adapter), the drafter's state, and which slots hold a request (the loop sets it before each block; rows
    not active propose nothing, so free slots never lengthen a block; None: all are)."""

    target: DecodeState
    draft: Any
    active: jax.Array | None = None  # [B] bool


class BlockOutput(NamedTuple):
    tokens: jax.Array  # [B, γ+1] the accepted drafts, then the decided token; valid up to `count`
    logprobs: jax.Array  # [B, γ+1] under the large model's unmodified distribution
    count: jax.Array  # [B] tokens emitted: accepted drafts + 1
    proposed: jax.Array  # [B] drafts proposed
    inputs: jax.Array  # [B, γ, F + 2] router_inputs of each drafting step run, with a router or log_inputs
    verified: jax.Array  # [] tokens the large model ran over (the verification length chosen)


def verify_lengths(gamma: int) -> tuple[int, ...]:
    """The block lengths verification is compiled for: 1, 2, 4, ... below γ + 1, and γ + 1."""
    return tuple(sorted({min(2 ** j, gamma + 1) for j in range((gamma + 1).bit_length() + 1)}))


def _prefill(cfg: ModelConfig, drafter: Drafter, tvars: dict, dvars: Any, state: SpecState, slot: jax.Array,
             tokens: jax.Array, length: jax.Array, sampling: RowSampling, adapter: jax.Array
             ) -> tuple[SpecState, jax.Array, jax.Array]:
    """Row `slot` takes a prompt (tokens [1, S], padded to a bucket): both models prefill it and the large
    model samples the first token, as hire.engine's prefill does."""
    target, token, logprob, hidden = prefill_target(cfg, drafter.wants_hidden, tvars, state.target, slot, tokens,
                                                    length, sampling, adapter)
    draft = drafter.prefill(dvars, state.draft, slot, tokens, length, hidden)
    return SpecState(target, draft, state.active), token[0], logprob[0]


def prefill_target(cfg: ModelConfig, wants_hidden: tuple[int, ...], tvars: dict, t: DecodeState, slot: jax.Array,
                   tokens: jax.Array, length: jax.Array, sampling: RowSampling, adapter: jax.Array
                   ) -> tuple[DecodeState, jax.Array, jax.Array, jax.Array | None]:
    """The large model's half of `_prefill`: its state with row `slot` on the prompt, the first token and its
    logprob ([1] each), and the hidden states `wants_hidden` names at the prompt's tokens (for the drafter)."""
    positions = jnp.arange(tokens.shape[1])[None]
    logits, row_cache, hidden = run_model(cfg, tvars, tokens, positions, take_row(t.cache, slot), adapter,
                                          length - 1, tokens.shape[1], wants_hidden)
    token, logprob = sample(logits, sampling, length - 1)
    put = lambda whole, row: whole.at[slot].set(row[0])  # noqa: E731
    target = DecodeState(put_row(t.cache, row_cache, slot), put(t.tokens, token), put(t.positions, length),
                         jax.tree.map(put, t.sampling, sampling), put(t.adapter, adapter))
    return target, token, logprob, hidden


def draft_block(drafter: Drafter, router: BlockRouter | None, log: bool, gamma: int, kv_len: int, dvars: Any,
                rparams: Any, dstate: Any, tokens: jax.Array, positions: jax.Array, rows: RowSampling,
                active: jax.Array) -> tuple[Any, jax.Array, jax.Array, jax.Array, jax.Array]:
    """The drafter's half of a block: up to γ drafting steps for every row, fed first its pending token [B] at
    positions [B], stopping once no active row proposes. Returns the drafter's state, drafts [B, γ], their
    distributions q [B, γ, V], proposed [B, γ] (a prefix per row) and router inputs [B, γ, F+2] (computed only
    for a router or when `log` asks for them; zeros otherwise)."""

    def step(carry):
        i, dstate, token, position, live, drafts, q, proposed, inputs = carry
        dstate, proposal = drafter.step(dvars, dstate, token, position, kv_len)
        nxt, qi = draw(proposal.logits, rows, _keys(rows, DRAFT, position + 1))
        live = live & proposal.proposed
        put = lambda buffer, value: buffer.at[:, i].set(value)  # noqa: E731
        if router is not None or log:
            x = router_inputs(proposal)
            inputs = put(inputs, x)
            if router is not None:
                live = live & (router.accept(rparams, x) >= router.threshold)
        return i + 1, dstate, nxt, position + 1, live, put(drafts, nxt), put(q, qi), put(proposed, live), inputs

    logits, inputs = jax.eval_shape(lambda: (lambda p: (p.logits, router_inputs(p)))(
        drafter.step(dvars, dstate, tokens, positions, kv_len)[1]))
    B, V, F = *logits.shape, inputs.shape[1]
    start = (0, dstate, tokens, positions, active, jnp.zeros((B, gamma), jnp.int32),
             jnp.zeros((B, gamma, V), jnp.float32), jnp.zeros((B, gamma), bool), jnp.zeros((B, gamma, F), jnp.float32))
    _, dstate, _, _, _, drafts, q, proposed, inputs = jax.lax.while_loop(
        lambda c: (c[0] < gamma) & jnp.any(c[4]), step, start)
    return dstate, drafts, q, proposed, inputs


def _block(cfg: ModelConfig, drafter: Drafter, router: BlockRouter | None, log: bool, gamma: int, trim: bool,
           kv_len: int, tvars: dict, dvars: Any, rparams: Any, state: SpecState) -> tuple[SpecState, BlockOutput]:
    """Draft up to γ tokens, verify them in one large-model pass (`trim`: the shortest of verify_lengths(γ) that
    covers the proposals, else γ + 1), accept, roll back: one block, every row (`draft_block`, then `verify_block`,
    then the drafter's update).

    γ = 0 is a plain block: one large-model step for every row, deciding a token as a block does after no accepted
    draft (so greedy rows decode exactly as in a block). The drafter still steps once over each row's pending token
    and is updated with the verdict, so it drafts from the right context when blocks resume."""
    t = state.target
    active = jnp.ones(t.tokens.shape, bool) if state.active is None else state.active
    dstate, drafts, q, proposed, inputs = draft_block(drafter, router, log, max(gamma, 1), kv_len, dvars, rparams,
                                                      state.draft, t.tokens, t.positions, t.sampling, active)
    if gamma == 0:
        proposed, lengths = jnp.zeros_like(proposed), (1,)
    else:
        lengths = verify_lengths(gamma) if trim else (gamma + 1,)
    target, v = verify_block(cfg, drafter.wants_hidden, lengths, kv_len, False, tvars, t, drafts, q, proposed)
    dstate = drafter.update(dvars, dstate, *block_inputs(t, drafts), v.accepted, v.hidden)
    output = BlockOutput(v.tokens, v.logprobs, v.accepted + 1, jnp.sum(proposed, axis=1), inputs, v.verified)
    return SpecState(target, dstate, state.active), output


class Verdict(NamedTuple):
    """The large model's half of a block, for every row."""

    tokens: jax.Array  # [B, γ+1] the accepted drafts, then the decided token; valid up to accepted + 1
    logprobs: jax.Array  # [B, γ+1] under the large model's unmodified distribution
    accepted: jax.Array  # [B] drafts kept
    hidden: jax.Array | None  # [B, γ+1, len(wants_hidden), dim] the large model's states at the block tokens
    verified: jax.Array  # [] tokens the large model ran over


def block_inputs(t: DecodeState, drafts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The tokens [B, γ+1] the large model verifies (each row's pending token, then its drafts) and their
    positions [B, γ+1]."""
    return (jnp.concatenate([t.tokens[:, None], drafts], axis=1),
            t.positions[:, None] + jnp.arange(drafts.shape[1] + 1))


def verify_block(cfg: ModelConfig, wants_hidden: tuple[int, ...], lengths: tuple[int, ...], kv_len: int,
                 defer: bool | jax.Array, tvars: dict, t: DecodeState, drafts: jax.Array, q: jax.Array,
                 proposed: jax.Array) -> tuple[DecodeState, Verdict]:
    """The large model's half of a block: run it over each row's pending token and drafts [B, γ] (with their
    distributions q [B, γ, V], proposed [B, γ]), accept, roll back (the state's next pending token and position).

    `lengths` are the pass lengths compiled (see verify_lengths): the shortest that covers the longest proposal
    in the batch runs (a block where no row proposes is a plain decode step). Give only γ + 1 when every row
    always proposes γ: the choice is a lax.switch, and XLA on CPU copies the KV cache it is handed into the branch
    that runs, so it is handed only the first kv_len positions (every live one), written back in place after.

    `defer` (a bool, traced or not; for a pipelined coordinator, which drafts the next block before this one is
    verified): a row that accepted all its k >= 1 proposals emits those k drafts and no bonus token; its last
    draft, at position n + k, becomes its pending token (its cache entry, already written by this pass, is
    rewritten identically when the next block feeds it again), so the next block, drafted from that draft,
    verifies the token after it against the same distribution the bonus token would have been drawn from: still
    exact, one token later."""
    gamma = drafts.shape[1]
    block_tokens, block_pos = block_inputs(t, drafts)

    def run(length: int):
        def verify_length(cache: KVCache) -> tuple[jax.Array, KVCache, jax.Array | None]:
            logits, cache, hidden = run_model(cfg, tvars, block_tokens[:, :length], block_pos[:, :length], cache,
                                              t.adapter, None, kv_len, wants_hidden, stepwise=True)
            pad = lambda a: jnp.pad(a, [(0, 0), (0, gamma + 1 - length)] + [(0, 0)] * (a.ndim - 2))  # noqa: E731
            return pad(logits), cache, None if hidden is None else pad(hidden)
        return verify_length

    needed = jnp.max(jnp.sum(proposed, axis=1)) + 1
    choice = jnp.searchsorted(jnp.array(lengths), needed)
    if len(lengths) == 1:
        logits, cache, hidden = run(lengths[0])(t.cache)
    else:
        window = tuple((k[..., :kv_len], v[:, :, :kv_len]) for k, v in t.cache)
        logits, window, hidden = jax.lax.switch(choice, [run(n) for n in lengths], window)
        put = jax.lax.dynamic_update_slice_in_dim
        cache = tuple((put(k, wk, 0, 3), put(v, wv, 0, 2)) for (k, v), (wk, wv) in zip(t.cache, window))
    accepted, final = verify(logits, drafts, q, proposed, t.sampling, t.positions)
    k = jnp.sum(proposed, axis=1)
    full = defer & (k > 0) & (accepted == k)
    last = jnp.take_along_axis(drafts, jnp.maximum(k - 1, 0)[:, None], axis=1)[:, 0]
    accepted, final = jnp.where(full, k - 1, accepted), jnp.where(full, last, final)

    row = jnp.arange(drafts.shape[0])
    out = jnp.concatenate([drafts, jnp.zeros_like(drafts[:, :1])], axis=1).at[row, accepted].set(final)
    logprobs = jnp.stack([token_logprobs(logits[:, i], out[:, i]) for i in range(gamma + 1)], axis=1)
    target = t._replace(cache=cache, tokens=final, positions=t.positions + accepted + 1)
    return target, Verdict(out, logprobs, accepted, hidden, jnp.array(lengths)[choice])


_prefill_jit = jax.jit(_prefill, static_argnums=(0, 1), donate_argnums=(4,))
_block_jit = jax.jit(_block, static_argnums=(0, 1, 2, 3, 4, 5, 6), donate_argnums=(10,))


class Speculator:
    """A large model (an Engine's weights, slots and context) paired with a drafter, drafting up to γ per
    block; a `router` (hire.router) stops each row's block early where its next draft looks unlikely.
    `log_inputs` fills BlockOutput.inputs (what a router would see) without a router, to train one.

    `trim`: verify over the shortest of verify_lengths(γ) that covers the longest proposal (a lax.switch: one model
    trace per length, and the attended cache window copied in and out of it every block) rather than always γ + 1;
    by default for a router or a drafter that `stops_early`. `hire generate` turns it off: in a fresh process the
    extra traces cost more than the short passes save over 128 tokens (docs/speculative.md)."""

    def __init__(self, engine: Engine, drafter: Drafter, gamma: int = 4, router: BlockRouter | None = None,
                 log_inputs: bool = False, trim: bool | None = None):
        if gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {gamma}")
        self.engine, self.drafter, self.gamma, self.router = engine, drafter, gamma, router
        self.log_inputs = log_inputs
        self.trim = router is not None or getattr(drafter, "stops_early", False) if trim is None else trim

    def init_state(self) -> SpecState:
        return SpecState(self.engine.init_state(), self.drafter.init(self.engine.slots, self.engine.max_len),
                         jnp.ones(self.engine.slots, bool))

    def prefill(self, state: SpecState, slot: int, tokens: list[int], params: SamplingParams,
                adapter: int = -1) -> tuple[SpecState, int, float]:
        """Start `tokens` in `slot`; returns the state and the first token and its logprob."""
        engine = self.engine
        engine.check_request(tokens, adapter)
        bucket = next(b for b in engine.buckets if b >= len(tokens))
        padded = np.zeros((1, bucket), np.int32)
        padded[0, : len(tokens)] = tokens
        state, token, logprob = _prefill_jit(engine.cfg, self.drafter, engine.variables, self.drafter.variables,
                                             state, jnp.int32(slot), jnp.asarray(padded),
                                             jnp.array([len(tokens)], jnp.int32), RowSampling.of([params]),
                                             jnp.array([adapter], jnp.int32))
        return state, int(token), float(logprob)

    def block(self, state: SpecState, reach: int) -> tuple[SpecState, BlockOutput]:
        """One block for every slot; `reach` bounds every active slot's pending position + γ + 1."""
        engine = self.engine
        return _block_jit(engine.cfg, self.drafter, self.router, self.log_inputs, self.gamma, self.trim,
                          self._kv_len(reach), engine.variables, self.drafter.variables,
                          None if self.router is None else self.router.params, state)

    def plain_block(self, state: SpecState, reach: int) -> tuple[SpecState, BlockOutput]:
        """One large-model step for every slot, drafting nothing (`_block` with γ = 0); outputs [B, 2], counts 1."""
        engine = self.engine
        return _block_jit(engine.cfg, self.drafter, None, False, 0, False, self._kv_len(reach), engine.variables,
                          self.drafter.variables, None, state)

    def _kv_len(self, reach: int) -> int:
        return next(b for b in self.engine.buckets if b >= min(reach, self.engine.max_len))


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class SpecStats:
    """Counts over a run: blocks are per row (one row's part of a large-model pass)."""

    requests: int = 0
    blocks: int = 0
    proposed: int = 0
    accepted: int = 0
    tokens: int = 0  # tokens emitted, stop tokens included
    seconds: float = 0.0
    passes: int = 0  # block calls (one large-model pass over every row)
    verified: int = 0  # tokens the large model ran over per row, summed over passes (γ + 1 unless blocks end early)
    plain_steps: int = 0  # passes among them that drafted nothing (SpeculativeBatch's plain_from)

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts / proposed drafts."""
        return self.accepted / max(self.proposed, 1)

    @property
    def mean_accepted(self) -> float:
        """Accepted drafts per block (each block also emits one token of the large model's own)."""
        return self.accepted / max(self.blocks, 1)

    @property
    def calls_per_token(self) -> float:
        """Large-model passes (prefills and blocks) per emitted token, per row: 1.0 without a drafter."""
        return (self.requests + self.blocks) / max(self.tokens, 1)

    def as_dict(self) -> dict[str, float]:
        return {"acceptance_rate": round(self.acceptance_rate, 4), "mean_accepted": round(self.mean_accepted, 4),
                "calls_per_token": round(self.calls_per_token, 4), "tokens": self.tokens, "blocks": self.blocks,
                "tokens_per_s": round(self.tokens / self.seconds, 1) if self.seconds else 0.0}


class SpeculativeBatch(SlotBatch):
    """The hire.batch.Batch over a Speculator's slots (any Drafter; TandemAlone too): each step is one block for
    every live request, its tokens handed out as they were decided; `stats` is updated as blocks finish (seconds
    from the batch's start), and `log`, when given, is called with the slots a block decoded and its output.

    `plain_from`: while at least this many requests are live, a step is a plain one (`Speculator.plain_block`: one
    token per row, the drafter kept up to date), since a pass over several tokens per row costs the batch more than
    its accepted drafts save (docs/speculative.md; None: always draft). `whole`: attention spans the bucket of the
    live requests' last position from the first block (hire.batch.PlainBatch's `whole`: one block program to trace
    and compile instead of one per span reached)."""

    def __init__(self, spec: Speculator, stats: SpecStats | None = None,
                 log: Callable[[list[int], BlockOutput], None] | None = None, plain_from: int | None = None,
                 whole: bool = False):
        if plain_from is not None and plain_from < 1:
            raise ValueError(f"plain_from must be >= 1 or None, got {plain_from}")
        self.spec, self.engine, self.log, self.plain_from, self.whole = spec, spec.engine, log, plain_from, whole
        self.stats = stats if stats is not None else SpecStats()
        self.state = spec.init_state()
        self.live: dict[int, Request] = {}
        self._start = time.perf_counter()

    def admit(self, req: Request, slot: int) -> Event:
        """Prefill `req`'s `context` into the free `slot` (both models); its first event."""
        self.state, token, logprob = self.spec.prefill(self.state, slot, self.context(req), req.params, req.adapter)
        self.stats.requests, self.stats.tokens = self.stats.requests + 1, self.stats.tokens + 1
        event = req.push(token, logprob)
        if event.finish_reason is None:
            self.live[slot] = req
        return event

    def step(self) -> list[Event]:
        """One block: up to γ drafts per live row, verified in one large-model pass; the accepted drafts and the
        decided token of each row, each request's in order."""
        stats, slots = self.stats, list(self.live)
        state = self.state._replace(active=jnp.array([slot in self.live for slot in range(self.engine.slots)]))
        if self.plain_from is not None and len(slots) >= self.plain_from:
            self.state, out = self.spec.plain_block(state, self.reach(1, self.whole))
            stats.plain_steps += 1
        else:
            self.state, out = self.spec.block(state, self.reach(self.spec.gamma, self.whole))
        if self.log:
            self.log(slots, out)
        tokens, logprobs, count, proposed = (np.asarray(a) for a in out[:4])
        stats.passes, stats.verified = stats.passes + 1, stats.verified + int(out.verified)
        stats.blocks += len(slots)
        stats.proposed += int(proposed[slots].sum())
        stats.accepted += int(count[slots].sum()) - len(slots)
        events = self._emit(tokens, logprobs, count)
        stats.tokens += len(events)
        stats.seconds = time.perf_counter() - self._start
        return events


def run(spec: Speculator, requests: Sequence[Request], stats: SpecStats | None = None,
        whole: bool = False) -> Iterator[Event]:
    """Decode every request speculatively through a hire.scheduler.Scheduler of SpeculativeBatches on this thread,
    yielding events as tokens are decided (a block's at once); `stats`, when given, is updated as blocks finish;
    `whole` as SpeculativeBatch's (`hire generate`)."""
    stats = stats if stats is not None else SpecStats()
    return run_scheduler(spec.engine, requests, lambda: SpeculativeBatch(spec, stats, whole=whole))


def speculative_generate(engine: Engine, drafter: Drafter, prompts: Sequence[str | Sequence[int]],
                         params: SamplingParams | Sequence[SamplingParams], gamma: int = 4,
                         adapters: Sequence[int] | None = None, router: BlockRouter | None = None
                         ) -> tuple[list[Completion], SpecStats]:
    """Complete every prompt (text or token ids) with the engine's model, drafting with `drafter` up to `gamma`
    tokens per block (fewer where `router` stops them); the completions (in order, as
    hire.generate.generate returns them) and statistics."""
    requests = make_requests(engine, prompts, params, adapters)
    stats = SpecStats()
    for _ in run(Speculator(engine, drafter, gamma, router), requests, stats):
        pass
    return [r.out for r in requests], stats



# ---------------------------------------------------------------------------------------------------------------
# Drafter quality on a text
# ---------------------------------------------------------------------------------------------------------------


def _teacher_forced(cfg: ModelConfig, drafter: Drafter, gamma: int, tvars: dict, dvars: Any, x: jax.Array,
                    m: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Counts (hits, agreements, predictions) of the drafter over windows x [B, C] whose targets are valid
    where m [B, C]: see drafter_accuracy."""
    B, C = x.shape
    logits, _, hidden = run_model(cfg, tvars, x, jnp.broadcast_to(jnp.arange(C), (B, C)), None,
                                  hidden=drafter.wants_hidden)
    large = argmax(logits)  # [B, C]: the large model's next token after each position

    def prefill(slot, state):
        row = lambda a: jax.lax.dynamic_slice_in_dim(a, slot, 1, 0)[:, :1]  # noqa: E731
        return drafter.prefill(dvars, state, slot, row(x), jnp.ones(1, jnp.int32),
                               None if hidden is None else row(hidden))

    state = jax.lax.fori_loop(0, B, prefill, drafter.init(B, C))
    window = lambda a, n, k: jax.lax.dynamic_slice_in_dim(a, n, k, 1)  # noqa: E731

    def block(state, n):
        def step(state, i):
            position = jnp.full((B,), n + i)
            state, proposal = drafter.step(dvars, state, window(x, n + i, 1)[:, 0], position, C)
            guess = jnp.where(proposal.proposed, argmax(proposal.logits), -1)
            return state, (guess, n + i)

        state, (guess, at) = jax.lax.scan(step, state, jnp.arange(gamma))
        guess, at = guess.T, at[None]  # [B, γ]: the guesses for positions n+1 .. n+γ, made at n .. n+γ-1
        valid = window(m, n, gamma)
        counts = jnp.stack([jnp.sum((guess == window(x, n + 1, gamma)) & valid),
                            jnp.sum((guess == window(large, n, gamma)) & valid), jnp.sum(valid)])
        positions = jnp.broadcast_to(n + jnp.arange(gamma + 1), (B, gamma + 1))
        state = drafter.update(dvars, state, window(x, n, gamma + 1), positions, jnp.full((B,), gamma),
                               None if hidden is None else window(hidden, n, gamma + 1))
        return state, counts

    starts = 1 + (gamma + 1) * jnp.arange((C - 1) // (gamma + 1))
    _, counts = jax.lax.scan(block, state, starts)
    return tuple(counts.sum(0))


_teacher_forced_jit = jax.jit(_teacher_forced, static_argnums=(0, 1, 2))


def drafter_accuracy(target: LoadedModel, drafter: Drafter, tokens: np.ndarray, context: int, gamma: int = 4,
                     batch_size: int = 8) -> dict[str, Any]:
    """How well `drafter` guesses a text, run as speculative decoding runs it but fed the true tokens.

    The text is cut into windows of `context` (hire.recall.windows); in each, the drafter prefills the first
    token, then goes block by block: fed the true tokens at positions n .. n+γ-1 it guesses n+1 .. n+γ (its
    argmax; nothing where it proposes nothing), then is told all γ were accepted, with the large model's
    hidden states at n .. n+γ; the next block starts at n+γ+1 (the large model's own token). Returns
    `draft_next_token_accuracy` (guesses equal to the text) and `draft_agreement` (guesses equal to the large
    model's argmax: the rate greedy verification accepts a draft at a position, given the right context),
    over `draft_predictions` guesses.
    """
    from hire.recall import windows

    inputs, _, mask = windows(np.asarray(tokens, np.int32), context)
    fill = -len(inputs) % batch_size
    inputs, mask = (np.concatenate([a, np.zeros((fill, context), a.dtype)]) for a in (inputs, mask))
    totals = np.zeros(3, np.int64)
    for i in range(0, len(inputs), batch_size):
        counts = _teacher_forced_jit(target.cfg, drafter, gamma, target.variables, drafter.variables,
                                     jnp.asarray(inputs[i:i + batch_size]), jnp.asarray(mask[i:i + batch_size]))
        totals += np.array([int(c) for c in counts])
    hits, agree, count = totals
    return {"draft": drafter.name, "draft_gamma": gamma, "draft_predictions": int(count),
            "draft_next_token_accuracy": hits / max(count, 1), "draft_agreement": agree / max(count, 1)}
