"""hire's own checkpoint folder: config.json, model.safetensors and the tokenizer's file(s).

config.json is ModelConfig.to_dict() plus "format": "hire" and "format_version"; model.safetensors
holds every variable under its flattened name ("params/layers_0/attn/q/kernel", "lora/scale").
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from hire.config import ModelConfig
from hire.formats import (
    CheckpointError,
    build_config,
    check_variables,
    flatten,
    prepare_variables,
    read_json,
    read_tensors,
    unflatten,
    with_dtype,
)
from hire.loaded import LoadedModel
from hire.tokenizer import Tokenizer, load_tokenizer

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"


def save_native(folder: str | Path, cfg: ModelConfig, variables: dict, tokenizer: Tokenizer | None) -> None:
    """Write a hire checkpoint folder, replacing the hire checkpoint already there, if any (with no tokenizer:
    a model of random weights, hire.flash_bench).

    Files are written to a temporary sibling folder that then takes `folder`'s place, so an
    interrupted save never leaves a half-written checkpoint.
    """
    folder = Path(folder).resolve()
    if folder.exists() and not _replaceable(folder):
        raise CheckpointError(f"{folder} exists and is not a hire checkpoint; refusing to overwrite it")
    check_variables(cfg, variables)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (folder.with_name(f".{folder.name}.{kind}-{os.getpid()}") for kind in ("new", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tensors = {k: np.ascontiguousarray(v) for k, v in flatten(variables).items()}
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "hire"})
        (tmp / WEIGHTS).chmod(0o644)
        if tokenizer is not None:
            tokenizer.save(tmp)
        meta = {**cfg.to_dict(), "format": "hire", "format_version": FORMAT_VERSION}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        if folder.exists():
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old)
        else:
            tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replaceable(folder: Path) -> bool:
    """Whether `folder` is empty or holds a hire checkpoint."""
    config = folder / "config.json"
    return folder.is_dir() and (not any(folder.iterdir())
                                or config.is_file() and read_json(config).get("format") == "hire")


def read_config(folder: str | Path, dtype: str | None = None) -> ModelConfig:
    """The ModelConfig of a folder written by save_native; `dtype` overrides the saved one."""
    config = Path(folder) / "config.json"
    raw = read_json(config)
    if raw.pop("format", None) != "hire":
        raise CheckpointError(f"{config} is not a hire config (no \"format\": \"hire\")")
    if (version := raw.pop("format_version", None)) != FORMAT_VERSION:
        raise CheckpointError(f"{config}: format_version {version!r} is not supported (supported: {FORMAT_VERSION})")
    return with_dtype(build_config(config, raw), dtype)


def load_native(folder: str | Path, dtype: str | None = None) -> LoadedModel:
    """Load a folder written by save_native; `dtype` overrides the saved one."""
    folder = Path(folder)
    cfg = read_config(folder, dtype)
    tensors = read_tensors(folder / WEIGHTS)
    # the weights are dense even when the config asks for HiRE: hire.checkpoint.load_model adds that
    return LoadedModel(cfg, prepare_variables(cfg.dense(), unflatten(tensors)), load_tokenizer(folder))
