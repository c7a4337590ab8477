"""hire.topk: top-k methods, the DA-TOP-k recall formula, DA-TOP-k on 1-8 devices and across 2 processes.

Multi-device checks run this file as a script in subprocesses (`python tests/test_topk.py devices` or
`... process ID PORT CACHE`), since the host device count is fixed when JAX's backend starts.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hire.engine import use_compilation_cache
from hire.topk import METHODS, da_top_k, gather_top_k, k_local_for_recall, shard_recall, threshold_candidates, top_k

REPO = Path(__file__).resolve().parents[1]
ROWS, DIM, BATCH, K = 1024, 32, 4, 16  # the DA-TOP-k problem: 1024 rows scored for 4 queries, top 16
DEVICE_COUNTS = (1, 2, 4, 8)
CACHE_HIT = "/jax/compilation_cache/cache_hits"


def small_k_local(shards: int) -> int:
    """The fewest candidates per shard that still make K in all: recall < 1 on 2 or more shards."""
    return -(-K // shards)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[-1] for a, b in zip(found, truth)]))


@pytest.mark.parametrize("method", METHODS)
def test_methods_shapes_and_recall(method):
    scores = jax.random.normal(jax.random.key(0), (2, 3, 8192))
    values, indices = jax.jit(lambda s: top_k(s, 32, method))(scores)
    assert values.shape == indices.shape == (2, 3, 32) and indices.dtype == jnp.int32
    np.testing.assert_array_equal(values, jnp.take_along_axis(scores, indices, -1))
    assert bool(jnp.all(values[..., :-1] >= values[..., 1:]))
    truth = jax.lax.top_k(scores, 32)[1]
    found = recall(np.asarray(indices).reshape(6, 32), np.asarray(truth).reshape(6, 32))
    assert found >= (0.9 if method == "approx" else 1.0)  # approx_max_k is exact on CPU, ~recall_target on TPU


def test_bad_arguments():
    scores = jnp.zeros((2, 16))
    with pytest.raises(ValueError, match="unknown top-k method"):
        top_k(scores, 4, "sort")
    with pytest.raises(ValueError, match="k must be"):
        top_k(scores, 17)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("rows",))
    with pytest.raises(ValueError, match="fewer than k"):
        da_top_k(lambda h, w: h @ w.T, jnp.ones((1, 4)), jnp.ones((16, 4)), mesh=mesh, axis="rows", k=4, k_local=3)


def test_statistical_threshold_on_gaussian_scores():
    """About capacity / 2 entries pass, never outside [k, capacity], and they hold the exact top-k."""
    k, capacity = 64, 256
    scores = jax.random.normal(jax.random.key(1), (16, 65536)) * 3.0 - 5.0
    values, indices, passed = jax.jit(threshold_candidates, static_argnums=1)(scores, capacity)
    passed = np.asarray(passed)
    assert np.all((passed >= k) & (passed <= capacity))
    assert abs(passed.mean() / (capacity / 2) - 1) < 0.1
    indices = np.asarray(indices)
    filled = np.arange(capacity)[None] < passed[:, None]
    assert all(np.all(np.diff(i[:p]) > 0) for i, p in zip(indices, passed))  # compacted in index order
    np.testing.assert_array_equal(np.where(filled, values, 0), np.where(filled, np.take_along_axis(
        np.asarray(scores), np.minimum(indices, 65535), -1), 0))
    truth = np.asarray(jax.lax.top_k(scores, k)[1])
    assert all(set(t) <= set(i[f]) for t, i, f in zip(truth, indices, filled))


def test_statistical_falls_back_to_exact():
    """A constant row (everything passes) or a lone outlier (one passes) gives lax.top_k for the batch."""
    normal = jax.random.normal(jax.random.key(2), (2, 4096))
    run = jax.jit(lambda s: (threshold_candidates(s, 64)[2], top_k(s, 16, "statistical", capacity=64)))
    for odd in (jnp.ones(4096), jnp.zeros(4096).at[7].set(1e6)):
        scores = jnp.concatenate([normal, odd[None]])
        passed, result = run(scores)
        assert passed[-1] < 16 or passed[-1] > 64
        for got, want in zip(result, jax.lax.top_k(scores, 16)):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("n, k, shards", [(1024, 32, 8), (4096, 64, 4), (960, 50, 3)])
def test_shard_recall_matches_simulation(n, k, shards):
    """The hypergeometric recall against random placements of the top-k rows, 4000 trials."""
    trials = 4000
    rng = np.random.default_rng(0)
    top_rows = np.argpartition(rng.random((trials, n)), k, axis=-1)[:, :k]
    per_shard = np.stack([np.sum(top_rows // (n // shards) == s, -1) for s in range(shards)], -1)
    for k_local in range(-(-k // shards), min(k, n // shards) + 1, 3):
        simulated = np.minimum(per_shard, k_local).sum(-1) / k
        stderr = simulated.std() / np.sqrt(trials)
        assert abs(simulated.mean() - shard_recall(k, shards, n, k_local)) < max(4 * stderr, 1e-3)


def test_k_local_for_recall_is_smallest():
    for k, shards, n, target in [(64, 8, 262144, 0.99), (50, 4, 32000, 0.95), (16, 2, 64, 0.999), (64, 1, 4096, 0.9)]:
        k_local = k_local_for_recall(k, shards, n, target)
        assert shard_recall(k, shards, n, k_local) >= target
        if k_local > -(-k // shards):
            assert shard_recall(k, shards, n, k_local - 1) < target
    assert k_local_for_recall(64, 8, 262144, 0.99) == 13
    assert k_local_for_recall(64, 1, 4096, 0.5) == 64 and shard_recall(64, 1, 4096, 64) == 1.0


def problem() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W [ROWS, DIM] and one-hot queries h [BATCH, DIM]: h @ W.T picks columns of W exactly (no rounding)."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    h = np.eye(DIM, dtype=np.float32)[rng.choice(DIM, BATCH, replace=False)]
    return w, h, h @ w.T


def approx_weight(w):
    """A deterministic stand-in for a HiRE predictor's copy of W: close to it, ranking rows differently."""
    return w + 0.5 * jnp.sin(7 * w)


def da_reference(scores: np.ndarray, shards: int, k_local: int, approx: np.ndarray | None = None,
                 candidates: int = 0) -> np.ndarray:
    """DA-TOP-k in numpy: each shard's top k_local (of its top `candidates` by `approx`, when given), then the
    top K of the candidates."""
    m = scores.shape[-1] // shards
    picked = []
    for s in range(shards):
        rows = np.arange(s * m, (s + 1) * m)[None].repeat(len(scores), 0)
        if approx is not None:
            rows = np.take_along_axis(rows, np.argsort(-approx[:, s * m:(s + 1) * m], -1)[:, :candidates], -1)
        order = np.argsort(-np.take_along_axis(scores, rows, -1), -1)[:, :k_local]
        picked.append(np.take_along_axis(rows, order, -1))
    candidates = np.concatenate(picked, -1)
    order = np.argsort(-np.take_along_axis(scores, candidates, -1), -1)[:, :K]
    return np.take_along_axis(candidates, order, -1)


def sharded_results(mesh: jax.sharding.Mesh, w: jax.Array, h: jax.Array) -> dict[str, list]:
    """Indices from gather_top_k and da_top_k (k_local = K, small_k_local, statistical local; and rescoring
    approximate candidates: all rows, or 2 x small_k_local of them), jitted."""
    def scores(h, w):
        return h @ w.T

    def rescore(h, w, rows):
        return jnp.einsum("bd,bcd->bc", h, w[rows])

    def run(fn, **kw):
        return np.asarray(jax.jit(lambda h, w: fn(scores, h, w, mesh=mesh, axis="rows", k=K, **kw))(h, w)[1])

    def run_rescored(candidates, k_local):
        step = jax.jit(lambda h, w: da_top_k(lambda h, w: h @ approx_weight(w).T, h, w, mesh=mesh, axis="rows", k=K,
                                             k_local=k_local, rescore=rescore, candidates=candidates))
        return np.asarray(step(h, w)[1])

    shards = mesh.shape["rows"]
    return {"gather": run(gather_top_k), "full": run(da_top_k, k_local=K),
            "small": run(da_top_k, k_local=small_k_local(shards)),
            "statistical": run(da_top_k, k_local=K, method="statistical"),
            "rescored_all": run_rescored(ROWS // shards, K),
            "rescored": run_rescored(2 * small_k_local(shards), small_k_local(shards))}


def check_against_reference(results: dict[str, list], shards: int, scores: np.ndarray) -> None:
    exact = np.argsort(-scores, -1)[:, :K]
    for name in ("gather", "full", "statistical", "rescored_all"):
        np.testing.assert_array_equal(results[name], exact, err_msg=f"{name} on {shards} shards")
    np.testing.assert_array_equal(results["small"], da_reference(scores, shards, small_k_local(shards)))
    w, h, _ = problem()
    approx = h @ np.asarray(approx_weight(w)).T
    np.testing.assert_array_equal(results["rescored"], da_reference(scores, shards, small_k_local(shards), approx,
                                                                    2 * small_k_local(shards)))
    assert recall(np.asarray(results["rescored"]), exact) < 1  # the approximate scores did miss some


def run_script(*args: str, devices: int) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, __file__, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"subprocess timed out: {err[-2000:]}")
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1])


def test_da_top_k_on_1_2_4_8_devices():
    """On 1, 2, 4, 8 host devices: k_local = k equals exact top-k; smaller k_local equals the numpy DA-TOP-k."""
    results = finish(run_script("devices", devices=8))
    _, _, scores = problem()
    assert sorted(results) == [str(d) for d in DEVICE_COUNTS]
    for shards in DEVICE_COUNTS:
        check_against_reference(results[str(shards)], shards, scores)
    truth = np.argsort(-scores, -1)[:, :K]
    assert all(recall(np.asarray(results[str(s)]["small"]), truth) < 1 for s in (2, 4, 8))  # candidates were cut


def test_da_top_k_across_two_processes(tmp_path):
    """jax.distributed with 2 processes x 2 CPU devices (gloo): a 4-device mesh gives the one-process result. Run
    twice over one compilation cache: the second time both processes load their programs, rank 1 included (jax
    writes the cache from process 0 only, and rank 1's keys differ from rank 0's)."""
    hits = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [run_script("process", str(i), str(port), str(tmp_path), devices=2) for i in range(2)]
        try:
            results = [finish(p) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        _, _, scores = problem()
        for r in results:
            check_against_reference(r, 4, scores)
        hits.append([r.pop("cache_hits") for r in results])
    assert hits[0] == [0, 0] and min(hits[1]) > 0, hits


def test_bench_topk_command():
    """`hire bench topk` makes its host devices inside the command and prints its JSON."""
    proc = subprocess.Popen([sys.executable, "-m", "hire.cli", "bench", "topk", "--devices", "2", "--vocab", "4096",
                             "--batch", "2", "--k", "16", "--dim", "32", "--repeats", "1"], cwd=REPO,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out = finish(proc)
    assert out["devices"] == 2 and out["k_local"] == k_local_for_recall(16, 2, 4096, 0.99)
    assert out["merge_only"]["recall"] == out["recall"] >= 0.9
    assert out["single_device"]["exact"]["recall"] == out["single_device"]["statistical"]["recall"] == 1.0
    assert out["exact_ms"] > 0 and out["da_top_k_ms"] > 0 and out["speedup_vs_exact"] > 0
    hire = out["hire"]  # DA-TOP-k scored by the int8 copy, candidates rescored exactly
    assert hire["predictor"] == "int8" and hire["candidates_per_shard"] == 4 * out["k_local"]
    assert hire["recall"] >= 0.9 and hire["ms"] > 0 and hire["bytes_read"] < hire["exact_bytes_read"]


def test_bench_topk_on_a_models_softmax(tmp_path):
    """`hire bench topk --model --text` ranks a real model's vocabulary (stories260K: 512 rows of 64) for its hidden
    states on the text; its top-k of the model's own logits is what every method is scored against. Shards of
    consecutive token ids break the recall formula's assumption (this model's top 16 crowd into one half);
    --shuffle-rows restores it."""
    text = tmp_path / "story.txt"
    text.write_text("Once upon a time, there was a little girl named Lily. She loved to play outside. " * 4)
    out = {}
    for flags in ([], ["--shuffle-rows"]):
        proc = subprocess.Popen([sys.executable, "-m", "hire.cli", "bench", "topk", "--devices", "2", "--batch", "4",
                                 "--k", "16", "--repeats", "1", "--model", str(REPO / "tests" / "data" / "stories260K"),
                                 "--text", str(text), *flags], cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out[bool(flags)] = finish(proc)
        assert (out[bool(flags)]["vocab"], out[bool(flags)]["dim"], out[bool(flags)]["batch"]) == (512, 64, 4)
        assert out[bool(flags)]["single_device"]["exact"]["recall"] == 1.0
    assert out[False]["weights"] == "model" and out[True]["weights"] == "model, rows shuffled"
    assert out[False]["recall"] < 0.9 < out[True]["recall"] and out[True]["hire"]["recall"] > 0.9


def main(argv: list[str]) -> None:
    """Subprocess entry: `devices` (one process, meshes of 1-8 devices) or `process ID PORT CACHE` (2 processes)."""
    w, h, _ = problem()
    if argv[0] == "devices":
        out = {}
        for shards in DEVICE_COUNTS:
            mesh = jax.sharding.Mesh(np.array(jax.devices()[:shards]), ("rows",))
            results = sharded_results(mesh, jnp.asarray(w), jnp.asarray(h))
            out[shards] = {name: a.tolist() for name, a in results.items()}
    else:
        hits = []
        jax.monitoring.register_event_listener(lambda event, **_: hits.append(event == CACHE_HIT))
        use_compilation_cache(argv[3])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # keep even these small programs
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{argv[2]}", num_processes=2,
                                   process_id=int(argv[1]), initialization_timeout=60)
        assert jax.device_count() == 4 and jax.local_device_count() == 2
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("rows",))
        sharding = jax.sharding.NamedSharding
        global_w = jax.make_array_from_callback(w.shape, sharding(mesh, jax.P("rows")), lambda i: w[i])
        global_h = jax.make_array_from_callback(h.shape, sharding(mesh, jax.P()), lambda i: h[i])
        out = {name: a.tolist() for name, a in sharded_results(mesh, global_w, global_h).items()}
        out["cache_hits"] = sum(hits)
        jax.distributed.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
