"""A gRPC client of hire.v1.Inference (the `hire client` command): waits for the server, streams a completion."""
from __future__ import annotations

import time
from collections.abc import Iterator

import grpc

from protos import inference_pb2 as pb
from protos import inference_pb2_grpc
from workers.auth import bearer

# What a server that is still starting answers (Serve's proxy says NOT_FOUND until the app is deployed).
# What a server that is still starting answers: not up yet, its application not deployed yet, or (Serve's proxy
# holding the call while the engine replica compiles its programs) no answer within the probe's 10 s
STARTING = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED)


def channel(target: str, tls_ca: bytes | None = None) -> grpc.Channel:
    if tls_ca is None:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=tls_ca))


class Client:
    """hire.v1.Inference on `target`; `api_key` is sent as a bearer token."""

    def __init__(self, target: str, api_key: str | None = None, tls_ca: bytes | None = None,
                 timeout: float | None = None):
        self.channel = channel(target, tls_ca)
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)
        self.metadata = bearer(api_key) if api_key else ()
        self.timeout = timeout

    def wait(self, seconds: float, probe: float = 10.0) -> pb.ModelInfo:
        """The server's model info, retrying for up to `seconds` while it starts (each try waits `probe` seconds)."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                return self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.metadata, timeout=probe)
            except grpc.RpcError as e:
                if e.code() not in STARTING or time.monotonic() > deadline:
                    raise
            time.sleep(1.0)

    def stream(self, request: pb.GenerateRequest) -> Iterator[pb.GenerateResponse]:
        return self.stub.GenerateStream(request, metadata=self.metadata, timeout=self.timeout)

    def generate(self, request: pb.GenerateRequest) -> pb.GenerateResponse:
        return self.stub.Generate(request, metadata=self.metadata, timeout=self.timeout)

    def close(self) -> None:
        self.channel.close()
