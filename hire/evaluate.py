"""Next-token loss, perplexity and accuracy of a model over a text, in windows of its context."""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from hire.config import OptionError
from hire.loaded import LoadedModel
from hire.model import Transformer
from hire.recall import layer_inputs, recalls, windows

# `hire eval --recommend`'s speed check: decode timed at one request and at hire serve's default --slots, this many
# steps (one compiled loop), the median of this many repeats, each paired with the exact model's
SPEED_BATCHES, SPEED_STEPS, SPEED_REPEATS = (1, 8), 32, 3


def token_nll(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token negative log-likelihood of `targets` and whether the argmax hit it."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return nll, jnp.argmax(logits, axis=-1) == targets


def fidelity(logits: jax.Array, exact: jax.Array, targets: jax.Array, key: jax.Array) -> dict[str, jax.Array]:
    """Per token, how far a HiRE model's next-token distribution (`logits`) is from the exact one's, in what
    decoding sees: top1_agreement (greedy picks the same token), sampled_agreement (a temperature-1 draw with the
    same Gumbel noise, as hire.sampling draws with the same seed, picks the same token), tv_distance (total
    variation between the two distributions: a bound on how often any temperature-1 draw can differ) and
    logprob_error (|difference| of the target token's log-probability)."""
    logp, exact_logp = (jax.nn.log_softmax(a.astype(jnp.float32), axis=-1) for a in (logits, exact))
    noise = jax.random.gumbel(key, logp.shape)
    at = lambda a: jnp.take_along_axis(a, targets[..., None], axis=-1)[..., 0]  # noqa: E731
    return {"top1_agreement": jnp.argmax(logp, -1) == jnp.argmax(exact_logp, -1),
            "sampled_agreement": jnp.argmax(logp + noise, -1) == jnp.argmax(exact_logp + noise, -1),
            "tv_distance": 0.5 * jnp.abs(jnp.exp(logp) - jnp.exp(exact_logp)).sum(-1),
            "logprob_error": jnp.abs(at(logp) - at(exact_logp))}


def evaluate(model: LoadedModel, tokens: np.ndarray, context: int, batch_size: int = 8,
             progress: bool = True, reference: LoadedModel | None = None,
             dense: LoadedModel | None = None,
             logits_fn: Callable[[Any, jax.Array, jax.Array], jax.Array] | None = None) -> dict[str, float | int]:
    """Mean loss (nats), perplexity and next-token accuracy over every token of `tokens` after the first.

    With a `reference` model (same tokenizer), also `agreement`: how often both models' argmax
    agree, which bounds how many greedy drafts of `model` the reference would accept.
    With `dense`, the same model without HiRE when `model` uses it: also dense_loss, dense_perplexity, the means
    of `fidelity`'s keys (top1_agreement, sampled_agreement, tv_distance, logprob_error) and the predictors' mean
    softmax_recall, ffn_recall and ffn_mass on the hidden states the HiRE model reads (hire.recall.recalls).
    `logits_fn(variables, inputs, positions)`, when given, computes `model`'s logits in place of
    hire.model.Transformer (a tandem small model beside its large one: hire.tandem.tandem_scorer).
    Windows do not overlap, so each starts without context; the last batch is padded and masked.
    """
    if len(tokens) < 2:
        raise ValueError("need at least two tokens to score")
    inputs, targets, mask = windows(np.asarray(tokens, np.int32), context)
    n_windows, fill = len(inputs), -len(inputs) % batch_size
    inputs, targets, mask = (np.concatenate([a, np.zeros((fill, context), a.dtype)]) for a in (inputs, targets, mask))
    positions = jnp.broadcast_to(jnp.arange(context), (batch_size, context))

    @jax.jit
    def score(variables, ref_variables, dense_variables, x, y, m, key):
        extra = {}
        if dense is None:
            logits = (logits_fn or (lambda v, *a: Transformer(model.cfg).apply(v, *a)[0]))(variables, x, positions)
        else:
            logits, inputs = layer_inputs(model.cfg, variables, x)
            dense_logits = Transformer(dense.cfg).apply(dense_variables, x, positions)[0]
            extra = {"dense_nll": token_nll(dense_logits, y)[0], **fidelity(logits, dense_logits, y, key),
                     **recalls(model.cfg, variables, *inputs)}
        extra = {k: jnp.sum(v.reshape(m.shape) * m) for k, v in extra.items()}
        nll, correct = token_nll(logits, y)
        agree = 0
        if reference is not None:
            ref_logits = Transformer(reference.cfg).apply(ref_variables, x, positions)[0]
            agree = jnp.sum((jnp.argmax(logits, -1) == jnp.argmax(ref_logits, -1)) * m)
        return jnp.sum(nll * m), jnp.sum(correct * m), agree, extra

    ref_variables = None if reference is None else reference.variables
    dense_variables = None if dense is None else dense.variables
    total_nll, total_correct, total_agree, totals = 0.0, 0, 0, {}
    for i in tqdm(range(0, len(inputs), batch_size), desc="eval", unit="batch", disable=not progress):
        batch = (a[i:i + batch_size] for a in (inputs, targets, mask))
        nll, correct, agree, extra = score(model.variables, ref_variables, dense_variables, *batch,
                                           jax.random.key(i))
        total_nll, total_correct, total_agree = (total_nll + float(nll), total_correct + int(correct),
                                                 total_agree + int(agree))
        totals = {k: totals.get(k, 0.0) + float(v) for k, v in extra.items()}
    count = int(mask.sum())
    loss = total_nll / count
    result = {"tokens": count, "loss": loss, "perplexity": math.exp(loss), "next_token_accuracy": total_correct / count,
              "windows": n_windows, "context": context}
    if reference is not None:
        result["agreement"] = total_agree / count
    means = {k: v / count for k, v in totals.items()}
    if "dense_nll" in means:
        dense_loss = means.pop("dense_nll")
        result |= {"dense_loss": dense_loss, "dense_perplexity": math.exp(dense_loss)}
    return result | means


def decode_speeds(model: LoadedModel, exact: LoadedModel) -> list[dict[str, Any]]:
    """`model`'s decode speed against `exact` (the same model without HiRE, at the same precision) at each of
    SPEED_BATCHES, timed side by side (hire.bench.bench_decode): tokens_per_s, dense_tokens_per_s, speedup (the
    median of the paired ratios) and the load average when it was measured."""
    import os

    from hire.bench import bench_decode

    keys = ("batch", "tokens_per_s", "dense_tokens_per_s", "speedup")
    return [{k: r[k] for k in keys} | {"load_average": round(os.getloadavg()[0], 2)}
            for r in (bench_decode(model, b, SPEED_STEPS, chunk=SPEED_STEPS, repeats=SPEED_REPEATS, dense=exact)
                      for b in SPEED_BATCHES)]


def evaluate_text(model: str, text_file: str | Path, context: int | None = None, batch_size: int = 8,
                  dtype: str | None = None, quantize: str | None = None, reference: str | None = None,
                  hire: dict[str, Any] | None = None, draft: str | None = None, gamma: int = 4,
                  recommend: bool = False, min_speedup: float = 1.0) -> tuple[dict[str, Any], list[str]]:
    """`hire eval`: `evaluate` `model` (a name or path: hire.checkpoint.load with the HiRE overrides `hire`, the exact
    model beside it when they ask for HiRE; a tandem small model beside its large one) on the UTF-8 text in
    `text_file`, in windows of `context` (default and at most the models'), plus bits_per_byte; with `draft`, also
    hire.speculative.drafter_accuracy of that drafter (hire.tandem.drafter). With `recommend`, if the result meets
    the quality targets, also `speed` (decode_speeds), and these HiRE settings become `model`'s serving default at
    this `dtype` and `quantize` (predictor_files.recommend_serving) if they decode at least `min_speedup` x as fast as
    the exact model at every batch size. Returns the result and the targets missed (none without `recommend`)."""
    from hire.checkpoint import exact, load, model_folder
    from hire.predictor_files import precision_key, quality_misses, recommend_serving, speed_misses
    from hire.speculative import drafter_accuracy
    from hire.tandem import drafter, is_tandem, load_tandem, tandem_scorer

    if is_tandem(model):
        loaded, logits_fn = tandem_scorer(load_tandem(model, dtype), dtype)
    else:
        loaded, logits_fn = load(model, dtype, hire, quantize), None
    dense = load(model, dtype, exact(model), quantize) if loaded.cfg.sparse else None
    ref = None if reference is None else load(reference, dtype)
    if ref is not None and ref.cfg.vocab_size != loaded.cfg.vocab_size:
        raise OptionError("the reference model has another vocabulary", "--reference")
    text = Path(text_file).read_text(encoding="utf-8")
    context = min(context or loaded.cfg.max_seq_len, loaded.cfg.max_seq_len, (ref or loaded).cfg.max_seq_len)
    tokens = loaded.tokenizer.encode(text)
    try:
        result = evaluate(loaded, tokens, context, batch_size, reference=ref, dense=dense, logits_fn=logits_fn)
    except ValueError as e:
        raise OptionError(str(e), "--text") from None
    if draft is not None:
        result |= drafter_accuracy(loaded, drafter(draft, loaded, dtype), tokens, context, gamma, batch_size)
    result["bits_per_byte"] = result["loss"] * result["tokens"] / math.log(2) / max(len(text.encode()), 1)
    if not recommend:
        return result, []
    misses = quality_misses(result)
    if not misses:  # speed is measured only for a setting that keeps quality
        result["speed"] = decode_speeds(loaded, dense)
        misses = speed_misses(result["speed"], min_speedup)
    if not misses:
        recommend_serving(model_folder(model), loaded.cfg, {"text": str(text_file), **result},
                          precision_key(dtype, quantize), min_speedup)
    return result, misses
