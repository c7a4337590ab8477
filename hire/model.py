"""A Llama-family decoder in Flax, read top to bottom.

RoPE (plain or Llama-3 scaled), grouped-query attention over a KV cache indexed by absolute
position, RMSNorm, a gated or plain FFN or a Mixtral-style mixture of experts, and optional
LoRA adapters selected per batch row. Parameters live in the "params" collection, adapters
in "lora"; both are plain pytrees. Gemma 3's pieces are options of the same blocks: (1 + w)
RMSNorm, QK-norm, sandwich norms, scaled embeddings, and sliding-window (local) layers
interleaved with global ones, each kind with its own RoPE base. With `cfg.quantize` ("int8", "int4"), every
Linear kernel and the embedding table are kept quantized (hire.quant: a dict in the kernel's place)
and multiplied as such.

The cache is a tuple of (k, v) per layer: k [batch, n_kv_heads, head_dim, length] (stored
transposed, so both attention products are plain matrix products) and v [batch, n_kv_heads,
length, head_dim]; the token at position p is written at index p, and a step may attend over only the first `kv_len`
entries when no position reaches further. Sliding layers keep the same layout and mask what lies
outside their window. One forward pass serves prefill (many tokens),
decode (one token) and block verification (a few tokens): new keys are scattered at their
positions, then queries attend to every cached key at a position not after their own. With `stepwise`
(verification), each token attends, and is RMS-normed, on its own, in ops shaped as a one-token step's: XLA:CPU
sums a product over 128+ keys, and a norm's row, in an order that depends on how many rows the op has, and with
quantized weights (each activation re-quantized to int8) that last bit grows into different logits; stepwise, a
pass over T tokens gives a one-token step's logits bit for bit wherever the weights' products are row-independent
(hire.quant's CPU kernel).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from hire import moe, quant, sharded_sparse, sparse
from hire.config import ModelConfig
from hire.predictors import Predictor

KVCache = tuple[tuple[jax.Array, jax.Array], ...]


class Lora(NamedTuple):
    """Per-row adapter choice: `ids` [B] (clipped to a valid index) and `scale` [B] (0 for none)."""

    ids: jax.Array
    scale: jax.Array


def init_cache(cfg: ModelConfig, batch: int, length: int) -> KVCache:
    k_shape = (batch, cfg.n_kv_heads, cfg.head_dim, length)
    v_shape = (batch, cfg.n_kv_heads, length, cfg.head_dim)
    dt = jnp.dtype(cfg.dtype)
    return tuple((jnp.zeros(k_shape, dt), jnp.zeros(v_shape, dt)) for _ in range(cfg.n_layers))


def rope_frequencies(cfg: ModelConfig, local: bool = False) -> jax.Array:
    """Inverse frequencies [head_dim/2], with Llama-3 or linear scaling when configured; `local`: those of the sliding
    layers, at base rope_local_theta unscaled when it is set."""
    d = cfg.head_dim
    local = local and cfg.rope_local_theta > 0
    inv = 1.0 / ((cfg.rope_local_theta if local else cfg.rope_theta) ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    s = cfg.rope_scaling
    if s is None or local:
        return inv
    if s.kind == "linear":
        return inv / s.factor
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate x [B, T, H, D] by its positions [B, T] (Hugging Face's half-split layout)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class RMSNorm(nn.Module):
    """x / rms(x) * w (Llama: scaled in x's dtype), or * (offset + w) in float32 (Gemma's (1 + w))."""

    eps: float
    dtype: str
    offset: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, stepwise: bool = False) -> jax.Array:
        """x [B, T, ...]; `stepwise`: each token on its own (XLA:CPU's reduction order depends on the row count)."""
        w = self.param("weight", nn.initializers.constant(1 - self.offset), (x.shape[-1],), jnp.dtype(self.dtype))
        return per_token(lambda x: self._normed(x, w), x) if stepwise else self._normed(x, w)

    def _normed(self, x: jax.Array, w: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (x32 * (self.offset + w.astype(jnp.float32))).astype(x.dtype)
        return w * x32.astype(x.dtype)


def norm(cfg: ModelConfig, name: str) -> RMSNorm:
    return RMSNorm(cfg.norm_eps, cfg.dtype, cfg.norm_offset, name=name)


def weight_init(kind: str, table: bool = False) -> nn.initializers.Initializer:
    """Random weights: normal(0.02), quantized to `kind` unless "none" (a kernel, or an embedding `table`'s rows)."""
    init = nn.initializers.normal(0.02)
    return init if kind == "none" else quant.initializer(kind, init, transpose=not table)


class Linear(nn.Module):
    """y = x W (+ b), plus each row's LoRA adapter: scale * (x A[id]) B[id]. W may be quantized (hire.quant)."""

    features: int
    cfg: ModelConfig
    use_bias: bool = False
    lora_target: str = ""

    @nn.compact
    def __call__(self, x: jax.Array, lora: Lora | None, product: jax.Array | None = None) -> jax.Array:
        """`product`: x W already computed (by `linears`)."""
        dt = jnp.dtype(self.cfg.dtype)
        kernel = self.param("kernel", weight_init(self.cfg.quantize), (x.shape[-1], self.features), dt)
        y = (quant.matmul(x, kernel) if product is None else product).astype(dt)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), dt)
        if self.cfg.lora_adapters and self.lora_target in self.cfg.lora_targets:
            n, r = self.cfg.lora_adapters, self.cfg.lora_rank
            a = self.variable("lora", "a", lambda: nn.initializers.normal(0.02)(
                self.make_rng("params"), (n, x.shape[-1], r), dt))
            b = self.variable("lora", "b", jnp.zeros, (n, r, self.features), dt)
            if lora is not None:
                delta = jnp.einsum("bti,bir->btr", x, a.value[lora.ids]) @ b.value[lora.ids]
                y = y + lora.scale[:, None, None].astype(dt) * delta
        return y


def linears(parent: nn.Module, layers: list[Linear], x: jax.Array, lora: Lora | None) -> list[jax.Array]:
    """Each of `layers` (children of `parent`) applied to x, their quantized weights multiplied in one kernel call
    (hire.quant.matmuls: x quantized once, one meeting of the threads)."""
    if not parent.is_initializing():
        kernels = [parent.variables["params"][layer.name]["kernel"] for layer in layers]
        if quant.fusable(kernels):
            return [layer(x, lora, y) for layer, y in zip(layers, quant.matmuls(x, kernels))]
    return [layer(x, lora) for layer in layers]


class Attention(nn.Module):
    """Grouped-query attention; `window` > 0 sees only the last `window` positions (a sliding layer)."""

    cfg: ModelConfig
    window: int = 0

    @nn.compact
    def __call__(self, x, positions, cache, lora, inv_freq, kv_len=None, stepwise=False):
        cfg = self.cfg
        B, T, _ = x.shape
        H, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        q, k, v = linears(self, [Linear(H * D, cfg, bias, "q", name="q"), Linear(K * D, cfg, bias, "k", name="k"),
                                 Linear(K * D, cfg, bias, "v", name="v")], x, lora)
        q, k, v = q.reshape(B, T, H, D), k.reshape(B, T, K, D), v.reshape(B, T, K, D)
        if cfg.qk_norm:
            q, k = norm(cfg, "q_norm")(q, stepwise), norm(cfg, "k_norm")(k, stepwise)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)

        if cache is None:  # attend within this call only
            keys, values, key_pos = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), positions
        else:  # write at each token's position, then attend over the cache's first kv_len entries
            rows = jnp.arange(B)[:, None]
            keys = cache[0].at[rows, :, :, positions].set(k, mode="drop")
            values = cache[1].at[rows, :, positions].set(v, mode="drop")
            cache = (keys, values)
            span = min(kv_len or keys.shape[3], keys.shape[3])
            keys, values = keys[..., :span], values[:, :, :span]
            key_pos = jnp.broadcast_to(jnp.arange(span), (B, span))

        visible = key_pos[:, None, :] <= positions[:, :, None]  # [B, T, S]
        if self.window:
            visible &= key_pos[:, None, :] > positions[:, :, None] - self.window
        # stepwise: each token's products shaped as a one-token step's, which XLA sums in the same order
        out = per_token(lambda q, visible: attend(cfg, q, keys, values, visible), q, visible) if stepwise \
            else attend(cfg, q, keys, values, visible)
        return Linear(cfg.dim, cfg, False, "o", name="o")(out.reshape(B, T, H * D), lora), cache


def per_token(fn: Callable[..., jax.Array], *xs: jax.Array) -> jax.Array:
    """fn over each token of xs [B, T, ...] on its own (ops shaped as a one-token step's), joined back along T."""
    return jnp.concatenate([fn(*(x[:, t:t + 1] for x in xs)) for t in range(xs[0].shape[1])], axis=1)


def attend(cfg: ModelConfig, q: jax.Array, keys: jax.Array, values: jax.Array, visible: jax.Array) -> jax.Array:
    """softmax(q k / sqrt(d)) v for q [B, T, H, D], keys [B, K, D, S], values [B, K, S, D], visible [B, T, S]."""
    B, T, H, D = q.shape
    K = keys.shape[1]
    qg = q.reshape(B, T, K, H // K, D).transpose(0, 2, 3, 1, 4).reshape(B, K, -1, D)  # [B, K, G*T, D]
    scores = jnp.einsum("bkqd,bkds->bkqs", qg, keys, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(cfg.query_scale or D)
    scores = scores.reshape(B, K, H // K, T, -1)
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype).reshape(B, K, H // K * T, -1)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, values).reshape(B, K, H // K, T, D)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)


def activation(cfg: ModelConfig, x: jax.Array) -> jax.Array:
    if cfg.activation == "silu":
        return jax.nn.silu(x)
    if cfg.activation == "relu":
        return jax.nn.relu(x)
    return jax.nn.gelu(x, approximate=cfg.activation == "gelu_tanh")


class FFN(nn.Module):
    """down(act(gate x) * up x) when gated (SwiGLU for silu), else down(act(up x))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, lora):
        cfg = self.cfg
        if cfg.gated:
            h, gate = linears(self, [Linear(cfg.ffn_dim, cfg, False, "up", name="up"),
                                     Linear(cfg.ffn_dim, cfg, False, "gate", name="gate")], x, lora)
            h = activation(cfg, gate) * h
        else:
            h = activation(cfg, Linear(cfg.ffn_dim, cfg, False, "up", name="up")(x, lora))
        if cfg.ffn == "group-topk":  # the group-sparse training mask (docs/hire.md)
            h = sparse.keep_top_groups(h, cfg.ffn_groups, cfg.ffn_k)
        return Linear(cfg.dim, cfg, False, "down", name="down")(h, lora)


class GroupSparseFFN(nn.Module):
    """The FFN with HiRE group sparsity (hire.sparse): weights bundled per group of neurons, "bundle"
    [groups, parts, group, dim] in params, and a predictor of the gate and up pre-activations."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        parts = 3 if cfg.gated else 2
        bundle = self.param("bundle", nn.initializers.normal(0.02), (cfg.ffn_groups, parts, cfg.ffn_group, cfg.dim),
                            jnp.dtype(cfg.dtype))
        approx = Predictor(cfg.predictor_kind("ffn"), (parts - 1) * cfg.ffn_dim, cfg.hire_rank, cfg.dtype,
                           name="predictor")(x)
        return sharded_sparse.group_sparse_ffn(x, bundle, approx, lambda h: activation(cfg, h), cfg.ffn_candidates,
                                               cfg.ffn_union, keep=cfg.ffn_k if cfg.ffn_keep_k else 0)


class MoE(nn.Module):
    """Mixtral: softmax router, top-k experts, weights renormalised over the chosen k; each token reads only its
    chosen experts' weights, one array per expert and weight (hire.moe)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, lora):
        cfg = self.cfg
        dt, D, F, init = jnp.dtype(cfg.dtype), cfg.dim, cfg.ffn_dim, nn.initializers.normal(0.02)
        router = self.param("router", init, (D, cfg.n_experts), dt)
        experts = tuple((self.param(f"gate_{e}", init, (D, F), dt), self.param(f"up_{e}", init, (D, F), dt),
                         self.param(f"down_{e}", init, (F, D), dt)) for e in range(cfg.n_experts))
        return moe.mixture(x, router, experts, cfg.n_experts_per_token, lambda h: activation(cfg, h), cfg.moe_dispatch)


class Block(nn.Module):
    """Pre-norm attention and FFN, each output normed again before its residual add with `post_norms` (Gemma)."""

    cfg: ModelConfig
    window: int = 0

    @nn.compact
    def __call__(self, x, positions, cache, lora, inv_freq, kv_len, stepwise=False):
        cfg = self.cfg
        h, cache = Attention(cfg, self.window, name="attn")(norm(cfg, "attn_norm")(x, stepwise), positions, cache,
                                                            lora, inv_freq, kv_len, stepwise)
        if cfg.post_norms:
            h = norm(cfg, "post_attn_norm")(h, stepwise)
        x = x + h
        y = norm(cfg, "ffn_norm")(x, stepwise)
        if cfg.n_experts:
            y = MoE(cfg, name="moe")(y, lora)
        elif cfg.ffn == "group-sparse":
            y = GroupSparseFFN(cfg, name="ffn")(y)
        else:
            y = FFN(cfg, name="ffn")(y, lora)
        if cfg.post_norms:
            y = norm(cfg, "post_ffn_norm")(y, stepwise)
        return x + y, cache


class Transformer(nn.Module):
    """tokens [B, T] at positions [B, T] -> logits [B, T, V] (or [B, V] at `logit_index`), cache.

    Applied with `mutable=["intermediates"]`, it also returns the residual stream [B, T, dim] as
    intermediates "hidden_0" (the embeddings) to "hidden_{n_layers}" (the last block's output, before
    the final norm): the representations a tandem drafter reads. Otherwise nothing is kept.
    `stepwise`: attention one token at a time (see the module's docstring).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: KVCache | None = None,
                 adapter: jax.Array | None = None, logit_index: jax.Array | None = None, kv_len: int | None = None,
                 stepwise: bool = False):
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        embed = self.param("embed", weight_init(cfg.embed_quantize, table=True), (cfg.vocab_size, cfg.dim), dt)
        lora = None
        if cfg.lora_adapters:
            scale = self.variable("lora", "scale", jnp.ones, (cfg.lora_adapters,), jnp.float32).value
            if adapter is not None:
                ids = jnp.clip(adapter, 0, cfg.lora_adapters - 1)
                lora = Lora(ids, jnp.where(adapter >= 0, scale[ids], 0.0))
        inv_freq = {False: rope_frequencies(cfg), True: rope_frequencies(cfg, local=True)}
        x = quant.take(embed, tokens).astype(dt)
        if cfg.embed_scale:
            x = x * jnp.asarray(math.sqrt(cfg.dim), dt)
        self.sow("intermediates", "hidden_0", x)
        new_cache = []
        for i in range(cfg.n_layers):
            layer_cache = None if cache is None else cache[i]
            window = cfg.layer_window(i)
            x, c = Block(cfg, window, name=f"layers_{i}")(x, positions, layer_cache, lora, inv_freq[window > 0],
                                                          kv_len, stepwise)
            self.sow("intermediates", f"hidden_{i + 1}", x)
            new_cache.append(c)
        x = norm(cfg, "norm")(x, stepwise)
        if logit_index is not None:
            x = x[jnp.arange(x.shape[0]), logit_index]
        weight = embed if cfg.tie_embeddings else self.param("lm_head", weight_init(cfg.embed_quantize),
                                                             (cfg.dim, cfg.vocab_size), dt)
        if cfg.softmax != "dense":  # HiRE: exact logits for the predicted candidates only (hire.sparse)
            approx = Predictor(cfg.predictor_kind("softmax"), cfg.vocab_size, cfg.hire_rank, cfg.dtype,
                               name="softmax")(x)
            logits = sharded_sparse.hire_logits(x, weight, approx, cfg.softmax_candidates,
                                                0 if cfg.tie_embeddings else 1)
        elif cfg.tie_embeddings:
            logits = quant.matmul_rows(x, embed)
        else:
            logits = quant.matmul(x, weight)
        return logits.astype(jnp.float32), (None if cache is None else tuple(new_cache))


def init_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Random variables {"params": ..., ["lora": ...]} for `cfg`."""
    model = Transformer(cfg)
    tokens = jnp.zeros((1, 1), jnp.int32)
    adapter = jnp.zeros((1,), jnp.int32) if cfg.lora_adapters else None
    return jax.jit(lambda: model.init(jax.random.PRNGKey(seed), tokens, tokens, None, adapter))()
