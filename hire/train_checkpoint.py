"""Resumable training checkpoints: any pytree of arrays (trainable weights, optimizer state) in safetensors.

A checkpoint is the folder `<out>/checkpoints/step_<N>/state.safetensors`, its tensors named by
their pytree paths. It is written under a temporary name and renamed into place, so a kill at
any moment leaves either the whole checkpoint or none; a restore checks every name and shape
against a template tree of the same structure.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

STATE = "state.safetensors"
PREFIX = "step_"


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `folder`, oldest first, as (step, path)."""
    found = [(int(p.name[len(PREFIX):]), p) for p in folder.glob(f"{PREFIX}*")
             if p.name[len(PREFIX):].isdigit() and (p / STATE).is_file()]
    return sorted(found)


def save_checkpoint(folder: Path, step: int, state: Any, keep: int) -> Path:
    """Write `state` as the checkpoint of `step` (unless there is one), then delete all but the newest `keep`."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{step:08d}"
    if (final / STATE).is_file():  # steps are deterministic: the same step is the same state
        return final
    tmp = folder / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
    save_file({jax.tree_util.keystr(path): np.array(leaf, order="C") for path, leaf in leaves}, tmp / STATE,
              metadata={"step": str(step)})
    tmp.rename(final)
    for _, old in checkpoints(folder)[:-keep]:
        shutil.rmtree(old)
    return final


def restore_checkpoint(path: Path, template: Any) -> Any:
    """The state saved at `path`, in the structure, names and shapes of `template` (numpy leaves)."""
    try:
        tensors = load_file(path / STATE)
    except (OSError, SafetensorError) as e:
        raise ValueError(f"cannot read checkpoint {path}: {e}") from None
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    values = []
    for key_path, leaf in leaves:
        key = jax.tree_util.keystr(key_path)
        if key not in tensors:
            raise ValueError(f"checkpoint {path} lacks {key}: was it written by a different recipe?")
        if tensors[key].shape != np.shape(leaf):
            raise ValueError(f"checkpoint {path}: {key} has shape {tensors[key].shape}, expected {np.shape(leaf)}")
        values.append(tensors[key])
    if extra := sorted(set(tensors) - {jax.tree_util.keystr(p) for p, _ in leaves}):
        raise ValueError(f"checkpoint {path} has unexpected {extra[0]}: was it written by a different recipe?")
    return jax.tree_util.tree_unflatten(treedef, values)


def remove_partial(folder: Path) -> None:
    """Delete temporary folders left by a save that was killed."""
    for tmp in folder.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
