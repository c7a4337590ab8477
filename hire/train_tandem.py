"""The tandem recipe: a small model trained beside a frozen large one, with the block pattern of inference.

`hire train RECIPE` runs it when the recipe has a [tandem] table (hire.train_config.TandemRecipe). The
large model's hidden states are computed inside the loss from `frozen` (its weights, never optimized),
so the batch is just tokens; the small model sees them exactly as at inference for blocks of
`tandem.block` tokens: a token of block b attends to the large model's states before b's start and to
its own states from there (hire.tandem.block_mask).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

from hire.checkpoint import load_model
from hire.config import ModelConfig
from hire.evaluate import token_nll
from hire.formats import CheckpointError
from hire.model import Transformer
from hire.tandem import (
    TandemConfig,
    TandemModel,
    TandemTransformer,
    depth_matched_layers,
    init_tandem,
    large_hidden,
    save_tandem,
)
from hire.tokenizer import Tokenizer
from hire.train_config import ConfigError, LossFn, TrainConfig, resolve_compute_dtype

PROBE = "def tandem(x):\n    return {'block': x}  # probe\n"  # text both tokenizers must encode alike


def tandem_loss(cfg: ModelConfig, tandem: TandemConfig, large_cfg: ModelConfig, distill: float = 0.0,
                compute_dtype: str = "float32") -> LossFn:
    """Next-token cross-entropy of the small model over batch["tokens"] [B, T+1] given the large model's
    states (the large model's variables are `frozen`), blended with weight `distill` with the
    cross-entropy against the large model's softmax. Metrics: accuracy, and with distillation agreement
    (the share of positions where both models' argmax agree)."""
    dt = jnp.dtype(compute_dtype)
    small, large = TandemTransformer(cfg.replace(dtype=compute_dtype), tandem), Transformer(
        large_cfg.replace(dtype=compute_dtype))
    cast = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def loss_fn(trainable, frozen, batch, rng):
        del rng  # no dropout
        tokens = batch["tokens"]
        inputs = tokens[:, :-1]
        positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
        (large_logits, _), inter = large.apply(cast(frozen), inputs, positions, mutable=["intermediates"])
        logits = small.apply(cast(trainable), inputs, large_hidden(inter, tandem), method="forward")
        nll, correct = token_nll(logits, tokens[:, 1:])
        loss, metrics = nll.mean(), {"accuracy": correct.mean()}
        if distill:
            soft = -jnp.sum(jax.nn.softmax(large_logits) * jax.nn.log_softmax(logits), axis=-1).mean()
            loss = (1 - distill) * loss + distill * soft
            metrics["agreement"] = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(large_logits, -1))
        return loss, metrics

    return loss_fn


def tandem_recipe(cfg: TrainConfig, model_cfg: ModelConfig,
                  tokenizer: Tokenizer) -> tuple[LossFn, dict, dict, Callable[[dict], None]]:
    """The loss, the small model's initial weights, the frozen large model's weights, and the function
    that saves the trained small model to cfg.out/model."""
    recipe = cfg.tandem
    try:
        large = load_model(recipe.large)
    except CheckpointError as e:
        raise ConfigError(f"tandem.large: {e}") from None
    if large.cfg.vocab_size != tokenizer.vocab_size or large.tokenizer.encode(PROBE) != tokenizer.encode(PROBE):
        raise ConfigError(f"tandem.large: {recipe.large} does not use the recipe's tokenizer ({cfg.tokenizer.path})")
    if large.cfg.max_seq_len < cfg.seq_len:
        raise ConfigError(f"tandem.large: {recipe.large}'s context ({large.cfg.max_seq_len}) is below "
                          f"seq_len ({cfg.seq_len})")
    layers = recipe.large_layers or depth_matched_layers(model_cfg.n_layers, large.cfg.n_layers)
    if max(max(ls) for ls in layers) > large.cfg.n_layers:
        raise ConfigError(f"tandem.large_layers: {recipe.large} has hidden states 0..{large.cfg.n_layers}, "
                          f"got {layers}")
    tandem = TandemConfig(large.cfg.dim, layers, recipe.block, recipe.large)
    loss_fn = tandem_loss(model_cfg, tandem, large.cfg, recipe.distill, resolve_compute_dtype(cfg.compute_dtype))

    def save(weights: dict) -> None:
        save_tandem(Path(cfg.out) / "model", TandemModel(model_cfg, tandem, weights, tokenizer))

    return loss_fn, init_tandem(model_cfg, tandem, cfg.seed), large.variables, save
