"""HiRE predictors: cheap approximations of the scores x W over the n output rows of a kernel W [dim, n].

Two kinds, each a dict of arrays (a plain pytree, stored in the model's "hire" collection):

- low rank ("lr"): {"a": [dim, r], "b": [r, n]}, scores (x a) b. `low_rank` fits it to minimise the
  expected score error E||x W - x a b||^2 over calibration hidden states x (their second moment C).
  Without calibration (C = I) that is the truncated SVD of W; at r = dim it is W itself.
- quantized ("int8", "int4"): {"q": int8 [n, dim] or uint8 [n, dim/2], "scale": f32 [n]}, one symmetric
  scale per row: row i is q_i * scale_i with q in [-127, 127] (int8) or [-7, 7] (int4, two per byte:
  the even column in the low nibble, the odd one in the high nibble, each stored plus 8). Scoring
  quantizes x too, in two int8 parts: x ~ x_hi * s_hi + x_lo * s_lo, x_hi the int8 rounding of x (one symmetric
  scale per row, s_hi = max|x| / 127) and x_lo that of what it lost (s_lo = max|x - x_hi s_hi| / 127 <= s_hi / 254),
  so a real model's outlier dimensions (SmolLM2's final hidden state: max|x| ~36 where its RMS is ~2) cost no
  precision; both go through one int8 x int8 -> int32 product: on the CPU for up to KERNEL_ROWS rows hire's own
  kernel (hire/csrc/scores.cc: XLA's s8 product reads an int8 copy at half the float GEMV's bandwidth there), else
  XLA's (faster than the f32 product from 2 rows on; converting q to float first costs more than the f32 product:
  docs/hire.md, Predictors). Both are exact in int32. Each score is off by at most |x|_1 * scale_i / 2 (the
  weight's rounding) + s_lo * |q_i|_1 * scale_i / 2 (the hidden state's).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hire import kernels

QUANTS = ("int8", "int4")
QMAX = {"int8": 127, "int4": 7}
KERNEL_ROWS = 64  # int8 rows (hidden states x 2 parts) up to which hire's kernel runs the product, not XLA's


KERNEL = kernels.load("_scores", 1, {"hire_scores_int8": "int8"})  # hire/csrc/scores.cc's handler where it runs


def low_rank(kernel: np.ndarray, rank: int, second_moment: np.ndarray | None = None,
             ridge: float = 1e-6) -> dict[str, np.ndarray]:
    """Rank-`rank` predictor of `kernel` [dim, n], weighted by the hidden states' second moment [dim, dim].

    With C = L L^T (Cholesky), E||x W - x a b||^2 = ||L^T (W - a b)||_F^2, minimised by a = L^-T U_r and
    b = U_r^T L^T W, U_r the top r eigenvectors of L^T W W^T L. `ridge` (relative to the mean eigenvalue)
    keeps C positive definite when some directions never occur.
    """
    w = np.asarray(kernel, np.float32)
    dim = w.shape[0]
    lower = None
    if second_moment is not None:
        c = np.asarray(second_moment, np.float64)
        lower = np.linalg.cholesky((c + c.T) / 2 + ridge * np.trace(c) / dim * np.eye(dim))
        w = lower.T.astype(np.float32) @ w  # L^T W
    _, vectors = np.linalg.eigh((w @ w.T).astype(np.float64))  # ascending eigenvalues
    u = vectors[:, ::-1][:, :min(rank, dim)]
    a = u if lower is None else np.linalg.solve(lower.T, u)
    return {"a": a.astype(np.float32), "b": u.T.astype(np.float32) @ w}


def pack_int4(values: np.ndarray) -> np.ndarray:
    """int values in [-8, 7], last axis even -> uint8 with half the last axis (even index in the low nibble)."""
    v = (np.asarray(values).astype(np.int16) + 8).astype(np.uint8)
    return v[..., 0::2] | (v[..., 1::2] << 4)


def unpack_int4(packed: jax.Array) -> jax.Array:
    """Inverse of pack_int4: uint8 [..., m] -> int8 [..., 2m] in [-8, 7] (works on numpy or jax arrays)."""
    low = (packed & 15).astype(jnp.int8) - 8
    high = (packed >> 4).astype(jnp.int8) - 8
    return jnp.stack([low, high], axis=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def quantize(kernel: np.ndarray, quant: str) -> dict[str, np.ndarray]:
    """Per-row symmetric int8 or int4 copy of `kernel` [dim, n] (rows = its n output columns)."""
    rows = np.asarray(kernel, np.float32).T
    scale = np.abs(rows).max(axis=1) / QMAX[quant]
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(rows / scale[:, None]), -QMAX[quant], QMAX[quant]).astype(np.int8)
    return {"q": pack_int4(q) if quant == "int4" else q, "scale": scale}


def kind_of(pred: dict[str, Any]) -> str:
    """"lr", "int8" or "int4"."""
    if "a" in pred:
        return "lr"
    return "int4" if pred["q"].dtype == jnp.uint8 else "int8"


def scores(pred: dict[str, Any], x: jax.Array) -> jax.Array:
    """Approximate x W: [..., dim] -> [..., n] in float32."""
    kind = kind_of(pred)
    if kind == "lr":
        return ((x @ pred["a"]) @ pred["b"]).astype(jnp.float32)
    lead = x.shape[:-1]
    q = unpack_int4(pred["q"]) if kind == "int4" else pred["q"]
    x = x.astype(jnp.float32).reshape(-1, x.shape[-1])
    high, high_scale = _int8_rows(x)
    low, low_scale = _int8_rows(x - high.astype(jnp.float32) * high_scale)  # what the first int8 rounding lost
    # int4: XLA's product, which unpacks q as it reads it (hire's kernel would read a whole unpacked copy)
    product = _int8_product if kind == "int8" else _xla_product
    dots = product(jnp.concatenate([high, low]), q).astype(jnp.float32).reshape(2, x.shape[0], -1)
    return ((dots[0] * high_scale + dots[1] * low_scale) * pred["scale"]).reshape(*lead, -1)


def _int8_product(x: jax.Array, q: jax.Array) -> jax.Array:
    """x @ q.T in int32 for int8 x [M, dim] and q [n, dim]: hire's kernel where it runs (the CPU, M <= KERNEL_ROWS,
    dim a multiple of 32, on one device or each device's own shard), else XLA's product (for a lone token's two
    rows ~25x faster than for one row). Over a mesh GSPMD partitions (hire.sharding.on_mesh), XLA's product: GSPMD
    would gather a kernel's sharded operands onto every device."""
    mesh = jax.sharding.get_abstract_mesh()
    if KERNEL and x.shape[0] <= KERNEL_ROWS and x.shape[1] % 32 == 0 and (mesh.empty or mesh.are_all_axes_manual):
        return jax.lax.platform_dependent(x, q, cpu=_kernel_product, default=_xla_product)
    return _xla_product(x, q)


def _xla_product(x: jax.Array, q: jax.Array) -> jax.Array:
    return jnp.einsum("td,nd->tn", x, q, preferred_element_type=jnp.int32)


def _kernel_product(x: jax.Array, q: jax.Array) -> jax.Array:
    # typed as XLA's product would be (under shard_map: varying along the axes its inputs vary along)
    return jax.ffi.ffi_call("hire_scores_int8", jax.eval_shape(_xla_product, x, q))(x, q)


def _int8_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [T, dim] as int8 with one symmetric scale per row (s = max|x| / 127; 1 for a zero row)."""
    x_scale = jnp.max(jnp.abs(x), -1, keepdims=True) / 127
    x_scale = jnp.where(x_scale > 0, x_scale, 1.0)
    return jnp.clip(jnp.round(x / x_scale), -127, 127).astype(jnp.int8), x_scale


def spec(kind: str, dim: int, n: int, rank: int, dtype: str) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Shape and dtype of each array of a predictor of `kind` ("lr", "int8", "int4") for a [dim, n] kernel."""
    if kind == "lr":
        r = min(rank, dim)
        return {"a": ((dim, r), jnp.dtype(dtype)), "b": ((r, n), jnp.dtype(dtype))}
    if kind == "int8":
        return {"q": ((n, dim), jnp.int8), "scale": ((n,), jnp.float32)}
    if kind == "int4":
        return {"q": ((n, dim // 2), jnp.uint8), "scale": ((n,), jnp.float32)}
    raise ValueError(f"unknown predictor kind {kind!r}; known: lr, {', '.join(QUANTS)}")


class Predictor(nn.Module):
    """Approximate scores over the `rows` outputs of a kernel; arrays in the "hire" collection (zeros at init)."""

    kind: str
    rows: int
    rank: int
    dtype: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shapes = spec(self.kind, x.shape[-1], self.rows, self.rank, self.dtype)
        pred = {name: self.variable("hire", name, jnp.zeros, shape, dt).value for name, (shape, dt) in shapes.items()}
        return scores(pred, x)
