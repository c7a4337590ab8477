"""The gRPC services both servers answer: hire.v1.Inference, JetStream's Orchestrator and grpc.health.v1.Health.

They run over a `Backend`, the one thing the servers do differently: how a request reaches a scheduler. `hire
serve-grpc` (cluster.grpc_server) has the scheduler in its own process (`Local`); the ingress of `hire serve`
(cluster.serve_app) reaches EngineServer replicas, each with a `Local`, through a Ray Serve handle. The rest is here
once: the checks at the door (an API key where the transport has no interceptor, shutting down, the message size),
the one table of exceptions to gRPC and HTTP statuses, and the count of calls by method and status.

A bad field answers INVALID_ARGUMENT, a mode not implemented yet UNIMPLEMENTED, a full queue RESOURCE_EXHAUSTED, an
engine down UNAVAILABLE, each with the exception's message (which names the field); a call that ends early (client
cancel, deadline) frees its slot before the next decode chunk.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import NoReturn, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.auth import REFUSED, ApiKeys
from cluster.messages import decode_response, full_response, request_id, stream_response
from cluster.metrics import Metrics
from cluster.requests import Limits, Served, UnknownModel, from_decode, from_generate, model_info
from hire.engine_api import EngineUnavailable
from hire.scheduler import QueueFull, Scheduler, Stream
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc, jetstream_pb2_grpc
from protos import jetstream_pb2 as js

log = logging.getLogger(__name__)

CODE = grpc.StatusCode
# What a failed request's client sees: its gRPC status code and HTTP status; any other exception is INTERNAL / 500.
STATUS = {UnknownModel: (CODE.NOT_FOUND, 404), ValueError: (CODE.INVALID_ARGUMENT, 400),
          NotImplementedError: (CODE.UNIMPLEMENTED, 400), QueueFull: (CODE.RESOURCE_EXHAUSTED, 429),
          EngineUnavailable: (CODE.UNAVAILABLE, 503)}
INTERNAL = "internal error; see the server's log"
STOPPING = "the server is shutting down; retry on another"
SERVICES = (pb.DESCRIPTOR.services_by_name["Inference"].full_name,
            js.DESCRIPTOR.services_by_name["Orchestrator"].full_name)  # with "" (the server), what health answers for


def status(e: BaseException) -> tuple[grpc.StatusCode, int] | None:
    """The gRPC code and HTTP status of a failed request, or None for a server fault."""
    return next((v for kind, v in STATUS.items() if isinstance(e, kind)), None)


class Responses(Protocol):
    """One request's hire.v1 messages as they are decoded (or one, the whole completion); `cancel` (from any
    callback) frees its slot."""

    def __aiter__(self) -> AsyncIterator[pb.GenerateResponse]: ...

    def cancel(self) -> None: ...


class Backend(Protocol):
    """How requests reach a scheduler. Failures raise the exceptions of `STATUS`."""

    def generate(self, request: pb.GenerateRequest | js.DecodeRequest, whole: bool = False) -> Responses:
        """The request's messages, or with `whole` one message: its completion (its text cut at a stop string,
        which a stream may have sent a part of before it matched)."""

    async def info(self) -> pb.ModelInfo: ...

    async def tokenize(self, text: str) -> list[int]: ...

    async def limits(self) -> Limits: ...

    async def live(self) -> bool:
        """Whether the engine can serve now."""


class Local:
    """A scheduler in this process: requests checked (cluster.requests) and streamed from it; `metrics` records
    each completed one."""

    def __init__(self, served: Served, scheduler: Scheduler, metrics: Metrics):
        self.served, self.scheduler, self.metrics = served, scheduler, metrics

    def generate(self, request: pb.GenerateRequest | js.DecodeRequest, whole: bool = False) -> Answer:
        return Answer(self, request, whole)

    async def info(self) -> pb.ModelInfo:
        return model_info(self.served, self.scheduler.queue_size)

    async def tokenize(self, text: str) -> list[int]:
        self.served.limits.check_text("text", text)
        return self.served.engine.tokenizer.encode(text)

    async def limits(self) -> Limits:
        return self.served.limits

    async def live(self) -> bool:
        return self.scheduler.alive


class Answer:
    """`Local.generate`'s messages: each holds every token ready when it was sent."""

    def __init__(self, local: Local, request: pb.GenerateRequest | js.DecodeRequest, whole: bool):
        self._stream: Stream | None = None
        self._messages = self._run(local, request, whole)

    def __aiter__(self) -> AsyncIterator[pb.GenerateResponse]:
        return self._messages

    def cancel(self) -> None:
        if self._stream is not None:
            self._stream.cancel()

    async def _run(self, local: Local, request, whole: bool) -> AsyncIterator[pb.GenerateResponse]:
        start = time.perf_counter()
        if isinstance(request, js.DecodeRequest):
            work, rid = from_decode(request, local.served), ""
        else:
            work, rid = from_generate(request, local.served), request_id(request)
        with Stream(local.scheduler, *work) as self._stream:
            async for batch in self._stream.batches():
                if not whole:
                    yield stream_response(batch, self._stream.job.request, rid)
        local.metrics.completed(self._stream.completion, time.perf_counter() - start)
        if whole:
            yield full_response(self._stream.job.request, rid)


class Refused(Exception):
    """A call ended with the status set on its context (a transport whose context cannot abort)."""


async def fail(grpc_context, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the call with `code` and `message`: a grpc.aio context aborts; Ray Serve's proxy answers with the status
    set on its context when the method raises."""
    if hasattr(grpc_context, "abort"):
        await grpc_context.abort(code, message)
    grpc_context.set_code(code)
    grpc_context.set_details(message)
    raise Refused(message)


class Door:
    """What the services share: the backend, the call metrics, the API keys checked here (None where the transport
    checks them), `draining` (stopping: new calls refused) and `active` (generation calls being answered)."""

    backend: Backend
    metrics: Metrics
    keys: ApiKeys | None = None
    draining: bool = False
    active: int = 0

    async def admit(self, request, grpc_context) -> None:
        """Fail a call without a key, while stopping, or over request_bytes."""
        if self.keys is not None and not self.keys.allows_metadata(grpc_context.invocation_metadata()):
            await fail(grpc_context, CODE.UNAUTHENTICATED, REFUSED)
        if self.draining:
            await fail(grpc_context, CODE.UNAVAILABLE, STOPPING)
        if (size := request.ByteSize()) > (limit := (await self.backend.limits()).request_bytes):
            await fail(grpc_context, CODE.RESOURCE_EXHAUSTED,
                       f"request: {size} bytes, over the limit of {limit} (limit request_bytes)")

    async def responses(self, rpc: str, request, grpc_context, whole: bool = False) -> AsyncIterator[
            pb.GenerateResponse]:
        """The request's messages from the backend (`Backend.generate`); a failure ends the call with its status."""
        self.active += 1  # counted from admission on: a drain waits for a call that passed its check mid-await
        code = CODE.OK
        try:
            await self.admit(request, grpc_context)
            answer = self.backend.generate(request, whole)
            if (done := getattr(grpc_context, "add_done_callback", None)) is not None:
                done(lambda _: answer.cancel())  # a call ended while its handler waits elsewhere
            try:
                async for msg in answer:
                    yield msg
            finally:
                answer.cancel()
        except (Refused, grpc.aio.AbortError):
            code = grpc_context.code()
            raise
        except (asyncio.CancelledError, GeneratorExit):
            remaining = getattr(grpc_context, "time_remaining", lambda: None)()
            code = CODE.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else CODE.CANCELLED
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes a status
            if (known := status(e)) is None:
                log.error("%s failed", rpc, exc_info=e)
            self.metrics.request(rpc, (known[0] if known else CODE.INTERNAL).name)  # before the client hears
            code = None
            await fail(grpc_context, known[0] if known else CODE.INTERNAL, str(e) if known else INTERNAL)
        finally:
            self.active -= 1
            if code is not None:
                self.metrics.request(rpc, code.name)

    def count(self, rpc: str) -> None:
        """Count a call that generates nothing (it cannot fail once admitted)."""
        self.metrics.request(rpc, CODE.OK.name)

    async def serving(self) -> bool:
        return not self.draining and await self.backend.live()


class Inference(Door, inference_pb2_grpc.InferenceServicer):
    async def Generate(self, request: pb.GenerateRequest, grpc_context) -> pb.GenerateResponse:
        return [m async for m in self.responses("Generate", request, grpc_context, whole=True)][-1]

    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context) -> AsyncIterator[pb.GenerateResponse]:
        async for msg in self.responses("GenerateStream", request, grpc_context):
            yield msg

    async def Tokenize(self, request: pb.TokenizeRequest, grpc_context) -> pb.TokenizeResponse:
        await self.admit(request, grpc_context)
        try:
            ids = await self.backend.tokenize(request.text)
        except ValueError as e:  # a text over prompt_bytes
            self.metrics.request("Tokenize", CODE.INVALID_ARGUMENT.name)
            await fail(grpc_context, CODE.INVALID_ARGUMENT, str(e))
        self.count("Tokenize")
        return pb.TokenizeResponse(token_ids=ids)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, grpc_context) -> pb.ModelInfo:
        await self.admit(request, grpc_context)
        self.count("GetModelInfo")
        return await self.backend.info()


class Orchestrator(Door, jetstream_pb2_grpc.OrchestratorServicer):
    """JetStream's API: greedy decoding; text requests get text and ids back, token requests ids only."""

    async def Decode(self, request: js.DecodeRequest, grpc_context) -> AsyncIterator[js.DecodeResponse]:
        text = request.WhichOneof("content") != "token_content"
        async for msg in self.responses("Decode", request, grpc_context):
            if out := decode_response(msg, text):
                yield out

    async def HealthCheck(self, request: js.HealthCheckRequest, grpc_context) -> js.HealthCheckResponse:
        await self.admit(request, grpc_context)
        self.count("HealthCheck")
        return js.HealthCheckResponse(is_live=await self.serving())


class Health(Door, health_pb2_grpc.HealthServicer):
    """grpc.health.v1.Health, open to probes without a key: SERVING, or NOT_SERVING while stopping or when the
    engine cannot serve, for the server ("") and each service (List: all of them); NOT_FOUND (Watch: SERVICE_UNKNOWN)
    for others."""

    async def _status(self, service: str) -> int | None:
        if service not in ("", *SERVICES):
            return None
        return health_pb2.HealthCheckResponse.SERVING if await self.serving() else \
            health_pb2.HealthCheckResponse.NOT_SERVING

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context) -> health_pb2.HealthCheckResponse:
        if (now := await self._status(request.service)) is None:
            await fail(grpc_context, CODE.NOT_FOUND, f"service: {request.service!r} is not served here")
        return health_pb2.HealthCheckResponse(status=now)

    async def List(self, request: health_pb2.HealthListRequest, grpc_context) -> health_pb2.HealthListResponse:
        now = health_pb2.HealthCheckResponse(status=await self._status(""))
        return health_pb2.HealthListResponse(statuses=dict.fromkeys(("", *SERVICES), now))

    async def Watch(self, request: health_pb2.HealthCheckRequest,
                    grpc_context) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The status now, then each change (the engine asked every second, a stop seen within 50 ms); the stream
        ends once it said NOT_SERVING for a stopping server."""
        last = None
        while True:
            now = await self._status(request.service)
            now = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN if now is None else now
            if now != last:
                yield health_pb2.HealthCheckResponse(status=now)
                last = now
            if self.draining:
                return
            for _ in range(20):
                if self.draining:
                    break
                await asyncio.sleep(0.05)


class Services(Inference, Orchestrator, Health):
    """All three services on one object (each server registers it for each)."""

    def __init__(self, backend: Backend, metrics: Metrics, keys: ApiKeys | None = None):
        self.backend, self.metrics, self.keys = backend, metrics, keys
