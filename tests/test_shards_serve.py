"""`hire serve --hosts 2` end to end: Ray Serve's HTTP front door over an engine sharded across two worker nodes
of a real multi-node Ray cluster on this machine (a head and two nodes with a hire_host each, two CPU devices
per host), and the gRPC server (`hire serve-grpc`'s) over such an engine, against the single-process engine's greedy
output; with both host nodes lost, HTTP, gRPC and their
health checks fail fast and cleanly until nodes return."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray import serve
from ray_nodes import add_node, host_cluster
from test_grpc_server import Running

from cluster import launch
from cluster.bench_serving import free_port
from cluster.config import ServeConfig
from cluster.requests import Served
from hire.checkpoint import load_model, resolve_model
from hire.engine import Engine
from hire.generate import generate
from hire.sampling import SamplingParams
from protos import inference_pb2, inference_pb2_grpc
from workers.shards import serving_engine

PROMPT, MAX_TOKENS = "Once upon a time", 10


def call(url: str, body: dict | None = None) -> dict:
    """GET `url`, or POST `body` to it as JSON; the JSON reply (a 4xx or 5xx raises)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data, {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.loads(reply.read())


@pytest.fixture(scope="module")
def cluster():
    """A head and two worker nodes with a hire_host each."""
    with host_cluster(2, num_cpus=1, resources={"hire_driver": 1}) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def served(cluster):
    """The cluster, the HTTP base URL and the gRPC address of `hire serve --hosts 2`. The replicas stay on the head
    (as in deploy/local-cluster.sh), the hosts go to the two worker nodes."""
    try:
        port, grpc_port = free_port(), free_port()
        launch.start(ServeConfig(model=str(resolve_model("stories260K")), slots=4, max_len=16, chunk=4, hosts=2,
                                 devices_per_host=2, replica_resource="hire_driver", http_port=port,
                                 grpc_port=grpc_port))
        yield cluster, f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"
    finally:
        if ray.is_initialized():
            serve.shutdown()


@pytest.fixture(scope="module", params=["serve-grpc", "serve"])
def door(request, cluster):
    """Either server of the model sharded over the two hosts; how to ask it for PROMPT's greedy completion (its
    text and token count). The gRPC server drives its ShardedEngine from this process, as a replica does."""
    if request.param == "serve":
        _, http_url, _ = request.getfixturevalue("served")
        assert call(http_url + "/health") == {"status": "ok"}  # the probe pings every host

        def ask() -> tuple[str, int]:
            body = complete(http_url)
            return body["choices"][0]["text"], body["usage"]["completion_tokens"]
        yield ask
        return
    engine = serving_engine(str(resolve_model("stories260K")), 2, 2, slots=4, max_len=16)
    server = Running(Served(engine, engine.cfg.name), ServeConfig(chunk=4, grpc_port=0))

    def ask() -> tuple[str, int]:
        with server.channel() as channel:
            request = inference_pb2.GenerateRequest(text=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
            out = inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=120)
        return out.text, out.usage.completion_tokens
    try:
        yield ask
    finally:
        server.close()
        engine.shutdown()


@pytest.fixture(scope="module")
def want():
    return generate(Engine(load_model("stories260K"), slots=1, max_len=16), [PROMPT],
                    SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))[0]


def complete(http_url: str) -> dict:
    name = call(http_url + "/v1/models")["data"][0]["id"]
    return call(http_url + "/v1/completions", {"model": name, "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                                               "temperature": 0})


def test_completion_through_either_server_equals_one_process(door, want):
    assert door() == (want.text, len(want.tokens))
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("hire_host")}
    # the hosts' placement group (read from the GCS: the state API would need the dashboard, which a fresh
    # machine can be slow to start): one bundle per worker node
    groups = [g for g in ray.util.placement_group_table().values()
              if g["state"] == "CREATED" and all("hire_host" in b for b in g["bundles"].values())]
    assert [sorted(g["bundles_to_node_id"].values()) for g in groups] == [sorted(nodes)]


def refused(url: str, body: dict | None = None) -> tuple[int, object, dict]:
    """The status, headers and JSON body of a request that must fail."""
    with pytest.raises(urllib.error.HTTPError) as e:
        call(url, body)
    return e.value.code, e.value.headers, json.loads(e.value.read())


def test_no_group_fails_fast_and_cleanly(served, want):
    """Both host nodes lost: a completion fails at once with 503, one line saying what is lost and how many hosts
    are left, a Retry-After, and none of Ray's internals; gRPC says UNAVAILABLE with the same line (its retry
    hint included), its health NOT_SERVING, /health 503. Once nodes come back the group is rebuilt (the health
    probe asks) and the completion is served again."""
    cluster, http_url, address = served
    hosts = [n for n in cluster.list_all_nodes() if n.node_id in {h["NodeID"] for h in ray.nodes()
                                                                  if h["Resources"].get("hire_host")}]
    for node in hosts:
        cluster.remove_node(node)
    name = call(http_url + "/v1/models")["data"][0]["id"]
    status, headers, body = refused(http_url + "/v1/completions", {"model": name, "prompt": PROMPT, "max_tokens": 4})
    line = body["error"]["message"]
    assert status == 503 and headers.get("Retry-After") == "5", (status, headers, body)
    assert "lost" in line and "0 of 2 hosts can be placed" in line and "retry in 5 s" in line, line
    assert "\n" not in line and not any(w in line for w in ("ActorID", "pid=", "Resources", "Traceback")), line
    status, _, body = refused(http_url + "/health")
    assert status == 503 and body == {"status": "unavailable", "error": line}

    with grpc.insecure_channel(address) as channel:
        request = inference_pb2.GenerateRequest(text=PROMPT, max_tokens=4)
        with pytest.raises(grpc.RpcError) as e:
            list(inference_pb2_grpc.InferenceStub(channel).GenerateStream(request, timeout=60))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and e.value.details() == line
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=60)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING

    for _ in hosts:
        add_node(cluster, num_cpus=1, resources={"hire_host": 1})
    deadline = time.monotonic() + 300
    while True:  # the health probe (every 5 s) rebuilds the group
        try:
            assert call(http_url + "/health") == {"status": "ok"}
            break
        except urllib.error.HTTPError:
            assert time.monotonic() < deadline, "not rebuilt within 300 s"
            time.sleep(2)
    assert complete(http_url)["choices"][0]["text"] == want.text
