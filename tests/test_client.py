"""cluster.client against real gRPC servers: Client.wait on a socket that is slow to answer while it starts, and
`hire client` (cluster.client.complete) streaming, in one call, and refused."""
from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest
from click.testing import CliRunner

from cluster.bench_serving import free_port
from cluster.client import Client
from hire.cli import main
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


class Completing(inference_pb2_grpc.InferenceServicer):
    """Answers "Once upon" in two streamed messages (or one Generate), keeping each request and its metadata; a prompt
    "bad" is refused with INVALID_ARGUMENT."""

    def __init__(self):
        self.calls: list[tuple[str, pb.GenerateRequest, dict]] = []

    def _answer(self, method: str, request, context) -> list[pb.GenerateResponse]:
        self.calls.append((method, request, dict(context.invocation_metadata())))
        if request.text == "bad":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "text: bad prompt")
        usage = pb.Usage(prompt_tokens=3, completion_tokens=2, time_to_first_token=0.25, seed=request.seed)
        return [pb.GenerateResponse(text="Once"), pb.GenerateResponse(text=" upon", usage=usage)]

    def GenerateStream(self, request, context):
        yield from self._answer("GenerateStream", request, context)

    def Generate(self, request, context):
        first, last = self._answer("Generate", request, context)
        return pb.GenerateResponse(text=first.text + last.text, usage=last.usage)


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


@pytest.mark.parametrize("stream", [True, False])
def test_client_command_prints_the_completion_and_its_usage(serve, stream):
    servicer = Completing()
    target = serve(servicer)
    args = ["client", "Hello", "--target", target, "--max-tokens", "5", "--temperature", "0", "--seed", "7",
            "--stop", ".", "--api-key", "k1, k2"] + ([] if stream else ["--no-stream"])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.stdout == "Once upon\n"
    assert result.stderr == "[3 prompt + 2 completion tokens, first token after 250 ms, seed 7]\n"
    ((method, request, metadata),) = servicer.calls
    assert method == ("GenerateStream" if stream else "Generate")
    assert (request.text, request.max_tokens, request.temperature, request.seed, list(request.stop)) == \
        ("Hello", 5, 0.0, 7, ["."])
    assert not request.HasField("top_p") and metadata["authorization"] == "Bearer k1"  # the first key only


def test_client_command_reports_a_refused_call(serve):
    result = CliRunner().invoke(main, ["client", "bad", "--target", serve(Completing())])
    assert result.exit_code == 1 and "Error: INVALID_ARGUMENT: text: bad prompt" in result.output
