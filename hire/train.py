"""The training loop, data-parallel over all local devices, and the language-model recipe.

`fit` is recipe-agnostic: it minimises `loss_fn(trainable, frozen, batch, rng) -> (loss, metrics)`
over `trainable` with `frozen` held fixed (it never reaches the optimizer), taking batch `step`
from `batch_at(step)`. A batch is a dict of arrays split along axis 0 over the "data" mesh axis,
so auxiliary inputs (a LoRA adapter per row, a larger model's activations) ride along with the
tokens; weights are replicated. The step's rng is fold_in(seed, step) and `batch_at` must be a
pure function of the step, so a run resumed from a checkpoint retraces the uninterrupted one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from hire.bpe import load_or_train
from hire.checkpoint import load_model
from hire.config import ModelConfig, OptionError
from hire.data import Batches, encode_documents, eval_batches, split_corpus
from hire.evaluate import token_nll
from hire.formats import CheckpointError, flatten, unflatten
from hire.formats.native import save_native
from hire.model import Transformer, init_params
from hire.tokenizer import Tokenizer
from hire.train_checkpoint import checkpoints, remove_partial, restore_checkpoint, save_checkpoint
from hire.train_config import ConfigError, LossFn, OptimizerConfig, TrainConfig, load_config, resolve_compute_dtype
from hire.train_tandem import tandem_recipe

Batch = dict[str, np.ndarray]
LOG_EVERY = 10  # steps between fetching metrics from the device (and appending them to metrics.jsonl)
# Recipe fields a resumed run may change: they do not alter the weights' trajectory.
FREE_ON_RESUME = frozenset({"out", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints"})


class FitResult(NamedTuple):
    trainable: Any
    step: int
    summary: dict[str, Any]


def partition(variables: dict, is_trainable: Callable[[str], bool]) -> tuple[dict, dict]:
    """Split nested dicts into (trainable, frozen) by each leaf's "collection/module/.../name" path."""
    flat = flatten(variables)
    return (unflatten({k: v for k, v in flat.items() if is_trainable(k)}),
            unflatten({k: v for k, v in flat.items() if not is_trainable(k)}))


def merge(trainable: dict, frozen: dict) -> dict:
    """The inverse of partition."""
    return unflatten({**flatten(frozen), **flatten(trainable)})


def lm_loss(cfg: ModelConfig, compute_dtype: str = "float32") -> LossFn:
    """Mean next-token cross-entropy of batch["tokens"] [B, T+1], computed in `compute_dtype`.

    The weights are merge(trainable, frozen); batch["adapter"] [B], if present, picks each row's
    LoRA adapter (-1: none). Metrics: next-token accuracy.
    """
    model, dt = Transformer(cfg.replace(dtype=compute_dtype)), jnp.dtype(compute_dtype)

    def loss_fn(trainable, frozen, batch, rng):
        del rng  # the model has no dropout
        variables = jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                 merge(trainable, frozen))
        tokens = batch["tokens"]
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1] - 1), (tokens.shape[0], tokens.shape[1] - 1))
        logits, _ = model.apply(variables, tokens[:, :-1], positions, adapter=batch.get("adapter"))
        nll, correct = token_nll(logits, tokens[:, 1:])
        return nll.mean(), {"accuracy": correct.mean()}

    return loss_fn


def optimizer(cfg: OptimizerConfig, steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (decaying matrices only) after global-norm clipping, on warmup + cosine; and the schedule."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, steps, cfg.lr * cfg.final_lr_fraction)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     optax.adamw(schedule, cfg.b1, cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask))
    return tx, schedule


@contextlib.contextmanager
def stop_requests() -> Iterator[list[int]]:
    """A list that receives the signal number on SIGINT or SIGTERM, instead of the process dying at once."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {s: signal.signal(s, lambda signum, _: received.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def fit(cfg: TrainConfig, loss_fn: LossFn, trainable: Any, frozen: Any, batch_at: Callable[[int], Batch],
        valid: Sequence[Batch], until: int | None = None, progress: bool = True) -> FitResult:
    """Train to cfg.steps (or stop after step `until`), resuming from the newest checkpoint in cfg.out.

    Writes cfg.out/train_config.json (a resumed run must match it), checkpoints, and
    metrics.jsonl (per step: loss, metrics, lr, grad_norm; per validation: valid_loss, valid_*).
    SIGINT/SIGTERM checkpoint the current step and return early. `frozen` is not checkpointed:
    the caller rebuilds it. Returns the trainable weights as numpy arrays, the step, and a summary.
    """
    out, ckpt_dir = Path(cfg.out), Path(cfg.out) / "checkpoints"
    _claim_folder(out, cfg)
    remove_partial(ckpt_dir)
    devices = jax.devices()
    if cfg.batch_size % len(devices):
        raise ConfigError(f"batch_size ({cfg.batch_size}) must be a multiple of the device count ({len(devices)})")
    mesh = Mesh(np.asarray(devices), ("data",))
    replicated, sharded = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
    tx, schedule = optimizer(cfg.optimizer, cfg.steps)
    state = (trainable, tx.init(trainable))
    start = 0
    if found := checkpoints(ckpt_dir):
        start, path = found[-1]
        state = restore_checkpoint(path, jax.device_get(state))
    trainable, opt_state = jax.device_put(state, replicated)
    frozen = jax.device_put(frozen, replicated)
    key = jax.random.PRNGKey(cfg.seed)

    def train_step(trainable, opt_state, frozen, batch, step):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, frozen, batch, jax.random.fold_in(key, step))
        updates, opt_state = tx.update(grads, opt_state, trainable)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        return optax.apply_updates(trainable, updates), opt_state, {"loss": loss, **metrics, "grad_norm": grad_norm}

    train_step = jax.jit(train_step, donate_argnums=(0, 1), out_shardings=replicated)
    evaluate = jax.jit(lambda t, f, b: loss_fn(t, f, b, key))
    valid = [jax.device_put(b, sharded) for b in valid]
    log = _MetricsLog(out / "metrics.jsonl", start)
    end = min(cfg.steps, until or cfg.steps)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    bar = tqdm(total=cfg.steps * tokens_per_step, initial=start * tokens_per_step, unit="tok", unit_scale=True,
               dynamic_ncols=True, disable=not progress, file=sys.stderr)
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    step, timed_from, last_valid = start, None, None
    with stop_requests() as stop, bar:
        while step < end and not stop:
            batch = jax.device_put(batch_at(step), sharded)
            trainable, opt_state, metrics = train_step(trainable, opt_state, frozen, batch, np.int32(step))
            pending.append((step + 1, metrics))
            step += 1
            bar.update(tokens_per_step)
            if timed_from is None:  # the first step compiles: time from its end
                jax.block_until_ready(metrics)
                timed_from = (step, time.perf_counter())
            if step % LOG_EVERY == 0 or step == end or _due(step, cfg.eval_every, cfg.steps):
                last = log.steps(jax.device_get(pending), schedule)
                pending.clear()
                bar.set_postfix(step=step, loss=f"{last['loss']:.4f}", refresh=False)
            if _due(step, cfg.eval_every, cfg.steps):
                last_valid = _validate(evaluate, trainable, frozen, valid)
                log.write({"step": step, **last_valid})
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_valid.items()), file=sys.stderr)
            if _due(step, cfg.checkpoint_every, cfg.steps) or step == end:
                save_checkpoint(ckpt_dir, step, (trainable, opt_state), cfg.keep_checkpoints)
        if pending:
            log.steps(jax.device_get(pending), schedule)
        if stop:
            save_checkpoint(ckpt_dir, step, (trainable, opt_state), cfg.keep_checkpoints)
    seconds = time.perf_counter() - timed_from[1] if timed_from else 0.0
    timed_steps = step - timed_from[0] if timed_from else 0
    summary = {"step": step, "steps": cfg.steps, "loss": log.last_loss, **(last_valid or {}),
               "stopped_by": signal.Signals(stop[0]).name if stop else None,
               "params": sum(int(np.size(x)) for x in jax.tree.leaves(trainable)), "devices": len(devices),
               "step_s": seconds / timed_steps if timed_steps else None,
               "tokens_per_s": timed_steps * tokens_per_step / seconds if timed_steps else None}
    return FitResult(jax.device_get(trainable), step, summary)


def _due(step: int, every: int, steps: int) -> bool:
    return step == steps or bool(every) and step % every == 0


def _validate(evaluate, trainable, frozen, valid) -> dict[str, float]:
    """Mean validation loss and metrics, keyed valid_<name>."""
    results = jax.device_get([evaluate(trainable, frozen, b) for b in valid])
    means = {"loss": np.mean([loss for loss, _ in results])}
    means |= {k: np.mean([m[k] for _, m in results]) for k in results[0][1]}
    return {f"valid_{k}": float(v) for k, v in means.items()}


def _claim_folder(out: Path, cfg: TrainConfig) -> None:
    """Record cfg in out/train_config.json, or check that a run already there used the same recipe."""
    out.mkdir(parents=True, exist_ok=True)
    record, mine = out / "train_config.json", {k: v for k, v in cfg.to_dict().items() if k not in FREE_ON_RESUME}
    if record.is_file():
        theirs = {k: v for k, v in json.loads(record.read_text()).items() if k not in FREE_ON_RESUME}
        if theirs != mine:
            changed = sorted(_differences(theirs, mine))
            raise ConfigError(f"{out} holds a run of a different recipe (changed: {', '.join(changed)}); "
                              "use another out folder or delete this one")
    else:
        record.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")


def _differences(a: dict, b: dict, prefix: str = "") -> Iterator[str]:
    for k in a.keys() | b.keys():
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            yield from _differences(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            yield prefix + k


class _MetricsLog:
    """metrics.jsonl, cut back to the records up to the step a run resumes from."""

    def __init__(self, path: Path, start: int):
        self.path, self.last_loss = path, None
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= start] \
            if path.is_file() else []
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def steps(self, pending: list[tuple[int, dict[str, np.ndarray]]], schedule: optax.Schedule) -> dict[str, float]:
        """Append one record per step; return the last."""
        for step, metrics in pending:
            record = {"step": step, **{k: float(v) for k, v in metrics.items()}, "lr": float(schedule(step - 1))}
            self.write(record)
        self.last_loss = record["loss"]
        return record


def initial_weights(init: str, template: dict, tokenizer: Tokenizer, probe: str) -> dict:
    """`template` (fresh variables of the recipe's model) with "params" replaced by the model `init`'s.

    Every parameter must be there with the template's shape (other collections, e.g. LoRA adapters, stay
    fresh), and `init`'s tokenizer must encode `probe` as the recipe's does; else a ConfigError naming it.
    """
    try:
        loaded = load_model(init, dtype="float32", softmax="dense", ffn="dense")
    except CheckpointError as e:
        raise ConfigError(f"init: {e}") from None
    mine, theirs = flatten(template["params"]), flatten(loaded.variables["params"])
    for key in sorted(mine.keys() | theirs.keys()):
        if key not in theirs:
            raise ConfigError(f"init: {init} has no params/{key}, which the [model] table needs")
        if key not in mine:
            raise ConfigError(f"init: {init} has params/{key}, which the [model] table does not make")
        if np.shape(theirs[key]) != np.shape(mine[key]):
            raise ConfigError(f"init: {init}'s params/{key} has shape {tuple(np.shape(theirs[key]))}, "
                              f"the [model] table gives {tuple(np.shape(mine[key]))}")
    if loaded.tokenizer.encode(probe) != tokenizer.encode(probe):
        raise ConfigError(f"init: {init}'s tokenizer is not the recipe's [tokenizer]: they encode the training text "
                          "differently")
    return {**template, "params": unflatten({k: np.asarray(v) for k, v in theirs.items()})}


def train(cfg: TrainConfig, until: int | None = None, progress: bool = True) -> dict[str, Any]:
    """The language-model recipe: corpus, tokenizer, model (from scratch or cfg.init), fit, and the final model.

    The finished model is saved with its tokenizer to cfg.out/model (hire's format). With cfg.tandem the
    model is a tandem small model beside a frozen large one (hire.train_tandem). Returns fit's summary.
    """
    try:
        split = split_corpus(cfg.data, cfg.seed)
        tokenizer = load_or_train(cfg.tokenizer, (d.text for d in split.train))
        batches = Batches(encode_documents(split.train, tokenizer), cfg.batch_size, cfg.seq_len, cfg.seed)
        valid = eval_batches(encode_documents(split.valid, tokenizer), cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data: {e}") from None
    model_cfg = cfg.model.replace(vocab_size=tokenizer.vocab_size)
    if cfg.tandem is None:
        loss_fn = lm_loss(model_cfg, resolve_compute_dtype(cfg.compute_dtype))
        trainable, frozen = init_params(model_cfg, cfg.seed), {}
        if cfg.init:
            trainable = initial_weights(cfg.init, trainable, tokenizer, split.train[0].text[:4000])
        save = lambda weights: save_native(Path(cfg.out) / "model", model_cfg, weights, tokenizer)  # noqa: E731
    else:
        loss_fn, trainable, frozen, save = tandem_recipe(cfg, model_cfg, tokenizer)
    result = fit(cfg, loss_fn, trainable, frozen, batches, valid, until, progress)
    if result.step == cfg.steps:
        save(result.trainable)
    return {**result.summary, "train_tokens": len(batches.tokens),
            "epochs": result.step * cfg.batch_size * cfg.seq_len / len(batches.tokens)}


def train_recipe(path: str | Path, out: str | None = None, until: int | None = None, init: str | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """`hire train`: `train` the recipe in the file at `path` (hire.train_config.load_config), with `out` and `init`
    in place of its own where given."""
    cfg = load_config(path)
    if out:
        cfg = dataclasses.replace(cfg, out=out)
    if init:
        try:
            cfg = dataclasses.replace(cfg, init=init)
        except ValueError as e:
            raise OptionError(str(e), "--init") from None
    return train(cfg, until=until, progress=progress)
