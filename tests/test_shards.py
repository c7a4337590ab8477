"""The sharded engine on a real multi-node Ray cluster on this machine: a head and two worker nodes, one
host (ShardWorker) per worker node, two CPU devices per host, one JAX program over the four devices; exact and
with HiRE."""
from __future__ import annotations

import contextlib
import os
import signal
import threading

import jax
import numpy as np
import pytest
import ray
from jax.sharding import PartitionSpec as P
from ray.cluster_utils import Cluster
from test_sharded_sampling import hire_model

from cluster.shards import ShardedEngine, check_servable
from hire import sharding
from hire.checkpoint import load_model
from hire.config import ModelConfig
from hire.engine import Engine, EngineUnavailable
from hire.formats import expected_variables
from hire.generate import generate
from hire.sampling import SamplingParams
from hire.scheduler import Scheduler

HOSTS, DEVICES = 2, 2
PROMPTS = ["Once upon a time", "The cat sat", "Lily was", "One day, a big"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, logprobs=True)  # prompts and outputs fit one bucket
CHUNK = 4  # decode steps per call everywhere here, so one decode program is compiled (and rebuilt) for all tests
# default's serving setting (int8 predictors; each token keeps its exact top ffn_k of the candidates) at
# stories260K's size: its 512 tokens and 172 groups of 1 neuron split over the 4 devices
SERVING_HIRE = dict(softmax="hire-q", softmax_k=8, softmax_oversample=2, ffn="group-sparse", ffn_predictor="q",
                    ffn_group=1, ffn_k=8, ffn_oversample=2, ffn_keep_k=True)


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
def one_process():
    return Engine(load_model("stories260K"), slots=4, max_len=16)


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


def test_killed_host_mid_generation(sharded, expected):
    """A host process killed while every slot decodes: the group is rebuilt and every request goes on from its
    prompt and tokens so far to the single-process output."""
    before, pid = len(sharded.recoveries), sharded.group.info[1]["pid"]
    assert_same(serve_all(sharded, PROMPTS, fault_at(3, lambda: os.kill(pid, signal.SIGKILL))), expected)
    assert len(sharded.recoveries) == before + 1 and sharded.ping()
    assert sharded.group.info[1]["pid"] != pid


def test_hung_host_mid_generation(sharded, expected):
    """A host that stops answering (SIGSTOP): the call times out, the group is rebuilt, the outputs are unchanged."""
    before, pid = len(sharded.recoveries), sharded.group.info[1]["pid"]
    sharded.group.call_timeout = 10
    try:
        assert_same(serve_all(sharded, PROMPTS, fault_at(2, lambda: os.kill(pid, signal.SIGSTOP))), expected)
    finally:
        sharded.group.call_timeout = 120
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert len(sharded.recoveries) == before + 1 and sharded.ping()


def test_unrecoverable_group_fails_requests(sharded, expected):
    """When the group cannot be rebuilt, requests end with EngineUnavailable (none hangs); once it can, it is."""
    model, pid = sharded.group.model, sharded.group.info[1]["pid"]
    os.kill(pid, signal.SIGKILL)
    sharded.group.model = "/nonexistent/model"
    try:
        outcomes = serve_all(sharded, PROMPTS[:2])
    finally:
        sharded.group.model = model
    assert all(isinstance(o, EngineUnavailable) and "rebuilding it failed" in str(o) for o in outcomes), outcomes
    assert_same(serve_all(sharded, PROMPTS[:1]), expected[:1])


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
        assert any(n.endswith("/" + rule) for n in names), rule
    assert sharding.variable_spec("params/layers_0/attn/q/kernel", (16, 16), 4) == P(None, "model")
    assert sharding.variable_spec("params/layers_0/ffn/down/kernel", (30, 16), 4) == P()  # 4 does not divide 30
    assert sharding.variable_spec("params/norm/weight", (16,), 4) == P()
    assert sharding.variable_spec("params/layers_0/ffn/bundle", (16, 3, 2, 16), 4) == P("model", None)
    assert sharding.variable_spec("params/layers_0/ffn/bundle", (6, 3, 2, 16), 4) == P()  # 4 does not divide 6
    assert sharding.variable_spec("hire/softmax/b", (8, 64), 4) == P(None, "model")
    assert sharding.variable_spec("hire/softmax/a", (16, 8), 4) == P()
    assert sharding.variable_spec("hire/layers_0/ffn/predictor/scale", (64,), 4) == P("model")

