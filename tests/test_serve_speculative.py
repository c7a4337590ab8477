"""Speculative decoding served by `hire serve --draft` on a real local Ray: the engine replica is a tandem
coordinator (workers.coordinator) that owns the large model's and stdlib-9m-tandem's worker actors; and by `hire
serve-grpc --draft` (the gRPC server, both models in its process). Greedy answers through either server equal the
large model alone; the decoding fields of a request are checked against what the server runs; under a closed-loop
load, a killed drafter or verifier is restarted with no request lost, and a killed coordinator (the replica) costs
only the requests it was running, each ended UNAVAILABLE, until Serve has started another."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import tempfile
from collections import Counter

import grpc
import pytest
import ray
from ray import serve
from test_grpc_server import Running

from cluster import faults, launch
from cluster import loadtest as lt
from cluster.bench_serving import free_port
from cluster.client import Client
from cluster.config import ServeConfig
from cluster.requests import Served
from hire.checkpoint import load_model, model_folder
from hire.engine import Engine
from hire.generate import generate
from hire.loaded import LoadedModel
from hire.predictor_files import serving_settings
from hire.sampling import SamplingParams
from hire.tandem import tandem_drafter
from protos import inference_pb2 as pb

MAX_LEN, GAMMA, SLOTS = 32, 4, 2
WORKLOAD = lt.Workload(lt.Dist("8"), lt.Dist("uniform:8:20"))
PROMPTS = ["def parse_args(argv):\n", "import os\n", "x = [\n    0,\n    0,\n"]


def served() -> LoadedModel:
    """stdlib-9m as `hire serve` serves it, with or without --draft: with the HiRE setting its folder recommends."""
    return load_model("stdlib-9m", **serving_settings(model_folder("stdlib-9m")))


@pytest.fixture(scope="module")
def grpc_port():
    http, port = free_port(), free_port()
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")
    ray.init(num_cpus=2, include_dashboard=False, namespace="hire-serve-speculative", log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="hire-spec-serve-"))
    try:
        launch.start(ServeConfig(model="stdlib-9m", draft="stdlib-9m-tandem", gamma=GAMMA, slots=SLOTS,
                                 max_len=MAX_LEN, replicas=1, http_port=http, grpc_port=port))
        yield port
    finally:
        launch.stop()


@pytest.fixture(scope="module")
def client(grpc_port):
    c = Client(f"127.0.0.1:{grpc_port}")
    yield c
    c.close()


def engine_stats() -> dict:
    return serve.get_deployment_handle("engine", launch.APP).stats.remote().result()


@pytest.fixture(scope="module", params=["serve", "serve-grpc"])
def door(request):
    """A client of either server, and how to read its drafting counters."""
    if request.param == "serve":
        yield request.getfixturevalue("client"), engine_stats
        return
    large = served()
    config = ServeConfig(draft="stdlib-9m-tandem", gamma=GAMMA, slots=SLOTS, max_len=MAX_LEN, grpc_port=0)
    server = Running(Served(Engine(large, SLOTS, MAX_LEN), large.cfg.name), config,
                     tandem_drafter("stdlib-9m-tandem", large))
    c = Client(f"127.0.0.1:{server.port}")
    try:
        yield c, lambda: dataclasses.asdict(server.server.stats)
    finally:
        c.close()
        server.close()


def test_greedy_through_serve_equals_model_alone(door):
    client, stats_of = door
    large = served()
    want = generate(Engine(large, SLOTS, MAX_LEN), PROMPTS, SamplingParams(temperature=0.0, max_tokens=20))
    requests = [pb.GenerateRequest(text=p, temperature=0.0, max_tokens=20) for p in PROMPTS]
    got = [client.generate(r) for r in requests]  # one at a time, then all at once (3 requests over 2 slots)
    async def together() -> list[pb.GenerateResponse]:
        return await asyncio.gather(*(asyncio.to_thread(client.generate, r) for r in requests))
    got_together = asyncio.run(together())
    for out, once, both in zip(want, got, got_together):
        assert list(once.token_ids) == out.tokens == list(both.token_ids) and once.text == out.text
    stats = stats_of()
    assert stats["blocks"] > 0 and 0 < stats["accepted"] <= stats["proposed"], stats


def test_model_info_and_decoding_fields(door):
    client, _ = door
    info = client.wait(10)
    assert list(info.drafters) == ["stdlib-9m-tandem"]
    assert list(info.modes) == [pb.DECODING_MODE_PLAIN, pb.DECODING_MODE_TANDEM]
    ok = client.generate(pb.GenerateRequest(text="import os\n", temperature=0.0, max_tokens=6,
                                            mode=pb.DECODING_MODE_TANDEM, gamma=GAMMA))
    assert len(ok.token_ids) == 6
    for fields, code, word in (({"mode": pb.DECODING_MODE_SPECULATIVE, "drafter": "stdlib-9m-tandem"},
                                grpc.StatusCode.UNIMPLEMENTED, "mode"),
                               ({"mode": pb.DECODING_MODE_TANDEM, "gamma": GAMMA + 1},
                                grpc.StatusCode.INVALID_ARGUMENT, "gamma"),
                               ({"mode": pb.DECODING_MODE_SPECULATIVE, "drafter": "stdlib-9m-draft"},
                                grpc.StatusCode.INVALID_ARGUMENT, "drafter")):
        with pytest.raises(grpc.RpcError) as e:
            client.generate(pb.GenerateRequest(text="import os\n", max_tokens=4, **fields))
        assert e.value.code() == code and e.value.details().startswith(word), e.value.details()


def load(target: str, inject, at: float = 3.0, duration: float = 12.0) -> tuple[dict, list[lt.Record]]:
    return asyncio.run(faults.under_load(target, inject, at=at, duration=duration, load=lt.Load(concurrency=4),
                                         workload=WORKLOAD, timeout=150.0))


@pytest.mark.parametrize("which", ["draft", "verify"])
def test_killed_worker_under_load_loses_no_request(grpc_port, which):
    (worker,) = faults.actors("DraftWorker" if which == "draft" else "VerifyWorker")
    before = engine_stats()["restarts"][which]
    report, records = load(f"grpc://127.0.0.1:{grpc_port}", lambda: faults.kill(worker.pid))
    print(json.dumps({"which": which, "requests": report["requests"], "recovery": report["recovery"],
                      "restart_seconds": engine_stats()["restart_seconds"]}))
    assert report["requests"] >= 4 and report["completed"] == report["requests"] and not report["errors"]
    assert all(r.status == "OK" and r.tokens == r.wanted for r in records)
    assert engine_stats()["restarts"][which] == before + 1
    (new,) = faults.actors("DraftWorker" if which == "draft" else "VerifyWorker")
    assert new.pid != worker.pid


def test_killed_coordinator_under_load(grpc_port):
    (replica,) = faults.replicas()
    engine = serve.get_deployment_handle("engine", launch.APP)

    def kill_mid_stream() -> None:
        faults.wait_for(lambda: engine.load.remote().result()["busy_slots"] >= 1, 30, "requests decoding")
        faults.kill(replica.pid)

    report, records = load(f"grpc://127.0.0.1:{grpc_port}", kill_mid_stream, duration=15.0)
    print(json.dumps({"recovery": report["recovery"], "errors": report["errors"], "requests": report["requests"]}))
    statuses = Counter(r.status for r in records)
    assert set(statuses) <= {"OK", "UNAVAILABLE"}, statuses  # no TIMEOUT (a hang), no INTERNAL
    assert 1 <= statuses["UNAVAILABLE"] <= 4 + SLOTS and report["recovery"]["short"] == 0
    recovery = report["recovery"]
    assert recovery["back_s"] is not None
    failed = [r for r in records if r.status != "OK"]
    killed_at = recovery["fault_at_s"] + recovery["fault_took_s"]  # the kill waits for a decoding request first
    assert all(r.start < killed_at for r in failed)  # only requests in flight at the kill fail
    after = [r for r in records if r.start > recovery["fault_at_s"]]
    assert after and all(r.status == "OK" for r in after)  # the others wait for the new replica
    (new,) = faults.wait_for(faults.replicas, 60, "a new coordinator replica")
    assert new.pid != replica.pid
    assert len(faults.actors("DraftWorker")) == len(faults.actors("VerifyWorker")) == 1  # the old pair went with it
