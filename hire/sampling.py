"""Token sampling: greedy, temperature, top-k, top-p, per-row seeds, logprobs."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks for. temperature 0 is greedy; top_k 0 and top_p 1 are off.

    A request without a seed gets a random one, kept in `seed` so the sample can be replayed.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_tokens: int = 64
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    logprobs: bool = False
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0, f"temperature: must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k: must be >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p: must be in (0, 1], got {self.top_p}"),
            (self.max_tokens > 0, f"max_tokens: must be > 0, got {self.max_tokens}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.seed is None:
            object.__setattr__(self, "seed", int.from_bytes(os.urandom(4), "little"))
        object.__setattr__(self, "stop_ids", tuple(self.stop_ids))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))


class RowSampling(NamedTuple):
    """Per-row sampling arrays carried through jitted decoding."""

    key: jax.Array  # [B, 2] uint32
    temperature: jax.Array  # [B] f32
    top_k: jax.Array  # [B] i32
    top_p: jax.Array  # [B] f32

    @classmethod
    def of(cls, params: list[SamplingParams]) -> "RowSampling":
        return cls(jnp.stack([jax.random.PRNGKey(p.seed % 2**32) for p in params]),
                   jnp.array([p.temperature for p in params], jnp.float32),
                   jnp.array([p.top_k for p in params], jnp.int32),
                   jnp.array([p.top_p for p in params], jnp.float32))


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Set to -inf what each row's top-k [B] (0 = all) and top-p [B] (1 = all) leave out."""
    ordered = -jnp.sort(-logits, axis=-1)
    vocab = logits.shape[-1]
    kth = jnp.take_along_axis(ordered, (jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab) - 1)[:, None], -1)
    ordered = jnp.where(ordered >= kth, ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    keep = before < top_p[:, None]
    cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= jnp.maximum(cutoff, kth), logits, -jnp.inf)


def argmax(x: jax.Array) -> jax.Array:
    """First index of the maximum along the last axis, as two plain reductions (XLA's CPU
    argmax, a variadic reduce, is several times slower)."""
    top = jnp.max(x, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == top, iota, x.shape[-1]), axis=-1)


def scale(logits: jax.Array, rows: RowSampling) -> jax.Array:
    """Logits [B, ..., V] divided by each row's temperature."""
    return logits / jnp.maximum(rows.temperature, 1e-6).reshape((-1,) + (1,) * (logits.ndim - 1))


def gumbel_noise(rows: RowSampling, positions: jax.Array, vocab: int) -> jax.Array:
    """Gumbel noise [B, vocab]: row b's from fold_in(key_b, position_b) alone."""
    keys = jax.vmap(jax.random.fold_in)(rows.key, positions)
    return jax.vmap(lambda k: jax.random.gumbel(k, (vocab,)))(keys)


def _draw(logits: jax.Array, rows: RowSampling, positions: jax.Array) -> jax.Array:
    scaled = scale(logits, rows)
    needs_filter = jnp.any(rows.top_k > 0) | jnp.any(rows.top_p < 1)
    scaled = jax.lax.cond(needs_filter, filter_logits, lambda x, *_: x, scaled, rows.top_k, rows.top_p)
    noise = gumbel_noise(rows, positions, logits.shape[-1])
    drawn = argmax(scaled + noise)  # Gumbel-max: a draw from softmax(scaled)
    return jnp.where(rows.temperature > 0, drawn, argmax(logits))


def sample(logits: jax.Array, rows: RowSampling, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Next token [B] and its log-probability under the unmodified model distribution.

    Row b's randomness is fold_in(key_b, position_b): a request's samples depend on its own
    seed and positions only, never on which slot or batch it shares. An all-greedy batch
    skips the random draw.
    """
    logits = logits.astype(jnp.float32)
    tokens = jax.lax.cond(jnp.any(rows.temperature > 0), _draw, lambda x, *_: argmax(x), logits, rows, positions)
    return tokens, token_logprobs(logits, tokens)


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log softmax(logits [B, V]) at tokens [B]. (Over [B, T, V] at once XLA:CPU may sum another way: a block's
    tokens each go through this to get a one-token step's logprobs bit for bit.)"""
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], -1)[:, 0]
