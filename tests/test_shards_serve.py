"""`hire serve --hosts 2` end to end: Ray Serve's HTTP front door over an engine sharded across two worker nodes
of a real multi-node Ray cluster on this machine (a head and two nodes with a hire_host each, two CPU devices
per host), against the single-process engine's greedy output."""
from __future__ import annotations

import json
import urllib.request

import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster

from cluster import launch
from cluster.bench_serving import free_port
from hire.checkpoint import load_model, resolve_model
from hire.engine import Engine
from hire.generate import generate
from hire.sampling import SamplingParams

PROMPT, MAX_TOKENS = "Once upon a time", 10


def call(url: str, body: dict | None = None) -> dict:
    """GET `url`, or POST `body` to it as JSON; the JSON reply (a 4xx or 5xx raises)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data, {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.loads(reply.read())


@pytest.fixture(scope="module")
def http_url():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, resources={"hire_host": 1})
        ray.init(address=cluster.address, include_dashboard=False)
        port = free_port()
        launch.start(dict(model=str(resolve_model("stories260K")), slots=4, max_len=16, chunk=4, hosts=2,
                          devices_per_host=2), http_port=port, grpc_port=free_port())
        yield f"http://127.0.0.1:{port}"
    finally:
        if ray.is_initialized():
            serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def test_completion_through_serve_equals_one_process(http_url):
    want = generate(Engine(load_model("stories260K"), slots=1, max_len=16), [PROMPT],
                    SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))[0]
    assert call(http_url + "/health") == {"status": "ok"}  # the probe pings every host
    name = call(http_url + "/v1/models")["data"][0]["id"]
    body = call(http_url + "/v1/completions", {"model": name, "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                                               "temperature": 0})
    assert body["choices"][0]["text"] == want.text
    assert body["usage"]["completion_tokens"] == len(want.tokens)
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("hire_host")}
    # the hosts' placement group (read from the GCS: the state API would need the dashboard, which a fresh
    # machine can be slow to start): one bundle per worker node
    groups = [g for g in ray.util.placement_group_table().values()
              if g["state"] == "CREATED" and all("hire_host" in b for b in g["bundles"].values())]
    assert [sorted(g["bundles_to_node_id"].values()) for g in groups] == [sorted(nodes)]
