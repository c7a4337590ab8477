"""Benchmarks of a model sharded over Ray hosts (workers.shards.ShardedEngine), docs/cluster.md:
`python -m cluster.bench_shards bench` measures decode over the hosts against one process, `sampler` sampling
through DA-TOP-k against gathering all logits over the hosts (docs/hire.md), `restart` the time a rebuild takes,
`collectives` the collectives in one compiled decode step.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray

from hire.checkpoint import model_folder
from hire.engine import Engine
from hire.predictor_files import exact_settings, serving_settings
from hire.sampling import SamplingParams
from workers.shards import ShardedEngine, ShardGroupError

PROMPT_LEN = 16  # of the benchmark's prompts


def bench_len(steps: int) -> int:
    """The context a benchmark of `steps` decode steps needs."""
    return PROMPT_LEN + steps + 1


def time_decode(engine: Any, steps: int, chunk: int, repeats: int) -> list[float]:
    """Seconds per decode step (every slot one token) of `repeats` runs of `steps` greedy steps, `chunk` per call
    and the tokens read back after each call, as hire.generate does; one untimed run first compiles."""
    prompt = np.random.default_rng(0).integers(3, engine.cfg.vocab_size, PROMPT_LEN).tolist()
    params = SamplingParams(temperature=0.0, seed=0)

    def run() -> float:
        state = engine.init_state()
        for slot in range(engine.slots):
            state = engine.insert(engine.prefill(prompt, params), state, slot)
        start = time.perf_counter()
        for done in range(0, steps, chunk):
            state, out = engine.generate_steps(state, chunk, PROMPT_LEN + done + chunk)
            np.asarray(out.tokens)
        return (time.perf_counter() - start) / steps

    run()
    return [run() for _ in range(repeats)]


def hire_setting(model: str, which: str) -> dict[str, Any]:
    """The HiRE overrides the benchmarks run `model` with: "serving", the folder's recommended setting (none: the
    model as configured), or "exact", the model without predictors (hire.predictor_files.exact_settings)."""
    folder = model_folder(model)
    return serving_settings(folder) if which == "serving" else exact_settings(folder)


def _local_engine(model: str, slots: int, max_len: int, hire: dict[str, Any]) -> Engine:
    """The plain engine on this process's one device, or, with several devices, one sharded over all of them."""
    import jax

    from hire import sharding
    from hire.checkpoint import load_model

    if jax.device_count() == 1:
        return Engine(load_model(model, **hire), slots, max_len)
    mesh = sharding.make_mesh()
    return Engine(sharding.load_sharded(model, mesh, **hire), slots, max_len, mesh=mesh)


def _summary(name: str, seconds: list[float], slots: int) -> dict[str, Any]:
    ms = statistics.median(seconds) * 1e3
    return {"path": name, "ms_per_step": round(ms, 4), "ms_per_token": round(ms / slots, 4),
            "tokens_per_s": round(slots / ms * 1e3, 1)}


def bench(model: str, hosts: int, devices_per_host: int, slots: int, steps: int, chunk: int, repeats: int,
          hire: str = "serving") -> dict[str, Any]:
    """Decode speed of the plain one-device engine, of one process over hosts * devices_per_host devices (both in
    child processes) and of `hosts` Ray hosts (a local Ray), in that order within one run; `hire` as in
    `hire_setting`."""
    if steps % chunk:
        raise ValueError("steps must be a multiple of chunk")
    devices = hosts * devices_per_host
    rows = []
    for d in dict.fromkeys((1, devices)):
        env = os.environ | {"XLA_FLAGS": f"--xla_force_host_platform_device_count={d}", "JAX_PLATFORMS": "cpu"}
        out = subprocess.run([sys.executable, "-m", "cluster.bench_shards", "local", "--model", model,
                              "--slots", str(slots), "--steps", str(steps), "--chunk", str(chunk),
                              "--repeats", str(repeats), "--hire", hire],
                             env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
        rows.append(_summary("plain engine, 1 device" if d == 1 else f"1 process, {d} devices", json.loads(out),
                             slots))
    with _local_ray(hosts):
        engine = ShardedEngine(model, hosts, devices_per_host, slots, bench_len(steps),
                               hire=hire_setting(model, hire))
        try:
            seconds = time_decode(engine, steps, chunk, repeats)
        finally:
            engine.shutdown()
    rows.append(_summary(f"{hosts} Ray hosts x {devices_per_host} devices", seconds, slots))
    plain = rows[0]["ms_per_step"]
    return {"model": model, "hire": hire_setting(model, hire), "slots": slots, "steps": steps, "chunk": chunk,
            "repeats": repeats, "cpus": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 1),
            "paths": [r | {"vs_plain": round(r["ms_per_step"] / plain, 3)} for r in rows]}


@contextlib.contextmanager
def _local_ray(cpus: int, temp_dir: str | None = None) -> Iterator[None]:
    """A local one-node Ray with `cpus` CPUs (its files under `temp_dir`, if given) for the duration, unless one is
    already up."""
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=cpus, include_dashboard=False,  # its own, even beside another Ray
                 log_to_driver=False, _temp_dir=temp_dir)  # keep the hosts' logs off stdout
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def text_prompts(tokenizer: Any, text: str, count: int) -> list[list[int]]:
    """`count` prompts of PROMPT_LEN tokens from evenly spaced places in `text`."""
    starts = np.linspace(0, len(text) - 2000, count).astype(int)
    prompts = [tokenizer.encode(text[s: s + 2000])[:PROMPT_LEN] for s in starts]
    if any(len(p) < PROMPT_LEN for p in prompts):
        raise ValueError(f"the text is too short for {count} prompts of {PROMPT_LEN} tokens")
    return prompts


SAMPLERS = {"greedy": dict(temperature=0.0), "top-k 40": dict(temperature=1.0, top_k=40)}  # DA-TOP-k serves both


def bench_sampler(model: str, hosts: int, devices_per_host: int, slots: int, steps: int, chunk: int, repeats: int,
                  text: str, hire: str = "exact", temp_dir: str | None = None, samplers: list[str] | None = None
                  ) -> dict[str, Any]:
    """Decode over `hosts` Ray hosts (a local Ray) sampling through DA-TOP-k (hire.sharding.sample_sharded) against
    the same group gathering all logits (ShardedEngine(gather_logits=True)): both groups up at once, each of
    SAMPLERS (or of `samplers`) run on both in turn `repeats` times (after an untimed run that compiles), from
    `slots` prompts of `text`, the same seeds. `ms_per_step`: median over every call of `chunk` steps, over its
    steps; `same_tokens`: the share of generated tokens (every step, slot and run) that are the gathered path's;
    `logprob_error` the largest difference of their logprobs. Each sampler's row also goes to stderr as it is done."""
    if steps % chunk:
        raise ValueError("steps must be a multiple of chunk")
    load = [round(x, 2) for x in os.getloadavg()]
    out: dict[str, Any] = {"model": model, "hire": hire_setting(model, hire), "hosts": hosts,
                           "devices_per_host": devices_per_host, "slots": slots, "steps": steps, "chunk": chunk,
                           "repeats": repeats, "cpus": os.cpu_count(), "samplers": {}}
    with _local_ray(2 * hosts, temp_dir):
        engines: dict[str, ShardedEngine] = {}
        try:
            for name in ("da_top_k", "gather"):
                engines[name] = ShardedEngine(model, hosts, devices_per_host, slots, bench_len(steps),
                                              hire=hire_setting(model, hire), start_timeout=900,
                                              call_timeout=900, gather_logits=name == "gather")
            prompts = text_prompts(engines["gather"].tokenizer, text, slots)
            for sampler in samplers or SAMPLERS:
                fields = SAMPLERS[sampler]
                params = [SamplingParams(**fields, seed=slot) for slot in range(slots)]
                calls: dict[str, list[float]] = {name: [] for name in engines}
                tokens: dict[str, list[np.ndarray]] = {name: [] for name in engines}
                logprobs: dict[str, list[np.ndarray]] = {name: [] for name in engines}
                for run in range(repeats + 1):
                    for name in sorted(engines, reverse=run % 2 == 1):  # alternate which goes first
                        engine, state = engines[name], engines[name].init_state()
                        for slot, (prompt, p) in enumerate(zip(prompts, params)):
                            state = engine.insert(engine.prefill(prompt, p), state, slot)
                        for done in range(0, steps, chunk):
                            start = time.perf_counter()
                            state, got = engine.generate_steps(state, chunk, PROMPT_LEN + done + chunk)
                            if run:  # run 0 compiles
                                calls[name].append((time.perf_counter() - start) / chunk)
                                tokens[name].append(np.asarray(got.tokens))
                                logprobs[name].append(np.asarray(got.logprobs))
                ms = {name: statistics.median(calls[name]) * 1e3 for name in engines}
                out["samplers"][sampler] = {
                    "ms_per_step": {name: round(v, 2) for name, v in ms.items()},
                    "speedup": round(ms["gather"] / ms["da_top_k"], 3),
                    "calls": len(calls["gather"]),
                    "same_tokens": float(np.mean(np.concatenate(tokens["da_top_k"]) == np.concatenate(
                        tokens["gather"]))),
                    "logprob_error": float(np.max(np.abs(np.concatenate(logprobs["da_top_k"]) - np.concatenate(
                        logprobs["gather"])))),
                    "text": engines["gather"].tokenizer.decode(
                        np.concatenate(tokens["da_top_k"][: steps // chunk])[:, 0].tolist())}
                print(json.dumps({sampler: out["samplers"][sampler]}), file=sys.stderr, flush=True)  # progress
        finally:
            for engine in engines.values():
                engine.shutdown()
    return out | {"load_avg": {"start": load, "end": [round(x, 2) for x in os.getloadavg()]}}


def measure_restart(model: str, hosts: int, devices_per_host: int, slots: int, chunk: int) -> dict[str, Any]:
    """Seconds a rebuild of the group takes after a host is killed (SIGKILL), in one run on a local Ray: the
    first start (compiling into an empty compilation cache), then a rebuild with that cache and one without any.

    Each row: `detect_s` from the kill to the failed call, `restart_s` (placement, jax.distributed, loading the
    slices), `warm_up_s` (Engine.warm_up(chunk) on every host, of every bucket at the first start and of the smallest
    after a rebuild, as ShardedEngine.recover does: compiling or reading the cache), and
    `first_token_s`, a one-token prefill right after.
    """
    params, rows = SamplingParams(temperature=0.0, seed=0), []
    with _local_ray(hosts), tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        engine = ShardedEngine(model, hosts, devices_per_host, slots, compilation_cache=cache, start_timeout=900)
        try:
            started = time.perf_counter()
            engine.warm_up(chunk)
            rows.append({"case": "first start, empty compilation cache", "restart_s": started - start,
                         "warm_up_s": time.perf_counter() - started})
            for case, folder in (("rebuild, compilation cache", cache), ("rebuild, no compilation cache", None)):
                engine.group.compilation_cache = folder
                state = engine.init_state()
                killed = time.perf_counter()
                os.kill(engine.group.info[-1]["pid"], signal.SIGKILL)
                try:
                    engine.generate_steps(state, chunk)
                    raise RuntimeError("a decode call succeeded with a host killed")
                except ShardGroupError:
                    detected = time.perf_counter()
                if not engine.recover():
                    raise RuntimeError("recover() found the group with a killed host healthy")
                recovered = time.perf_counter()
                engine.prefill([1], params)
                rows.append({"case": case, "detect_s": detected - killed, **engine.recoveries[-1],
                             "first_token_s": time.perf_counter() - recovered})
        finally:
            engine.shutdown()
    return {"model": model, "hosts": hosts, "devices_per_host": devices_per_host, "slots": slots, "chunk": chunk,
            "max_len": engine.max_len, "buckets": engine.buckets, "cpus": os.cpu_count(),
            "load_avg_1min": round(os.getloadavg()[0], 1),
            "rows": [{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()} for r in rows]}


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def count_collectives(model: str, slots: int, max_len: int, hire: str = "serving") -> dict[str, Any]:
    """The collectives in one compiled decode step (Engine.generate_steps, n=1) over this process's devices,
    sampling with hire.sampling.sample on the gathered logits (as before DA-TOP-k) and with each of
    hire.sharding.sample_sharded's paths compiled alone, and in the engine's own step (every branch of its switch);
    `hire` as in `hire_setting`; with HiRE also a greedy step with the HiRE operators left to GSPMD (not traced on
    the mesh, as before hire.sharded_sparse). `shapes`: what each collective of the engine steps moves.
    """
    import functools
    import re

    import jax

    from hire import engine as engine_module
    from hire import sharding
    from hire.model import Transformer
    from hire.sampling import sample

    mesh = sharding.make_mesh()
    engine = Engine(sharding.load_sharded(model, mesh, **hire_setting(model, hire)), slots, max_len, mesh=mesh)
    state = engine.init_state()

    def shapes(step: Any) -> dict[str, list[str]]:
        text = step.lower(engine.variables, state, 1, engine.max_len).compile().as_text()
        return {op: found for op in COLLECTIVES if (found := re.findall(rf"= (\S+) {op}(?:-start)?\(", text))}

    samplers = {"sample (gathered logits)": sample} | {
        f"sample_sharded {path}": functools.partial(sharding.sample_sharded, mesh=mesh, path=path)
        for path in sharding.PATHS}
    net = Transformer(engine.cfg)
    steps = {name: jax.jit(sharding.on_mesh(functools.partial(engine_module._steps, net, sampler), mesh),
                           static_argnums=(2, 3)) for name, sampler in samplers.items()}
    steps["engine step (all branches)"] = engine._generate_steps
    if engine.cfg.sparse:  # not traced on the mesh: hire.sparse's operators as GSPMD alone partitions them
        steps["engine step, HiRE by GSPMD alone"] = jax.jit(
            functools.partial(engine_module._steps, net, samplers["sample_sharded greedy"]), static_argnums=(2, 3))
    moved = {name: shapes(step) for name, step in steps.items()}
    return {"model": model, "hire": engine.cfg.sparse, "devices": jax.device_count(), "slots": slots,
            "per_decode_step": {name: {op: len(v) for op, v in ops.items()} for name, ops in moved.items()},
            "shapes": {name: ops for name, ops in moved.items() if name.startswith("engine")}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cluster.bench_shards", description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("bench", "sampler", "local", "restart", "collectives"),
                        help="bench: decode over all three paths; sampler: DA-TOP-k against gathering the logits over "
                        "the hosts; local: this process only; restart: rebuild times; collectives: per decode step "
                        "over hosts x devices-per-host devices of this process")
    parser.add_argument("--model", default="stories260K")
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--devices-per-host", type=int, default=2)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hire", choices=("serving", "exact"), default="serving",
                        help="serving: the HiRE setting the model's folder recommends, if any; exact: no predictors")
    parser.add_argument("--text", default="docs/cluster.md", help="sampler: where its prompts come from")
    parser.add_argument("--temp-dir", help="sampler: the local Ray's folder (default: Ray's)")
    parser.add_argument("--sampler", action="append", choices=SAMPLERS, help="sampler: run only these (repeatable)")
    a = parser.parse_args(argv)
    if a.what == "collectives":
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={a.hosts * a.devices_per_host}"
        print(json.dumps(count_collectives(a.model, a.slots, bench_len(a.steps), a.hire)))
    elif a.what == "sampler":
        text = open(a.text, encoding="utf-8").read()
        print(json.dumps(bench_sampler(a.model, a.hosts, a.devices_per_host, a.slots, a.steps, a.chunk, a.repeats, text,
                                       a.hire, a.temp_dir, a.sampler)))
    elif a.what == "restart":
        print(json.dumps(measure_restart(a.model, a.hosts, a.devices_per_host, a.slots, a.chunk)))
    elif a.what == "local":
        engine = _local_engine(a.model, a.slots, bench_len(a.steps), hire_setting(a.model, a.hire))
        print(json.dumps(time_decode(engine, a.steps, a.chunk, a.repeats)))
    else:
        print(json.dumps(bench(a.model, a.hosts, a.devices_per_host, a.slots, a.steps, a.chunk, a.repeats, a.hire)))


if __name__ == "__main__":
    main()
