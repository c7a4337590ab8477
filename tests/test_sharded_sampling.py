"""On 4 CPU devices of one process (this file runs itself as a script with XLA_FLAGS): hire.sharding.sample_sharded,
sampling from vocabulary-sharded logits through DA-TOP-k, against hire.sampling.sample; and the engine with HiRE
sharded over the 4 devices (hire.sharded_sparse) against the single-device engine."""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_hf_parity import save
from test_topk import finish

from hire import sharding
from hire.calibrate import build_predictors
from hire.checkpoint import convert, load_model, resolve_model
from hire.engine import Engine
from hire.generate import generate
from hire.predictor_files import save_predictors
from hire.sampling import RowSampling, SamplingParams, sample

# HiRE settings of stories260K (vocabulary 512, FFN 172 neurons), each run sharded over 4 devices against 1 device
# (tests/test_shards.py runs default's serving setting, int8 predictors keeping the top ffn_k, over 2 hosts)
HIRE = {
    # 172 groups of 1 split over the devices, 16 candidates each: decode (4 rows) gathers the softmax rows and scans
    # the groups, prefill (16 tokens) computes all groups and masks them
    "lr": dict(softmax="hire-lr", softmax_k=8, softmax_oversample=2, ffn="group-sparse", ffn_predictor="lr",
               ffn_group=1, ffn_k=8, ffn_oversample=2),
    # 43 groups of 4 (replicated: 4 does not divide 43), the batch union, each token keeping its exact top ffn_k;
    # 256 softmax candidates (the masked softmax path)
    "int8, union, 43 groups": dict(softmax="hire-q", softmax_k=32, softmax_oversample=8, ffn="group-sparse",
                                   ffn_predictor="q", ffn_group=4, ffn_k=4, ffn_oversample=2, ffn_union=True,
                                   ffn_keep_k=True),
}
HIRE_PROMPTS = ["Once upon a time", "The cat sat", "Lily", "One day"]
HIRE_PARAMS = [SamplingParams(temperature=0.0, max_tokens=8, logprobs=True),
               SamplingParams(temperature=0.9, top_k=5, max_tokens=8, seed=1, logprobs=True),
               SamplingParams(temperature=0.0, max_tokens=8, logprobs=True),
               SamplingParams(temperature=0.7, top_p=0.9, max_tokens=8, seed=3, logprobs=True)]


def hire_model(folder: Path) -> Path:
    """A copy of stories260K in `folder` with HiRE predictors beside it: rank-16 low-rank (SVD) and int8."""
    shutil.copytree(resolve_model("stories260K"), folder, dirs_exist_ok=True)
    save_predictors(folder, build_predictors(load_model(folder), ["lr", "int8"], 16), {"rank": 16})
    return folder


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


def test_engine_gather_logits_switch():
    """Engine(gather_logits=True) on 4 devices (the baseline of cluster.bench_shards sampler) draws the default
    engine's tokens, greedy and top-k, and its decode step has no DA-TOP-k all-gather (of each device's candidates),
    only that of the whole logits [slots, vocab] (the default step has both: its switch keeps the fallback)."""
    out = finish(subprocess.Popen([sys.executable, __file__, "engine"], env=os.environ | {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    assert out["same_tokens"] and out["logprob_error"] < 1e-4, out
    slots_vocab = [4, out["vocab"]]
    assert out["all_gathers"]["gather"] == [slots_vocab], out
    assert slots_vocab in out["all_gathers"]["da_top_k"] and [4, 4, 2 * 64 + 2] in out["all_gathers"]["da_top_k"], out


def gemma3_hire_model(folder: Path) -> Path:
    """tests/test_hf_parity.py's random Gemma 3 (MQA, local and global layers, sandwich norms) in hire's format in
    `folder`, with predictors as hire_model's."""
    save("gemma3", folder.parent / "gemma3-hf")
    convert(folder.parent / "gemma3-hf", folder)
    save_predictors(folder, build_predictors(load_model(folder), ["lr", "int8"], 16), {"rank": 16})
    return folder


@pytest.mark.parametrize("model", ["stories260K", "gemma3"])
def test_hire_engine_on_four_devices(tmp_path, model):
    """The engine with HiRE over 4 devices of one process generates the single-device engine's tokens (greedy and
    seeded, logprobs within 1e-4) for every setting in HIRE, on stories260K and on a random Gemma 3; the bundle and
    predictors are split where 4 divides their rows; and no collective of a decode step moves as much as one
    device's share of the bundle (GSPMD alone gathers the whole bundle every step)."""
    folder = (hire_model if model == "stories260K" else gemma3_hire_model)(tmp_path / f"{model}-hire")
    out = finish(subprocess.Popen([sys.executable, __file__, "hire", str(folder)], env=os.environ | {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), timeout=240)
    assert set(out) == set(HIRE)
    for name, got in out.items():
        assert got["same_tokens"] and got["logprob_error"] < 1e-4, (name, got)
    assert out["lr"]["splits"] == {"bundle": True, "softmax/a": False, "softmax/b": True, "ffn/predictor/a": False,
                                   "ffn/predictor/b": True}
    # Gemma's 96 neurons make 24 groups of 4, which 4 devices split; stories260K's 172 make 43
    assert out["int8, union, 43 groups"]["splits"] == {"bundle": model == "gemma3", "softmax/q": True,
                                                       "ffn/predictor/q": True}
    for got in out.values():
        assert not got["splits"]["bundle"] or 0 < got["largest_collective"] < got["bundle_share"], got


def hire_engines(folder: str) -> dict:
    """What test_hire_engine_on_four_devices checks, run here with this process's devices."""
    mesh, out = sharding.make_mesh(), {}
    for name, setting in HIRE.items():
        one = Engine(load_model(folder, **setting), slots=4, max_len=16)  # one bucket: one prefill, one decode
        loaded = sharding.load_sharded(folder, mesh, **setting)
        split = Engine(loaded, slots=4, max_len=16, mesh=mesh)
        want, got = (generate(e, HIRE_PROMPTS, HIRE_PARAMS, chunk=8) for e in (one, split))
        hire, layer = loaded.variables["hire"], loaded.variables["params"]["layers_0"]
        arrays = {"bundle": layer["ffn"]["bundle"]} | {f"softmax/{k}": v for k, v in hire["softmax"].items()
                                                        if k != "scale"}
        arrays |= {f"ffn/predictor/{k}": v for k, v in hire["layers_0"]["ffn"]["predictor"].items() if k != "scale"}
        out[name] = {"same_tokens": all(g.tokens == w.tokens for g, w in zip(got, want)),
                     "logprob_error": max(float(np.max(np.abs(np.subtract(g.logprobs, w.logprobs))))
                                          for g, w in zip(got, want)),
                     "splits": {k: v.sharding.spec != P() for k, v in arrays.items()}}
        if out[name]["splits"]["bundle"]:
            text = split._generate_steps.lower(split.variables, split.init_state(), 8, 16).compile().as_text()
            moved = [np.prod([int(d) for d in dims.split(",") if d])  # elements of each collective's result
                     for dims in re.findall(r"= \w+\[([\d,]*)\]\S* (?:all-reduce|all-gather|collective-permute|"
                                            r"all-to-all)", text)]
            out[name] |= {"largest_collective": int(max(moved)), "bundle_share": layer["ffn"]["bundle"].size // 4}
    return out


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


def all_gathers(text: str) -> list[list[int]]:
    """The result shape of each all-gather in a compiled program's text."""
    return [[int(d) for d in dims.split(",")] for dims in re.findall(r"= \w+\[([\d,]*)\]\S* all-gather", text)]


def gather_switch() -> dict:
    """What test_engine_gather_logits_switch checks, run here with this process's devices."""
    mesh = sharding.make_mesh()
    engines = {name: Engine(sharding.load_sharded("stories260K", mesh), slots=4, max_len=16, mesh=mesh,
                            gather_logits=name == "gather") for name in ("da_top_k", "gather")}
    params = [SamplingParams(temperature=0.0, max_tokens=8, logprobs=True),
              SamplingParams(temperature=0.9, top_k=5, max_tokens=8, seed=1, logprobs=True)] * 2
    want, got = (generate(engines[name], HIRE_PROMPTS, params, chunk=8) for name in ("da_top_k", "gather"))
    return {"vocab": engines["gather"].cfg.vocab_size,
            "same_tokens": all(g.tokens == w.tokens for g, w in zip(got, want)),
            "logprob_error": max(float(np.max(np.abs(np.subtract(g.logprobs, w.logprobs)))) for g, w in zip(got, want)),
            "all_gathers": {name: all_gathers(e._generate_steps.lower(
                e.variables, e.init_state(), 8, 16).compile().as_text()) for name, e in engines.items()}}



if __name__ == "__main__":
    what = sys.argv[1:2]
    print(json.dumps(hire_engines(sys.argv[2]) if what == ["hire"] else gather_switch() if what == ["engine"]
                     else sampler_paths()))
