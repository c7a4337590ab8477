"""Tandem transformers (Nair et al., 2024): a small decoder that attends to a large model's representations.

The large model runs in block mode over γ tokens at a time; the small model generates autoregressively.
In every small layer, the keys and values at positions of EARLIER blocks come from the large model's
residual stream (the hidden states named in `TandemConfig.large_layers`, concatenated, RMS-normed and
projected to the small model's width, then through that layer's own k/v projections), and those at
positions of the CURRENT block from the small model's own stream. Queries always come from the small
model. A query at position t of the block starting at s sees large-model keys at positions < s and its
own keys at positions s..t.

One KV cache indexed by absolute position holds both kinds, in hire.model's layout (k [B, Kv, D, S],
v [B, Kv, S, D]): `step` writes the small model's own keys at the positions it runs, `absorb` overwrites
positions with keys from the large model's hidden states once the large model has run over them. Nothing
needs undoing after a rejected draft: absorbing the verified tokens overwrites their positions, and the
stale keys beyond them are invisible to every query before them and are overwritten as decoding reaches
them. `forward` (training) computes the block pattern for a whole sequence at once and equals the
step-by-step run with block refreshes.

Around the model: `TandemDrafter` plugs it into hire.speculative (tandem + verification, SPEED: the large
model verifies its drafts), `TandemAlone` runs it without verification (the large model only refreshes the
representations), `tandem_scorer` scores it teacher-forced with hire.evaluate, and `save_tandem` /
`load_tandem` keep it in a folder whose config.json says "format": "hire-tandem". The
training recipe is hire.train_tandem.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from hire.checkpoint import detect_format, load_model, resolve_model
from hire.config import ModelConfig, OptionError
from hire.formats import CheckpointError, _check, build_config, flatten, read_json, read_tensors, unflatten, with_dtype
from hire.loaded import LoadedModel
from hire.model import FFN, KVCache, Linear, RMSNorm, apply_rope, init_cache, rope_frequencies
from hire.sampling import sample
from hire.speculative import (
    BlockOutput,
    Proposal,
    SpecState,
    Speculator,
    put_row,
    router_inputs,
    run_model,
    take_row,
)
from hire.tokenizer import Tokenizer, load_tokenizer

FORMAT = "hire-tandem"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class TandemConfig:
    """How the small model reads the large one.

    `large_layers[i]` lists the large model's hidden states ("hidden_j": 0 the embeddings, n the last
    block's output) that small layer i reads, concatenated; `block` is the γ the model was trained with;
    `large` names the large model (a name under models/ or a path).
    """

    large_dim: int
    large_layers: tuple[tuple[int, ...], ...]
    block: int = 4
    large: str = "stdlib-9m"

    def __post_init__(self) -> None:
        object.__setattr__(self, "large_layers", tuple(tuple(int(j) for j in ls) for ls in self.large_layers))
        if self.block < 1:
            raise ValueError(f"block must be positive, got {self.block}")
        if self.large_dim < 1:
            raise ValueError(f"large_dim must be positive, got {self.large_dim}")
        if not self.large_layers or not all(self.large_layers) or min(min(ls) for ls in self.large_layers) < 0:
            raise ValueError(f"large_layers must give each small layer at least one hidden index >= 0, "
                             f"got {self.large_layers}")

    @property
    def used(self) -> tuple[int, ...]:
        """The large hidden indices read by any layer, in the order `large_hidden` stacks them."""
        return tuple(sorted({j for ls in self.large_layers for j in ls}))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def depth_matched_layers(n_small: int, n_large: int) -> tuple[tuple[int, ...], ...]:
    """Small layer i reads the large hidden state at the same relative depth: hidden_ceil((i+1) n_large / n_small)."""
    return tuple((math.ceil((i + 1) * n_large / n_small),) for i in range(n_small))


def large_hidden(intermediates: dict, tandem: TandemConfig) -> jax.Array:
    """The hidden states the small model reads, [B, T, len(tandem.used), large_dim], from a large
    Transformer's intermediates (its `mutable=["intermediates"]` output, or that dict's "intermediates")."""
    inter = intermediates.get("intermediates", intermediates)
    return jnp.stack([inter[f"hidden_{j}"][0] for j in tandem.used], axis=2)


def block_mask(length: int, block: int) -> jax.Array:
    """Training visibility [T, 2T] over [large keys, own keys] for blocks of `block` tokens: a query at t
    sees large-model keys before its block's start and its own keys from that start up to t."""
    t = jnp.arange(length)
    start = t // block * block
    large = t[None, :] < start[:, None]
    own = (t[None, :] >= start[:, None]) & (t[None, :] <= t[:, None])
    return jnp.concatenate([large, own], axis=1)


def _attend(q: jax.Array, keys: jax.Array, values: jax.Array, visible: jax.Array) -> jax.Array:
    """Grouped-query attention: q [B, T, H, D] over keys [B, K, D, S], values [B, K, S, D] where visible
    [B, T, S]; returns [B, T, H * D]."""
    B, T, H, D = q.shape
    K = keys.shape[1]
    qg = q.reshape(B, T, K, H // K, D).transpose(0, 2, 3, 1, 4).reshape(B, K, -1, D)
    scores = jnp.einsum("bkqd,bkds->bkqs", qg, keys, preferred_element_type=jnp.float32) / math.sqrt(D)
    scores = jnp.where(visible[:, None, None], scores.reshape(B, K, H // K, T, -1), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype).reshape(B, K, H // K * T, -1)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, values).reshape(B, K, H // K, T, D)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H * D)


def _write(cache: tuple[jax.Array, jax.Array], positions: jax.Array, k: jax.Array, v: jax.Array):
    """Scatter k, v [B, T, K, D] into one layer's cache at positions [B, T] (out-of-range ones dropped)."""
    rows = jnp.arange(k.shape[0])[:, None]
    return cache[0].at[rows, :, :, positions].set(k, mode="drop"), cache[1].at[rows, :, positions].set(v, mode="drop")


class TandemAttention(nn.Module):
    """The q/k/v/o projections of one small layer (the same names as hire.model.Attention's)."""

    cfg: ModelConfig

    def setup(self) -> None:
        cfg = self.cfg
        H, K, D, bias = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.attention_bias
        self.q = Linear(H * D, cfg, bias)
        self.k = Linear(K * D, cfg, bias)
        self.v = Linear(K * D, cfg, bias)
        self.o = Linear(cfg.dim, cfg, False)

    def keys_values(self, x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Rotated keys and values [B, T, K, D] of inputs x [B, T, dim] at positions [B, T]."""
        B, T, _ = x.shape
        shape = (B, T, self.cfg.n_kv_heads, self.cfg.head_dim)
        return apply_rope(self.k(x, None).reshape(shape), positions, inv_freq), self.v(x, None).reshape(shape)

    def __call__(self, x, positions, inv_freq, keys, values, visible) -> jax.Array:
        """o(attention of x's queries over keys [B, K, D, S] and values [B, K, S, D] where visible [B, T, S])."""
        B, T, _ = x.shape
        q = apply_rope(self.q(x, None).reshape(B, T, self.cfg.n_heads, self.cfg.head_dim), positions, inv_freq)
        return self.o(_attend(q, keys, values, visible), None)


class TandemBlock(nn.Module):
    """A pre-norm decoder layer, plus the projection of the large model's states into its key/value input."""

    cfg: ModelConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.attn_norm = RMSNorm(cfg.norm_eps, cfg.dtype)
        self.attn = TandemAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.norm_eps, cfg.dtype)
        self.ffn = FFN(cfg)
        self.large_norm = RMSNorm(cfg.norm_eps, cfg.dtype)
        self.large_proj = Linear(cfg.dim, cfg, False)

    def large_keys_values(self, hidden, positions, inv_freq) -> tuple[jax.Array, jax.Array]:
        """Keys and values [B, T, K, D] from the large model's concatenated hidden states [B, T, n * large_dim]."""
        return self.attn.keys_values(self.large_proj(self.large_norm(hidden), None), positions, inv_freq)

    def _finish(self, x, attended) -> jax.Array:
        x = x + attended
        return x + self.ffn(self.ffn_norm(x), None)

    def forward(self, x, hidden, positions, inv_freq, block: int) -> jax.Array:
        """Training: every position at once, with the block pattern (no cache)."""
        y = self.attn_norm(x)
        own_k, own_v = self.attn.keys_values(y, positions, inv_freq)
        big_k, big_v = self.large_keys_values(hidden, positions, inv_freq)
        keys = jnp.concatenate([big_k, own_k], axis=1).transpose(0, 2, 3, 1)
        values = jnp.concatenate([big_v, own_v], axis=1).transpose(0, 2, 1, 3)
        visible = jnp.broadcast_to(block_mask(x.shape[1], block), (x.shape[0], x.shape[1], 2 * x.shape[1]))
        return self._finish(x, self.attn(y, positions, inv_freq, keys, values, visible))

    def step(self, x, positions, cache, inv_freq, kv_len: int | None):
        """Inference: write x's own keys at positions, attend over the cache's first kv_len entries."""
        y = self.attn_norm(x)
        keys, values = _write(cache, positions, *self.attn.keys_values(y, positions, inv_freq))
        span = min(kv_len or keys.shape[3], keys.shape[3])
        key_pos = jnp.arange(span)
        visible = key_pos[None, None, :] <= positions[:, :, None]
        out = self.attn(y, positions, inv_freq, keys[..., :span], values[:, :, :span], visible)
        return self._finish(x, out), (keys, values)

    def absorb(self, hidden, positions, cache, inv_freq):
        """Write keys and values from the large model's hidden states at positions into the cache."""
        return _write(cache, positions, *self.large_keys_values(hidden, positions, inv_freq))


class TandemTransformer(nn.Module):
    """The small model of a tandem. Methods: `forward` (training), `__call__` (a decode step, like
    hire.model.Transformer: tokens, positions, cache -> logits, cache) and `absorb` (large states into
    the cache). `hidden` is always `large_hidden(...)`: [B, T, len(tandem.used), large_dim]."""

    cfg: ModelConfig
    tandem: TandemConfig

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.sliding_window or cfg.norm_offset or cfg.qk_norm or cfg.post_norms or cfg.embed_scale or cfg.query_scale:
            raise ValueError("the tandem's small model is a plain Llama-style decoder: sliding_window, norm_offset, "
                             "qk_norm, post_norms, embed_scale and query_scale must keep their defaults")
        if len(self.tandem.large_layers) != cfg.n_layers:
            raise ValueError(f"large_layers names {len(self.tandem.large_layers)} layers' inputs; the small model "
                             f"has {cfg.n_layers}")
        self.embed = self.param("embed", nn.initializers.normal(0.02), (cfg.vocab_size, cfg.dim), jnp.dtype(cfg.dtype))
        self.layers = [TandemBlock(cfg) for _ in range(cfg.n_layers)]
        self.norm = RMSNorm(cfg.norm_eps, cfg.dtype)
        if not cfg.tie_embeddings:
            self.lm_head = self.param("lm_head", nn.initializers.normal(0.02), (cfg.dim, cfg.vocab_size),
                                      jnp.dtype(cfg.dtype))
        self.inv_freq = rope_frequencies(cfg)
        index = {j: n for n, j in enumerate(self.tandem.used)}
        self.reads = [[index[j] for j in ls] for ls in self.tandem.large_layers]

    def _layer_input(self, hidden: jax.Array, i: int) -> jax.Array:
        B, T = hidden.shape[:2]
        return hidden[:, :, jnp.array(self.reads[i])].reshape(B, T, -1).astype(jnp.dtype(self.cfg.dtype))

    def _logits(self, x: jax.Array, logit_index: jax.Array | None) -> jax.Array:
        x = self.norm(x)
        if logit_index is not None:
            x = x[jnp.arange(x.shape[0]), logit_index]
        head = self.embed.T if self.cfg.tie_embeddings else self.lm_head
        return (x @ head).astype(jnp.float32)

    def forward(self, tokens: jax.Array, hidden: jax.Array, block: int | None = None) -> jax.Array:
        """Training logits [B, T, V] of tokens [B, T] (positions 0..T-1) in blocks of `block` (default: the
        trained γ), the large model's states `hidden` at the same positions."""
        block = block or self.tandem.block
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = self.embed[tokens]
        for i, layer in enumerate(self.layers):
            x = layer.forward(x, self._layer_input(hidden, i), positions, self.inv_freq, block)
        return self._logits(x, None)

    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: KVCache, logit_index: jax.Array | None = None,
                 kv_len: int | None = None) -> tuple[jax.Array, KVCache]:
        """A decode step over tokens [B, T] at positions [B, T]: logits [B, T, V] (or [B, V]) and the cache.
        Applied with `mutable=["intermediates"]`, it also returns the last layer's output (before the final
        norm) as "hidden"."""
        x = self.embed[tokens]
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache):
            x, c = layer.step(x, positions, layer_cache, self.inv_freq, kv_len)
            new_cache.append(c)
        self.sow("intermediates", "hidden", x)
        return self._logits(x, logit_index), tuple(new_cache)

    def absorb(self, hidden: jax.Array, positions: jax.Array, cache: KVCache) -> KVCache:
        """The cache with every layer's keys and values at positions [B, T] taken from the large states there."""
        return tuple(layer.absorb(self._layer_input(hidden, i), positions, c, self.inv_freq)
                     for i, (layer, c) in enumerate(zip(self.layers, cache)))


def init_tandem(cfg: ModelConfig, tandem: TandemConfig, seed: int = 0) -> dict:
    """Random variables {"params": ...} for a tandem small model."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    hidden = jnp.zeros((1, 1, len(tandem.used), tandem.large_dim), jnp.dtype(cfg.dtype))
    model = TandemTransformer(cfg, tandem)
    return jax.jit(lambda: model.init(jax.random.PRNGKey(seed), tokens, hidden, method="forward"))()


@dataclass
class TandemModel:
    """A tandem small model ready to run: its shape, how it reads the large model, weights and tokenizer."""

    cfg: ModelConfig
    tandem: TandemConfig
    variables: dict
    tokenizer: Tokenizer


def save_tandem(folder: str | Path, model: TandemModel) -> None:
    """Write a tandem model folder: config.json (the small ModelConfig, "format": "hire-tandem" and the
    "tandem" table), model.safetensors and the tokenizer."""
    folder = Path(folder)
    _check(model.cfg, _expected(model.cfg, model.tandem), flatten(model.variables))
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in flatten(model.variables).items()}
    save_file(tensors, folder / WEIGHTS, metadata={"format": FORMAT})
    (folder / WEIGHTS).chmod(0o644)
    model.tokenizer.save(folder)
    meta = {**model.cfg.to_dict(), "format": FORMAT, "format_version": FORMAT_VERSION,
            "tandem": model.tandem.to_dict()}
    (folder / "config.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_tandem(path: str | Path, dtype: str | None = None) -> TandemModel:
    """Load a tandem small model (a folder save_tandem wrote) by name or path (hire.checkpoint.resolve_model);
    `dtype` overrides the saved one. Its large model is loaded separately."""
    folder = resolve_model(path)
    if detect_format(folder) != "tandem":
        raise CheckpointError(f"{folder} is not a tandem model (no \"format\": \"{FORMAT}\" in its config.json)")
    config = folder / "config.json"
    raw = read_json(config)
    raw.pop("format")
    if (version := raw.pop("format_version", None)) != FORMAT_VERSION:
        raise CheckpointError(f"{config}: format_version {version!r} is not supported (supported: {FORMAT_VERSION})")
    try:
        tandem = TandemConfig(**raw.pop("tandem"))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config}: bad or missing \"tandem\" table: {e}") from None
    cfg = with_dtype(build_config(config, raw), dtype)
    tensors = read_tensors(folder / WEIGHTS)
    want = _expected(cfg, tandem)
    _check(cfg, want, tensors)
    variables = unflatten({k: jnp.asarray(tensors[k], dtype=want[k].dtype) for k in want})
    return TandemModel(cfg, tandem, variables, load_tokenizer(folder))


def _expected(cfg: ModelConfig, tandem: TandemConfig) -> dict[str, jax.ShapeDtypeStruct]:
    return flatten(jax.eval_shape(lambda: init_tandem(cfg, tandem)))


class TandemDrafter:
    """hire.speculative's Drafter for a tandem small model; its state is the small model's KV cache.

    `prefill` and `update` absorb the large model's hidden states of the prompt and of each verified block
    (every block position: those past the accepted ones lie beyond the next position and are overwritten by
    the next step before any query sees them), `step` runs the small model on its own stream. Its router
    features are the small model's last hidden state (before the final norm).
    """

    def __init__(self, model: TandemModel):
        self.model, self.name = model, model.cfg.name
        self.wants_hidden, self.variables = model.tandem.used, model.variables
        self.net = TandemTransformer(model.cfg, model.tandem)

    def init(self, batch: int, max_len: int) -> KVCache:
        return init_cache(self.model.cfg, batch, max_len)

    def prefill(self, variables, state: KVCache, slot, tokens, length, hidden) -> KVCache:
        positions = jnp.arange(tokens.shape[1])[None]
        return put_row(state, self.net.apply(variables, hidden, positions, take_row(state, slot), method="absorb"),
                       slot)

    def step(self, variables, state: KVCache, token, position, kv_len: int) -> tuple[KVCache, Proposal]:
        (logits, state), inter = self.net.apply(variables, token[:, None], position[:, None], state,
                                                jnp.zeros_like(position), kv_len, mutable=["intermediates"])
        features = inter["intermediates"]["hidden"][0][:, 0].astype(jnp.float32)
        return state, Proposal(logits, jnp.ones(token.shape, bool), features)

    def update(self, variables, state: KVCache, tokens, positions, accepted, hidden) -> KVCache:
        del tokens, accepted  # see the class docstring
        return self.net.apply(variables, hidden, positions, state, method="absorb")


def tandem_drafter(name: str, target: LoadedModel, dtype: str | None = None) -> TandemDrafter:
    """The tandem drafter at `name` (a name under models/ or a path) for the large model `target`, which must be
    the shape it was trained beside (its width, depth and vocabulary)."""
    model = load_tandem(name, dtype)
    want, cfg = model.tandem, target.cfg
    if cfg.dim != want.large_dim or cfg.vocab_size != model.cfg.vocab_size or max(want.used) > cfg.n_layers:
        raise ValueError(f"tandem drafter {name!r} reads a large model of width {want.large_dim} with hidden states "
                         f"{want.used} and {model.cfg.vocab_size} tokens; {cfg.name} has width {cfg.dim}, "
                         f"{cfg.n_layers} layers and {cfg.vocab_size} tokens")
    return TandemDrafter(model)


def is_tandem(model: str | Path) -> bool:
    """Whether `model` names a tandem small model; False for anything else, even nothing."""
    try:
        return detect_format(resolve_model(model)) == "tandem"
    except CheckpointError:
        return False


def drafter(name: str, target: LoadedModel, dtype: str | None = None):
    """The drafter called `name` (`--draft`) for the loaded model `target`: tandem_drafter's for a tandem model (e.g.
    stdlib-9m-tandem), else hire.drafters.load_drafter's; one that cannot be had is an OptionError."""
    from hire.drafters import load_drafter

    try:
        return (tandem_drafter if is_tandem(name) else load_drafter)(name, target, dtype)
    except ValueError as e:  # a CheckpointError too
        raise OptionError(str(e), "--draft") from None


def speculator(engine, drafter, gamma: int, tandem_only: bool = False) -> Speculator:
    """hire.speculative.Speculator of `engine` and `drafter` verifying γ + 1 tokens every block (no `trim`: one model
    trace, and no cache window copied per block; hire generate and hire bench decode), or with `tandem_only`
    (`--tandem-only`) a TandemAlone; that takes a TandemDrafter, else an OptionError."""
    if not tandem_only:
        return Speculator(engine, drafter, gamma, trim=False)
    if not isinstance(drafter, TandemDrafter):
        raise OptionError("needs --draft to name a tandem model (e.g. stdlib-9m-tandem)", "--tandem-only")
    return TandemAlone(engine, drafter, gamma)


def _alone_block(cfg: ModelConfig, drafter: TandemDrafter, gamma: int, kv_len: int, tvars: dict, dvars: dict,
                 state: SpecState) -> tuple[SpecState, BlockOutput]:
    """Tandem alone, one block for every row: the small model samples γ tokens from the pending one, then the
    large model runs once over the pending token and the first γ-1 of them (block mode) and the small model
    absorbs its states; the last sample becomes the pending token. Nothing is verified."""
    t = state.target

    def draft_step(carry, _):
        dstate, token, position = carry
        dstate, proposal = drafter.step(dvars, dstate, token, position, kv_len)
        nxt, logprob = sample(proposal.logits, t.sampling, position)
        return (dstate, nxt, position + 1), (nxt, logprob, router_inputs(proposal))

    (dstate, *_), (drafts, logprobs, inputs) = jax.lax.scan(draft_step, (state.draft, t.tokens, t.positions), None,
                                                            length=gamma)
    drafts, logprobs, inputs = drafts.T, logprobs.T, inputs.transpose(1, 0, 2)  # [B, γ], [B, γ], [B, γ, F+2]
    block_tokens = jnp.concatenate([t.tokens[:, None], drafts[:, :-1]], axis=1)
    block_pos = t.positions[:, None] + jnp.arange(gamma)
    _, cache, hidden = run_model(cfg, tvars, block_tokens, block_pos, t.cache, t.adapter,
                                 jnp.zeros_like(t.positions), kv_len, drafter.wants_hidden)
    dstate = drafter.update(dvars, dstate, block_tokens, block_pos, jnp.full_like(t.positions, gamma - 1), hidden)
    target = t._replace(cache=cache, tokens=drafts[:, -1], positions=t.positions + gamma)
    count = jnp.full_like(t.positions, gamma)
    return SpecState(target, dstate), BlockOutput(drafts, logprobs, count, count, inputs, jnp.array(gamma))


_alone_block_jit = jax.jit(_alone_block, static_argnums=(0, 1, 2, 3), donate_argnums=(6,))


class TandemAlone(Speculator):
    """Tandem transformers without verification (`--tandem-only`): the small model generates every token
    after the first (which the large model samples from the prompt), γ per block, and the large model runs
    in block mode only to refresh the representations the small model reads. Its output is the tandem's,
    not the large model's. A hire.speculative.SpeculativeBatch runs it like a Speculator."""

    def block(self, state: SpecState, reach: int) -> tuple[SpecState, BlockOutput]:
        engine = self.engine
        return _alone_block_jit(engine.cfg, self.drafter, self.gamma, self._kv_len(reach), engine.variables,
                                self.drafter.variables, state)


def tandem_scorer(model: TandemModel, dtype: str | None = None) -> tuple[LoadedModel, Callable]:
    """`model` beside its large model for hire.evaluate.evaluate(..., logits_fn=...): a LoadedModel holding both
    models' variables, and the tandem's teacher-forced logits over a window (the training pattern: blocks of
    the trained γ from the window's start, the large model's states of the same window)."""
    large = load_model(model.tandem.large, dtype)
    net = TandemTransformer(model.cfg, model.tandem)

    def logits_fn(variables: dict, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        _, _, hidden = run_model(large.cfg, variables["large"], tokens, positions, None, hidden=model.tandem.used)
        return net.apply(variables["small"], tokens, hidden, method="forward")

    return LoadedModel(model.cfg, {"small": model.variables, "large": large.variables}, model.tokenizer), logits_fn
