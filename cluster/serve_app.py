"""The Ray Serve application: an engine deployment behind an ingress that speaks HTTP and gRPC.

- `EngineServer` owns one model: its engine, a continuous-batching Scheduler and the Ray metrics.
  Its `generate` streams hire.v1 GenerateResponse messages for a hire.v1 or JetStream request. With a
  drafter (`draft`) its engine is a tandem coordinator instead (workers.coordinator.CoordinatorEngine: the large
  model and the drafter in two worker actors it owns, driven over gRPC), whose batches the same Scheduler drives.
- `Ingress` (FastAPI) serves the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions,
  both with SSE streaming, /v1/models, /health) and, through Ray Serve's gRPC proxy, the same
  hire.v1.Inference and jetstream_proto.Orchestrator methods as `hire serve-grpc`. It reaches the
  engine through a deployment handle.

`build` is the application builder named by deploy/serve.yaml (`serve run deploy/serve.yaml`) and
used by `hire serve`. Bad requests end as HTTP 400 (404 for an unknown model, 413 for a body over
`request_bytes`, 429 for a full queue) or INVALID_ARGUMENT / UNIMPLEMENTED / RESOURCE_EXHAUSTED, with a
message that names the field. With API keys, every HTTP route but /health and every gRPC method but
grpc.health.v1.Health needs one (401 / UNAUTHENTICATED). `Ingress.drain` stops taking requests (health
NOT_SERVING, new ones 503 / UNAVAILABLE) and waits for those in flight: `hire serve`'s graceful stop.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from grpc_health.v1 import health_pb2
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle

from cluster import openai_api as oa
from cluster.auth import REFUSED, ApiKeys, env_keys, parse_keys
from cluster.messages import decode_response, request_id, stream_response
from cluster.metrics import RayMetrics
from cluster.requests import Limits, Served, from_decode, from_generate, model_info
from hire.chat import ChatTemplate
from hire.checkpoint import DEFAULT_MODEL, load_model, model_folder
from hire.engine import Engine, compilation_cache_folder, use_compilation_cache
from hire.engine_api import EngineUnavailable
from hire.lora import load_adapters
from hire.predictor_files import serving_settings
from hire.scheduler import QueueFull, Scheduler, Stream
from protos import inference_pb2 as pb
from protos import jetstream_pb2 as js
from workers.shards import RETRY_S, serving_engine

log = logging.getLogger(__name__)

# Servicers Serve's gRPC proxy registers (serve.start's grpc_options, or http/grpc_options in serve.yaml); the proxy
# routes each method to the ingress's method of that name (grpc.health.v1.Health's Check and Watch too).
GRPC_SERVICERS = ("protos.inference_pb2_grpc.add_InferenceServicer_to_server",
                  "protos.jetstream_pb2_grpc.add_OrchestratorServicer_to_server",
                  "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server")
SERVICES = ("", pb.DESCRIPTOR.services_by_name["Inference"].full_name,
            js.DESCRIPTOR.services_by_name["Orchestrator"].full_name)  # the names health checks answer for
STOPPING = "the server is shutting down; retry on another"
# A replica that died or cannot be reached (its process killed, its node cut off) fails its calls with a
# RayActorError: UNAVAILABLE / 503, a status a client may retry.
GRPC_STATUS = {ValueError: grpc.StatusCode.INVALID_ARGUMENT, NotImplementedError: grpc.StatusCode.UNIMPLEMENTED,
               QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED, RayActorError: grpc.StatusCode.UNAVAILABLE,
               EngineUnavailable: grpc.StatusCode.UNAVAILABLE}
HTTP_STATUS = {oa.UnknownModel: 404, ValueError: 400, NotImplementedError: 400, QueueFull: 429, RayActorError: 503,
               EngineUnavailable: 503}
HEAD_NODE = "node:__internal_head__"  # the resource Ray gives the head node only


def cause(e: BaseException) -> BaseException:
    """The exception a replica raised, out of Ray's wrapper."""
    return e.cause if isinstance(e, RayTaskError) and e.cause is not None else e


def kind_of(e: BaseException, table: dict):
    """The entry of `table` for the first exception class `e` is an instance of, or None."""
    return next((v for k, v in table.items() if isinstance(e, k)), None)


def describe(e: BaseException) -> str:
    """What the client is told about a failed request with a known status."""
    if isinstance(e, RayActorError):
        return "the engine replica serving this request died or became unreachable; retry"
    return str(e)


def retry_after(e: BaseException) -> dict[str, str]:
    """The HTTP header {"retry-after": seconds} when the error says when a retry may succeed (an engine being
    rebuilt), else {}. (gRPC clients read it in the message: Serve's proxy drops a failed call's trailers.)"""
    seconds = getattr(e, "retry_after", None)
    return {"retry-after": str(round(seconds))} if seconds else {}


class EngineServer:
    """One model with its scheduler; calls arrive from the ingress through a handle.

    The model runs with the HiRE setting its folder recommends (hire.predictor_files.serving_settings), if any,
    with `hire` (ModelConfig HiRE fields, e.g. {"softmax": "dense"}) on top. With `draft` (a drafter's name or
    path, or "ngram") it is decoded speculatively, `gamma` tokens drafted per block, `pipelined` or not
    (docs/coordinator.md); the large model then runs exactly, in its own worker actor (over `hosts` host actors
    when > 1). `limits` bound each request (cluster.requests.Limits' fields).
    """

    def __init__(self, model: str = DEFAULT_MODEL, slots: int = 8, max_len: int | None = None, queue_size: int = 128,
                 chunk: int = 4, prefills: int = 4, dtype: str | None = None, lora: dict[str, str] | None = None,
                 hire: dict | None = None, hosts: int = 1, devices_per_host: int = 1, placement: str | None = None,
                 draft: str | None = None, gamma: int = 4, pipelined: bool = True, limits: dict | None = None,
                 quantize: str | None = None):
        use_compilation_cache()
        bounds = Limits.parse(limits)
        batch = None  # the scheduler's default: hire.generate.PlainBatch
        if draft:
            from workers.coordinator import CoordinatorEngine

            tandem = CoordinatorEngine(model, draft, slots, max_len, gamma, pipelined, dtype,
                                       compilation_cache=compilation_cache_folder(), verify_hosts=hosts,
                                       devices_per_host=devices_per_host)
            mode = pb.DECODING_MODE_TANDEM if tandem.hidden_layers else pb.DECODING_MODE_SPECULATIVE
            self.served = Served(tandem, tandem.cfg.name, drafters=[Path(draft).name], mode=mode, gamma=gamma,
                                 limits=bounds)
            batch = tandem.batch
        elif hosts > 1:  # the model sharded over `hosts` Ray actors (workers.shards); this replica drives them
            sharded = serving_engine(model, hosts, devices_per_host, placement, slots, max_len, dtype, lora, hire)
            self.served = Served(sharded, sharded.cfg.name, limits=bounds)
        else:
            loaded = load_model(model, dtype=dtype, quantize=quantize, **serving_settings(model_folder(model), hire))
            names: dict[str, int] = {}
            if lora:
                loaded, names = load_adapters(loaded, lora)
            self.served = Served(Engine(loaded, slots=slots, max_len=max_len), loaded.cfg.name, names, limits=bounds)
        self.served.engine.warm_up(chunk)
        self.scheduler = Scheduler(self.served.engine, queue_size, chunk, prefills, batch=batch).start()
        self.metrics = RayMetrics(self.scheduler)
        self._sampler: asyncio.Task | None = None
        self.cancelled = 0

    async def _sample_gauges(self) -> None:
        while True:
            self.metrics.sample()
            await asyncio.sleep(1.0)

    async def generate(self, request: pb.GenerateRequest | js.DecodeRequest) -> AsyncIterator[pb.GenerateResponse]:
        """Check and run one request; each message holds every token ready when it was sent.

        Raises ValueError / NotImplementedError naming the field, or QueueFull. Cancelling the call
        (the client went away) frees the request's slot before the next decode chunk.
        """
        rpc = "Decode" if isinstance(request, js.DecodeRequest) else "Generate"
        if self._sampler is None:  # on the replica's event loop, which __init__ may not run on
            self._sampler = asyncio.get_running_loop().create_task(self._sample_gauges())
        start, status = time.perf_counter(), "OK"
        try:
            if rpc == "Decode":
                work, rid = from_decode(request, self.served), ""
            else:
                work, rid = from_generate(request, self.served), request_id(request)
            with Stream(self.scheduler, *work) as stream:
                async for batch in stream.batches():
                    yield stream_response(batch, stream.job.request, rid)
            self.metrics.completed(stream.completion, time.perf_counter() - start)
        except BaseException as e:
            if isinstance(e, (asyncio.CancelledError, GeneratorExit)):
                status, self.cancelled = "CANCELLED", self.cancelled + 1
            else:
                status = (kind_of(e, GRPC_STATUS) or grpc.StatusCode.INTERNAL).name
            raise
        finally:
            self.metrics.request(rpc, status)

    def info(self) -> pb.ModelInfo:
        return model_info(self.served, self.scheduler.queue_size)

    def chat_template(self) -> ChatTemplate | None:
        """The model's chat template (hire.chat), None when it has none."""
        return ChatTemplate.of(self.served.engine.tokenizer)

    def stats(self) -> dict:
        """Speculative decoding's counters (acceptance, calls, restarts: CoordinatorStats), or {} for plain."""
        stats = getattr(self.served.engine, "stats", None)
        return stats.as_dict() if stats is not None else {}

    def worker(self, which: str):
        """The actor handle of a speculative replica's "verify" or "draft" worker (fault tests)."""
        return self.served.engine.workers.actors[which]

    def limits(self) -> Limits:
        return self.served.limits

    def tokenize(self, text: str) -> list[int]:
        self.served.limits.check_text("text", text)
        return self.served.engine.tokenizer.encode(text)

    def token_texts(self, ids: list[int]) -> list[str]:
        """Each token's own text (for OpenAI logprobs)."""
        return [self.served.engine.tokenizer.decode([i]) for i in ids]

    def load(self) -> dict[str, int]:
        """Slots in use, requests waiting, and generation calls cancelled so far (the client went away)."""
        return {"busy_slots": self.scheduler.busy_slots, "queue_depth": self.scheduler.queue_depth,
                "cancelled": self.cancelled}

    async def check_health(self) -> str | None:
        """Serve's health probe, and the ingress's: a replica whose scheduler thread died is restarted (it raises).
        Otherwise why the engine cannot serve now (one line for clients), or None while it can. A sharded engine that
        is down or has a host that does not answer is rebuilt by the scheduler instead (which retries the requests
        that had no token yet), and one on fewer hosts than configured grows back between requests."""
        if not self.scheduler.alive:
            raise RuntimeError("the scheduler thread has stopped")
        engine = self.served.engine
        if down := getattr(engine, "unavailable", None):
            self.scheduler.recover()
            return down
        ping = getattr(engine, "ping", None)
        if ping is not None and not await asyncio.to_thread(ping, 5.0):
            self.scheduler.recover()
            return "a shard host does not answer; rebuilding"
        if getattr(engine, "degraded", False):
            self.scheduler.recover(grow=True)
        return None


class Guard:
    """ASGI middleware in front of every HTTP route: the API key (all but /health: 401), the shutdown (503), and the
    body, read here up to `Limits.request_bytes` (413 past it) before any route parses it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        ingress: Ingress = serve.get_replica_context().servable_object
        headers = dict(scope["headers"])
        if scope["path"] != "/health":
            if ingress.keys is not None and not ingress.keys.allows(headers.get(b"authorization")):
                return await reply(send, 401, oa.error(REFUSED, "authentication_error"),
                                   [(b"www-authenticate", b"Bearer")])
            if ingress.draining:
                return await reply(send, 503, oa.error(STOPPING, "server_error"))
        try:
            limit = (await ingress.limits()).request_bytes
        except Exception as e:  # noqa: BLE001 - the engine is not up (yet): 503, which a client may retry
            return await http_error(e)(scope, receive, send)
        too_large = oa.error(f"request: the body is over the limit of {limit} bytes (limit request_bytes)",
                             "invalid_request_error")
        if int(headers.get(b"content-length", b"0") or 0) > limit:
            return await reply(send, 413, too_large)
        body, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body.append(message.get("body", b""))
            more = message.get("more_body", False)
            if sum(map(len, body)) > limit:
                return await reply(send, 413, too_large)
        whole = {"type": "http.request", "body": b"".join(body), "more_body": False}

        async def replay() -> dict:
            nonlocal whole
            message, whole = whole, None
            return message if message is not None else await receive()
        await self.app(scope, replay, send)


async def reply(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """Answer an HTTP request with a JSON body."""
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


app = FastAPI(title="hire", description="OpenAI-compatible completions served by hire on Ray Serve.")
app.add_middleware(Guard)


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    return JSONResponse(oa.error(f"{param}: {first.get('msg', 'invalid request')}", "invalid_request_error", param),
                        status_code=400)


def http_error(e: BaseException) -> JSONResponse:
    """The OpenAI error response for a failed request (500 only for a server fault)."""
    e = cause(e)
    status = kind_of(e, HTTP_STATUS)
    if status is None:
        log.error("request failed", exc_info=e)
        return JSONResponse(oa.error("internal error; see the server's log", "server_error"), status_code=500)
    kind = {404: "not_found_error", 429: "rate_limit_error", 503: "server_error"}.get(status, "invalid_request_error")
    return JSONResponse(oa.error(describe(e), kind, oa.field_of(str(e)) if status < 429 else None), status_code=status,
                        headers=retry_after(e))


class Refused(Exception):
    """A gRPC call refused before it reached the engine (its status is set on the call's context)."""


@serve.ingress(app)
class Ingress:
    """HTTP (OpenAI API) and gRPC (hire.v1, JetStream and grpc.health.v1) in front of an `EngineServer` handle.
    With `api_keys`, every call but health checks needs one."""

    def __init__(self, engine: DeploymentHandle, api_keys: list[str] | None = None):
        self.engine = engine
        self.keys = ApiKeys(api_keys) if api_keys else None
        self.draining, self.active = False, 0  # active: requests being answered
        self._served: tuple[pb.ModelInfo, ChatTemplate | None] | None = None
        self._limits: Limits | None = None

    async def served(self) -> tuple[pb.ModelInfo, ChatTemplate | None]:
        """The model's info and chat template, asked of the engine once; chat prompts are rendered here."""
        if self._served is None:
            self._served = (await self.engine.info.remote(), await self.engine.chat_template.remote())
        return self._served

    async def model_info(self) -> pb.ModelInfo:
        return (await self.served())[0]

    async def limits(self) -> Limits:
        if self._limits is None:
            self._limits = await self.engine.limits.remote()
        return self._limits

    async def drain(self, grace: float) -> int:
        """Stop taking requests (health NOT_SERVING, new calls 503 / UNAVAILABLE) and wait up to `grace` seconds
        for those in flight to finish; how many are still running."""
        self.draining = True
        deadline = time.monotonic() + grace
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.active

    async def _admit(self, request, context: RayServegRPCContext) -> None:
        """Raise Refused, with the call's status set, for a call without a key, while stopping, or over
        request_bytes."""
        refusal = None
        if self.keys is not None and not self.keys.allows_metadata(context.invocation_metadata()):
            refusal = grpc.StatusCode.UNAUTHENTICATED, REFUSED
        elif self.draining:
            refusal = grpc.StatusCode.UNAVAILABLE, STOPPING
        elif (size := request.ByteSize()) > (limit := (await self.limits()).request_bytes):
            refusal = grpc.StatusCode.RESOURCE_EXHAUSTED, f"request: {size} bytes, over the limit of {limit} " \
                                                          "(limit request_bytes)"
        if refusal:
            context.set_code(refusal[0])
            context.set_details(refusal[1])
            raise Refused(refusal[1])

    def _stream(self, request: pb.GenerateRequest | js.DecodeRequest):
        return self.engine.generate.options(stream=True).remote(request)

    # HTTP

    @app.get("/health")
    async def health(self):
        if self.draining:
            return JSONResponse({"status": "stopping"}, status_code=503)
        if down := await self.engine.check_health.remote():
            return JSONResponse({"status": "unavailable", "error": down}, status_code=503,
                                headers=retry_after(EngineUnavailable(down, RETRY_S)))
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self) -> dict:
        info = await self.model_info()
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "hire",
                                            **({"parent": info.name} if name != info.name else {})}
                                           for name in (info.name, *info.adapters)]}

    @app.post("/v1/completions")
    async def completions(self, body: oa.CompletionRequest):
        return await self._openai(body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: oa.ChatRequest):
        return await self._openai(body, chat=True)

    async def _openai(self, body: oa.CompletionRequest | oa.ChatRequest, chat: bool):
        rid, streaming = oa.new_id(chat), False
        self.active += 1
        try:
            try:
                info, template = await self.served()
                responses = self._stream(oa.to_generate(body, info.name, list(info.adapters), template))
                first = await responses.__anext__()  # a bad request fails here, before any byte is sent
            except Exception as e:  # noqa: BLE001 - every failure becomes an error response
                return http_error(e)
            if body.stream:
                streaming = True  # _sse counts it out
                return StreamingResponse(self._sse(rid, body, chat, first, responses), media_type="text/event-stream")
            try:
                msgs = [first] + [m async for m in responses]
            except Exception as e:  # noqa: BLE001
                return http_error(e)
            msg = oa.merge(msgs)
            lp = await self._logprobs(msg, chat) if msg.logprobs else None
            out = oa.body(rid, body.model, chat, False, [oa.choice(msg, chat, False, True, lp)])
            return {**out, "usage": oa.usage(msg)}
        finally:
            self.active -= not streaming

    async def _logprobs(self, msg: pb.GenerateResponse, chat: bool) -> dict:
        return oa.logprobs(await self.engine.token_texts.remote(list(msg.token_ids)), list(msg.logprobs), chat)

    async def _sse(self, rid: str, body, chat: bool, first: pb.GenerateResponse, rest) -> AsyncIterator[str]:
        """Server-sent events: one chunk per message, usage last when asked, then [DONE]."""
        try:
            msg, n = first, 0
            while True:
                lp = await self._logprobs(msg, chat) if msg.logprobs else None
                chunk = oa.body(rid, body.model, chat, True, [oa.choice(msg, chat, True, n == 0, lp)])
                yield f"data: {json.dumps(chunk)}\n\n"
                if msg.finish_reason:
                    break
                msg, n = await rest.__anext__(), n + 1
            if body.stream_options and body.stream_options.include_usage:
                yield f"data: {json.dumps({**oa.body(rid, body.model, chat, True, []), 'usage': oa.usage(msg)})}\n\n"
        except Exception as e:  # noqa: BLE001 - the status line is gone; report in the stream
            yield f"data: {json.dumps(json.loads(http_error(e).body))}\n\n"
        finally:
            rest.cancel()
            self.active -= 1
        yield "data: [DONE]\n\n"

    # gRPC, through Serve's proxy: the methods of hire.v1.Inference, jetstream_proto.Orchestrator and
    # grpc.health.v1.Health (the one service that needs no key)

    async def _grpc(self, request, context: RayServegRPCContext) -> AsyncIterator[pb.GenerateResponse]:
        self.active += 1  # counted from admission on: a drain waits for a call that passed its check mid-await
        try:
            await self._admit(request, context)
            responses = self._stream(request)
            try:
                async for msg in responses:
                    yield msg
            except Exception as e:  # noqa: BLE001 - every failure becomes a status
                e = cause(e)
                code = kind_of(e, GRPC_STATUS)
                if code is None:
                    log.error("gRPC request failed", exc_info=e)
                context.set_code(code or grpc.StatusCode.INTERNAL)
                context.set_details(describe(e) if code else "internal error; see the server's log")
                raise e from None  # Serve's proxy answers with the status set above
            finally:
                responses.cancel()
        finally:
            self.active -= 1

    async def Generate(self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext) -> pb.GenerateResponse:
        msgs = [m async for m in self._grpc(request, grpc_context)]
        out = oa.merge(msgs)
        out.request_id = msgs[-1].request_id
        return out

    async def GenerateStream(self, request: pb.GenerateRequest,
                             grpc_context: RayServegRPCContext) -> AsyncIterator[pb.GenerateResponse]:
        async for msg in self._grpc(request, grpc_context):
            yield msg

    async def Tokenize(self, request: pb.TokenizeRequest, grpc_context: RayServegRPCContext) -> pb.TokenizeResponse:
        await self._admit(request, grpc_context)
        try:
            return pb.TokenizeResponse(token_ids=await self.engine.tokenize.remote(request.text))
        except Exception as e:  # noqa: BLE001 - a text over prompt_bytes
            if not isinstance(e := cause(e), ValueError):
                raise
            grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            grpc_context.set_details(str(e))
            raise e from None

    async def GetModelInfo(self, request: pb.GetModelInfoRequest,
                           grpc_context: RayServegRPCContext) -> pb.ModelInfo:
        await self._admit(request, grpc_context)
        return await self.model_info()

    async def Decode(self, request: js.DecodeRequest,
                     grpc_context: RayServegRPCContext) -> AsyncIterator[js.DecodeResponse]:
        text = request.WhichOneof("content") != "token_content"
        async for msg in self._grpc(request, grpc_context):
            if out := decode_response(msg, text):
                yield out

    async def HealthCheck(self, request: js.HealthCheckRequest,
                          grpc_context: RayServegRPCContext) -> js.HealthCheckResponse:
        await self._admit(request, grpc_context)
        return js.HealthCheckResponse(is_live=await self._live())

    async def _live(self) -> bool:
        if self.draining:
            return False
        try:
            return await self.engine.check_health.remote() is None
        except Exception:  # noqa: BLE001 - any failure means not live
            return False

    async def _status(self, service: str) -> int | None:
        """grpc.health.v1's status of `service` ("": the server), or None for a service not served here."""
        if service not in SERVICES:
            return None
        return health_pb2.HealthCheckResponse.SERVING if await self._live() else \
            health_pb2.HealthCheckResponse.NOT_SERVING

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    grpc_context: RayServegRPCContext) -> health_pb2.HealthCheckResponse:
        """grpc.health.v1.Health/Check: SERVING, NOT_SERVING (stopping, or the engine is down), NOT_FOUND."""
        status = await self._status(request.service)
        if status is None:
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"service: {request.service!r} is not served here")
            raise Refused(request.service)
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest,
                    grpc_context: RayServegRPCContext) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """grpc.health.v1.Health/Watch: the status now, then each change (checked every second); the stream ends
        once it said NOT_SERVING for a stopping server."""
        last = None
        while True:
            status = await self._status(request.service)
            if status is None:
                status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            if self.draining:
                return
            await asyncio.sleep(1.0)


def build(args: dict) -> serve.Application:
    """The application: `args` are EngineServer's keyword arguments (model, slots, max_len, ...) and
    optionally `replicas`, the engine's replica count (serve.yaml may instead autoscale it), and
    `replica_resource`, a Ray resource each engine replica takes one unit of (nodes started with one unit,
    such as deploy/local-cluster.sh's `hire_host`, hold one replica each), which also keeps the ingress on
    the head node beside Serve's proxy.

    Every call but health checks needs one of `api_keys` (a list, or one string of keys separated by commas),
    or of $HIRE_API_KEY's where the application is built (a Kubernetes Secret in deploy/rayservice.yaml). With
    neither, `insecure: true` must say that anyone who reaches the proxies may use the model (`hire serve` says it
    for a loopback address).

    Each engine replica admits up to slots + queue_size requests: it queues and batches them itself.
    """
    args = dict(args)
    keys = args.pop("api_keys", None)
    keys = parse_keys([keys] if isinstance(keys, str) else keys or []) or env_keys()
    if not keys and not args.pop("insecure", False):
        raise ValueError("api_keys: no API key; set $HIRE_API_KEY where the application is built (or args "
                         "api_keys), or say `insecure: true` in args for a server that only trusted clients reach")
    args.pop("insecure", None)
    replicas = {"num_replicas": int(args.pop("replicas"))} if "replicas" in args else {}
    resource = args.pop("replica_resource", None)
    slots, queue = int(args.get("slots", 8)), int(args.get("queue_size", 128))
    options = {"resources": {resource: 1}} if resource else {}
    if int(args.get("hosts", 1)) > 1 or args.get("draft"):  # the replica drives actors that take the CPUs
        options["num_cpus"] = 0
    engine = serve.deployment(EngineServer, name="engine", max_ongoing_requests=slots + queue + 16,
                              health_check_period_s=5, **replicas,
                              **({"ray_actor_options": options} if options else {}))
    ingress = serve.deployment(Ingress, name="ingress", max_ongoing_requests=16 * (slots + queue),
                               ray_actor_options={"num_cpus": 0,  # waits on the engine; needs no core of its own
                                                  **({"resources": {HEAD_NODE: 0.001}} if resource else {})})
    return ingress.bind(engine.bind(**args), keys)
