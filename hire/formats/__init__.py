"""Checkpoint formats: shared errors, key flattening, and checking weights against a config."""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from hire.config import ModelConfig
from hire.model import init_params

DTYPES = ("float32", "bfloat16", "float16")


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, read, or matched to its config; the message is one line."""


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file; a CheckpointError when it cannot be read."""
    try:
        return load_file(path)
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": x}} -> {"a/b": x}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a/b": x} -> {"a": {"b": x}}."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def half_split(w: np.ndarray, n_heads: int, axis: int = 0) -> np.ndarray:
    """Permute the q or k rows along `axis` (n_heads heads) from interleaved RoPE pairs (2i, 2i+1), as llama.cpp
    and llama.c store them, to hire's and Hugging Face's half-split pairs (i, i + head_dim/2)."""
    w = np.moveaxis(w, axis, 0)
    out = w.reshape(n_heads, -1, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    return np.moveaxis(out, 0, axis)


def build_config(source: Path, fields: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig.from_dict, with bad or missing fields reported as a CheckpointError naming `source`."""
    try:
        return ModelConfig.from_dict(dict(fields))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None


def with_dtype(cfg: ModelConfig, dtype: str | None) -> ModelConfig:
    """`cfg` computing in `dtype` (unchanged when None)."""
    if dtype is None:
        return cfg
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported; supported: {', '.join(DTYPES)}")
    return cfg.replace(dtype=dtype)


def expected_variables(cfg: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat "collection/module/.../name" -> shape and dtype of every variable the model creates."""
    return flatten(jax.eval_shape(lambda: init_params(cfg)))


def _check(cfg: ModelConfig, want: Mapping[str, Any], got: Mapping[str, Any]) -> None:
    problems = [f"{k}: expected shape {tuple(want[k].shape)}, got {tuple(got[k].shape)}"
                for k in want if k in got and tuple(got[k].shape) != tuple(want[k].shape)]
    problems += [f"missing {k}" for k in want if k not in got]
    problems += [f"unexpected {k}" for k in got if k not in want]
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise CheckpointError(f"weights do not match the config of {cfg.name} (dim={cfg.dim}, "
                              f"n_layers={cfg.n_layers}, vocab_size={cfg.vocab_size}): "
                              + "; ".join(problems[:5]) + more)


def check_variables(cfg: ModelConfig, variables: Mapping[str, Any]) -> None:
    """Raise CheckpointError naming the first missing, unexpected or misshapen tensors."""
    _check(cfg, expected_variables(cfg), flatten(variables))


def prepare_variables(cfg: ModelConfig, variables: Mapping[str, Any], held_elsewhere: str = "") -> dict[str, Any]:
    """Check `variables` (numpy or jax leaves) and return them as jax arrays in the model's dtypes; variables whose
    names end with `held_elsewhere` (when given) are expected absent (hire.flash keeps the FFN bundles on disk)."""
    want, got = expected_variables(cfg), flatten(variables)
    if held_elsewhere:
        want = {k: v for k, v in want.items() if not k.endswith(held_elsewhere)}
    _check(cfg, want, got)
    return unflatten({k: jnp.asarray(got[k], dtype=want[k].dtype) for k in want})
