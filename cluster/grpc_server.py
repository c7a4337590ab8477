"""The asyncio gRPC server: hire.v1.Inference and JetStream's Orchestrator over one Scheduler.

Every generation request is checked (cluster.requests), queued in the scheduler and streamed back
as the engine decodes it; a bad field or a request over its limits answers INVALID_ARGUMENT, a mode not
implemented yet UNIMPLEMENTED, a full queue RESOURCE_EXHAUSTED, a message over `Limits.request_bytes`
RESOURCE_EXHAUSTED. A call that ends early (client cancel, deadline) frees its slot before the next decode chunk.
Standard health checking and reflection are served too. With API keys every call but health checks needs one;
without, the server listens on loopback only unless told `insecure` (docs/serving.md, "Security").
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import prometheus_client
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster.auth import ApiKeyInterceptor, ApiKeys, check_exposure, loopback, server_credentials
from cluster.messages import decode_response, full_response, request_id, stream_response
from cluster.metrics import Metrics
from cluster.requests import Served, Work, from_decode, from_generate, model_info
from hire.engine_api import EngineUnavailable
from hire.request import Event, Request
from hire.scheduler import QueueFull, Scheduler, Stream
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc, jetstream_pb2_grpc
from protos import jetstream_pb2 as js

log = logging.getLogger(__name__)

STATUS = {ValueError: grpc.StatusCode.INVALID_ARGUMENT, NotImplementedError: grpc.StatusCode.UNIMPLEMENTED,
          QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED, EngineUnavailable: grpc.StatusCode.UNAVAILABLE}
SERVICES = (pb.DESCRIPTOR.services_by_name["Inference"].full_name,
            js.DESCRIPTOR.services_by_name["Orchestrator"].full_name)


@dataclass
class Options:
    """Where and how to listen. TLS when `tls_cert` and `tls_key` are set (mutual with `tls_client_ca`)."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    api_keys: tuple[str, ...] = ()  # one is required on every call but health checks
    insecure: bool = False  # listen beyond loopback with no key
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None


class Generation:
    """Runs generation calls through the scheduler: status codes, cancellation on call end, metrics."""

    def __init__(self, served: Served, scheduler: Scheduler, metrics: Metrics):
        self.served, self.scheduler, self.metrics = served, scheduler, metrics

    async def batches(self, rpc: str, check: Callable[[], Work],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[tuple[list[Event], Request]]:
        """The checked request's events as they come (see Stream.batches), with the request (its `out` is
        complete at the last event).

        Aborts the call with the status code of a bad request, a full queue or a failure.
        """
        start, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            with Stream(self.scheduler, *check()) as stream:
                context.add_done_callback(lambda _: stream.cancel())
                async for batch in stream.batches():
                    yield batch, stream.job.request
            self.metrics.completed(stream.completion, time.perf_counter() - start)
        except tuple(STATUS) as e:
            code = next(c for kind, c in STATUS.items() if isinstance(e, kind))
            await context.abort(code, str(e))
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("%s failed", rpc)
            await context.abort(code, "internal error; see the server's log")
        finally:
            self.metrics.request(rpc, code.name)

    def count(self, rpc: str) -> None:
        """Count a call that cannot fail (no generation)."""
        self.metrics.request(rpc, grpc.StatusCode.OK.name)


class Inference(inference_pb2_grpc.InferenceServicer):
    def __init__(self, generation: Generation):
        self.generation, self.served = generation, generation.served

    def _batches(self, rpc: str, request: pb.GenerateRequest, context) -> AsyncIterator[tuple[list[Event], Request]]:
        return self.generation.batches(rpc, lambda: from_generate(request, self.served), context)

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        async for _, req in self._batches("Generate", request, context):
            pass
        return full_response(req, request_id(request))

    async def GenerateStream(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        rid = request_id(request)
        async for batch, req in self._batches("GenerateStream", request, context):
            yield stream_response(batch, req, rid)

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        try:
            self.served.limits.check_text("text", request.text)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        self.generation.count("Tokenize")
        return pb.TokenizeResponse(token_ids=self.served.engine.tokenizer.encode(request.text))

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        self.generation.count("GetModelInfo")
        return model_info(self.served, self.generation.scheduler.queue_size)


class Orchestrator(jetstream_pb2_grpc.OrchestratorServicer):
    """JetStream's API: greedy decoding; text requests get text and ids back, token requests ids only."""

    def __init__(self, generation: Generation):
        self.generation = generation

    async def Decode(self, request: js.DecodeRequest, context) -> AsyncIterator[js.DecodeResponse]:
        text = request.WhichOneof("content") != "token_content"
        check = lambda: from_decode(request, self.generation.served)  # noqa: E731
        async for batch, req in self.generation.batches("Decode", check, context):
            if out := decode_response(stream_response(batch, req, ""), text):
                yield out

    async def HealthCheck(self, request: js.HealthCheckRequest, context) -> js.HealthCheckResponse:
        self.generation.count("HealthCheck")
        return js.HealthCheckResponse(is_live=self.generation.scheduler.alive)


class GrpcServer:
    """A started Scheduler behind a grpc.aio server; `start` and `stop` run on the serving event loop."""

    def __init__(self, served: Served, options: Options | None = None, queue_size: int = 128, chunk: int = 4,
                 prefills: int = 4):
        self.options = options or Options()
        self.served = served
        self.scheduler = Scheduler(served.engine, queue_size, chunk, prefills)
        self.metrics = Metrics(self.scheduler)
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None

    async def start(self) -> int:
        """Start the scheduler and listen; returns the port."""
        opts = self.options
        check_exposure(opts.host, opts.api_keys, opts.insecure)
        interceptors = [ApiKeyInterceptor(ApiKeys(opts.api_keys))] if opts.api_keys else []
        server = grpc.aio.server(interceptors=interceptors,
                                 options=[("grpc.max_receive_message_length", self.served.limits.request_bytes)])
        generation = Generation(self.served, self.scheduler, self.metrics)
        inference_pb2_grpc.add_InferenceServicer_to_server(Inference(generation), server)
        jetstream_pb2_grpc.add_OrchestratorServicer_to_server(Orchestrator(generation), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"[{opts.host}]:{opts.port}" if ":" in opts.host else f"{opts.host}:{opts.port}"
        if opts.tls_cert or opts.tls_key:
            if not (opts.tls_cert and opts.tls_key):
                raise ValueError("TLS needs both a certificate and its key")
            self.port = server.add_secure_port(address, server_credentials(opts.tls_cert, opts.tls_key,
                                                                           opts.tls_client_ca))
        else:
            if not loopback(opts.host):
                log.warning("serving %s without TLS: traffic and any API key travel in clear", address)
            self.port = server.add_insecure_port(address)
        self.scheduler.start()
        await server.start()
        for name in ("", *SERVICES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        log.info("serving %s on %s:%d (%s%s)", self.served.name, opts.host, self.port,
                 "TLS" if opts.tls_cert else "plaintext", ", API keys" if opts.api_keys else ", no API key")
        return self.port

    async def stop(self, grace: float | None = 5.0) -> None:
        """Report NOT_SERVING and refuse new calls (UNAVAILABLE), let calls in flight finish for `grace` seconds
        (cancelling those still running then), then stop the scheduler."""
        stopped = asyncio.ensure_future(self._server.stop(grace))
        await asyncio.sleep(0)  # the server refuses new calls once stop has begun; then health says so
        await self.health.enter_graceful_shutdown()
        log.info("stopping: %d requests in flight, %s s to finish", self.in_flight, grace)
        await stopped
        self.scheduler.stop()
        log.info("stopped")

    @property
    def in_flight(self) -> int:
        """Requests decoding or waiting for a slot."""
        return self.scheduler.busy_slots + self.scheduler.queue_depth

    async def wait(self) -> None:
        await self._server.wait_for_termination()


async def serve(served: Served, options: Options, metrics: tuple[str, int] | None = None, grace: float = 20.0,
                **scheduling: int) -> None:
    """Serve until SIGINT or SIGTERM, then stop gracefully within `grace` seconds (a second signal stops at once);
    the `hire serve-grpc` command. `metrics`: where to serve Prometheus metrics (host, port)."""
    server = GrpcServer(served, options, **scheduling)
    check_exposure(options.host, options.api_keys, options.insecure)
    signals = asyncio.Queue()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, signals.put_nowait, sig)
    warm = asyncio.create_task(asyncio.to_thread(served.engine.warm_up, server.scheduler.chunk))
    first = asyncio.create_task(signals.get())
    await asyncio.wait([warm, first], return_when=asyncio.FIRST_COMPLETED)
    if first.done():  # stopped while compiling: nothing to drain
        log.info("stopped before serving")
        return
    await server.start()
    if metrics is not None:
        prometheus_client.start_http_server(metrics[1], addr=metrics[0], registry=server.metrics.registry)
    await first
    stopping = asyncio.create_task(server.stop(grace))
    again = asyncio.create_task(signals.get())
    await asyncio.wait([stopping, again], return_when=asyncio.FIRST_COMPLETED)
    if again.done():
        log.info("second signal: stopping now")
        await server.stop(0)
    await stopping
