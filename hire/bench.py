"""Decode benchmarks: measured speed against the memory-bandwidth floor of this machine."""
from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from hire.batch import Batch, PlainBatch
from hire.config import ModelConfig, OptionError
from hire.engine import Engine
from hire.loaded import LoadedModel
from hire.moe import experts_read, pick
from hire.request import Request
from hire.sampling import SamplingParams
from hire.scheduler import run
from hire.sparse import use_gather


def measure_bandwidth(gib: float = 1.0, repeats: int = 7) -> float:
    """Read bandwidth in GB/s: median time of a jitted reduction over `gib` GiB of float32."""
    x = jnp.ones((int(gib * 2**30) // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        total(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return x.nbytes / statistics.median(times) / 1e9


def weight_bytes(variables: dict) -> int:
    return sum(a.nbytes for a in jax.tree.leaves(variables["params"]))


def bytes_per_token(cfg: ModelConfig, variables: dict, batch: int) -> int:
    """Weight bytes a decode step of `batch` tokens reads, per token.

    Dense: every weight. HiRE: its predictors, the gathered softmax rows and FFN groups (with ffn_union
    at most min(groups, batch * candidates) groups a layer, the bound counted here) and every other weight;
    a part that computes all rows at this batch size (hire.sparse.use_gather) reads all of its weight. A mixture
    of experts: hire.moe.experts_read's bound on the experts read, in place of all of them.
    """
    total = weight_bytes(variables)
    if cfg.n_experts:
        moe = variables["params"]["layers_0"]["moe"]
        expert = sum(moe[f"{part}_0"].nbytes for part in ("gate", "up", "down"))
        reads = experts_read(cfg.moe_dispatch, batch, cfg.n_experts_per_token, cfg.n_experts)
        total += cfg.n_layers * (reads - cfg.n_experts) * expert
    if not cfg.sparse:
        return total // batch
    params = variables["params"]
    total += sum(a.nbytes for a in jax.tree.leaves(variables.get("hire", {})))
    if cfg.softmax != "dense" and use_gather(batch, cfg.softmax_candidates, cfg.vocab_size):
        head = sum(a.nbytes for a in jax.tree.leaves(params["embed"] if cfg.tie_embeddings else params["lm_head"]))
        total += batch * (cfg.softmax_candidates + cfg.tie_embeddings) * head // cfg.vocab_size - head
    if cfg.ffn != "dense" and use_gather(batch, cfg.ffn_candidates, cfg.ffn_groups):
        bundle = params["layers_0"]["ffn"]["bundle"]
        groups = min(cfg.ffn_groups, batch * cfg.ffn_candidates) if cfg.ffn_union else batch * cfg.ffn_candidates
        total += cfg.n_layers * (groups * bundle.nbytes // cfg.ffn_groups - bundle.nbytes)
    return total // batch


def decode_prompts(vocab_size: int, batch: int, prompt_len: int) -> list[list[int]]:
    """`batch` prompts of `prompt_len` random token ids, one a slot (seeded: the same for every call)."""
    return np.random.default_rng(0).integers(0, vocab_size, (batch, prompt_len)).tolist()


def _decode_timer(model: LoadedModel, batch: int, steps: int, prompt_len: int, chunk: int) -> Callable[..., float]:
    """A function that times `steps` greedy decode steps of `batch` slots (compiled at its first call).

    Each slot decodes its own prompt (decode_prompts: the same in every run and for every model timed at this
    batch), so rows route to different experts and choose different HiRE candidates, as a real batch's rows do.
    """
    cfg = model.cfg
    max_len = min(cfg.max_seq_len, prompt_len + steps + 1)
    engine = Engine(model, slots=batch, max_len=max_len)
    greedy = SamplingParams(temperature=0.0, seed=0)
    prompts = decode_prompts(cfg.vocab_size, batch, prompt_len)
    prefixes = [engine.prefill(prompt, greedy) for prompt in prompts]

    def run(prefill: bool = False) -> float:
        """Seconds of the decode steps, or with `prefill` of prefilling the first slot's prompt alone."""
        if prefill:
            start = time.perf_counter()
            jax.block_until_ready(engine.prefill(prompts[0], greedy))
            return time.perf_counter() - start
        state = engine.init_state()
        for slot, prefix in enumerate(prefixes):
            state = engine.insert(prefix, state, slot)
        jax.block_until_ready(state)
        start = time.perf_counter()
        for done in range(0, steps, chunk):
            n = min(chunk, steps - done)
            state, out = engine.generate_steps(state, n, prompt_len + done + n)
        out.tokens.block_until_ready()
        return time.perf_counter() - start

    return run


def bench_decode(model: LoadedModel, batch: int, steps: int = 128, prompt_len: int = 16, chunk: int = 32,
                 repeats: int = 5, dense: LoadedModel | None = None) -> dict[str, Any]:
    """Time `steps` greedy decode steps of `batch` slots; medians of `repeats`.

    Steps run `chunk` at a time in one compiled loop each, attention reading the cache only as
    far as the chunk reaches, as `hire.batch.PlainBatch` decodes. The memory bandwidth is measured
    right before each timed run and each run is compared with its own floor, since this
    machine's bandwidth drifts with its neighbours' load. With `dense` (the same model without HiRE, or
    the mixture of experts running every expert: moe_dispatch "all"), each repeat also times it right after,
    and `speedup` is the median of the paired ratios.
    """
    cfg = model.cfg
    run = _decode_timer(model, batch, steps, prompt_len, chunk)
    weights = weight_bytes(model.variables)
    read = bytes_per_token(cfg, model.variables, batch) * batch if cfg.sparse or cfg.n_experts else weights
    itemsize = jnp.dtype(cfg.dtype).itemsize
    mean_context = prompt_len + (steps + 1) / 2
    kv_bytes = int(batch * cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * itemsize * mean_context)
    run_dense = dense and _decode_timer(dense, batch, steps, prompt_len, chunk)
    for timer in (run, run_dense):
        if timer:
            timer()  # compile
    bandwidths, seconds, dense_seconds = zip(*((measure_bandwidth(repeats=3), run(), run_dense and run_dense())
                                               for _ in range(repeats)))
    prefill_seconds = statistics.median(run(prefill=True) for _ in range(repeats))
    bandwidth = statistics.median(bandwidths)
    ms_per_step = statistics.median(seconds) / steps * 1e3
    floor_ms = (read + kv_bytes) / (bandwidth * 1e9) * 1e3
    ratio = statistics.median(s / steps * bw * 1e9 / (read + kv_bytes) for s, bw in zip(seconds, bandwidths))
    return {
        "model": cfg.name, "batch": batch, "steps": steps, "prompt_len": prompt_len, "chunk": chunk, "dtype": cfg.dtype,
        "quantize": cfg.quantize,
        "tokens_per_s": round(batch / ms_per_step * 1e3, 1),
        "ms_per_token": round(ms_per_step, 4),
        "weight_bytes": weights, "kv_bytes_per_step": kv_bytes,
        "bandwidth_gbps": round(bandwidth, 2),
        "floor_ms_per_token": round(floor_ms, 4),
        "ratio_to_floor": round(ratio, 3),
        "prefill_tokens_per_s": round(prompt_len / prefill_seconds, 1),
        "device": jax.devices()[0].device_kind, "jax": jax.__version__,
    } | (_versus_dense(cfg, model.variables, dense, batch, steps, seconds, dense_seconds) if dense else {})


def _versus_dense(cfg: ModelConfig, variables: dict, dense: LoadedModel, batch: int, steps: int,
                  seconds: tuple[float, ...], dense_seconds: tuple[float, ...]) -> dict[str, Any]:
    """HiRE's settings or the mixture's path, the dense model's speed in the same run, and both models' weight bytes
    read per token."""
    sparse_ffn = cfg.ffn != "dense"
    hire = {
        "softmax": cfg.softmax, "ffn": cfg.ffn, "softmax_candidates": cfg.softmax_candidates,
        "ffn_candidates": cfg.ffn_candidates if sparse_ffn else None,
        "ffn_groups": cfg.ffn_groups if sparse_ffn else None, "ffn_union": cfg.ffn_union,
    } if cfg.sparse else {}
    moe = {"n_experts": cfg.n_experts, "experts_per_token": cfg.n_experts_per_token,
           "moe_path": pick(cfg.moe_dispatch, batch, cfg.n_experts_per_token)} if cfg.n_experts else {}
    return hire | moe | {
        "dense_tokens_per_s": round(batch * steps / statistics.median(dense_seconds), 1),
        "speedup": round(statistics.median(d / s for d, s in zip(dense_seconds, seconds)), 3),
        "bytes_per_token": bytes_per_token(cfg, variables, batch),
        "dense_bytes_per_token": bytes_per_token(dense.cfg, dense.variables, batch),
    }


def text_prompts(tokens: list[int], batch: int, prompt_len: int) -> list[list[int]]:
    """`batch` prompts of `prompt_len` tokens cut from evenly spaced places in a tokenized text."""
    if len(tokens) < prompt_len:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than a prompt of {prompt_len}")
    starts = np.linspace(0, len(tokens) - prompt_len, batch).astype(int)
    return [list(tokens[s:s + prompt_len]) for s in starts]


def bench_speculative(model: LoadedModel, drafter: Any, prompts: list[list[int]], gamma: int, steps: int = 128,
                      temperature: float = 0.0, chunk: int = 32, repeats: int = 5,
                      speculator: Callable[[Engine, Any, int], Any] | None = None,
                      batch: int | None = None) -> dict[str, Any]:
    """Speculative decoding (hire.speculative) against the large model alone, `steps` tokens per prompt (no stop
    token), `batch` prompts at a time in as many slots (default: all at once), in the same run: medians of
    `repeats` interleaved runs of each over all the prompts, `speedup` the median of the paired ratios. Both run
    as `hire generate` does, through a hire.scheduler.Scheduler (prefill included): the large model alone a
    hire.batch.PlainBatch of `chunk` steps per call, the speculative one a hire.speculative.SpeculativeBatch of a
    block per call. Prompt i samples with seed i.
    `speculator(engine, drafter, gamma)` replaces hire.speculative.Speculator (e.g. hire.tandem.TandemAlone).
    `verified_per_block`: the mean block length the large model ran over (γ + 1 unless blocks end early)."""
    from hire.speculative import SpecStats, SpeculativeBatch, Speculator

    batch = batch or len(prompts)
    if len(prompts) % batch:
        raise ValueError(f"{len(prompts)} prompts do not split into batches of {batch}")
    engine = Engine(model, slots=batch, max_len=min(model.cfg.max_seq_len, max(map(len, prompts)) + steps))
    params = [SamplingParams(temperature=temperature, seed=i, max_tokens=steps, ignore_eos=True)
              for i in range(len(prompts))]
    spec = (speculator or Speculator)(engine, drafter, gamma)

    def timed(make: Callable[[], Batch]) -> tuple[float, np.ndarray]:
        """Seconds and tokens [prompts, steps] of every `batch` of prompts in turn, each through a Scheduler of
        `make()`."""
        start, tokens = time.perf_counter(), []
        for first in range(0, len(prompts), batch):
            requests = [Request(i, prompts[i], params[i], -1, engine) for i in range(first, first + batch)]
            for _ in run(engine, requests, make):
                pass
            tokens += [r.out.tokens for r in requests]
        return time.perf_counter() - start, np.array(tokens)

    def run_speculative() -> tuple[float, np.ndarray, SpecStats]:
        stats = SpecStats()
        return *timed(lambda: SpeculativeBatch(spec, stats)), stats

    def alone() -> tuple[float, np.ndarray]:
        return timed(lambda: PlainBatch(engine, chunk))

    alone(), run_speculative()  # compile
    pairs = [(alone(), run_speculative()) for _ in range(repeats)]
    base_s, spec_s = [a[0] for a, _ in pairs], [s[0] for _, s in pairs]
    (_, base_tokens), (_, spec_tokens, stats) = pairs[-1]
    return {
        "model": model.cfg.name, "draft": drafter.name, "speculator": type(spec).__name__, "batch": batch,
        "prompts": len(prompts), "gamma": gamma, "temperature": temperature,
        "steps": steps, "prompt_len": max(map(len, prompts)), **stats.as_dict(),
        "verified_per_block": round(stats.verified / max(stats.passes, 1), 3),
        "tokens_per_s": round(len(prompts) * steps / statistics.median(spec_s), 1),
        "baseline_tokens_per_s": round(len(prompts) * steps / statistics.median(base_s), 1),
        "speedup": round(statistics.median(b / s for b, s in zip(base_s, spec_s)), 3),
        "identical": bool((base_tokens == spec_tokens).all()) if temperature == 0 else None,
        "device": jax.devices()[0].device_kind, "jax": jax.__version__,
    }


def prompt_count(n_prompts: int | None, batch: int) -> int:
    """Prompts timed with --prompts (default: one batch), which must split into batches of `batch`."""
    if n_prompts is not None and n_prompts % batch:
        raise OptionError(f"{n_prompts} prompts do not split into batches of {batch}", "--prompts")
    return n_prompts or batch


def _models(model: str | None, shape: str | None, dtype: str | None, quantize: str | None,
            hire: dict[str, Any]) -> tuple[LoadedModel, LoadedModel | None]:
    """The model `hire bench decode` times (`model`, or a random one of `shape` with random predictors) and the one it
    is timed against: the dense model beside HiRE, the all-experts path beside a mixture of experts, else None."""
    from hire.calibrate import random_predictors
    from hire.checkpoint import load
    from hire.config import SHAPES
    from hire.model import init_params
    from hire.predictor_files import sparsify
    from hire.quant import EMBED_BESIDE

    if (model is None) == (shape is None):
        raise OptionError("give exactly one of --model and --shape")
    dense = None
    if shape is not None:
        if shape not in SHAPES:
            raise OptionError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}", "--shape")
        try:
            cfg = SHAPES[shape].replace(dtype=dtype or "float32", quantize=quantize or "none",
                                        quantize_embed=EMBED_BESIDE.get(quantize, ""))
        except ValueError as e:
            raise OptionError(str(e), "--quantize") from None
        loaded = LoadedModel(cfg, init_params(cfg), None)
        try:
            want = cfg.replace(**hire)
        except ValueError as e:
            raise OptionError(str(e), "--softmax/--ffn/--hire") from None
        if want.sparse:
            dense, loaded = loaded, sparsify(loaded, want, random_predictors(want))
    else:
        loaded = load(model, dtype, hire, quantize)
        if loaded.cfg.sparse:
            dense = load(model, dtype, {"softmax": "dense", "ffn": "dense"}, quantize)  # at the same precision
    if loaded.cfg.n_experts and loaded.cfg.moe_dispatch != "all":  # against the all-experts path (hire.moe)
        base = dense or loaded
        dense = LoadedModel(base.cfg.replace(moe_dispatch="all"), base.variables, base.tokenizer)
    return loaded, dense


def bench_decode_runs(model: str | None, shape: str | None, batches: tuple[int, ...], steps: int, prompt_len: int,
                      chunk: int, repeats: int, dtype: str | None = None, quantize: str | None = None,
                      hire: dict[str, Any] | None = None, draft: str | None = None, gammas: tuple[int, ...] = (4,),
                      temperature: float = 0.0, text_file: str | Path | None = None, n_prompts: int | None = None,
                      tandem_only: bool = False) -> Iterator[dict[str, Any]]:
    """`hire bench decode`: `bench_decode` of `model` (a name or path) or of a random model of `shape` (hire.config.
    SHAPES) at every batch size, or with `draft` (hire.tandem.drafter) `bench_speculative` at every batch size and
    gamma, on `n_prompts` prompts (prompt_count) cut from `text_file` or random ids; one result each, as it is
    measured. A bad value is an OptionError naming its option."""
    from hire.tandem import drafter, speculator

    loaded, dense = _models(model, shape, dtype, quantize, hire or {})
    if draft is None:
        if tandem_only:
            raise OptionError("--tandem-only needs --draft (a tandem model, e.g. stdlib-9m-tandem)")
        for b in batches:
            yield bench_decode(loaded, b, steps, prompt_len, chunk, repeats, dense)
        return
    if loaded.tokenizer is None:  # requests decode their text as they go, as in `hire generate`
        raise OptionError("a --shape model has no tokenizer; speculative decoding needs a --model", "--draft")
    draft_model = drafter(draft, loaded, dtype)
    if text_file is not None:
        tokens = loaded.tokenizer.encode(Path(text_file).read_text(encoding="utf-8"))
    else:
        tokens = np.random.default_rng(0).integers(0, loaded.cfg.vocab_size,
                                                   prompt_len * max(*batches, n_prompts or 1)).tolist()
    counts = {b: prompt_count(n_prompts, b) for b in batches}  # every batch checked before the first run
    for b in batches:
        try:
            prompts = text_prompts(tokens, counts[b], prompt_len)
        except ValueError as e:
            raise OptionError(str(e), "--text") from None
        for g in gammas:
            yield bench_speculative(loaded, draft_model, prompts, g, steps, temperature, chunk, repeats,
                                    lambda engine, d, gamma: speculator(engine, d, gamma, tandem_only), b)
