"""Next-token loss, perplexity and accuracy of a model over a text, in windows of its context."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from hire.checkpoint import LoadedModel
from hire.model import Transformer


def token_nll(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token negative log-likelihood of `targets` and whether the argmax hit it."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return nll, jnp.argmax(logits, axis=-1) == targets


def windows(tokens: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs, targets and mask [n, context]: window i predicts tokens[i*context + 1 : (i+1)*context + 1]."""
    n = math.ceil((len(tokens) - 1) / context)
    padded = np.zeros(n * context + 1, np.int32)
    padded[:len(tokens)] = tokens
    mask = np.arange(1, n * context + 1) < len(tokens)
    return (padded[:-1].reshape(n, context), padded[1:].reshape(n, context), mask.reshape(n, context))


def evaluate(model: LoadedModel, tokens: np.ndarray, context: int, batch_size: int = 8,
             progress: bool = True, reference: LoadedModel | None = None) -> dict[str, float | int]:
    """Mean loss (nats), perplexity and next-token accuracy over every token of `tokens` after the first.

    With a `reference` model (same tokenizer), also `agreement`: how often both models' argmax
    agree, which bounds how many greedy drafts of `model` the reference would accept.
    Windows do not overlap, so each starts without context; the last batch is padded and masked.
    """
    if len(tokens) < 2:
        raise ValueError("need at least two tokens to score")
    inputs, targets, mask = windows(np.asarray(tokens, np.int32), context)
    n_windows, fill = len(inputs), -len(inputs) % batch_size
    inputs, targets, mask = (np.concatenate([a, np.zeros((fill, context), a.dtype)]) for a in (inputs, targets, mask))
    positions = jnp.broadcast_to(jnp.arange(context), (batch_size, context))

    @jax.jit
    def score(variables, ref_variables, x, y, m):
        logits = Transformer(model.cfg).apply(variables, x, positions)[0]
        nll, correct = token_nll(logits, y)
        agree = 0
        if reference is not None:
            ref_logits = Transformer(reference.cfg).apply(ref_variables, x, positions)[0]
            agree = jnp.sum((jnp.argmax(logits, -1) == jnp.argmax(ref_logits, -1)) * m)
        return jnp.sum(nll * m), jnp.sum(correct * m), agree

    ref_variables = None if reference is None else reference.variables
    total_nll, total_correct, total_agree = 0.0, 0, 0
    for i in tqdm(range(0, len(inputs), batch_size), desc="eval", unit="batch", disable=not progress):
        batch = (a[i:i + batch_size] for a in (inputs, targets, mask))
        nll, correct, agree = score(model.variables, ref_variables, *batch)
        total_nll, total_correct, total_agree = (total_nll + float(nll), total_correct + int(correct),
                                                 total_agree + int(agree))
    count = int(mask.sum())
    loss = total_nll / count
    result = {"tokens": count, "loss": loss, "perplexity": math.exp(loss), "next_token_accuracy": total_correct / count,
              "windows": n_windows, "context": context}
    if reference is not None:
        result["agreement"] = total_agree / count
    return result
