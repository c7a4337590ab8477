"""The tandem coordinator (workers.coordinator) on a real two-node Ray cluster (ray.cluster_utils.Cluster): the large
model's actor on one node and the drafter's on the other, driven over gRPC on loopback, unpipelined and pipelined,
with stdlib-9m-draft and stdlib-9m-tandem; the large model sharded over two host actors (workers.shards); and with a
HiRE setting or LoRA adapters (the verifier's model, also through `hire serve`'s engine replica)."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group_table
from ray_nodes import add_node
from test_grpc_server import tiny_adapter

from cluster.config import ServeConfig
from cluster.serve_app import EngineServer
from hire.bench import text_prompts
from hire.checkpoint import load_model, resolve_model
from hire.drafters import load_drafter
from hire.engine import Engine, compilation_cache_folder
from hire.engine_api import EngineUnavailable
from hire.generate import generate
from hire.lora import load_adapters
from hire.sampling import SamplingParams
from hire.speculative import speculative_generate
from protos import inference_pb2, internal_pb2_grpc
from protos import internal_pb2 as pb
from workers.auth import bearer
from workers.coordinator import Coordinator, CoordinatorActor
from workers.rpc import pack

# Prompts of 13 tokens and γ 4 in a context of 32: every block's attention span is the bucket 32 and every prompt
# fits the bucket 16, so each worker compiles few programs. 3 prompts over 2 slots: the third joins when one ends.
MAX_LEN, GAMMA, SLOTS, PROMPT_LEN = 32, 4, 2, 13
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_LEN, ignore_eos=True)


@pytest.fixture(scope="module")
def large():
    return load_model("stdlib-9m")


@pytest.fixture(scope="module")
def prompts(large) -> list[list[int]]:
    """Two prompts from held-out code (where the drafts are often rejected) and one repetitive one (where whole
    blocks are accepted, so that pipelined pre-drafts hold)."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    repetitive = large.tokenizer.encode("x = [\n" + "    0,\n" * 12)[:PROMPT_LEN]
    return [*text_prompts(large.tokenizer.encode(text), 2, PROMPT_LEN), repetitive]


@pytest.fixture(scope="module")
def expected(large, prompts):
    return generate(Engine(large, SLOTS, MAX_LEN), prompts, GREEDY)


# Each worker on its own node: the head holds the verifier's resource, the second node the drafter's.
PLACES = {"verify": {"num_cpus": 1, "resources": {"verify_node": 1}},
          "draft": {"num_cpus": 1, "resources": {"draft_node": 1}}}


@pytest.fixture(scope="module")
def local_ray():
    tmp = tempfile.mkdtemp(prefix="hire-coordinator-")
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")  # RayConfig: how long a worker waits for its raylet
    # Cluster writes the head's address into Ray's default temp folder even with temp_dir set, and does not make
    # that folder: on a fresh machine where no Ray ran yet, it is not there
    Path(ray._private.utils.get_ray_address_file(None)).parent.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "resources": {"verify_node": 2},
                                                            "temp_dir": tmp})
    try:
        add_node(cluster, num_cpus=3, resources={"draft_node": 2})
        ray.init(address=cluster.address, include_dashboard=False, namespace=f"hire-coordinator-{os.getpid()}",
                 log_to_driver=False)
        yield Path(tmp)
    finally:
        ray.shutdown()
        cluster.shutdown()


def start(local_ray: Path, draft: str) -> Coordinator:
    return Coordinator("stdlib-9m", draft, SLOTS, MAX_LEN, GAMMA, timeout=120, start_timeout=180,
                       compilation_cache=compilation_cache_folder(), options=PLACES)


@pytest.fixture(scope="module")
def standalone(local_ray):
    coordinator = start(local_ray, "stdlib-9m-draft")
    yield coordinator
    coordinator.shutdown()


def same_tokens(got, want) -> bool:
    return [(o.tokens, o.text, o.finish_reason) for o in got] == [(o.tokens, o.text, o.finish_reason) for o in want]


def run(coordinator: Coordinator, pipelined: bool, prompts, params=GREEDY):
    coordinator.set_pipelined(pipelined)
    names = ("blocks", "proposed", "accepted", "predrafts_used", "predrafts_discarded")
    before = [getattr(coordinator.stats, name) for name in names]
    outs = coordinator.generate(prompts, params)
    return outs, {name: getattr(coordinator.stats, name) - b for name, b in zip(names, before)}


def test_greedy_equals_large_model_alone(standalone, prompts, expected):
    info = standalone.workers.info
    assert info["verify"]["node"] != info["draft"]["node"]  # two Ray nodes
    outs, stats = run(standalone, False, prompts)
    assert same_tokens(outs, expected)
    assert 0 < stats["accepted"] < stats["proposed"] and stats["predrafts_used"] == 0
    outs, stats = run(standalone, True, prompts)
    assert same_tokens(outs, expected)
    assert stats["predrafts_used"] > 0 and stats["predrafts_discarded"] > 0  # pre-drafts both held and thrown away
    assert all(len(o.tokens) == MAX_LEN - PROMPT_LEN for o in outs)  # ran to the end of the context


def test_sampled_pipelined_equals_speculation_without_bonus_tokens(standalone, large, prompts):
    """Pipelined, a fully accepted block defers its bonus token, so every token is decided by a draft's acceptance
    test or the residual draw after a rejection, with the keys of its position, from distributions that depend only
    on the tokens before it (stdlib-9m-draft is a standalone model). In-process speculative decoding with blocks
    longer than the output has no bonus token either: the same seeds give the same tokens, so the deferral is the
    standard, exact rejection scheme; and drafts, q and seeds cross the processes intact."""
    n = 12
    params = [SamplingParams(temperature=t, top_p=0.95, max_tokens=n, seed=i) for i, t in enumerate((0.8, 0.8, 0.2))]
    want, stats = speculative_generate(Engine(large, SLOTS, MAX_LEN), load_drafter("stdlib-9m-draft", large), prompts,
                                       params, gamma=n)
    outs, piped = run(standalone, True, prompts, params)
    assert same_tokens(outs, want)
    assert 0 < stats.accepted < stats.proposed
    assert piped["predrafts_used"] > 0  # the repetitive prompt, nearly greedy: whole blocks accepted, bonus deferred


@pytest.mark.parametrize("which", ["draft", "verify"])
def test_killed_worker_is_restarted_and_requests_finish(standalone, prompts, expected, which):
    """A worker's actor is killed once some tokens are out: it is restarted, the live slots are prefilled on it
    again (the verifier resuming each slot's pending token), and every request still ends with the large model's
    output."""
    standalone.set_pipelined(True)
    restarts, tokens = dict(standalone.stats.restarts), standalone.stats.tokens
    victim = standalone.workers.actors[which]

    def kill() -> None:
        deadline = time.monotonic() + 300
        while standalone.stats.tokens < tokens + 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        ray.kill(victim, no_restart=True)

    killer = threading.Thread(target=kill)
    killer.start()
    outs = standalone.generate(prompts, GREEDY)
    killer.join()
    assert standalone.stats.restarts == restarts | {which: restarts[which] + 1}
    assert standalone.workers.actors[which] != victim
    assert same_tokens(outs, expected)


def test_a_cancelled_request_leaves_its_slot(standalone, prompts, expected):
    """A request cancelled after its first token (as a server cancels the stream of a client that went away) gets
    no further event and leaves its slot before the next round; a request beside it is not disturbed."""
    first, go, events = threading.Event(), threading.Event(), []

    def sink(item) -> None:  # on the scheduler's thread: hold it until the request is cancelled
        events.append(item)
        first.set()
        go.wait(60)

    before = standalone.stats.cancelled
    job = standalone.scheduler.submit(prompts[0], GREEDY, -1, sink)
    first.wait(300)
    standalone.scheduler.cancel(job)
    go.set()
    outs = standalone.generate(prompts[1:2], GREEDY)
    assert len(events) == 1 and standalone.stats.cancelled == before + 1 and standalone.scheduler.busy_slots == 0
    assert same_tokens(outs, expected[1:2])


def test_a_worker_past_its_restarts_fails_the_batch_and_the_scheduler_recovers(standalone, prompts, expected):
    """With no restart left inside the batch (`restarts` 0), a killed verifier makes the batch raise WorkerError.
    Killed before any token: the scheduler restarts it (CoordinatorEngine.recover) and retries the requests, which
    end with the large model's output. Killed mid-stream: the streams that had sent tokens end with
    EngineUnavailable (UNAVAILABLE for a server's client), the one still waiting runs on the restarted verifier."""
    scheduler, engine = standalone.scheduler, standalone.engine
    before = standalone.stats.restarts["verify"]
    engine.restarts = 0
    try:
        os.kill(standalone.workers.info["verify"]["pid"], signal.SIGKILL)
        assert same_tokens(standalone.generate(prompts, GREEDY), expected)
        assert standalone.stats.restarts["verify"] == before + 1

        items: list[list] = [[] for _ in prompts]
        ended = threading.Semaphore(0)

        def sink(i: int):
            def put(item) -> None:
                items[i].append(item)
                if isinstance(item, Exception) or item.finish_reason:
                    ended.release()
            return put

        tokens = standalone.stats.tokens
        for i, prompt in enumerate(prompts):
            scheduler.submit(prompt, GREEDY, -1, sink(i))
        deadline = time.monotonic() + 300
        while standalone.stats.tokens < tokens + 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(standalone.workers.info["verify"]["pid"], signal.SIGKILL)
        for _ in prompts:
            assert ended.acquire(timeout=600)
    finally:
        engine.restarts = 3
    *cut, waited = items
    for stream in cut:
        assert 1 <= len(stream) - 1 < MAX_LEN - PROMPT_LEN and isinstance(stream[-1], EngineUnavailable)
        assert "cut after" in str(stream[-1])
    assert [e.token for e in waited] == expected[2].tokens and waited[-1].finish_reason == "length"
    assert standalone.stats.restarts["verify"] == before + 2 and scheduler.busy_slots == 0


def test_workers_answer_only_the_deployment_and_within_bounds(standalone):
    """A caller without the deployment's secret is refused, a message past the largest legitimate one is refused
    before it is read, and health checks stay open."""
    workers = standalone.workers
    huge = pb.Array(data=bytes(workers.message_limit() + 1), shape=[1], dtype="float32")
    calls = {"draft": lambda c, m: internal_pb2_grpc.DrafterStub(c).Prefill(
                 pb.DraftPrefillRequest(slot=0, tokens=[1], hidden=huge if m == "huge" else None),
                 metadata=bearer(workers.secret) if m == "huge" else m, timeout=30),
             "verify": lambda c, m: internal_pb2_grpc.VerifierStub(c).Verify(
                 pb.VerifyRequest(q=huge if m == "huge" else None),
                 metadata=bearer(workers.secret) if m == "huge" else m, timeout=30)}
    for which, call in calls.items():
        with grpc.insecure_channel(workers.info[which]["address"]) as channel:
            assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30).status == \
                health_pb2.HealthCheckResponse.SERVING
            for metadata, code in (((), "UNAUTHENTICATED"), (bearer("not-the-secret"), "UNAUTHENTICATED"),
                                   ("huge", "RESOURCE_EXHAUSTED")):
                with pytest.raises(grpc.RpcError) as e:
                    call(channel, metadata)
                assert e.value.code().name == code, (which, e.value.details())


def test_bad_requests_answer_invalid_argument(standalone):
    drafter = internal_pb2_grpc.DrafterStub(standalone.workers.channels["draft"])
    verifier = internal_pb2_grpc.VerifierStub(standalone.workers.channels["verify"])
    bad = [
        (drafter.Draft, pb.DraftRequest(rows=pack(np.ones(3, bool))), "rows: shape"),
        (drafter.Draft, pb.DraftRequest(rows=pack(np.ones(SLOTS, bool)), tokens=pack(np.full(SLOTS, -1, np.int32)),
                                        positions=pack(np.zeros(SLOTS, np.int32))), "tokens: token ids outside"),
        (drafter.Prefill, pb.DraftPrefillRequest(slot=SLOTS, tokens=[1]), "slot"),
        (verifier.Prefill, pb.VerifyPrefillRequest(slot=0, tokens=[]), "prompt: empty"),
        (verifier.Prefill, pb.VerifyPrefillRequest(slot=0, tokens=[1], sampling=pb.Sampling(top_p=2)), "top_p"),
        (verifier.Verify, pb.VerifyRequest(rows=pack(np.ones(SLOTS, bool)),
                                           drafts=pb.Array(data=bytes(16 * SLOTS), shape=(SLOTS, 2), dtype="int64")),
         "drafts: missing, or dtype"),
    ]
    for method, request, message in bad:
        with pytest.raises(grpc.RpcError) as info:
            method(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in info.value.details()


def test_tandem_through_the_coordinator_actor(local_ray, prompts, expected):
    """stdlib-9m-tandem (its drafter reads the large model's hidden states, sent over gRPC with every verdict), the
    coordinator in its own actor, which owns the two workers."""
    actor = CoordinatorActor.remote(target="stdlib-9m", draft="stdlib-9m-tandem", slots=SLOTS, max_len=MAX_LEN,
                                    gamma=GAMMA, timeout=120, start_timeout=180,
                                    compilation_cache=compilation_cache_folder(), options=PLACES)
    try:
        for pipelined in (False, True):
            ray.get(actor.set_pipelined.remote(pipelined), timeout=60)
            before = ray.get(actor.stats.remote(), timeout=60)
            outs = ray.get(actor.generate.remote(prompts, GREEDY), timeout=600)
            after = ray.get(actor.stats.remote(), timeout=60)
            assert same_tokens(outs, expected), pipelined
            assert 0 < after["accepted"] - before["accepted"] < after["proposed"] - before["proposed"]
        assert after["predrafts_used"] > 0
    finally:
        ray.get(actor.shutdown.remote(), timeout=120)
        ray.kill(actor)


def test_verifier_sharded_over_hosts(local_ray, prompts, expected):
    """The large model sharded over two host actors, one per node (the KV cache split by KV heads), which the
    verifier's actor drives in lockstep: greedy output equals the large model alone; a host killed mid-generation
    restarts the verifier with a fresh group (the old one's placement group freed), every live slot is prefilled on
    it again, and the output is unchanged."""
    places = {"verify": {"num_cpus": 0, "resources": {"verify_node": 1}}, "draft": PLACES["draft"]}
    coordinator = Coordinator("stdlib-9m", "ngram", SLOTS, MAX_LEN, GAMMA, timeout=120, start_timeout=180,
                              compilation_cache=compilation_cache_folder(), options=places, verify_hosts=2)
    try:
        hosts = coordinator.workers.info["verify"]["hosts"]
        assert len({h["node"] for h in hosts}) == 2
        outs, stats = run(coordinator, False, prompts)
        assert same_tokens(outs, expected) and stats["accepted"] > 0
        tokens = coordinator.stats.tokens

        def kill() -> None:
            deadline = time.monotonic() + 300
            while coordinator.stats.tokens < tokens + 10 and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(hosts[1]["pid"], signal.SIGKILL)

        killer = threading.Thread(target=kill)
        killer.start()
        outs, _ = run(coordinator, True, prompts)
        killer.join()
        assert same_tokens(outs, expected)
        assert coordinator.stats.restarts == {"verify": 1, "draft": 0}
        assert {h["pid"] for h in coordinator.workers.info["verify"]["hosts"]}.isdisjoint(h["pid"] for h in hosts)
        groups = [g for g in placement_group_table().values()
                  if g["name"].startswith("hire-verify-") and g["state"] != "REMOVED"]
        assert [g["name"] for g in groups] == [coordinator.workers.group_name]
    finally:
        coordinator.shutdown()


def test_hire_verifier_equals_its_model_alone(local_ray, tmp_path):
    """HiRE is a property of the large model: the verifier loads it with the HiRE overrides given, and greedy output
    through the coordinator equals that model alone (which differs from the exact model's)."""
    folder = shutil.copytree(resolve_model("stories260K"), tmp_path / "stories")  # int4 predictors built at load
    hire = {"softmax": "hire-q", "hire_quant": "int4", "softmax_k": 1, "softmax_oversample": 2}
    prompts = ["The cat sat on the mat. The cat sat", "Tom and his mom went to the park to play"]
    model = load_model(folder, **hire)
    want = generate(Engine(model, SLOTS, MAX_LEN), prompts, GREEDY)
    assert [o.tokens for o in want] != [o.tokens for o in generate(Engine(load_model(folder), SLOTS, MAX_LEN),
                                                                   prompts, GREEDY)]
    coordinator = Coordinator(str(folder), "ngram", SLOTS, MAX_LEN, GAMMA, timeout=120, start_timeout=180,
                              compilation_cache=compilation_cache_folder(), options=PLACES, hire=hire)
    try:
        assert coordinator.engine.cfg.softmax == "hire-q"
        outs, stats = run(coordinator, True, prompts)
        assert same_tokens(outs, want) and stats["accepted"] > 0
    finally:
        coordinator.shutdown()


def test_lora_verifier_runs_each_requests_adapter(local_ray, tmp_path):
    """The verifier loads the adapters and prefills and verifies each row with its request's: greedy output through
    the coordinator equals the adapted model alone, row by row (one row adapted, one on the base model)."""
    lora = {"tiny": str(tiny_adapter(tmp_path / "tiny"))}
    prompts = ["The cat sat on the mat. The cat sat"] * 2
    model, names = load_adapters(load_model("stories260K"), lora)
    adapters = [names["tiny"], -1]
    want = generate(Engine(model, SLOTS, MAX_LEN), prompts, GREEDY, adapters)
    assert want[0].tokens != want[1].tokens
    coordinator = Coordinator("stories260K", "ngram", SLOTS, MAX_LEN, GAMMA, timeout=120, start_timeout=180,
                              compilation_cache=compilation_cache_folder(), options=PLACES, lora=lora)
    try:
        assert coordinator.engine.adapters == names
        coordinator.set_pipelined(True)
        assert same_tokens(coordinator.generate(prompts, GREEDY, adapters), want)
    finally:
        coordinator.shutdown()
    with pytest.raises(ValueError, match="lora: LoRA adapters are not served over several hosts"):
        Coordinator("stories260K", "ngram", SLOTS, MAX_LEN, GAMMA, lora=lora, verify_hosts=2)


def test_lora_through_a_serve_replica(local_ray, tmp_path):
    """`hire serve --draft ngram --lora tiny=PATH`'s engine replica (cluster.serve_app.EngineServer, outside Serve):
    it names the adapter, and a request naming it gets the adapted model's greedy answer, one naming none the base
    model's."""
    adapter = tiny_adapter(tmp_path / "tiny")
    prompt, max_len = "The cat sat on the mat. The cat sat", 64
    loaded, names = load_adapters(load_model("stories260K"), {"tiny": adapter})
    want = generate(Engine(loaded, SLOTS, max_len), [prompt] * 2, SamplingParams(temperature=0.0, max_tokens=24),
                    [names["tiny"], -1])
    server = EngineServer(ServeConfig(model="stories260K", draft="ngram", gamma=GAMMA, slots=SLOTS, max_len=max_len,
                                      lora={"tiny": str(adapter)}))

    async def answer(name: str) -> list:
        request = inference_pb2.GenerateRequest(text=prompt, temperature=0.0, max_tokens=24, adapter=name)
        return [m async for m in server.generate(request, whole=True)]

    try:
        assert list(server.info().adapters) == ["tiny"]
        for name, expected in (("tiny", want[0]), ("", want[1])):
            [reply] = asyncio.run(answer(name))
            assert list(reply.token_ids) == expected.tokens, name
        assert want[0].tokens != want[1].tokens
    finally:
        server.scheduler.stop()
        server.served.engine.shutdown()
