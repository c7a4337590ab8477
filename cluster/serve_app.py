"""The Ray Serve application: an engine deployment behind an ingress that speaks HTTP and gRPC.

- `EngineServer` owns one model: its engine, a continuous-batching Scheduler and the Ray metrics.
  Its `generate` streams hire.v1 GenerateResponse messages for a hire.v1 or JetStream request. With a
  drafter (`draft`) its engine is a tandem coordinator instead (workers.coordinator.CoordinatorEngine: the large
  model and the drafter in two worker actors it owns, driven over gRPC), whose batches the same Scheduler drives.
- `Ingress` (FastAPI) serves the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions,
  both with SSE streaming, /v1/models, /health) and, through Ray Serve's gRPC proxy, the services of
  `hire serve-grpc` (cluster.servicers), over `Remote`: the engine reached through a deployment handle.

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
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle

from cluster import openai_api as oa
from cluster.auth import REFUSED, ApiKeys, env_keys
from cluster.config import ServeConfig
from cluster.metrics import Metrics, Ray
from cluster.requests import Limits, Served, model_info
from cluster.servicers import CODE, INTERNAL, STOPPING, Local, Services, status
from hire.chat import ChatTemplate
from hire.checkpoint import load_model, model_folder
from hire.engine import Engine, compilation_cache_folder, use_compilation_cache
from hire.engine_api import EngineUnavailable
from hire.lora import load_adapters
from hire.predictor_files import serving_settings
from hire.scheduler import Scheduler
from protos import inference_pb2 as pb
from protos import jetstream_pb2 as js
from workers.shards import RETRY_S, serving_engine

log = logging.getLogger(__name__)

# Servicers Serve's gRPC proxy registers (serve.start's grpc_options, or http/grpc_options in serve.yaml); the proxy
# routes each method to the ingress's method of that name (grpc.health.v1.Health's Check and Watch too).
GRPC_SERVICERS = ("protos.inference_pb2_grpc.add_InferenceServicer_to_server",
                  "protos.jetstream_pb2_grpc.add_OrchestratorServicer_to_server",
                  "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server")
# A replica that died or cannot be reached (its process killed, its node cut off) fails its calls with a
# RayActorError: UNAVAILABLE / 503, a status a client may retry.
LOST = "the engine replica serving this request died or became unreachable; retry"
HEAD_NODE = "node:__internal_head__"  # the resource Ray gives the head node only


def unwrap(e: BaseException) -> BaseException:
    """The exception a replica raised, out of Ray's wrapper; EngineUnavailable for a replica lost."""
    if isinstance(e, RayTaskError) and e.cause is not None:
        return e.cause
    return EngineUnavailable(LOST) if isinstance(e, RayActorError) else e


def retry_after(e: BaseException) -> dict[str, str]:
    """The HTTP header {"retry-after": seconds} when the error says when a retry may succeed (an engine being
    rebuilt), else {}. (gRPC clients read it in the message: Serve's proxy drops a failed call's trailers.)"""
    seconds = getattr(e, "retry_after", None)
    return {"retry-after": str(round(seconds))} if seconds else {}


class EngineServer:
    """One model with its scheduler; calls arrive from the ingress through a handle.

    The model (`config.model`) runs with the HiRE setting its folder recommends (hire.predictor_files.
    serving_settings), if any, with `config.hire` (ModelConfig HiRE fields, e.g. {"softmax": "dense"}) on top. With
    `config.draft` (a drafter's name or path, or "ngram") it is decoded speculatively, `gamma` tokens drafted per
    block, `pipelined` or not (docs/coordinator.md); the large model, with the same HiRE setting and adapters, then
    runs in its own worker actor (over `hosts` host actors when > 1, with no adapters). `config.limits` bound each
    request.
    """

    def __init__(self, config: ServeConfig):
        use_compilation_cache()
        c, batch = config, None  # the scheduler's default batch: hire.batch.PlainBatch
        if c.draft:
            from workers.coordinator import CoordinatorEngine

            tandem = CoordinatorEngine(c.model, c.draft, c.slots, c.max_len, c.gamma, c.pipelined, c.dtype,
                                       compilation_cache=compilation_cache_folder(), verify_hosts=c.hosts,
                                       devices_per_host=c.devices_per_host,
                                       hire=serving_settings(model_folder(c.model), c.hire or None, c.dtype),
                                       lora=c.lora or None)
            mode = pb.DECODING_MODE_TANDEM if tandem.hidden_layers else pb.DECODING_MODE_SPECULATIVE
            self.served = Served(tandem, tandem.cfg.name, tandem.adapters, drafters=[Path(c.draft).name], mode=mode,
                                 gamma=c.gamma, limits=c.limits)
            batch = tandem.batch
        elif c.hosts > 1:  # the model sharded over `hosts` Ray actors (workers.shards); this replica drives them
            sharded = serving_engine(c.model, c.hosts, c.devices_per_host, c.placement, c.slots, c.max_len, c.dtype,
                                     c.lora or None, c.hire or None)
            self.served = Served(sharded, sharded.cfg.name, limits=c.limits)
        else:
            loaded = load_model(c.model, dtype=c.dtype, quantize=c.quantize,
                                **serving_settings(model_folder(c.model), c.hire or None, c.dtype, c.quantize))
            names: dict[str, int] = {}
            if c.lora:
                loaded, names = load_adapters(loaded, c.lora)
            self.served = Served(Engine(loaded, slots=c.slots, max_len=c.max_len), loaded.cfg.name, names,
                                 limits=c.limits)
        self.served.engine.warm_up(c.chunk)
        self.scheduler = Scheduler(self.served.engine, **c.scheduling, batch=batch).start()
        self.metrics = Metrics(Ray(), self.scheduler)
        self.local = Local(self.served, self.scheduler, self.metrics)
        self._sampler: asyncio.Task | None = None
        self.cancelled = 0

    async def _sample_gauges(self) -> None:
        while True:
            self.metrics.sample()
            await asyncio.sleep(1.0)

    async def generate(self, request: pb.GenerateRequest | js.DecodeRequest,
                       whole: bool = False) -> AsyncIterator[pb.GenerateResponse]:
        """Check and run one request (cluster.servicers.Local): each message holds every token ready when it was
        sent, or with `whole` the one message is the completion.

        Raises ValueError / NotImplementedError naming the field, or QueueFull. Cancelling the call
        (the client went away) frees the request's slot before the next decode chunk.
        """
        if self._sampler is None:  # on the replica's event loop, which __init__ may not run on
            self._sampler = asyncio.get_running_loop().create_task(self._sample_gauges())
        answer = self.local.generate(request, whole)
        try:
            async for msg in answer:
                yield msg
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise
        finally:
            answer.cancel()

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

    async def tokenize(self, text: str) -> list[int]:
        return await self.local.tokenize(text)

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
    known = status(e := unwrap(e))
    if known is None:
        log.error("request failed", exc_info=e)
        return JSONResponse(oa.error(INTERNAL, "server_error"), status_code=500)
    code = known[1]
    kind = {404: "not_found_error", 429: "rate_limit_error", 503: "server_error"}.get(code, "invalid_request_error")
    return JSONResponse(oa.error(str(e), kind, oa.field_of(str(e)) if code < 429 else None), status_code=code,
                        headers=retry_after(e))


class Remote:
    """cluster.servicers' Backend over a handle of EngineServer replicas (each runs a `Local`); Ray's errors become
    the replica's (`unwrap`)."""

    def __init__(self, engine: DeploymentHandle):
        self.engine = engine
        self._info: pb.ModelInfo | None = None
        self._limits: Limits | None = None

    def generate(self, request: pb.GenerateRequest | js.DecodeRequest, whole: bool = False) -> Replies:
        return Replies(self.engine.generate.options(stream=True).remote(request, whole))

    async def info(self) -> pb.ModelInfo:
        if self._info is None:
            self._info = await self._call(self.engine.info.remote())
        return self._info

    async def tokenize(self, text: str) -> list[int]:
        return await self._call(self.engine.tokenize.remote(text))

    async def limits(self) -> Limits:
        if self._limits is None:
            self._limits = await self._call(self.engine.limits.remote())
        return self._limits

    async def live(self) -> bool:
        try:
            return await self.engine.check_health.remote() is None
        except Exception:  # noqa: BLE001 - any failure means not live
            return False

    @staticmethod
    async def _call(response):
        try:
            return await response
        except Exception as e:  # noqa: BLE001
            raise unwrap(e) from None


class Replies:
    """A replica's streamed messages; `cancel` cancels the call in the replica (its request leaves its slot)."""

    def __init__(self, responses):
        self._responses = responses

    def __aiter__(self) -> Replies:
        return self

    async def __anext__(self) -> pb.GenerateResponse:
        try:
            return await self._responses.__anext__()
        except StopAsyncIteration:
            raise
        except Exception as e:  # noqa: BLE001
            raise unwrap(e) from None

    def cancel(self) -> None:
        self._responses.cancel()


@serve.ingress(app)
class Ingress(Services):
    """HTTP (OpenAI API) and gRPC (cluster.servicers: hire.v1, JetStream and grpc.health.v1) in front of an
    `EngineServer` handle. With `api_keys`, every call but health checks needs one."""

    def __init__(self, engine: DeploymentHandle, api_keys: list[str] | None = None):
        super().__init__(Remote(engine), Metrics(Ray()), ApiKeys(api_keys) if api_keys else None)
        self.engine = engine
        self._template: tuple[ChatTemplate | None] | None = None

    async def served(self) -> tuple[pb.ModelInfo, ChatTemplate | None]:
        """The model's info and chat template, asked of the engine once; chat prompts are rendered here."""
        if self._template is None:
            self._template = (await self.engine.chat_template.remote(),)
        return await self.backend.info(), self._template[0]

    async def limits(self) -> Limits:
        return await self.backend.limits()

    async def drain(self, grace: float) -> int:
        """Stop taking requests (health NOT_SERVING, new calls 503 / UNAVAILABLE) and wait up to `grace` seconds
        for those in flight to finish; how many are still running."""
        self.draining = True
        deadline = time.monotonic() + grace
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.active

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
        info = await self.backend.info()
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
        rid, streaming, rpc = oa.new_id(chat), False, "ChatCompletions" if chat else "Completions"
        self.active += 1
        try:
            try:
                info, template = await self.served()
                request = oa.to_generate(body, info.name, list(info.adapters), template)
                responses = self.backend.generate(request, whole=not body.stream)
                first = await responses.__anext__()  # a bad request fails here, before any byte is sent
            except Exception as e:  # noqa: BLE001 - every failure becomes an error response
                self.metrics.request(rpc, (status(unwrap(e)) or (CODE.INTERNAL,))[0].name)
                return http_error(e)
            self.metrics.request(rpc, CODE.OK.name)
            if body.stream:
                streaming = True  # _sse counts it out
                return StreamingResponse(self._sse(rid, body, chat, first, responses), media_type="text/event-stream")
            try:
                msg = ([first] + [m async for m in responses])[-1]  # the whole completion
            except Exception as e:  # noqa: BLE001
                return http_error(e)
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


def build(args: Mapping[str, Any] | ServeConfig) -> serve.Application:
    """The application of a ServeConfig, or of its fields (deploy/serve.yaml's `args`). `replicas` is the engine's
    replica count (left out, serve.yaml may autoscale it); with `replica_resource` each engine replica takes one unit
    of that Ray resource (nodes started with one unit, such as deploy/local-cluster.sh's `hire_host`, hold one
    replica each), and the ingress stays on the head node beside Serve's proxy.

    Every call but health checks needs one of `api_keys` (a list, or one string of keys separated by commas),
    or of $HIRE_API_KEY's where the application is built (a Kubernetes Secret in deploy/rayservice.yaml). With
    neither, `insecure: true` must say that anyone who reaches the proxies may use the model (`hire serve` says it
    for a loopback address).

    Each engine replica admits up to slots + queue_size requests: it queues and batches them itself.
    """
    config = args if isinstance(args, ServeConfig) else ServeConfig.of(args)
    keys = list(config.api_keys) or env_keys()
    if not keys and not config.insecure:
        raise ValueError("api_keys: no API key; set $HIRE_API_KEY where the application is built (or args "
                         "api_keys), or say `insecure: true` in args for a server that only trusted clients reach")
    replicas = {"num_replicas": config.replicas} if config.replicas else {}
    resource, slots, queue = config.replica_resource, config.slots, config.queue_size
    options = {"resources": {resource: 1}} if resource else {}
    if config.hosts > 1 or config.draft:  # the replica drives actors that take the CPUs
        options["num_cpus"] = 0
    engine = serve.deployment(EngineServer, name="engine", max_ongoing_requests=slots + queue + 16,
                              health_check_period_s=5, **replicas,
                              **({"ray_actor_options": options} if options else {}))
    ingress = serve.deployment(Ingress, name="ingress", max_ongoing_requests=16 * (slots + queue),
                               ray_actor_options={"num_cpus": 0,  # waits on the engine; needs no core of its own
                                                  **({"resources": {HEAD_NODE: 0.001}} if resource else {})})
    return ingress.bind(engine.bind(config.replace(api_keys=())), keys)  # the keys stay with the ingress
