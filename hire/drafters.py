"""Drafters for hire.speculative: a standalone small model and the model-free n-gram (prompt-lookup) drafter.

Both implement hire.speculative.Drafter; `load_drafter` picks one by name.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from hire.checkpoint import load_model
from hire.loaded import LoadedModel
from hire.model import KVCache, init_cache
from hire.speculative import Proposal, put_row, run_model, take_row


class ModelDraftState(NamedTuple):
    cache: KVCache  # the small model's, [B, ...] rows over max_len positions
    prev_token: jax.Array  # [B] the last committed token before the one `step` is fed next
    prev_pos: jax.Array  # [B] its position


class ModelDrafter:
    """A standalone small model with the large model's tokenizer (e.g. `stdlib-9m-draft` for `default`).

    Each step runs the small model over two tokens: the one it is fed and the committed token before it.
    That rewrites a cache entry that is usually there already, and fills it when the whole previous block
    was accepted (the last draft was never fed to the small model), so blocks need no extra pass.
    Its router features are its last hidden state (before the final norm).
    """

    wants_hidden: tuple[int, ...] = ()

    def __init__(self, model: LoadedModel):
        self.cfg, self.variables, self.name = model.cfg, model.variables, model.cfg.name

    def init(self, batch: int, max_len: int) -> ModelDraftState:
        return ModelDraftState(init_cache(self.cfg, batch, max_len), jnp.zeros(batch, jnp.int32),
                               jnp.zeros(batch, jnp.int32))

    def prefill(self, variables, state: ModelDraftState, slot, tokens, length, hidden) -> ModelDraftState:
        positions = jnp.arange(tokens.shape[1])[None]
        _, cache, _ = run_model(self.cfg, variables, tokens, positions, take_row(state.cache, slot), None,
                                length - 1, tokens.shape[1])
        last = jnp.take_along_axis(tokens, length[:, None] - 1, axis=1)[0, 0]
        return ModelDraftState(put_row(state.cache, cache, slot), state.prev_token.at[slot].set(last),
                               state.prev_pos.at[slot].set(length[0] - 1))

    def step(self, variables, state: ModelDraftState, token, position, kv_len: int
             ) -> tuple[ModelDraftState, Proposal]:
        tokens = jnp.stack([state.prev_token, token], axis=1)
        positions = jnp.stack([state.prev_pos, position], axis=1)
        logits, cache, hidden = run_model(self.cfg, variables, tokens, positions, state.cache, None,
                                          jnp.ones_like(token), kv_len, (self.cfg.n_layers,))
        proposal = Proposal(logits, jnp.ones(token.shape, bool), hidden[:, 1, 0].astype(jnp.float32))
        return ModelDraftState(cache, token, position), proposal

    def update(self, variables, state: ModelDraftState, tokens, positions, accepted, hidden) -> ModelDraftState:
        at = lambda x: jnp.take_along_axis(x, accepted[:, None], axis=1)[:, 0]  # noqa: E731
        return state._replace(prev_token=at(tokens), prev_pos=at(positions))


class NGramState(NamedTuple):
    history: jax.Array  # [B, max_len] the token at each position (valid up to the one last fed)


class NGramDrafter:
    """Prompt lookup: find the latest earlier occurrence of the longest suffix (up to `n` tokens, at least
    `min_n`) of the prompt + output so far, and propose the token that followed it. Deterministic: its
    distribution is one-hot. Where no suffix of `min_n` tokens recurs it proposes nothing, and the block
    stops there. Router features: the matched length / n.

    The history is indexed by position and written as tokens are fed and blocks verified, so rejected
    drafts need no undoing: a search only reads positions up to the one just written.
    """

    wants_hidden: tuple[int, ...] = ()
    stops_early = True

    def __init__(self, vocab_size: int, n: int = 3, min_n: int = 1):
        if not 1 <= min_n <= n:
            raise ValueError(f"need 1 <= min_n <= n, got min_n {min_n}, n {n}")
        self.vocab_size, self.n, self.min_n = vocab_size, n, min_n
        self.variables: dict = {}
        self.name = f"ngram-{n}"

    def init(self, batch: int, max_len: int) -> NGramState:
        return NGramState(jnp.zeros((batch, max_len), jnp.int32))

    def prefill(self, variables, state: NGramState, slot, tokens, length, hidden) -> NGramState:
        return NGramState(jax.lax.dynamic_update_slice(state.history, tokens.astype(jnp.int32), (slot, 0)))

    def step(self, variables, state: NGramState, token, position, kv_len: int) -> tuple[NGramState, Proposal]:
        B = token.shape[0]
        history = state.history.at[jnp.arange(B), position].set(token, mode="drop")
        h = history[:, :kv_len]
        ends = jnp.arange(kv_len)
        run = jnp.ones((B, kv_len), bool)
        matched = jnp.zeros((B, kv_len), jnp.int32)
        for k in range(self.n):  # matched[e]: how many tokens before and at e equal those before and at position
            want = jnp.take_along_axis(h, jnp.maximum(position - k, 0)[:, None], axis=1)
            run &= (jnp.roll(h, k, axis=1) == want) & (ends >= k) & (position[:, None] >= k)
            matched += run
        candidate = (ends < position[:, None]) & (matched >= self.min_n)
        score = jnp.where(candidate, matched * kv_len + ends, -1)
        best = jnp.argmax(score, axis=1)
        found = jnp.max(score, axis=1) >= 0
        nxt = jnp.take_along_axis(h, jnp.minimum(best + 1, kv_len - 1)[:, None], axis=1)[:, 0]
        nxt = jnp.where(found, nxt, token)  # some token, so that the logits stay finite
        logits = jnp.where(jnp.arange(self.vocab_size) == nxt[:, None], 0.0, -jnp.inf)
        length = jnp.take_along_axis(matched, best[:, None], axis=1).astype(jnp.float32) * found[:, None]
        return NGramState(history), Proposal(logits, found, length / self.n)

    def update(self, variables, state: NGramState, tokens, positions, accepted, hidden) -> NGramState:
        """Write the verified block (its last draft was never fed when all were accepted); what lies past the
        accepted drafts is overwritten before any search reads it."""
        rows = jnp.arange(tokens.shape[0])[:, None]
        return NGramState(state.history.at[rows, positions].set(tokens, mode="drop"))


def load_drafter(name: str, target: LoadedModel, dtype: str | None = None):
    """The drafter called `name` for the large model `target`: "ngram" or "ngram-N" (prompt lookup of up to N
    tokens), else a model loaded with hire.checkpoint whose vocabulary must be the target's."""
    if name == "ngram" or name.startswith("ngram-") and name[6:].isdigit():
        return NGramDrafter(target.cfg.vocab_size, int(name[6:]) if name != "ngram" else 3)
    model = load_model(name, dtype)
    if model.cfg.vocab_size != target.cfg.vocab_size:
        raise ValueError(f"drafter {name!r} has a vocabulary of {model.cfg.vocab_size} tokens, the large model "
                         f"{target.cfg.vocab_size}: they must share the tokenizer")
    return ModelDrafter(model)
