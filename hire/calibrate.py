"""Build HiRE predictors for a model from calibration text and measure their recall (hire.predictor_files saves
them beside the checkpoint and loads them), and the serving setting an evaluation recommends.

The softmax predictor approximates the output embedding ([dim, vocab]); each FFN's predictor approximates
its gate and up kernels side by side ([dim, 2 * ffn_dim], up alone when not gated). Low-rank predictors
are fitted to the second moment of the hidden states that layer reads (hire.predictors.low_rank).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from hire import predictors
from hire.config import ModelConfig, OptionError
from hire.formats import expected_variables
from hire.loaded import LoadedModel
from hire.predictor_files import save_predictors, softmax_kernel, sparsify
from hire.recall import layer_inputs, recall_of, scores_on, windows


def ffn_kernel(ffn: dict) -> jax.Array:
    """The kernels a dense FFN's predictor approximates, [dim, (parts - 1) * ffn_dim]: gate then up (up alone
    when not gated), as hire.sparse orders its pre-activations."""
    return jnp.concatenate([ffn["gate"]["kernel"], ffn["up"]["kernel"]] if "gate" in ffn else [ffn["up"]["kernel"]],
                           axis=1)


def build_predictors(model: LoadedModel, kinds: Iterable[str], rank: int,
                     second_moments: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Predictors of every kind in `kinds` for the softmax and each FFN of a dense model, keyed as in the file.

    `second_moments` ("softmax", "layers_i" -> [dim, dim]) weights the low-rank fits; plain SVD without.
    """
    cfg, params = model.cfg, model.variables["params"]
    kernels = {"softmax": softmax_kernel(cfg, params)}
    kernels |= {f"layers_{i}/ffn/predictor": ffn_kernel(params[f"layers_{i}"]["ffn"]) for i in range(cfg.n_layers)}
    out = {}
    for path, kernel in kernels.items():
        kernel = np.asarray(kernel, np.float32)
        for kind in kinds:
            moment = None if second_moments is None else second_moments[path.split("/")[0]]
            built = predictors.low_rank(kernel, rank, moment) if kind == "lr" else predictors.quantize(kernel, kind)
            out |= {f"{kind}/{path}/{name}": value for name, value in built.items()}
    return out


def random_predictors(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random predictors of the kinds `cfg` uses (for timing models with random weights), keyed as in the file."""
    rng, out = np.random.default_rng(seed), {}
    for key, shape in expected_variables(cfg).items():
        collection, path = key.split("/", 1)
        if collection != "hire":
            continue
        kind = cfg.predictor_kind("softmax" if path.startswith("softmax") else "ffn")
        if shape.dtype in (jnp.int8, jnp.uint8):
            info = np.iinfo(shape.dtype)
            value = rng.integers(info.min, info.max, shape.shape, endpoint=True, dtype=shape.dtype)
        elif path.endswith("scale"):
            value = rng.uniform(0.5, 1.0, shape.shape).astype(np.float32)
        else:
            value = rng.standard_normal(shape.shape, np.float32) / math.sqrt(shape.shape[0])
        out[f"{kind}/{path}"] = value
    return out


def calibrate(model: LoadedModel, tokens: np.ndarray, context: int, rank: int, quants: Iterable[str],
              batch_size: int = 8, holdout: float = 0.125, settings: dict[str, Any] | None = None,
              oversamples: Iterable[int] = (1, 2, 4, 8, 16), progress: bool = True
              ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Fit low-rank (none with `rank` 0) and `quants` predictors for a dense `model` on `tokens`, in windows of
    `context`.

    The last `holdout` share of the windows (at least one, at most `batch_size`) is kept out of the fit;
    recall is measured on it for each kind at the HiRE settings `settings` (ModelConfig fields, defaults
    otherwise), with both oversampling factors set to each of `oversamples`. Returns the predictors and
    their description.
    """
    cfg = model.cfg
    inputs, _, mask = windows(np.asarray(tokens, np.int32), context)
    held = max(1, min(round(len(inputs) * holdout), batch_size))
    if len(inputs) <= held:
        raise ValueError(f"need at least {held + 1} windows of {context} tokens, got {len(inputs)}")
    capture = jax.jit(lambda v, x: layer_inputs(cfg, v, x)[1])
    names = ["softmax", *(f"layers_{i}" for i in range(cfg.n_layers))]
    moments = {name: np.zeros((cfg.dim, cfg.dim)) for name in names}
    fit = len(inputs) - held
    for i in tqdm(range(0, fit, batch_size), desc="calibrate", unit="batch", disable=not progress):
        end = min(i + batch_size, fit)
        softmax_x, ffn_x = capture(model.variables, jnp.asarray(inputs[i:end]))
        m = jnp.asarray(mask[i:end].reshape(-1, 1), jnp.float32)
        for name, x in zip(moments, [softmax_x, *ffn_x]):
            x = x.reshape(-1, cfg.dim).astype(jnp.float32) * m
            moments[name] += np.asarray(x.T @ x, np.float64)
    count = int(mask[:fit].sum())
    kinds = ["lr", *quants] if rank else list(quants)
    found = build_predictors(model, kinds, rank, {k: v / count for k, v in moments.items()})
    held_x = capture(model.variables, jnp.asarray(inputs[fit:]))
    held_mask = jnp.asarray(mask[fit:].reshape(-1), jnp.float32)
    measured: dict[str, list[dict[str, Any]]] = {}
    for kind in kinds:
        modes = {"softmax": "hire-lr" if kind == "lr" else "hire-q", "ffn": "group-sparse",
                 "ffn_predictor": "lr" if kind == "lr" else "q", "hire_quant": "int8" if kind == "lr" else kind}
        hired = sparsify(model, cfg.replace(**{**(settings or {}), **modes}), found)
        scores = scores_on(hired.cfg, hired.variables, *held_x)
        for oversample in oversamples:
            target = hired.cfg.replace(softmax_oversample=oversample, ffn_oversample=oversample)
            result = recall_of(target, scores)
            measured.setdefault(kind, []).append({
                **_settings(target),
                **{name: round(float(jnp.sum(v * held_mask) / jnp.sum(held_mask)), 5) for name, v in result.items()}})
    meta = {"rank": rank, "kinds": kinds, "context": context, "fit_tokens": count,
            "held_out_tokens": int(mask[fit:].sum()), "recall": measured}
    return found, meta


def calibrate_text(model: str, text_file: str | Path, rank: int = 64, quants: Iterable[str] = ("int8",),
                   context: int | None = None, batch_size: int = 8, max_tokens: int | None = None,
                   out: str | Path | None = None, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """`hire calibrate`: `calibrate` the exact `model` (a name or path; its float weights, which the predictors fit
    whether they are kept quantized or not) on the UTF-8 text in `text_file` (its first `max_tokens`), in windows of
    `context` (default and at most the model's), and save the predictors into `out` (default: the model's folder).
    Returns what was written into hire_predictors.json."""
    from hire.checkpoint import exact, load, model_folder

    loaded = load(model, None, exact(model), "none")
    settings = settings or {}
    try:
        loaded.cfg.replace(**settings)
    except ValueError as e:
        raise OptionError(str(e), "--hire") from None
    tokens = loaded.tokenizer.encode(Path(text_file).read_text(encoding="utf-8"))[:max_tokens]
    context = min(context or loaded.cfg.max_seq_len, loaded.cfg.max_seq_len)
    try:
        found, meta = calibrate(loaded, tokens, context, rank, quants, batch_size, settings=settings)
    except ValueError as e:
        raise OptionError(str(e), "--text") from None
    folder = Path(out) if out else model_folder(model)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"model": loaded.cfg.name, "text": str(text_file), **meta}
    save_predictors(folder, found, meta)
    return meta


def _settings(cfg: ModelConfig) -> dict[str, Any]:
    """The HiRE settings a recall was measured at."""
    return {"softmax_k": cfg.softmax_k, "softmax_candidates": cfg.softmax_candidates, "ffn_group": cfg.ffn_group,
            "ffn_k": cfg.ffn_k, "ffn_candidates": cfg.ffn_candidates}
