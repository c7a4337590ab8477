"""hire's CPU kernels alone at real shapes, each path timed round-robin in one process: the AVX2 and AVX-512 VNNI
loops of this checkout's build (hire._qmatmul, hire._scores) and, with --before DIR, another build's .so files.

- scores: HiRE-Q's int8 product over Gemma 3 270M's vocabulary (262,144 x 640), 2 int8 rows per hidden state;
- int8 / int4: a 30-layer chain of SmolLM2's 576 -> 1536 -> 576 quantized matrices (60 calls, 53 / 27 MB).

Prints one JSON object per kernel and batch: each path's median ms per call (scores) or per chain, and its ratio to
the first path's (medians of the paired rounds).

    python scripts/bench_kernels.py --before /tmp/main-so [--rounds 7]
"""
from __future__ import annotations

import argparse
import glob
import importlib.machinery
import importlib.util
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from hire import _qmatmul, _scores, quant


def load_build(folder: str, tag: str) -> tuple:
    """The _qmatmul and _scores modules of the .so files in `folder`, their handlers registered as `tag`_*."""
    modules = []
    for name in ("_qmatmul", "_scores"):
        path = glob.glob(os.path.join(folder, f"{name}.*.so"))[0]
        loader = importlib.machinery.ExtensionFileLoader(f"hire.{name}", path)
        module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(f"hire.{name}", path,
                                                                                         loader=loader))
        loader.exec_module(module)
        modules.append(module)
    register(tag, *modules)
    return tuple(modules)


def register(tag: str, qmatmul, scores) -> None:
    for kind in ("int8", "int4"):
        jax.ffi.register_ffi_target(f"{tag}_matmul_{kind}", getattr(qmatmul, kind), platform="cpu")
    jax.ffi.register_ffi_target(f"{tag}_scores_int8", scores.int8, platform="cpu")


def scores_fn(tag: str):
    def f(x, q):
        out = jax.ShapeDtypeStruct((x.shape[0], q.shape[0]), jnp.int32)
        return jax.ffi.ffi_call(f"{tag}_scores_int8", out)(x, q)
    return jax.jit(f)


def chain_fn(tag: str, kind: str):
    """h -> down(up(h)) over the layers, normalized between layers, one kernel call per matrix."""
    def matmul(x, w):
        args = [w["q"], w["scale"]] + ([w["min"]] if kind == "int4" else [])
        out = jax.ShapeDtypeStruct((x.shape[0], w["q"].shape[0]), jnp.float32)
        return jax.ffi.ffi_call(f"{tag}_matmul_{kind}", out)(x, *args)

    def f(x, layers):
        def step(h, layer):
            h = matmul(matmul(h, layer["up"]), layer["down"])
            return h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6), None
        return jax.lax.scan(step, x, layers)[0]
    return jax.jit(f)


def layers(kind: str, count: int = 30) -> dict:
    rng = np.random.default_rng(0)
    def matrix(n, k):
        return quant.quantize_rows(rng.normal(0, 0.05, (n, k)).astype(np.float32), kind)
    stacked = [{"up": matrix(1536, 576), "down": matrix(576, 1536)} for _ in range(count)]
    return jax.tree.map(lambda *a: jnp.stack([jnp.asarray(v) for v in a]), *stacked)


def bench(name: str, paths: dict, args: tuple, rounds: int, calls: int) -> dict:
    """paths: label -> (jitted f, set the path up); each round runs every path `calls` times (the median kept)."""
    for f, setup in paths.values():
        setup()
        jax.block_until_ready(f(*args))
    times = {label: [] for label in paths}
    for _ in range(rounds):
        for label, (f, setup) in paths.items():
            setup()
            runs = []
            for _ in range(calls):
                start = time.perf_counter()
                jax.block_until_ready(f(*args))
                runs.append(time.perf_counter() - start)
            times[label].append(statistics.median(runs) * 1e3)
    first = next(iter(times.values()))
    return {"kernel": name, "ms": {label: round(statistics.median(t), 3) for label, t in times.items()},
            "ratio_to_" + next(iter(times)): {label: round(statistics.median(a / b for a, b in zip(first, t)), 3)
                                               for label, t in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="folder with another build's _qmatmul / _scores .so files")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--only", choices=["scores", "int8", "int4"], action="append")
    options = parser.parse_args()
    register("now", _qmatmul, _scores)
    builds = {"now": (_qmatmul, _scores)}
    if options.before:
        builds = {"before": load_build(options.before, "before"), **builds}

    def paths(make):
        out = {}
        for tag, modules in builds.items():
            switches = [m for m in modules if hasattr(m, "vnni")]
            if not switches:
                out[tag] = (make(tag), lambda: None)
                continue
            for vnni in (False, True):
                out[f"{tag}-{'vnni' if vnni else 'avx2'}"] = (make(tag), lambda v=vnni: [m.vnni(v) for m in switches])
        return out

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.integers(-127, 128, (262144, 640), dtype=np.int8))
    for kind in options.only or ["scores", "int8", "int4"]:
        weights = None if kind == "scores" else layers(kind)
        for batch in (1, 8):
            if kind == "scores":
                x = jnp.asarray(rng.integers(-127, 128, (2 * batch, 640), dtype=np.int8))
                result = bench(kind, paths(scores_fn), (x, q), options.rounds, options.calls)
            else:
                x = jnp.asarray(rng.normal(0, 1, (batch, 576)).astype(np.float32))
                result = bench(f"{kind} chain", paths(lambda tag: chain_fn(tag, kind)), (x, weights), options.rounds,
                               options.calls)
            print(json.dumps({**result, "batch": batch, "load": os.getloadavg()[0]}), flush=True)


if __name__ == "__main__":
    main()
