"""`hire serve-grpc`: the services of cluster.servicers (hire.v1.Inference, JetStream's Orchestrator, grpc.health.v1
.Health) on an asyncio gRPC server over one Scheduler in this process, with reflection.

A message over `Limits.request_bytes` is refused RESOURCE_EXHAUSTED before it is parsed. With API keys every call
but health checks needs one; without, the server listens on loopback only unless told `insecure` (docs/serving.md,
"Security").
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from pathlib import Path

import grpc
import prometheus_client
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster import servicers
from cluster.auth import ApiKeyInterceptor, ApiKeys, check_exposure, loopback, server_credentials
from cluster.config import ServeConfig
from cluster.metrics import Metrics, Prometheus
from cluster.requests import Served
from cluster.servicers import Local, Services
from hire.scheduler import Scheduler, warm_up
from hire.speculative import Drafter, SpecStats, SpeculativeBatch, Speculator
from hire.tandem import TandemDrafter
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc, jetstream_pb2_grpc

log = logging.getLogger(__name__)

SERVICES = (*servicers.SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME)


class GrpcServer:
    """A started Scheduler behind a grpc.aio server; `start` and `stop` run on the serving event loop. Of `config`
    it takes the scheduling (queue_size, chunk, prefills), where to listen (host, grpc_port: 0 picks a free one), the
    API keys (`insecure`: beyond loopback without one) and TLS (tls_cert and tls_key; mutual with tls_client_ca).
    With a `drafter` (config.draft's) it decodes speculatively, config.gamma tokens drafted per block
    (hire.speculative.SpeculativeBatch): the same tokens as plain decoding, for greedy requests the same text."""

    def __init__(self, served: Served, config: ServeConfig | None = None, drafter: Drafter | None = None):
        self.config = c = config or ServeConfig()
        batch, stats, spec = None, None, None  # the scheduler's default batch: hire.batch.PlainBatch
        if drafter is not None:
            spec, stats = Speculator(served.engine, drafter, c.gamma), SpecStats()
            batch = lambda: SpeculativeBatch(spec, stats, plain_from=c.plain_from)  # noqa: E731
            mode = pb.DECODING_MODE_TANDEM if isinstance(drafter, TandemDrafter) else pb.DECODING_MODE_SPECULATIVE
            served = dataclasses.replace(served, drafters=[Path(c.draft or "draft").name], mode=mode, gamma=c.gamma)
        self.served, self.stats, self.spec = served, stats, spec  # stats: the drafts' (SpecStats), or None
        self.scheduler = Scheduler(served.engine, **c.scheduling, batch=batch)
        self.metrics = Metrics(Prometheus(), self.scheduler, stats)
        self.services = Services(Local(served, self.scheduler, self.metrics), self.metrics)
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None

    def warm_up(self) -> None:
        """Compile what serving runs, so that no request waits for a compilation: the engine's programs
        (Engine.warm_up), or decoding speculatively the Speculator's (hire.scheduler.warm_up, its drafts not counted
        in `stats`): its blocks, and with `plain_from` its plain steps, through every attention span."""
        if self.spec is None:
            self.served.engine.warm_up(self.scheduler.chunk)
        else:
            warm_up(self.served.engine, lambda: SpeculativeBatch(self.spec))
            if self.config.plain_from is not None:
                warm_up(self.served.engine, lambda: SpeculativeBatch(self.spec, plain_from=1))

    async def start(self) -> int:
        """Start the scheduler and listen; returns the port."""
        opts = self.config
        check_exposure(opts.host, opts.api_keys, opts.insecure)
        interceptors = [ApiKeyInterceptor(ApiKeys(opts.api_keys))] if opts.api_keys else []
        server = grpc.aio.server(interceptors=interceptors,
                                 options=[("grpc.max_receive_message_length", self.served.limits.request_bytes)])
        inference_pb2_grpc.add_InferenceServicer_to_server(self.services, server)
        jetstream_pb2_grpc.add_OrchestratorServicer_to_server(self.services, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.services, server)
        reflection.enable_server_reflection(SERVICES, server)
        address = f"[{opts.host}]:{opts.grpc_port}" if ":" in opts.host else f"{opts.host}:{opts.grpc_port}"
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
        self._server = server
        log.info("serving %s on %s:%d (%s%s)", self.served.name, opts.host, self.port,
                 "TLS" if opts.tls_cert else "plaintext", ", API keys" if opts.api_keys else ", no API key")
        return self.port

    async def stop(self, grace: float | None = 5.0) -> None:
        """Report NOT_SERVING and refuse new calls (UNAVAILABLE), let calls in flight finish for `grace` seconds
        (cancelling those still running then), then stop the scheduler."""
        self.services.draining = True  # health says NOT_SERVING, new calls are refused
        await asyncio.sleep(0.1)  # health watchers hear it before the calls in flight may be cut
        log.info("stopping: %d requests in flight, %s s to finish", self.in_flight, grace)
        await self._server.stop(grace)
        self.scheduler.stop()
        log.info("stopped")

    @property
    def in_flight(self) -> int:
        """Requests decoding or waiting for a slot."""
        return self.scheduler.busy_slots + self.scheduler.queue_depth

    async def wait(self) -> None:
        await self._server.wait_for_termination()


def serve_model(config: ServeConfig) -> None:
    """`hire serve-grpc`: `serve` the model of `config` (ServeConfig.load) with its drafter (hire.tandem.drafter)."""
    from hire.engine import Engine
    from hire.tandem import drafter

    loaded, names = config.load()
    draft = drafter(config.draft, loaded, config.dtype) if config.draft else None
    engine = Engine(loaded, slots=config.slots, max_len=config.max_len)
    asyncio.run(serve(Served(engine, loaded.cfg.name, names, limits=config.limits), config, draft))


async def serve(served: Served, config: ServeConfig, drafter: Drafter | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then stop gracefully within `config.grace` seconds (a second signal stops at
    once). Prometheus metrics on `config.metrics_port` if set."""
    server = GrpcServer(served, config, drafter)
    check_exposure(config.host, config.api_keys, config.insecure)
    signals = asyncio.Queue()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, signals.put_nowait, sig)
    warm = asyncio.create_task(asyncio.to_thread(server.warm_up))
    first = asyncio.create_task(signals.get())
    await asyncio.wait([warm, first], return_when=asyncio.FIRST_COMPLETED)
    if first.done():  # stopped while compiling: nothing to drain
        log.info("stopped before serving")
        return
    await server.start()
    if config.metrics_port is not None:
        prometheus_client.start_http_server(config.metrics_port, addr=config.metrics_host,
                                            registry=server.metrics.registry)
    await first
    stopping = asyncio.create_task(server.stop(config.grace))
    again = asyncio.create_task(signals.get())
    await asyncio.wait([stopping, again], return_when=asyncio.FIRST_COMPLETED)
    if again.done():
        log.info("second signal: stopping now")
        await server.stop(0)
    await stopping
