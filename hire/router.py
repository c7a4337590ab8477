"""Adaptive block length: stop drafting where the next draft will likely be rejected.

A router sees each drafting step's `hire.speculative.router_inputs` (the drafter's features, e.g. the draft
model's last hidden state, then its top probability and entropy) and predicts the probability that the
draft is accepted; a row stops proposing at the first draft predicted below the router's threshold
(`Speculator(..., router=...)`). Drafting then ends once no row proposes, and verification runs over the
shortest compiled block length that covers the longest proposal (hire.speculative.verify_lengths).

- `ConfidenceRouter`: the drafter's own top probability, against a threshold.
- `MLPRouter`: a small MLP trained (optax) on acceptances logged from fixed-γ greedy decoding (`collect`,
  `fit`); greedy labels are exact: a draft is accepted when it equals the large model's argmax.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hire.engine import Engine
from hire.loaded import LoadedModel
from hire.request import Request
from hire.sampling import SamplingParams
from hire.scheduler import run
from hire.speculative import BlockOutput, Drafter, SpeculativeBatch, Speculator


class ConfidenceRouter:
    """Stop where the drafter's top probability (temperature 1) is below `threshold`."""

    def __init__(self, threshold: float):
        self.threshold, self.params = threshold, {}
        self.name = f"confidence-{threshold:g}"

    def accept(self, params: dict, inputs: jax.Array) -> jax.Array:
        return inputs[:, -2]


def _logit(params: dict, inputs: jax.Array) -> jax.Array:
    """The MLP: standardised inputs [N, F+2] -> one hidden GELU layer -> acceptance logit [N]."""
    h = jax.nn.gelu(((inputs - params["mean"]) / params["scale"]) @ params["w1"] + params["b1"])
    return (h @ params["w2"] + params["b2"])[:, 0]


class MLPRouter:
    """Stop where a trained MLP's predicted acceptance probability is below `threshold`."""

    def __init__(self, params: dict, threshold: float = 0.5):
        self.params, self.threshold = params, threshold
        self.name = f"mlp-{threshold:g}"

    def with_threshold(self, threshold: float) -> "MLPRouter":
        return MLPRouter(self.params, threshold)

    def accept(self, params: dict, inputs: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(_logit(params, inputs))


def collect(engine: Engine, drafter: Drafter, gamma: int, prompts: list[list[int]], max_tokens: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """Router inputs [N, F+2] and labels [N] (1: accepted) of every draft that greedy verification judged,
    decoding each prompt for `max_tokens` tokens (through a Scheduler of `engine.slots`) with blocks of `gamma`
    drafts.

    A draft is judged when every draft before it in its block was accepted; later ones are left out."""
    spec = Speculator(engine, drafter, gamma, log_inputs=True)
    greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    inputs, labels = [], []

    def log(slots: list[int], out: BlockOutput) -> None:
        count, proposed, x = np.asarray(out.count), np.asarray(out.proposed), np.asarray(out.inputs)
        for slot in slots:
            accepted, judged = count[slot] - 1, min(count[slot], proposed[slot])
            inputs.append(x[slot, :judged])
            labels.append(np.arange(judged) < accepted)

    requests = [Request(i, prompt, greedy, -1, engine) for i, prompt in enumerate(prompts)]
    for _ in run(engine, requests, lambda: SpeculativeBatch(spec, log=log)):
        pass
    return np.concatenate(inputs), np.concatenate(labels).astype(np.float32)


def fit(inputs: np.ndarray, labels: np.ndarray, hidden: int = 16, steps: int = 300, lr: float = 3e-3,
        weight_decay: float = 1e-2, seed: int = 0, threshold: float = 0.5) -> MLPRouter:
    """Train the MLP router on (inputs, labels) by full-batch AdamW on the logistic loss (short and small:
    a thousand logged drafts are easily memorised)."""
    x, y = jnp.asarray(inputs, jnp.float32), jnp.asarray(labels, jnp.float32)
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    width = x.shape[1]
    standardise = {"mean": x.mean(0), "scale": x.std(0) + 1e-6}
    weights = {"w1": jax.random.normal(k1, (width, hidden)) / np.sqrt(width), "b1": jnp.zeros(hidden),
               "w2": jax.random.normal(k2, (hidden, 1)) / np.sqrt(hidden), "b2": jnp.zeros(1)}
    optimizer = optax.adamw(lr, weight_decay=weight_decay)

    def loss(weights: dict) -> jax.Array:
        return optax.sigmoid_binary_cross_entropy(_logit(standardise | weights, x), y).mean()

    @jax.jit
    def train(weights: dict) -> dict:
        def step(carry, _):
            weights, opt = carry
            updates, opt = optimizer.update(jax.grad(loss)(weights), opt, weights)
            return (optax.apply_updates(weights, updates), opt), None

        return jax.lax.scan(step, (weights, optimizer.init(weights)), None, length=steps)[0][0]

    return MLPRouter(standardise | train(weights), threshold)


def scores(router: MLPRouter | ConfidenceRouter, inputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """How well the router's probability ranks and classifies held-out drafts: AUC, and accuracy and the
    share of drafts kept at its threshold."""
    p = np.asarray(router.accept(router.params, jnp.asarray(inputs, jnp.float32)))
    keep = p >= router.threshold
    positive, negative = p[labels == 1], p[labels == 0]  # AUC: P(a positive outranks a negative), ties half
    auc = np.mean((positive[:, None] > negative[None]) + 0.5 * (positive[:, None] == negative[None]))
    return {"auc": round(float(auc), 4), "accuracy": round(float(np.mean(keep == (labels == 1))), 4),
            "kept": round(float(keep.mean()), 4)}


def bench_router(model: LoadedModel, drafter: Drafter, train_prompts: list[list[int]],
                 score_prompts: list[list[int]], prompts: list[list[int]], gamma: int, steps: int = 128,
                 thresholds: tuple[float, ...] = (0.3, 0.5, 0.7), repeats: int = 5, batch: int | None = None
                 ) -> list[dict[str, Any]]:
    """Fixed γ against the confidence and MLP routers at each threshold, timed on held-out `prompts` (greedy,
    `batch` at a time, default all), after training the MLP on drafts logged over `train_prompts`: one result per
    setting (hire.bench.bench_speculative's keys, plus the router's scores on drafts logged over the held-out
    `score_prompts`)."""
    from hire.bench import bench_speculative

    length = max(map(len, train_prompts + score_prompts + prompts)) + steps
    engine = Engine(model, slots=8, max_len=min(model.cfg.max_seq_len, length))
    mlp = fit(*collect(engine, drafter, gamma, train_prompts, steps))
    held_out = collect(engine, drafter, gamma, score_prompts, steps)
    results = [bench_speculative(model, drafter, prompts, gamma, steps, repeats=repeats, batch=batch)
               | {"router": None}]
    for router in [ConfidenceRouter(t) for t in thresholds] + [mlp.with_threshold(t) for t in thresholds]:
        result = bench_speculative(model, drafter, prompts, gamma, steps, repeats=repeats,
                                   speculator=functools.partial(Speculator, router=router), batch=batch)
        results.append(result | {"router": router.name, **scores(router, *held_out)})
    return results


def bench_router_text(model: str, draft: str, train_file: str | Path, text_file: str | Path, batch: int,
                      prompts: int | None, train_prompts: int = 64, score_prompts: int = 16, gamma: int = 8,
                      steps: int = 128, prompt_len: int = 64, thresholds: tuple[float, ...] = (0.3, 0.5, 0.7),
                      repeats: int = 5) -> list[dict[str, Any]]:
    """`hire bench router`: bench_router of `model` (a name or path) with the drafter `draft` (hire.tandem.drafter),
    on prompts of `prompt_len` tokens cut from the UTF-8 texts: `train_prompts` from `train_file`, `score_prompts`
    and `prompts` (timed `batch` at a time; hire.bench.prompt_count) from `text_file`."""
    from hire.bench import prompt_count, text_prompts
    from hire.checkpoint import load
    from hire.tandem import drafter

    prompts = prompt_count(prompts, batch)
    loaded = load(model)
    cut = lambda file, n: text_prompts(loaded.tokenizer.encode(Path(file).read_text(encoding="utf-8")), n,  # noqa: E731
                                       prompt_len)
    return bench_router(loaded, drafter(draft, loaded), cut(train_file, train_prompts), cut(text_file, score_prompts),
                        cut(text_file, prompts), gamma, steps, thresholds, repeats, batch)
