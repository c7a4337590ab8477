"""cluster.client.Client.wait against a real gRPC server on a socket that is slow to answer while it starts."""
from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest

from cluster.bench_serving import free_port
from cluster.client import Client
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc


class Starting(inference_pb2_grpc.InferenceServicer):
    """Holds each GetModelInfo call `hold` seconds until `ready` is set (as Serve's proxy does while the engine
    replica compiles), or answers `code` instead when one is given."""

    def __init__(self, hold: float, code: grpc.StatusCode | None = None):
        self.hold, self.code, self.ready, self.calls = hold, code, threading.Event(), 0

    def GetModelInfo(self, request, context):
        self.calls += 1
        if self.code is not None:
            context.abort(self.code, "refused")
        if not self.ready.is_set():
            time.sleep(self.hold)
        return pb.ModelInfo(name="m")


@pytest.fixture
def serve():
    servers = []

    def start(servicer: Starting) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(4))
        inference_pb2_grpc.add_InferenceServicer_to_server(servicer, server)
        port = free_port()
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(0)


def test_a_probe_that_times_out_is_retried_until_the_server_answers(serve):
    servicer = Starting(hold=1.0)
    client = Client(serve(servicer))
    threading.Timer(1.5, servicer.ready.set).start()
    assert client.wait(30, probe=0.3).name == "m"
    assert servicer.calls >= 2
    with pytest.raises(grpc.RpcError) as e:  # without time to wait, the first timeout is the answer
        Client(serve(Starting(hold=1.0))).wait(0, probe=0.3)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_other_errors_are_not_retried(serve):
    servicer = Starting(hold=0, code=grpc.StatusCode.UNAUTHENTICATED)
    with pytest.raises(grpc.RpcError) as e:
        Client(serve(servicer)).wait(30, probe=0.3)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and servicer.calls == 1
