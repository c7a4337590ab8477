"""Windowing for the group-sparse FFN (as in "LLM in a flash"): keep the groups the last W tokens used, and
load for a new token only the groups it needs that are not held already.

A token's groups are a boolean mask over the G groups of a layer; masks come as [..., T, G], T tokens of one
sequence in order. For token t and a window of W tokens:

- the window's groups A_t: the union of the masks of tokens t-W .. t-1 (fewer at the start of a sequence, none
  at W = 0);
- `reuse`: the share of t's groups already in A_t; `loads`: how many of t's groups are not (what a window cache
  reads for t); `held`: the size of mask_t | A_t (what the cache holds while t is computed).

For HiRE, with the exact top-k groups E_t (by sum |h|, as hire.sparse ranks them) and a predictor's top-k'
candidates C_t: `recall` is |E_t & C_t| / k; the window offers candidates for free, so also the recall of
C_t | A_t for two windows, the previous tokens' used groups (A of E: what a keep-k model computed for them when
recall was 1) and the previous tokens' candidates (A of C: the window cache of what was loaded), with `extra`,
how many groups each union adds to C_t.

`measure` runs a model over text, on the hidden states and predictors hire.calibrate collects and builds, and
reports these figures per layer and over all layers (`hire bench window`, docs/hire.md).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from hire.config import OptionError
from hire.evaluate import windows as text_windows
from hire.formats import CheckpointError
from hire.loaded import LoadedModel
from hire.predictor_files import sparsify
from hire.predictors import QUANTS
from hire.recall import layer_inputs, scores_on

KINDS = ("lr", *QUANTS)
# The order figures are reported in.
ORDER = ("reuse", "recall", "recall_used", "extra_used", "recall_cache", "extra_cache", "loads", "held")


def window_union(masks: jax.Array, window: int) -> jax.Array:
    """[..., T, G] bool -> [..., T, G]: for each token, the groups in the masks of the `window` tokens before it
    (a difference of running counts, so every window length costs the same)."""
    if window == 0:
        return jnp.zeros(masks.shape, bool)
    t = masks.shape[-2]
    counts = jnp.cumsum(masks, axis=-2, dtype=jnp.int32)
    counts = jnp.concatenate([jnp.zeros((*masks.shape[:-2], window + 1, masks.shape[-1]), jnp.int32), counts], -2)
    # Padded, counts[i] counts tokens 0 .. i - window - 1: entry t + window minus entry t is tokens t - window .. t - 1.
    return counts[..., window:window + t, :] > counts[..., :t, :]


def top_mask(scores: jax.Array, k: int) -> jax.Array:
    """[..., G] -> bool [..., G]: the k largest scores of each row (lax.top_k's choice among ties)."""
    flat = scores.reshape(-1, scores.shape[-1])
    idx = jax.lax.top_k(flat, k)[1]
    mask = jnp.zeros(flat.shape, bool).at[jnp.arange(flat.shape[0])[:, None], idx].set(True)
    return mask.reshape(scores.shape)


def reuse_figures(need: jax.Array, window: int) -> dict[str, jax.Array]:
    """Per token [..., T]: `reuse`, `loads` and `held` (module docstring) of the groups `need` [..., T, G]."""
    before = window_union(need, window)
    count = need.sum(-1)
    found = (need & before).sum(-1)
    return {"reuse": found / jnp.maximum(count, 1), "loads": count - found, "held": (need | before).sum(-1)}


def recall_figures(exact: jax.Array, candidates: jax.Array, window: int) -> dict[str, jax.Array]:
    """Per token [..., T]: `recall` of the groups `exact` [..., T, G] among `candidates` [..., T, G], alone and
    unioned with the window of the used groups (`recall_used`, `extra_used`) or of the candidates
    (`recall_cache`, `extra_cache`), and the candidates' `loads` and `held` with a window cache."""
    k = jnp.maximum(exact.sum(-1), 1)
    out = {"recall": (exact & candidates).sum(-1) / k}
    for name, source in (("used", exact), ("cache", candidates)):
        offered = window_union(source, window) & ~candidates
        out[f"recall_{name}"] = (exact & (candidates | offered)).sum(-1) / k
        out[f"extra_{name}"] = offered.sum(-1)
    figures = reuse_figures(candidates, window)
    return out | {"loads": figures["loads"], "held": figures["held"]}


def figures(exact_scores: jax.Array, approx: dict[str, jax.Array], k: int, candidates: dict[str, tuple[str, int]],
            windows: Sequence[int], valid: jax.Array) -> dict[int, dict[str, dict[str, jax.Array]]]:
    """Sums over the valid tokens, per layer [L], of every figure for each window: "exact" (`reuse_figures` of the
    exact top-k groups) and each candidate set NAME (`recall_figures` of the top `count` of approx[kind] when
    candidates[NAME] is (kind, count)).

    Scores are [L, B, T, G] (layers, sequences, tokens); `valid` [B, T] weighs each token 1 or 0.
    """
    exact = top_mask(exact_scores, k)
    chosen = {name: top_mask(approx[kind], count) for name, (kind, count) in candidates.items()}
    total = lambda per_token: (per_token * valid).sum((1, 2))  # noqa: E731
    out = {}
    for w in windows:
        out[w] = {"exact": {key: total(v) for key, v in reuse_figures(exact, w).items()}}
        for name, mask in chosen.items():
            out[w][name] = {key: total(v) for key, v in recall_figures(exact, mask, w).items()}
    return out


def ffn_kinds(found: dict[str, np.ndarray]) -> list[str]:
    """The predictor kinds `found` (keyed as hire.calibrate saves them) holds for layer 0's FFN, in KINDS order."""
    paths = {key.rsplit("/", 1)[0] for key in found}
    return [kind for kind in KINDS if f"{kind}/layers_0/ffn/predictor" in paths]


def measure(model: LoadedModel, found: dict[str, np.ndarray], tokens: np.ndarray, context: int,
            windows: Iterable[int], kinds: Iterable[str], oversamples: Iterable[int],
            settings: dict[str, Any] | None = None, batch_size: int = 8, progress: bool = True) -> list[dict[str, Any]]:
    """The window figures of `model` (run exactly: dense, or its trained group-topk mask) over `tokens` cut into
    sequences of `context` tokens: one dict per window length in `windows`.

    The FFN groups are ModelConfig's ffn_group and ffn_k (`settings` override them); the candidates are the top
    ffn_k x oversample groups by each predictor kind in `kinds` (from `found`, as hire.calibrate saves them).
    """
    windows, oversamples = tuple(dict.fromkeys(windows)), tuple(dict.fromkeys(oversamples))
    if len(tokens) < 2:
        raise ValueError("need at least two tokens")
    base = model.cfg.replace(**(settings or {}), softmax="dense", ffn="group-sparse")
    hired = {kind: sparsify(model, base.replace(ffn_predictor="lr" if kind == "lr" else "q",
                                                hire_quant="int8" if kind == "lr" else kind), found)
             for kind in kinds}
    if not hired:
        raise ValueError("need at least one predictor kind")
    cfg = next(iter(hired.values())).cfg
    k, groups = cfg.ffn_k, cfg.ffn_groups
    candidates = {f"{kind}x{o}": (kind, min(groups, k * o)) for kind in hired for o in oversamples}

    @jax.jit
    def batch(variables: dict, inputs: jax.Array, valid: jax.Array) -> dict:
        ffn_x = layer_inputs(model.cfg, variables["model"], inputs)[1][1]
        exact, approx = None, {}
        for kind, h in hired.items():
            pairs = scores_on(h.cfg, variables[kind], None, ffn_x)["ffn"]
            exact = jnp.stack([e for e, _ in pairs]).reshape(cfg.n_layers, *inputs.shape, groups)  # any kind's
            approx[kind] = jnp.stack([a for _, a in pairs]).reshape(exact.shape)
        return figures(exact, approx, k, candidates, windows, valid.astype(jnp.float32))

    inputs, _, valid = text_windows(np.asarray(tokens, np.int32), context)
    fill = -len(inputs) % batch_size
    inputs, valid = (np.concatenate([a, np.zeros((fill, context), a.dtype)]) for a in (inputs, valid))
    variables = {"model": model.variables} | {kind: h.variables for kind, h in hired.items()}
    sums = None
    for i in tqdm(range(0, len(inputs), batch_size), desc="window", unit="batch", disable=not progress):
        part = batch(variables, jnp.asarray(inputs[i:i + batch_size]), jnp.asarray(valid[i:i + batch_size]))
        out = jax.tree.map(lambda v: np.asarray(v, np.float64), part)
        sums = out if sums is None else jax.tree.map(np.add, sums, out)
    count = float(valid.sum())
    bundle = hired[next(iter(hired))].variables["params"]["layers_0"]["ffn"]["bundle"]
    group_bytes = int(np.prod(bundle.shape[1:])) * bundle.dtype.itemsize
    head = {"tokens": int(count), "context": context, "layers": cfg.n_layers, "ffn_group": cfg.ffn_group,
            "groups": groups, "k": k, "group_bytes": group_bytes}
    return [{"window": w, **head, **{name: _summary(part, count, group_bytes, candidates.get(name, ("", k))[1])
                                     for name, part in sums[w].items()}} for w in windows]


def measure_text(model: str, text_file: str | Path, windows: Iterable[int], predictor_dir: str | Path | None = None,
                 kinds: Iterable[str] = (), oversamples: Iterable[int] = (1, 2), context: int | None = None,
                 batch_size: int = 8, max_tokens: int | None = None, settings: dict[str, Any] | None = None
                 ) -> list[dict[str, Any]]:
    """`hire bench window`: `measure` the exact `model` (a name or path) over the UTF-8 text in `text_file` (its
    first `max_tokens`) with the predictors in `predictor_dir` (default: the model's folder), of `kinds` (default:
    every kind there); `settings` may set ffn_group and ffn_k. One result per window, naming the model and text."""
    from hire.checkpoint import exact, load, model_folder
    from hire.predictor_files import load_predictors

    loaded = load(model, None, exact(model), "none")  # predictors fit the float weights (kept quantized or not)
    if bad := set(settings or {}) - {"ffn_group", "ffn_k"}:
        raise OptionError(f"only ffn_group and ffn_k apply here, got {', '.join(sorted(bad))}", "--hire")
    found = load_predictors(predictor_dir or model_folder(model))
    tokens = loaded.tokenizer.encode(Path(text_file).read_text(encoding="utf-8"))[:max_tokens]
    context = min(context or loaded.cfg.max_seq_len, loaded.cfg.max_seq_len)
    try:
        results = measure(loaded, found, tokens, context, windows, kinds or ffn_kinds(found), oversamples, settings,
                          batch_size)
    except CheckpointError:
        raise
    except ValueError as e:
        raise OptionError(str(e), "--text/--hire/--kind") from None
    return [{"model": loaded.cfg.name, "text": str(text_file), **result} for result in results]


def _summary(sums: dict[str, np.ndarray], count: float, group_bytes: int, size: int) -> dict[str, Any]:
    """Per-layer means of per-layer token sums; overall: the mean over layers, and bytes per token over all layers
    (loads_bytes: read, held_bytes: held, no_window_bytes: what reading all `size` groups per token costs)."""
    layers = {key: np.round(sums[key] / count, 5) for key in ORDER if key in sums}
    out: dict[str, Any] = {"groups_per_token": size}
    out |= {key: round(float(v.mean()), 5) for key, v in layers.items()}
    n = len(sums["loads"])
    out |= {"loads_bytes": round(out["loads"] * n * group_bytes), "held_bytes": round(out["held"] * n * group_bytes),
            "no_window_bytes": size * n * group_bytes}
    return out | {"per_layer": {key: v.tolist() for key, v in layers.items()}}
