"""The sharded engine on a real multi-node Ray cluster on this machine: a head and two worker nodes, one
host (ShardWorker) per worker node, two CPU devices per host, one JAX program over the four devices."""
from __future__ import annotations

import time

import jax
import numpy as np
import pytest
import ray
from jax.sharding import PartitionSpec as P
from ray.cluster_utils import Cluster

from cluster.shards import ShardedEngine, ShardGroupError
from hire import sharding
from hire.checkpoint import load_model
from hire.config import ModelConfig
from hire.engine import Engine
from hire.formats import expected_variables
from hire.generate import generate
from hire.sampling import SamplingParams

HOSTS, DEVICES = 2, 2
PROMPTS = ["Once upon a time", "The cat sat", "Lily was", "One day, a big"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, logprobs=True)  # prompts and outputs fit one bucket


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    engine = None
    try:
        for _ in range(HOSTS):
            cluster.add_node(num_cpus=1, resources={"hire_host": 1})
        ray.init(address=cluster.address, include_dashboard=False)
        engine = ShardedEngine("stories260K", HOSTS, DEVICES, slots=4, max_len=16, call_timeout=120,
                               start_timeout=120, compilation_cache=str(tmp_path_factory.mktemp("xla")))
        yield engine
    finally:
        if engine is not None:
            engine.shutdown()
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def expected():
    return generate(Engine(load_model("stories260K"), slots=4, max_len=16), PROMPTS, GREEDY)


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
    sharded.warm_up(16)
    assert_same(generate(sharded, PROMPTS, GREEDY), expected)
    with pytest.raises(ValueError, match="prompt"):
        sharded.prefill([], GREEDY)


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


def test_dead_host_then_restart(sharded, expected):
    assert sharded.ping()
    ray.kill(sharded.group.workers[1])
    deadline = time.monotonic() + 30  # the kill takes effect soon, not at once
    while sharded.ping(timeout=5):
        assert time.monotonic() < deadline, "a killed host still answers ping"
        time.sleep(0.2)
    with pytest.raises(ShardGroupError, match="died"):
        sharded.init_state()
    sharded.restart()
    assert sharded.ping()
    assert_same(generate(sharded, PROMPTS[:1], GREEDY), expected[:1])


def test_rules_name_real_variables():
    """Every rule matches a variable of a model that has it, so a renamed parameter cannot go silently unsplit."""
    base = dict(vocab_size=64, dim=16, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=32)
    names = {n for cfg in (ModelConfig(**base, attention_bias=True), ModelConfig(**base, n_experts=2))
             for n in expected_variables(cfg)}
    for rule in sharding.RULES:
        assert any(n.endswith("/" + rule) for n in names), rule
    assert sharding.variable_spec("params/layers_0/attn/q/kernel", (16, 16), 4) == P(None, "model")
    assert sharding.variable_spec("params/layers_0/ffn/down/kernel", (30, 16), 4) == P()  # 4 does not divide 30
    assert sharding.variable_spec("params/norm/weight", (16,), 4) == P()
