"""Decode benchmarks: measured speed against the memory-bandwidth floor of this machine."""
from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hire.checkpoint import LoadedModel
from hire.engine import Engine
from hire.sampling import SamplingParams


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


def bench_decode(model: LoadedModel, batch: int, steps: int = 128, prompt_len: int = 16, chunk: int = 32,
                 repeats: int = 5) -> dict[str, Any]:
    """Time `steps` greedy decode steps of `batch` slots; medians of `repeats`.

    Steps run `chunk` at a time in one compiled loop each, attention reading the cache only as
    far as the chunk reaches, as `hire.generate.run` decodes. The memory bandwidth is measured
    right before each timed run and each run is compared with its own floor, since this
    machine's bandwidth drifts with its neighbours' load.
    """
    cfg = model.cfg
    max_len = min(cfg.max_seq_len, prompt_len + steps + 1)
    engine = Engine(model, slots=batch, max_len=max_len)
    prompt = list(np.random.default_rng(0).integers(0, cfg.vocab_size, prompt_len))
    prefix = engine.prefill(prompt, SamplingParams(temperature=0.0, seed=0))

    def run() -> float:
        state = engine.init_state()
        for slot in range(batch):
            state = engine.insert(prefix, state, slot)
        jax.block_until_ready(state)
        start = time.perf_counter()
        for done in range(0, steps, chunk):
            n = min(chunk, steps - done)
            state, out = engine.generate_steps(state, n, prompt_len + done + n)
        out.tokens.block_until_ready()
        return time.perf_counter() - start

    weights = weight_bytes(model.variables)
    itemsize = jnp.dtype(cfg.dtype).itemsize
    mean_context = prompt_len + (steps + 1) / 2
    kv_bytes = int(batch * cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * itemsize * mean_context)
    run()  # compile
    bandwidths, seconds = zip(*((measure_bandwidth(repeats=3), run()) for _ in range(repeats)))
    bandwidth = statistics.median(bandwidths)
    ms_per_step = statistics.median(seconds) / steps * 1e3
    floor_ms = (weights + kv_bytes) / (bandwidth * 1e9) * 1e3
    ratio = statistics.median(s / steps * bw * 1e9 / (weights + kv_bytes) for s, bw in zip(seconds, bandwidths))
    return {
        "model": cfg.name, "batch": batch, "steps": steps, "prompt_len": prompt_len, "chunk": chunk, "dtype": cfg.dtype,
        "tokens_per_s": round(batch / ms_per_step * 1e3, 1),
        "ms_per_token": round(ms_per_step, 4),
        "weight_bytes": weights, "kv_bytes_per_step": kv_bytes,
        "bandwidth_gbps": round(bandwidth, 2),
        "floor_ms_per_token": round(floor_ms, 4),
        "ratio_to_floor": round(ratio, 3),
        "device": jax.devices()[0].device_kind, "jax": jax.__version__,
    }
