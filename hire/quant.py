"""Weights kept quantized in memory: int8 and int4 in blocks of 32 along the input dimension (llama.cpp's Q8_0, Q4_1).

A quantized matrix is a dict stored where its float kernel would be, holding its N output rows of K inputs:

- int8: {"q": int8 [N, K], "scale": float16 [N, K/32]}: w = scale * q, q in [-127, 127] (Q8_0's blocks);
- int4: {"q": uint8 [N, K/2], "scale", "min": float16 [N, K/32]}: w = scale * q + min, q in [0, 15], two per byte:
  in each block's 16 bytes, byte j holds element j in its low nibble and element j + 16 in its high one (Q4_1's
  blocks; Q4_0's are min = -8 scale).

A Linear kernel [K, N] is stored as those rows (its transpose), the embedding table [V, D] as it is (in int8 beside
int4 kernels: EMBED_BESIDE): the same dict serves the lookup (`take` dequantizes only the gathered rows) and the
tied LM head. On the CPU, `matmul` runs the C++ kernels in hire/csrc/qmatmul.cc (built with the package): the
activation rows are quantized to int8 per block of 32 too and multiplied in integers, block by block, as llama.cpp's
CPU path does. Elsewhere, and for prompts longer than `KERNEL_ROWS`, the weights are dequantized in the graph and
multiplied in float32.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp

from hire import kernels

QUANTIZE = ("none", "int8", "int4")
# The embedding table's (and an untied LM head's) quantization beside kernels of a kind, where it differs: as llama.cpp
# keeps the token table at 8 bits in its 4-bit files (an int4 table costs SmolLM2 4% perplexity: docs/models.md).
EMBED_BESIDE = {"int4": "int8"}
BLOCK = 32
KERNEL_ROWS = 64  # activation rows up to which the CPU kernel beats dequantizing into a float32 product
# hire/csrc/qmatmul.cc's handlers (hire._qmatmul; abi 2: any number of weight matrices per call) where they run
KERNELS = kernels.load("_qmatmul", 2, {"hire_matmul_int8": "int8", "hire_matmul_int4": "int4"})


def is_quantized(w: Any) -> bool:
    return isinstance(w, dict)


def kind_of(w: dict) -> str:
    return "int4" if "min" in w else "int8"


def quantize_rows(rows: Any, kind: str) -> dict[str, jax.Array]:
    """Quantize `rows` [N, K] (K a multiple of 32) to `kind`; each block's scale (and min) is rounded to float16
    first and its values quantized against the rounded numbers."""
    rows = jnp.asarray(rows, jnp.float32)
    n, k = rows.shape
    if k % BLOCK:
        raise ValueError(f"cannot quantize rows of {k} values: not a multiple of {BLOCK}")
    blocks = rows.reshape(n, k // BLOCK, BLOCK)
    if kind == "int8":
        scale = (jnp.max(jnp.abs(blocks), -1) / 127).astype(jnp.float16)
        q = _round(blocks, scale, jnp.zeros_like(scale), -127, 127).astype(jnp.int8)
        return {"q": q.reshape(n, k), "scale": scale}
    if kind != "int4":
        raise ValueError(f"unknown quantization {kind!r}; known: {', '.join(QUANTIZE[1:])}")
    low = jnp.min(blocks, -1).astype(jnp.float16)
    scale = ((jnp.max(blocks, -1) - low.astype(jnp.float32)) / 15).astype(jnp.float16)
    q = _round(blocks, scale, low, 0, 15).astype(jnp.uint8)
    return {"q": (q[..., :16] | (q[..., 16:] << 4)).reshape(n, k // 2), "scale": scale, "min": low}


def _round(blocks: jax.Array, scale: jax.Array, low: jax.Array, lo: int, hi: int) -> jax.Array:
    s, m = scale.astype(jnp.float32)[..., None], low.astype(jnp.float32)[..., None]
    return jnp.clip(jnp.round(jnp.where(s > 0, (blocks - m) / jnp.where(s > 0, s, 1), 0)), lo, hi)


def quantize(kernel: Any, kind: str) -> dict[str, jax.Array]:
    """A kernel [K, N] (y = x @ kernel) quantized: its N output rows."""
    return quantize_rows(jnp.asarray(kernel).T, kind)


def dequantize_rows(w: dict) -> jax.Array:
    """The float32 rows [..., N, K] a quantized dict holds (leading axes gathered by `take`)."""
    nb = w["scale"].shape[-1]
    if kind_of(w) == "int4":
        packed = w["q"].reshape(*w["q"].shape[:-1], nb, BLOCK // 2)
        q = jnp.concatenate([packed & 15, packed >> 4], -1).astype(jnp.float32)
        blocks = q * w["scale"].astype(jnp.float32)[..., None] + w["min"].astype(jnp.float32)[..., None]
    else:
        blocks = w["q"].reshape(*w["q"].shape[:-1], nb, BLOCK).astype(jnp.float32)
        blocks = blocks * w["scale"].astype(jnp.float32)[..., None]
    return blocks.reshape(*blocks.shape[:-2], nb * BLOCK)


def take(table: Any, ids: jax.Array) -> jax.Array:
    """Rows `ids` of an embedding table [V, D], float or quantized (only those rows are dequantized)."""
    if not is_quantized(table):
        return table[ids]
    return dequantize_rows(jax.tree.map(lambda a: a[ids], table))


def matmul(x: jax.Array, kernel: Any) -> jax.Array:
    """x @ kernel for a float kernel [K, N] or a quantized one; float32 out of a quantized one."""
    return x @ kernel if not is_quantized(kernel) else matmul_rows(x, kernel)


def fusable(kernels: list) -> bool:
    """Whether `matmuls` multiplies these kernels in one kernel call: two to four quantized ones of one kind."""
    return 2 <= len(kernels) <= 4 and all(map(is_quantized, kernels)) and len({kind_of(k) for k in kernels}) == 1


def matmuls(x: jax.Array, kernels: list) -> list[jax.Array]:
    """[matmul(x, k) for k in kernels]; `fusable` kernels in one call of the CPU kernel, which quantizes x once and
    shares all their rows among its threads (fewer, larger calls: a decode step makes ~7 per layer otherwise)."""
    return _quantized(x, kernels) if fusable(kernels) else [matmul(x, k) for k in kernels]


def matmul_rows(x: jax.Array, rows: Any) -> jax.Array:
    """x @ rows.T for float rows [N, K] (the tied LM head) or a quantized dict."""
    return _quantized(x, [rows])[0] if is_quantized(rows) else x @ rows.T


def _quantized(x: jax.Array, ws: list[dict]) -> list[jax.Array]:
    """x @ w.T for quantized dicts of one kind."""
    flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    if not KERNELS and jax.default_backend() == "cpu":
        warnings.warn("hire._qmatmul is not built: quantized weights are dequantized for every product (slow); "
                      "pip install -e . builds it", stacklevel=3)
    if KERNELS and flat.shape[0] <= KERNEL_ROWS:
        ys = jax.lax.platform_dependent(flat, ws, cpu=_cpu_kernel, default=_dequantized)
    else:
        ys = _dequantized(flat, ws)
    return [y.reshape(*x.shape[:-1], -1) for y in ys]


def _dequantized(x: jax.Array, ws: list[dict]) -> list[jax.Array]:
    return [x @ dequantize_rows(w).T for w in ws]


def _cpu_kernel(x: jax.Array, ws: list[dict]) -> list[jax.Array]:
    kind = kind_of(ws[0])
    outs = [jax.ShapeDtypeStruct((x.shape[0], w["q"].shape[0]), jnp.float32) for w in ws]
    args = [w[name] for w in ws for name in (("q", "scale", "min") if kind == "int4" else ("q", "scale"))]
    return list(jax.ffi.ffi_call(f"hire_matmul_{kind}", outs)(x, *args))


def initializer(kind: str, init: Callable, transpose: bool = True) -> Callable:
    """A flax initializer of a quantized matrix: `init`'s float weights [K, N] quantized (`transpose`: as a kernel;
    else as rows [N, K], an embedding table)."""
    def quantized(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> dict[str, jax.Array]:
        w = init(key, shape, jnp.float32)
        return quantize(w, kind) if transpose else quantize_rows(w, kind)

    return quantized


def quantize_params(params: dict, kind: str, table_kind: str | None = None) -> dict:
    """Every Linear kernel ("kernel") of `params` quantized to `kind`, the embedding table ("embed", read as rows)
    and an untied "lm_head" (a kernel) to `table_kind` (default `kind`); "none" dequantizes to float32."""
    def convert(path: tuple, leaf: Any) -> Any:
        name = path[-1]
        if name not in ("kernel", "embed", "lm_head"):
            return leaf
        to, as_rows = kind if name == "kernel" else table_kind or kind, name == "embed"
        if is_quantized(leaf):
            if kind_of(leaf) == to:
                return leaf
            rows = dequantize_rows(leaf)
            leaf = rows if as_rows else rows.T
        return leaf if to == "none" else (quantize_rows(leaf, to) if as_rows else quantize(leaf, to))

    return _map_named(convert, params)


def _map_named(fn: Callable, tree: dict, path: tuple = ()) -> dict:
    """`tree` with fn(path, value) in place of each value that is an array or a quantized dict."""
    out = {}
    for key, value in tree.items():
        here = (*path, key)
        is_tree = isinstance(value, dict) and not (key in ("kernel", "embed", "lm_head") and is_quantized(value))
        out[key] = _map_named(fn, value, here) if is_tree else fn(here, value)
    return out
