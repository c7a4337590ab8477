"""hire.sharding.sample_sharded: sampling from vocabulary-sharded logits through DA-TOP-k, checked on 4 CPU devices
of one process (this file runs itself as a script with XLA_FLAGS) against hire.sampling.sample."""
from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_topk import finish

from hire import sharding
from hire.sampling import RowSampling, SamplingParams, sample


def test_sampler_paths_on_four_devices():
    """hire.sharding.sample_sharded on 4 devices of one process equals hire.sampling.sample (greedy, top-k mixed
    with greedy, top-p, full distribution; each forced path and the switch), and its DA-TOP-k paths compile to
    one all-gather and no all-reduce."""
    out = finish(subprocess.Popen([sys.executable, __file__], env=os.environ | {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    assert out["devices"] == 4
    for case, paths in out["cases"].items():
        for path, (same_tokens, logprob_error) in paths.items():
            assert same_tokens and logprob_error < 1e-4, (case, path, logprob_error)
    assert set(out["cases"]["top-k"]) == {"switch", "gather", "top_k"}
    assert out["collectives"]["greedy"] == out["collectives"]["top_k"] == {"all-gather": 1}
    assert out["collectives"]["gather"].get("all-reduce", 0) + out["collectives"]["gather"].get("all-gather", 0) > 1


def sampler_paths() -> dict:
    """What test_sampler_paths_on_four_devices checks, run here with this process's devices."""
    mesh = sharding.make_mesh()
    logits = jax.random.normal(jax.random.key(0), (8, 512)) * 3
    split = jax.device_put(logits, NamedSharding(mesh, P(None, sharding.AXIS)))
    positions = jnp.arange(8, dtype=jnp.int32) + 5
    cases = {"greedy": ([SamplingParams(temperature=0.0, seed=i) for i in range(8)], "greedy"),
             "top-k": ([SamplingParams(temperature=0.9, top_k=(1, 5, 40, 64)[i % 4], seed=i) if i % 3
                        else SamplingParams(temperature=0.0) for i in range(8)], "top_k"),
             "top-p": ([SamplingParams(temperature=0.8, top_p=0.9, seed=i) for i in range(8)], None),
             "full": ([SamplingParams(temperature=1.0, seed=i) for i in range(8)], None)}
    out = {"devices": jax.device_count(), "cases": {}, "collectives": {}}
    for case, (params, own) in cases.items():
        rows = RowSampling.of(params)
        want = jax.jit(sample)(logits, rows, positions)
        out["cases"][case] = {}
        for path in (None, "gather", own) if own else (None, "gather"):
            got = jax.jit(functools.partial(sharding.sample_sharded, mesh=mesh, path=path))(split, rows, positions)
            out["cases"][case][path or "switch"] = (bool(np.array_equal(got[0], want[0])),
                                                    float(np.max(np.abs(np.asarray(got[1]) - np.asarray(want[1])))))
    rows = RowSampling.of(cases["top-k"][0])
    for path in sharding.PATHS:
        text = jax.jit(functools.partial(sharding.sample_sharded, mesh=mesh, path=path)).lower(
            split, rows, positions).compile().as_text()
        out["collectives"][path] = {op: n for op in ("all-reduce", "all-gather")
                                    if (n := len(re.findall(rf"= \S+ {op}(?:-start)?\(", text)))}
    return out



if __name__ == "__main__":
    print(json.dumps(sampler_paths()))
