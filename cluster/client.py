"""A gRPC client of hire.v1.Inference (the `hire client` command): waits for the server, streams a completion."""
from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

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


class CallFailed(Exception):
    """A call the server answered with an error status: "CODE: details"."""


def complete(target: str, prompt: str, max_tokens: int | None = None, temperature: float = 1.0, top_k: int = 0,
             top_p: float | None = None, seed: int | None = None, stop: Sequence[str] = (), adapter: str | None = None,
             stream: bool = True, wait: float = 0.0, timeout: float | None = None, api_key: str | None = None,
             tls_ca: str | None = None) -> pb.GenerateResponse:
    """`hire client`: send `prompt` to the server at `target` (waiting up to `wait` seconds for one that is starting),
    its text to stdout as it streams (or, without `stream`, from one Generate call), its usage to stderr; the last
    message. `api_key` sends the first of its comma-separated keys, `tls_ca` (a PEM file) connects with TLS. A failed
    call raises CallFailed."""
    request = pb.GenerateRequest(text=prompt, temperature=temperature, top_k=top_k, stop=stop, adapter=adapter or "")
    for name, value in (("max_tokens", max_tokens), ("top_p", top_p), ("seed", seed)):
        if value is not None:
            setattr(request, name, value)
    key = next(iter(api_key.split(",")), "").strip() if api_key else None
    client = Client(target, key, Path(tls_ca).read_bytes() if tls_ca else None, timeout)
    try:
        if wait:
            client.wait(wait)
        last = None if stream else client.generate(request)
        for msg in [last] if last else client.stream(request):
            sys.stdout.write(msg.text)
            sys.stdout.flush()
            last = msg
        print()
        u = last.usage
        print(f"[{u.prompt_tokens} prompt + {u.completion_tokens} completion tokens, first token after "
              f"{u.time_to_first_token * 1000:.0f} ms, seed {u.seed}]", file=sys.stderr)
        return last
    except grpc.RpcError as e:
        raise CallFailed(f"{e.code().name}: {e.details()}") from None
    finally:
        client.close()
