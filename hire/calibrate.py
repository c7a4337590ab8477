"""Build HiRE predictors for a model from calibration text, measure their recall, save and load them.

A model folder's predictors live beside its checkpoint in `hire_predictors.safetensors` (arrays named
"KIND/PATH/NAME": KIND "lr", "int8" or "int4", PATH/NAME the variable's place in the model's "hire"
collection, e.g. "lr/softmax/a", "int4/layers_3/ffn/predictor/q") and `hire_predictors.json` (how they
were built and the recall measured on held-out text; and "serving", the HiRE setting the model is served with
by default once an evaluation showed it keeps quality: `recommend_serving`). `sparsify` turns a dense
LoadedModel into one whose config asks for HiRE: the FFN kernels bundled per neuron group, the chosen
predictors in "hire".

The softmax predictor approximates the output embedding ([dim, vocab]); each FFN's predictor approximates
its gate and up kernels side by side ([dim, 2 * ffn_dim], up alone when not gated). Low-rank predictors
are fitted to the second moment of the hidden states that layer reads (hire.predictors.low_rank).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from tqdm import tqdm

from hire import predictors, quant, sparse
from hire.checkpoint import LoadedModel, resolve_model
from hire.config import HIRE_FIELDS, ModelConfig
from hire.evaluate import windows
from hire.formats import CheckpointError, expected_variables, prepare_variables, read_json, unflatten
from hire.model import RMSNorm, Transformer, activation

PREDICTORS = "hire_predictors.safetensors"
META = "hire_predictors.json"
# Issue 5's quality targets for HiRE, against the exact model: what makes a setting the serving default.
SERVING_TARGETS = {"perplexity_ratio": 1.01, "top1_agreement": 0.99, "recall": 0.99}


def softmax_kernel(cfg: ModelConfig, params: dict) -> jax.Array:
    """The output embedding as a kernel [dim, vocab] (float32 when hire.quant keeps it quantized, by row)."""
    weight = params["embed"] if cfg.tie_embeddings else params["lm_head"]
    if quant.is_quantized(weight):
        return quant.dequantize_rows(weight).T
    return weight.T if cfg.tie_embeddings else weight


def ffn_kernel(ffn: dict) -> jax.Array:
    """The kernels a dense FFN's predictor approximates, [dim, (parts - 1) * ffn_dim]: gate then up (up alone
    when not gated), as hire.sparse orders its pre-activations."""
    return jnp.concatenate([ffn["gate"]["kernel"], ffn["up"]["kernel"]] if "gate" in ffn else [ffn["up"]["kernel"]],
                           axis=1)


def layer_inputs(cfg: ModelConfig, variables: dict,
                 tokens: jax.Array) -> tuple[jax.Array, tuple[jax.Array, list[jax.Array]]]:
    """Logits [B, T, V], and the hidden states [B, T, dim] the softmax (the final norm's output) and each FFN read."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    (logits, _), state = Transformer(cfg).apply(variables, tokens, positions, mutable=["intermediates"],
                                                capture_intermediates=lambda module, _: isinstance(module, RMSNorm))
    inter = state["intermediates"]
    ffn = [inter[f"layers_{i}"]["ffn_norm"]["__call__"][0] for i in range(cfg.n_layers)]
    return logits, (inter["norm"]["__call__"][0], ffn)


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


def sparsify(model: LoadedModel, cfg: ModelConfig, found: dict[str, Any]) -> LoadedModel:
    """`model` (dense) running as `cfg` asks: FFNs bundled, predictors of the kinds it names taken from `found`.

    A low-rank predictor sets cfg.hire_rank to its own rank. Arrays not changed are shared, not copied.
    """
    params = dict(model.variables["params"])
    hire: dict[str, Any] = {}
    parts = [("softmax", "softmax")] if cfg.softmax != "dense" else []
    if cfg.ffn == "group-sparse":
        parts += [("ffn", f"layers_{i}/ffn/predictor") for i in range(cfg.n_layers)]
        for i in range(cfg.n_layers):
            ffn = params[f"layers_{i}"]["ffn"]
            gate = ffn["gate"]["kernel"] if "gate" in ffn else None
            bundle = sparse.bundle_ffn(ffn["up"]["kernel"], ffn["down"]["kernel"], gate, cfg.ffn_group)
            params[f"layers_{i}"] = {**params[f"layers_{i}"], "ffn": {"bundle": bundle}}
    for part, path in parts:
        kind = cfg.predictor_kind(part)
        arrays = {k.split("/")[-1]: v for k, v in found.items() if k.rsplit("/", 1)[0] == f"{kind}/{path}"}
        if not arrays:
            have = sorted({k.split("/")[0] for k in found if k.split("/", 1)[1].startswith(path + "/")})
            raise CheckpointError(f"no {kind} predictor for {path}; the predictors found are: "
                                  f"{', '.join(have) or 'none'} (`hire calibrate --model M --text FILE` builds them)")
        if kind == "lr":
            cfg = cfg.replace(hire_rank=arrays["a"].shape[1])
        hire |= {f"{path}/{name}": value for name, value in arrays.items()}
    variables = {**model.variables, "params": params}
    if hire:
        variables["hire"] = unflatten(hire)
    return LoadedModel(cfg, prepare_variables(cfg, variables), model.tokenizer)


def save_predictors(folder: str | Path, found: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write the predictors and their description (`calibrate`'s report) into `folder`."""
    folder = Path(folder)
    save_file({k: np.ascontiguousarray(v) for k, v in found.items()}, folder / PREDICTORS, metadata={"format": "hire"})
    (folder / META).write_text(json.dumps(meta, indent=2) + "\n")


def load_predictors(folder: str | Path) -> dict[str, np.ndarray]:
    """The predictors saved in `folder`, keyed as in the file."""
    folder = Path(folder)
    if not (folder / PREDICTORS).is_file():
        raise CheckpointError(f"no HiRE predictors in {folder} ({PREDICTORS}); build them with "
                              f"`hire calibrate --model {folder} --text FILE`")
    try:
        found = load_file(folder / PREDICTORS)
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot read {folder / PREDICTORS}: {e}") from None
    return found


def with_predictors(model: LoadedModel, folder: str | Path, cfg: ModelConfig) -> LoadedModel:
    """`model` (dense) as `cfg` asks, with the predictors saved in `folder`.

    A quantized softmax predictor (an int8 or int4 copy of the output embedding: no calibration text needed) that
    the folder lacks is built here and cached in it, so a pulled model runs with `--softmax hire-q` at once.
    """
    folder = Path(folder)
    found = load_predictors(folder) if (folder / PREDICTORS).is_file() else {}
    kind = cfg.predictor_kind("softmax")
    if cfg.softmax != "dense" and kind != "lr" and not any(k.startswith(f"{kind}/softmax/") for k in found):
        built = predictors.quantize(np.asarray(softmax_kernel(cfg, model.variables["params"]), np.float32), kind)
        found |= {f"{kind}/softmax/{name}": value for name, value in built.items()}
        _cache_predictors(folder, found)
    if not found:
        load_predictors(folder)  # raises, naming the command that builds them
    return sparsify(model, cfg, found)


def _cache_predictors(folder: Path, found: dict[str, np.ndarray]) -> None:
    """Save `found` into `folder` (written aside, then renamed); a folder that cannot be written is left as is."""
    tmp = folder / f".{PREDICTORS}.tmp"
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in found.items()}, tmp, metadata={"format": "hire"})
        tmp.replace(folder / PREDICTORS)
        if not (folder / META).is_file():
            (folder / META).write_text(json.dumps({"built": "at load time: quantized softmax predictor"}) + "\n")
    except OSError:
        tmp.unlink(missing_ok=True)


def model_folder(name_or_path: str | Path) -> Path:
    """The folder a model (a name under models/ or a path) keeps its config and predictors in."""
    path = resolve_model(name_or_path)
    return path if path.is_dir() else path.parent


def exact_settings(folder: str | Path) -> dict[str, str]:
    """The overrides that run the model in `folder` exactly, with no predictor: the dense softmax, and the FFN it
    was trained with (the exact group-topk mask for a model fine-tuned group-sparse, docs/hire.md; else dense)."""
    config = Path(folder) / "config.json"
    trained = read_json(config).get("ffn") if config.is_file() else None
    return {"softmax": "dense", "ffn": "group-topk" if trained == "group-topk" else "dense"}


def quality_misses(result: dict[str, Any]) -> list[str]:
    """The quality targets (SERVING_TARGETS) a `hire eval` result with HiRE misses, each as a short sentence."""
    misses = []
    if "dense_perplexity" not in result:
        return ["no HiRE part is on (no --softmax hire-lr/hire-q, no --ffn group-sparse)"]
    if result["perplexity"] > result["dense_perplexity"] * SERVING_TARGETS["perplexity_ratio"]:
        misses.append(f"perplexity {result['perplexity']:.4f} is above {SERVING_TARGETS['perplexity_ratio']} x the "
                      f"exact model's {result['dense_perplexity']:.4f}")
    for key, target in (("top1_agreement", SERVING_TARGETS["top1_agreement"]),
                        ("softmax_recall", SERVING_TARGETS["recall"]), ("ffn_recall", SERVING_TARGETS["recall"])):
        if key in result and result[key] < target:
            misses.append(f"{key} {result[key]:.4f} is below {target}")
    return misses


def recommend_serving(folder: str | Path, cfg: ModelConfig, result: dict[str, Any]) -> list[str]:
    """Make `cfg`'s HiRE settings the serving default of the model in `folder` if `result` (its `hire eval` with
    them) meets every quality target: written into hire_predictors.json as "serving", with the evidence.
    Returns the targets missed (nothing is written then)."""
    if misses := quality_misses(result):
        return misses
    path = Path(folder) / META
    meta = read_json(path) if path.is_file() else {}
    meta["serving"] = {"settings": {f: getattr(cfg, f) for f in HIRE_FIELDS}, "targets": SERVING_TARGETS,
                       "eval": result}
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return []


def serving_settings(folder: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The HiRE overrides to serve the model in `folder` with: its recommended setting (`recommend_serving`), if it
    has one and its predictors are there, then `overrides` (the command line's) on top."""
    meta = Path(folder) / META
    recommended = read_json(meta).get("serving", {}).get("settings", {}) \
        if meta.is_file() and (Path(folder) / PREDICTORS).is_file() else {}
    return {**recommended, **(overrides or {})}


Scores = dict[str, list[tuple[jax.Array, jax.Array]]]


def scores_on(cfg: ModelConfig, variables: dict, softmax_x: jax.Array, ffn_x: list[jax.Array]) -> Scores:
    """Exact and predicted scores [N, rows] of a HiRE model on hidden states [..., dim] its softmax and FFNs
    read: "softmax" (logits), "ffn" (group scores sum |h|, one pair per layer)."""
    out: Scores = {}
    params, hire = variables["params"], variables.get("hire", {})
    if cfg.softmax != "dense":
        x = softmax_x.reshape(-1, cfg.dim)
        out["softmax"] = [(x @ softmax_kernel(cfg, params), predictors.scores(hire["softmax"], x))]
    if cfg.ffn == "group-sparse":
        act = lambda h: activation(cfg, h)  # noqa: E731
        out["ffn"] = []
        for i, x in enumerate(ffn_x):
            x = x.reshape(-1, cfg.dim)
            exact = jnp.abs(sparse.exact_activations(x, params[f"layers_{i}"]["ffn"]["bundle"], act)).sum(-1)
            approx = sparse.approx_group_scores(predictors.scores(hire[f"layers_{i}"]["ffn"]["predictor"], x), act,
                                                cfg.ffn_groups, cfg.ffn_group)
            out["ffn"].append((exact, approx))
    return out


def recall_of(cfg: ModelConfig, scores: Scores) -> dict[str, jax.Array]:
    """Per-token recall at `cfg`'s k and k' from `scores_on`'s scores.

    softmax_recall: share of the exact top softmax_k logits among the softmax_candidates predicted best;
    ffn_recall: share of the exact top ffn_k groups (by sum |h|) among the ffn_candidates predicted best,
    averaged over layers; ffn_mass: share of sum |h| that the predicted groups hold.
    """
    out = {}
    if "softmax" in scores:
        [(exact, approx)] = scores["softmax"]
        out["softmax_recall"] = sparse.candidate_recall(exact, approx, cfg.softmax_k, cfg.softmax_candidates)
    if "ffn" in scores:
        found, mass = [], []
        for exact, approx in scores["ffn"]:
            found.append(sparse.candidate_recall(exact, approx, cfg.ffn_k, cfg.ffn_candidates))
            chosen = jax.lax.top_k(approx, cfg.ffn_candidates)[1]
            mass.append(jnp.take_along_axis(exact, chosen, -1).sum(-1) / exact.sum(-1))
        out["ffn_recall"], out["ffn_mass"] = jnp.mean(jnp.stack(found), 0), jnp.mean(jnp.stack(mass), 0)
    return out


def recalls(cfg: ModelConfig, variables: dict, softmax_x: jax.Array, ffn_x: list[jax.Array]) -> dict[str, jax.Array]:
    """Per-token recall of a HiRE model's predictors on hidden states [..., dim] its softmax and FFNs read
    (`recall_of` says which)."""
    return recall_of(cfg, scores_on(cfg, variables, softmax_x, ffn_x))


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


def _settings(cfg: ModelConfig) -> dict[str, Any]:
    """The HiRE settings a recall was measured at."""
    return {"softmax_k": cfg.softmax_k, "softmax_candidates": cfg.softmax_candidates, "ffn_group": cfg.ffn_group,
            "ffn_k": cfg.ffn_k, "ffn_candidates": cfg.ffn_candidates}
