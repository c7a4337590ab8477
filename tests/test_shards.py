"""The sharded engine on a real multi-node Ray cluster on this machine: a head and two worker nodes, one
host (ShardWorker) per worker node, two CPU devices per host, one JAX program over the four devices; exact and
with HiRE."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time

import jax
import numpy as np
import pytest
import ray
from jax.sharding import PartitionSpec as P
from ray_nodes import add_node, host_cluster
from test_sharded_sampling import hire_model

from hire import sharding
from hire.checkpoint import load_model
from hire.config import ModelConfig
from hire.engine import Engine, compilation_cache_folder
from hire.engine_api import EngineUnavailable
from hire.formats import expected_variables
from hire.generate import generate
from hire.sampling import SamplingParams
from hire.scheduler import Scheduler
from workers.shards import RETRY_S, ShardedEngine, check_servable

HOSTS, DEVICES = 2, 2
PROMPTS = ["Once upon a time", "The cat sat", "Lily was", "One day, a big"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, logprobs=True)  # prompts and outputs fit the first bucket
LONG = "Once upon a time, there was a little girl named Lily. She"  # 17 tokens: the second bucket (max_len 32)
CHUNK = 4  # decode steps per call everywhere here, so one decode program is compiled (and rebuilt) for all tests
# default's serving setting (int8 predictors; each token keeps its exact top ffn_k of the candidates) at
# stories260K's size: its 512 tokens and 172 groups of 1 neuron split over the 4 devices
SERVING_HIRE = dict(softmax="hire-q", softmax_k=8, softmax_oversample=2, ffn="group-sparse", ffn_predictor="q",
                    ffn_group=1, ffn_k=8, ffn_oversample=2, ffn_keep_k=True)


@pytest.fixture(scope="module")
def local_cluster():
    with host_cluster(HOSTS, num_cpus=0) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def sharded(local_cluster):
    engine = ShardedEngine("stories260K", HOSTS, DEVICES, slots=4, max_len=32, call_timeout=120, start_timeout=120,
                           compilation_cache=compilation_cache_folder())
    try:
        yield engine
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def one_process():
    return Engine(load_model("stories260K"), slots=4, max_len=32)


@pytest.fixture(scope="module")
def expected(one_process):
    return generate(one_process, PROMPTS, GREEDY)


def assert_same(got, want):
    for g, w in zip(got, want):
        assert g.tokens == w.tokens and g.text == w.text
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-4)


def test_hosts_spread_over_nodes(sharded):
    """One host per worker node (STRICT_SPREAD over the nodes with a hire_host), all in one JAX program."""
    hire_hosts = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("hire_host")}
    assert [i["rank"] for i in sharded.group.info] == list(range(HOSTS))
    assert sorted(i["node"] for i in sharded.group.info) == sorted(hire_hosts)
    assert all(i["devices"] == HOSTS * DEVICES for i in sharded.group.info)


def test_greedy_matches_one_process(sharded, expected):
    sharded.warm_up(CHUNK)  # compiled again by every rebuild, before the requests are retried
    assert_same(generate(sharded, PROMPTS, GREEDY, chunk=CHUNK), expected)
    with pytest.raises(ValueError, match="prompt"):
        sharded.prefill([], GREEDY)


def test_top_k_sampling_matches_one_process(sharded, one_process):
    """Sampled with top-k over the hosts (DA-TOP-k: the logits stay split) or top-p (the gathered-logits fallback):
    the same seeds draw the single-process engine's tokens."""
    params = [SamplingParams(temperature=0.9, top_k=5, max_tokens=10, seed=1, logprobs=True),
              SamplingParams(temperature=1.2, top_k=40, max_tokens=10, seed=2, logprobs=True),
              SamplingParams(temperature=0.7, top_p=0.9, max_tokens=10, seed=3, logprobs=True), GREEDY]
    assert_same(generate(sharded, PROMPTS, params, chunk=CHUNK), generate(one_process, PROMPTS, params))


def test_each_host_holds_its_slice(sharded):
    """Split tensors: a host holds its DEVICES of HOSTS * DEVICES pieces; replicated ones: one copy."""
    cfg = sharded.cfg
    want = 0
    for name, v in expected_variables(cfg).items():
        split = sharding.variable_spec(name, v.shape, HOSTS * DEVICES) != P()
        want += v.size * v.dtype.itemsize // (HOSTS if split else 1)
    total = sum(a.nbytes for a in jax.tree.leaves(load_model("stories260K").variables))
    assert [i["held_bytes"] for i in sharded.group.info] == [want] * HOSTS
    assert want < 0.51 * total


def serve_all(engine, prompts, on_event=None, timeout: float = 150.0) -> list:
    """Every prompt through a hire.scheduler.Scheduler over `engine`: each request's Completion, or
    the exception it ended with. `on_event(index, item)` sees every event on the scheduler thread."""
    outcomes, done = {}, threading.Event()

    def sink(i):
        def put(item):
            if on_event:
                on_event(i, item)
            if isinstance(item, Exception) or item.finish_reason:
                outcomes[i] = item
                if len(outcomes) == len(prompts):
                    done.set()
        return put

    scheduler = Scheduler(engine, queue_size=8, chunk=CHUNK).start()
    try:
        jobs = [scheduler.submit(engine.tokenizer.encode(p), GREEDY, -1, sink(i)) for i, p in enumerate(prompts)]
        assert done.wait(timeout), f"requests hung: {len(outcomes)} of {len(prompts)} ended"
        assert scheduler.alive
    finally:
        scheduler.stop()
    return [outcomes[i] if isinstance(outcomes[i], Exception) else job.request.out for i, job in enumerate(jobs)]


def fault_at(nth: int, fault):
    """An on_event that calls `fault()` once, when request 0 has streamed `nth` tokens: mid-generation."""
    seen = []

    def on_event(i, item):
        if i == 0 and not isinstance(item, Exception):
            seen.append(item)
            if len(seen) == nth:
                fault()
    return on_event


def assert_cut(outcomes, expected, *why: str) -> None:
    """Request 0, which was streaming at the fault, and any other that had streamed a token ended with
    EngineUnavailable for a stream cut mid-way: one line naming what was lost (each of `why`), with a retry hint and
    none of Ray's internals. The others (which had no token yet: when each was admitted is up to the race) were
    retried on the rebuilt group and end as on one process."""
    assert isinstance(outcomes[0], EngineUnavailable), outcomes[0]
    for o, want in zip(outcomes, expected):
        if not isinstance(o, EngineUnavailable):
            assert_same([o], [want])
            continue
        assert str(o).startswith("the stream was cut after ") and all(w in str(o) for w in why), o
        assert o.retry_after == RETRY_S and "\n" not in str(o), o
        assert not any(word in str(o) for word in ("ActorID", "pid=", "node_id", "Resources", "Gloo")), o


def test_killed_host_mid_generation(sharded, expected):
    """A host process killed mid-generation: the streams cut mid-way end at once with UNAVAILABLE; the group is
    rebuilt on the same nodes (they answer) and the requests that had no token yet run on it as on one process."""
    before, pid = len(sharded.recoveries), sharded.group.info[1]["pid"]
    outcomes = serve_all(sharded, PROMPTS + PROMPTS[:2], fault_at(3, lambda: os.kill(pid, signal.SIGKILL)))
    assert_cut(outcomes, expected + expected[:2], "shard host on node", "lost (its process died",
               "1 of 2 hosts left; rebuilding")
    assert len(sharded.recoveries) == before + 1 and sharded.ping() and sharded.group.hosts == HOSTS
    assert sharded.group.info[1]["pid"] != pid and sharded.unavailable is None


def test_rebuild_serves_before_the_larger_buckets_load(sharded, one_process):
    """A rebuilt group warms up the smallest prompt bucket only, so it serves sooner: each host holds one program of
    each kind; a prompt of the larger bucket loads that bucket's programs then, and is answered as on one process."""
    sharded.warm_up(CHUNK)
    os.kill(sharded.group.info[1]["pid"], signal.SIGKILL)
    assert sharded.recover()
    assert sharded.programs() == [{"prefill": 1, "insert": 1, "generate_steps": 1}] * HOSTS
    assert_same(generate(sharded, [LONG], GREEDY, chunk=CHUNK), generate(one_process, [LONG], GREEDY))
    assert [p["prefill"] for p in sharded.programs()] == [2] * HOSTS


def test_hung_host_mid_generation(sharded, expected):
    """A host that stops answering (SIGSTOP) misses its heartbeat: noticed in seconds, not at the call's 120 s
    timeout; the streams cut end, the group is rebuilt and the other requests' outputs are unchanged."""
    before, pid = len(sharded.recoveries), sharded.group.info[1]["pid"]
    assert sharded.group.call_timeout == 120
    try:
        outcomes = serve_all(sharded, PROMPTS + PROMPTS[:2], fault_at(2, lambda: os.kill(pid, signal.SIGSTOP)))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert_cut(outcomes, expected + expected[:2], f"lost (no heartbeat for {sharded.group.heartbeat_timeout:.0f} s)")
    assert len(sharded.recoveries) == before + 1 and sharded.ping()


def test_unrecoverable_group_fails_requests(sharded, expected):
    """When the group cannot be rebuilt, requests end with EngineUnavailable (none hangs) saying so in one line with
    a retry hint; a retry after it, once the group can be rebuilt, is served."""
    model, pid = sharded.group.model, sharded.group.info[1]["pid"]
    os.kill(pid, signal.SIGKILL)
    sharded.group.model = "/nonexistent/model"
    try:
        outcomes = serve_all(sharded, PROMPTS[:2])
    finally:
        sharded.group.model = model
    assert all(isinstance(o, EngineUnavailable) and "rebuilding" in str(o) and o.retry_after == RETRY_S
               for o in outcomes), outcomes
    assert sharded.unavailable is not None and sharded.degraded
    time.sleep(RETRY_S)
    assert_same(serve_all(sharded, PROMPTS[:1]), expected[:1])
    assert sharded.unavailable is None and not sharded.degraded


def host_node(cluster, engine, rank: int):
    """The cluster_utils node that runs host `rank`."""
    (node,) = [n for n in cluster.list_all_nodes() if n.node_id == engine.group.info[rank]["node"]]
    return node


def test_lost_node_reshards_and_grows_back(sharded, expected, local_cluster):
    """A worker node lost mid-generation: the streams cut end, the model is re-sharded onto the one host left and
    serves the requests that had no token yet as one process would; a new node grows the group back to two hosts between
    requests. With a model that needs both hosts (min_hosts 2) a lost node fails requests at once, saying how many
    hosts are left, until a node returns."""
    node = host_node(local_cluster, sharded, 1)
    outcomes = serve_all(sharded, PROMPTS + PROMPTS[:2], fault_at(3, lambda: local_cluster.remove_node(node)))
    assert_cut(outcomes, expected + expected[:2], "1 of 2 hosts left; rebuilding")
    assert sharded.group.hosts == 1 and sharded.recoveries[-1]["hosts"] == 1 and sharded.degraded
    assert not sharded.recover(grow=True)  # no node to grow onto

    add_node(local_cluster, num_cpus=1, resources={"hire_host": 1})
    assert sharded.recover(grow=True) and sharded.group.hosts == HOSTS and not sharded.degraded
    assert_same(generate(sharded, PROMPTS, GREEDY, chunk=CHUNK), expected)

    sharded.group.min_hosts = 2
    try:
        local_cluster.remove_node(host_node(local_cluster, sharded, 0))
        (failed,) = serve_all(sharded, PROMPTS[:1])
        assert isinstance(failed, EngineUnavailable) and failed.retry_after == RETRY_S, failed
        assert "1 of 2 hosts can be placed and the model needs 2; rebuilding when a node returns" in str(failed)
        assert sharded.unavailable == str(failed)
    finally:
        sharded.group.min_hosts = 1
        add_node(local_cluster, num_cpus=1, resources={"hire_host": 1})
    time.sleep(RETRY_S)
    assert_same(serve_all(sharded, PROMPTS[:1]), expected[:1])
    assert sharded.group.hosts == HOSTS


def test_hire_matches_one_process(sharded, tmp_path):
    """HiRE over the two hosts: a group of a model with predictors, started with default's serving setting
    (it takes the nodes of the `sharded` group, which it shuts down: this test runs after the others that use it),
    holds a share of the bundles and predictors on each host and generates the single-process engine's tokens."""
    folder = hire_model(tmp_path / "stories260K-hire")
    sharded.shutdown()
    engine = ShardedEngine(str(folder), HOSTS, DEVICES, slots=4, max_len=16, call_timeout=120, start_timeout=120,
                           hire=SERVING_HIRE)
    try:
        one = Engine(load_model(folder, **SERVING_HIRE), slots=4, max_len=16)
        assert engine.cfg == one.cfg and engine.cfg.sparse
        params = [GREEDY, SamplingParams(temperature=0.9, top_k=5, max_tokens=10, seed=1, logprobs=True), GREEDY,
                  GREEDY]
        assert_same(generate(engine, PROMPTS, params, chunk=CHUNK), generate(one, PROMPTS, params, chunk=CHUNK))
        total = sharding.held_bytes(one.variables)
        assert all(i["held_bytes"] < 0.51 * total for i in engine.group.info), (engine.group.info, total)
    finally:
        engine.shutdown()


def test_check_servable():
    """`hire serve --hosts N` takes HiRE (default recommends it) and refuses, naming `hire`, a setting that is
    not valid or has no predictors."""
    check_servable("stdlib-9m")
    check_servable("stories260K", hire={"softmax": "dense"})
    with pytest.raises(ValueError, match="^hire: .* needs the predictors"):
        check_servable("stories260K", hire={"softmax": "hire-q"})
    with pytest.raises(ValueError, match="^hire: invalid ModelConfig: ffn_group"):
        check_servable("stories260K", hire={"ffn": "group-sparse", "ffn_group": 5})
    with pytest.raises(ValueError, match="^lora: "):
        check_servable("stories260K", lora={"a": "adapters/a"})


def test_rules_name_real_variables():
    """Every rule matches a variable of a model that has it, so a renamed parameter cannot go silently unsplit."""
    base = dict(vocab_size=64, dim=16, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=32)
    hire = dict(ffn="group-sparse", ffn_group=2)
    names = {n for cfg in (ModelConfig(**base, attention_bias=True), ModelConfig(**base, n_experts=2),
                           ModelConfig(**base, **hire, softmax="hire-lr"),
                           ModelConfig(**base, **hire, softmax="hire-q", ffn_predictor="q"))
             for n in expected_variables(cfg)}
    for rule in sharding.RULES:
        assert any(re.search(rf"/{rule}(_\d+)?$", n) for n in names), rule  # moe/up_0: expert 0's moe/up
    assert sharding.variable_spec("params/layers_0/attn/q/kernel", (16, 16), 4) == P(None, "model")
    assert sharding.variable_spec("params/layers_0/ffn/down/kernel", (30, 16), 4) == P()  # 4 does not divide 30
    assert sharding.variable_spec("params/norm/weight", (16,), 4) == P()
    assert sharding.variable_spec("params/layers_0/moe/down_1", (32, 16), 4) == P("model", None)
    assert sharding.variable_spec("params/layers_0/ffn/bundle", (16, 3, 2, 16), 4) == P("model", None)
    assert sharding.variable_spec("params/layers_0/ffn/bundle", (6, 3, 2, 16), 4) == P()  # 4 does not divide 6
    assert sharding.variable_spec("hire/softmax/b", (8, 64), 4) == P(None, "model")
    assert sharding.variable_spec("hire/softmax/a", (16, 8), 4) == P()
    assert sharding.variable_spec("hire/layers_0/ffn/predictor/scale", (64,), 4) == P("model")

