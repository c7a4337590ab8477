"""HiRE predictors on disk and into a model: the files beside a checkpoint, and `sparsify`, which turns a dense
LoadedModel into one whose config asks for HiRE (the FFN kernels bundled per neuron group, the chosen predictors
in the "hire" collection). hire.checkpoint.load_model reads them here; hire.calibrate builds them. Also the HiRE
settings a folder asks for: the one it is served with (`serving_settings`), and none (`exact_settings`).

A model folder's predictors live beside its checkpoint in `hire_predictors.safetensors` (arrays named
"KIND/PATH/NAME": KIND "lr", "int8" or "int4", PATH/NAME the variable's place in the model's "hire"
collection, e.g. "lr/softmax/a", "int4/layers_3/ffn/predictor/q") and `hire_predictors.json` (how they
were built and the recall measured on held-out text; and "serving", the HiRE setting the model is served with
by default at each weight precision (precision_key) where an evaluation showed it keeps quality and decodes
faster than the exact model: recommend_serving). A "serving" entry written before it was keyed by precision (one
"settings" of its own) is read as the "as stored" one.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors.numpy import save_file

from hire import predictors, quant, sparse
from hire.config import HIRE_FIELDS, ModelConfig
from hire.formats import CheckpointError, prepare_variables, read_json, read_tensors, unflatten
from hire.loaded import LoadedModel

PREDICTORS = "hire_predictors.safetensors"
META = "hire_predictors.json"
# Issue 5's quality targets for HiRE, against the exact model: what makes a setting the serving default.
SERVING_TARGETS = {"perplexity_ratio": 1.01, "top1_agreement": 0.99, "recall": 0.99}
AS_STORED = "as stored"


def softmax_kernel(cfg: ModelConfig, params: dict) -> jax.Array:
    """The output embedding as a kernel [dim, vocab] (float32 when hire.quant keeps it quantized, by row)."""
    weight = params["embed"] if cfg.tie_embeddings else params["lm_head"]
    if quant.is_quantized(weight):
        return quant.dequantize_rows(weight).T
    return weight.T if cfg.tie_embeddings else weight


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
    return read_tensors(folder / PREDICTORS)


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


def exact_settings(folder: str | Path) -> dict[str, str]:
    """The overrides that run the model in `folder` exactly, with no predictor: the dense softmax, and the FFN it
    was trained with (the exact group-topk mask for a model fine-tuned group-sparse, docs/hire.md; else dense)."""
    config = Path(folder) / "config.json"
    trained = read_json(config).get("ffn") if config.is_file() else None
    return {"softmax": "dense", "ffn": "group-topk" if trained == "group-topk" else "dense"}


def precision_key(dtype: str | None = None, quantize: str | None = None) -> str:
    """The key a serving default is kept under: the --dtype and --quantize the model runs with, as given
    ("dtype=float32 quantize=none"; AS_STORED when neither is)."""
    return " ".join(f"{k}={v}" for k, v in (("dtype", dtype), ("quantize", quantize)) if v) or AS_STORED


def serving_entries(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """hire_predictors.json's serving defaults by precision_key (an unkeyed one, written before keys: AS_STORED)."""
    serving = meta.get("serving", {})
    return {AS_STORED: serving} if "settings" in serving else serving


def serving_settings(folder: str | Path, overrides: dict[str, Any] | None = None, dtype: str | None = None,
                     quantize: str | None = None) -> dict[str, Any]:
    """The HiRE overrides to serve the model in `folder` with at `dtype` and `quantize` (as given on the command
    line): the setting recommended for that precision (recommend_serving), if there is one and its predictors are
    there, then `overrides` (the command line's) on top."""
    meta = Path(folder) / META
    entries = serving_entries(read_json(meta)) if meta.is_file() and (Path(folder) / PREDICTORS).is_file() else {}
    return {**entries.get(precision_key(dtype, quantize), {}).get("settings", {}), **(overrides or {})}


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


def speed_misses(speeds: list[dict[str, Any]], min_speedup: float) -> list[str]:
    """The batch sizes where HiRE decoded under `min_speedup` x the exact model (hire.bench.bench_decode results
    with a speedup), each as a short sentence."""
    return [f"batch {r['batch']}: {r['speedup']}x the exact model's decode speed, below {min_speedup}"
            for r in speeds if r["speedup"] < min_speedup]


def recommend_serving(folder: str | Path, cfg: ModelConfig, result: dict[str, Any], precision: str,
                      min_speedup: float) -> None:
    """Make `cfg`'s HiRE settings the serving default of the model in `folder` at `precision` (precision_key), with
    the weights' dtype and quantization, the targets met (`min_speedup` among them) and `result` (its `hire eval`
    with them, speeds included) as the evidence: written into hire_predictors.json under "serving" and that key,
    the other precisions' defaults kept."""
    path = Path(folder) / META
    meta = read_json(path) if path.is_file() else {}
    entry = {"settings": {f: getattr(cfg, f) for f in HIRE_FIELDS},
             "weights": {"dtype": cfg.dtype, "quantize": cfg.quantize},
             "targets": SERVING_TARGETS | {"min_speedup": min_speedup}, "eval": result}
    meta["serving"] = serving_entries(meta) | {precision: entry}
    path.write_text(json.dumps(meta, indent=2) + "\n")
