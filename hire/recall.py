"""The hidden states HiRE's predictors read, and how well the predictors find the top scores on them: exact and
predicted scores of the softmax and of each FFN's neuron groups, and the recall of the predicted candidates
(hire.calibrate measures it on held-out text, hire.evaluate beside perplexity, hire.window over decode windows);
the windows a text is cut into; and `hire bench topk` on a model's softmax (bench_host_devices).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hire import predictors, sparse
from hire.config import ModelConfig, OptionError
from hire.loaded import LoadedModel
from hire.model import RMSNorm, Transformer, activation
from hire.predictor_files import softmax_kernel
from hire.topk import METHODS, bench_topk


def layer_inputs(cfg: ModelConfig, variables: dict,
                 tokens: jax.Array) -> tuple[jax.Array, tuple[jax.Array, list[jax.Array]]]:
    """Logits [B, T, V], and the hidden states [B, T, dim] the softmax (the final norm's output) and each FFN read."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    (logits, _), state = Transformer(cfg).apply(variables, tokens, positions, mutable=["intermediates"],
                                                capture_intermediates=lambda module, _: isinstance(module, RMSNorm))
    inter = state["intermediates"]
    ffn = [inter[f"layers_{i}"]["ffn_norm"]["__call__"][0] for i in range(cfg.n_layers)]
    return logits, (inter["norm"]["__call__"][0], ffn)


def model_softmax(model: LoadedModel, tokens: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """A loaded model's output embedding W [vocab, dim] (float32) and `batch` hidden states [batch, dim] its softmax
    reads, at evenly spaced positions of one window of `tokens` (at most its context)."""
    window = np.asarray(tokens[:model.cfg.max_seq_len], np.int32)[None]
    if window.shape[1] < batch:
        raise ValueError(f"the text has {window.shape[1]} tokens, fewer than the batch ({batch})")
    _, (x, _) = jax.jit(lambda v, t: layer_inputs(model.cfg, v, t))(model.variables, window)
    at = np.linspace(0, window.shape[1] - 1, batch).round().astype(int)
    return (np.asarray(softmax_kernel(model.cfg, model.variables["params"]), np.float32).T,
            np.asarray(x[0, at], np.float32))


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


def windows(tokens: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs, targets and mask [n, context]: window i predicts tokens[i*context + 1 : (i+1)*context + 1]."""
    n = math.ceil((len(tokens) - 1) / context)
    padded = np.zeros(n * context + 1, np.int32)
    padded[:len(tokens)] = tokens
    mask = np.arange(1, n * context + 1) < len(tokens)
    return (padded[:-1].reshape(n, context), padded[1:].reshape(n, context), mask.reshape(n, context))


class DeviceError(RuntimeError):
    """Fewer devices than a benchmark asks for."""


def bench_host_devices(devices: int, vocab: int, batch: int, k: int, dim: int = 2048,
                       methods: tuple[str, ...] = METHODS, recall_target: float = 0.99, repeats: int = 5,
                       predictor: str | None = "int8", oversample: int = 4, model: str | None = None,
                       text_file: str | Path | None = None, shuffle_rows: bool = False) -> dict[str, Any]:
    """`hire bench topk`: bench_topk over `devices` CPU host devices, made here (so before JAX's backend starts), on
    random scores or, with `model` and `text_file`, that model's output embedding and hidden states on the text
    (hire.recall.model_softmax). DeviceError where JAX has fewer devices (its backend had started)."""
    from hire.checkpoint import load

    if (model is None) != (text_file is None):
        raise OptionError("--model and --text go together")
    if model is None and (vocab % devices or k > vocab):
        raise OptionError(f"needs a multiple of --devices ({devices}), at least --k", "--vocab")
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    if jax.device_count() < devices:
        raise DeviceError(f"--devices {devices}, but JAX has {jax.device_count()} {jax.default_backend()} devices "
                           "(was its backend started already?)")
    real = None
    if model is not None:
        loaded = load(model, None, None, "none")
        try:
            real = model_softmax(loaded, loaded.tokenizer.encode(Path(text_file).read_text(encoding="utf-8")), batch)
        except ValueError as e:
            raise OptionError(str(e), "--text") from None
        if real[0].shape[0] % devices or k > real[0].shape[0]:
            raise OptionError(f"{model}'s vocabulary ({real[0].shape[0]}) is not a multiple of --devices "
                              f"({devices}) or is under --k", "--model")
    return bench_topk(jax.devices()[:devices], vocab, batch, k, dim, methods, repeats, recall_target,
                      predictor=predictor, oversample=oversample, real=real, shuffle_rows=shuffle_rows)
