"""The training recipe file: a TOML or JSON document read into checked, frozen dataclasses.

Top-level keys are TrainConfig's fields; the tables [model] (ModelConfig fields, less the
vocabulary and special ids, which the tokenizer sets), [tokenizer], [data], [optimizer] and
[tandem] (optional: the tandem recipe) hold the rest. Every error names the offending field, e.g. "optimizer.lr".
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax

from hire.bpe import BOS_ID, EOS_ID, TokenizerConfig
from hire.config import ModelConfig
from hire.data import CorpusConfig

COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
SET_BY_TOKENIZER = ("vocab_size", "bos_id", "eos_id")
# What a recipe hands hire.train.fit: loss_fn(trainable, frozen, batch, rng) -> (loss, metrics).
LossFn = Callable[[Any, Any, dict[str, jax.Array], jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


class ConfigError(ValueError):
    """A recipe that cannot be read or has a bad field; the message names the field."""


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with global-norm clipping; the learning rate warms up linearly, then decays on a cosine
    to `lr * final_lr_fraction` at the last step. Weight decay applies to matrices only."""

    lr: float = 3e-3
    warmup_steps: int = 100
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        for name in ("lr", "grad_clip"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "weight_decay", "final_lr_fraction"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")


@dataclass(frozen=True)
class TandemRecipe:
    """The [tandem] table: train `model` as the small model of a tandem transformer (hire.tandem) beside
    the frozen `large` model (a name under models/ or a path, with the same tokenizer). Small layer i reads
    the large hidden states `large_layers[i]` (empty: the one at the same relative depth), in blocks of
    `block` tokens, exactly as at inference. `distill` in [0, 1] is the weight of the large model's softmax
    as a soft target beside the next token."""

    large: str = "stdlib-9m"
    large_layers: tuple[tuple[int, ...], ...] = ()
    block: int = 4
    distill: float = 0.0

    def __post_init__(self) -> None:
        if self.block < 1:
            raise ValueError(f"block must be positive, got {self.block}")
        if not 0 <= self.distill <= 1:
            raise ValueError(f"distill must be in [0, 1], got {self.distill}")


@dataclass(frozen=True)
class TrainConfig:
    """A whole run. `steps` updates of `batch_size` windows of `seq_len` tokens; validation every
    `eval_every` steps on `eval_batches` batches; a resumable checkpoint every `checkpoint_every`
    steps (the last `keep_checkpoints` are kept) under `out`, and the final model in `out`/model.
    `compute_dtype` "auto" is bfloat16 on GPU/TPU and float32 on CPU; weights stay float32.
    With a [tandem] table the model is a tandem small model trained beside a frozen large one.
    `init` (a name under models/ or a model folder) starts from that model's weights instead of a random
    init (fine-tuning): the [model] table must give its shape and the tokenizer must be its tokenizer."""

    model: ModelConfig
    tokenizer: TokenizerConfig
    out: str
    data: CorpusConfig = CorpusConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    seed: int = 0
    compute_dtype: str = "auto"
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    tandem: TandemRecipe | None = None
    init: str | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_batches", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative (0: only at the end), got {getattr(self, name)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        if self.optimizer.warmup_steps >= self.steps:
            raise ValueError(f"optimizer.warmup_steps ({self.optimizer.warmup_steps}) must be below "
                             f"steps ({self.steps})")
        if self.seq_len > self.model.max_seq_len:
            raise ValueError(f"seq_len ({self.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})")
        if self.model.dtype != "float32":
            raise ValueError("model.dtype must be float32 (the master weights); set compute_dtype instead")
        if self.tandem and self.init:
            raise ValueError("init: a tandem small model starts from a random init (leave init out with [tandem])")
        if self.tandem and self.tandem.large_layers and len(self.tandem.large_layers) != self.model.n_layers:
            raise ValueError(f"tandem.large_layers gives {len(self.tandem.large_layers)} layers' inputs; "
                             f"model.n_layers is {self.model.n_layers}")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def load_config(path: str | Path) -> TrainConfig:
    """Read a recipe from a .toml or .json file; the model's name defaults to the file's stem."""
    path = Path(path)
    if path.suffix not in (".toml", ".json"):
        raise ConfigError(f"{path}: a recipe is a .toml or .json file")
    try:
        raw = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    try:
        return config_from_dict(raw, default_name=path.stem)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def config_from_dict(raw: Any, default_name: str = "model") -> TrainConfig:
    """Build a TrainConfig from nested dicts (a parsed recipe file), checking every field."""
    raw = dict(_table(raw, "recipe"))
    tokenizer = _build(TokenizerConfig, raw.pop("tokenizer", None), "tokenizer")
    model = dict(_table(raw.pop("model", None), "model"))
    for name in SET_BY_TOKENIZER:
        if name in model:
            raise ConfigError(f"model.{name}: set by the tokenizer, leave it out")
    seq_len = raw.get("seq_len", TrainConfig.seq_len)
    model = {"max_seq_len": seq_len, "name": default_name, **model,
             "vocab_size": tokenizer.vocab_size, "bos_id": BOS_ID, "eos_id": EOS_ID}
    raw["model"] = _build(ModelConfig, model, "model")
    raw["tokenizer"] = tokenizer
    for name, cls in (("data", CorpusConfig), ("optimizer", OptimizerConfig), ("tandem", TandemRecipe)):
        if name in raw:
            raw[name] = _build(cls, raw[name], name)
    return _build(TrainConfig, raw, "recipe", nested=("model", "tokenizer", "data", "optimizer", "tandem"))


def _table(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table of fields, got {type(raw).__name__}")
    return raw


def _build(cls: type, raw: Any, where: str, nested: tuple[str, ...] = ()) -> Any:
    """cls(**raw), with unknown, missing and mistyped fields reported as `where.field`."""
    raw = _table(raw, where)
    prefix = "" if where == "recipe" else f"{where}."
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    if unknown := sorted(set(raw) - set(fields)):
        raise ConfigError(f"unknown field {', '.join(prefix + u for u in unknown)}; known: {', '.join(fields)}")
    missing = [n for n, f in fields.items()
               if n not in raw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing field {', '.join(prefix + m for m in missing)}")
    hints = typing.get_type_hints(cls)
    values = {k: v if k in nested else _coerce(v, hints[k], prefix + k) for k, v in raw.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}" if where != "recipe" else str(e)) from None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` checked against a field's type (ints are accepted as floats, lists as tuples)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
        if option == tuple[tuple[int, ...], ...] and isinstance(value, list) and all(
                isinstance(v, list) and all(type(i) is int for i in v) for v in value):
            return tuple(tuple(v) for v in value)
        if typing.get_origin(option) is tuple and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        if dataclasses.is_dataclass(option) and isinstance(value, dict):
            return value  # e.g. ModelConfig.rope_scaling, built by its owner
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{where}: expected {names}, got {value!r}")


def resolve_compute_dtype(name: str) -> str:
    """A recipe's compute_dtype: "auto" is bfloat16 on accelerators and float32 on CPU."""
    if name != "auto":
        return name
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
