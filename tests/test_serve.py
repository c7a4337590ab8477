"""The Ray Serve application on a real local Ray: the official `openai` client over HTTP (completions and
chat, streamed and not), gRPC through Serve's proxy (every hire.v1 RPC, JetStream's Decode, standard health
checks and reflection), API keys on every door but health, request limits, bad requests answered 4xx /
INVALID_ARGUMENT with the server still serving, a closed stream cancelled in the engine, and 64 concurrent
streams equal to each request alone."""
from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import openai
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray import serve
from test_grpc_server import check_lora, tiny_adapter

from cluster import launch
from cluster.bench_serving import free_port
from cluster.config import ServeConfig
from hire.chat import chat_prompt
from hire.checkpoint import load_model
from hire.engine import Engine
from hire.generate import generate
from hire.sampling import SamplingParams
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc, jetstream_pb2_grpc
from protos import jetstream_pb2 as js
from workers.auth import WithKey, bearer

MODEL, PROMPT = "stories260K", "Once upon a time"
KEY, OTHER_KEY = "test-key-0c4f", "second-key-9a1e"
AUTH = {"Authorization": f"Bearer {KEY}"}
REQUEST_BYTES = 8 * 32 * 512 + 2**16  # Limits.request_bytes for a context of 512


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    return tiny_adapter(tmp_path_factory.mktemp("lora") / "tiny")


@pytest.fixture(scope="module")
def ports(adapter):
    http, grpc_port = free_port(), free_port()
    launch.start(ServeConfig(model=MODEL, slots=8, max_len=512, api_keys=(KEY, OTHER_KEY), http_port=http,
                             grpc_port=grpc_port, num_cpus=2, lora={"tiny": str(adapter)}))
    yield http, grpc_port
    launch.stop()


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(load_model(MODEL), slots=8, max_len=512)


@pytest.fixture(scope="module")
def client(ports) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{ports[0]}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def bare(ports):
    """A channel whose calls carry no key."""
    with grpc.insecure_channel(f"127.0.0.1:{ports[1]}") as channel:
        yield channel


@pytest.fixture(scope="module")
def channel(bare):
    return grpc.intercept_channel(bare, WithKey(KEY))


def alone(engine: Engine, prompt: str | list[int], max_tokens: int, **params):
    return generate(engine, [prompt], SamplingParams(temperature=0.0, max_tokens=max_tokens, **params))[0]


def engine_load() -> dict:
    return serve.get_deployment_handle("engine", launch.APP).load.remote().result()


def http(ports, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    """The status and body (JSON, or {"text": ...} for an event stream) of an HTTP request to the server."""
    request = urllib.request.Request(f"http://127.0.0.1:{ports[0]}{path}", body,
                                     {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            status, data = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, data = e.code, e.read()
    try:
        return status, json.loads(data)
    except ValueError:
        return status, {"text": data.decode(errors="replace")}


def test_completions_match_the_library(engine, client):
    expected = alone(engine, PROMPT, 40, logprobs=True)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, logprobs=1)
    assert r.object == "text_completion" and r.choices[0].text == expected.text
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(expected.prompt_tokens), 40)
    assert r.choices[0].logprobs.token_logprobs == pytest.approx(expected.logprobs, abs=1e-5)
    assert "".join(r.choices[0].logprobs.tokens) == expected.text
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 40
    ids = client.completions.create(model=MODEL, prompt=expected.prompt_tokens, max_tokens=40, temperature=0)
    assert ids.choices[0].text == expected.text  # a token-id prompt


def test_chat_completions_match_the_library(engine, client):
    messages = [{"role": "system", "content": "Tell a story."}, {"role": "user", "content": "A cat"}]
    expected = alone(engine, chat_prompt(None, messages), 30)  # stories260K has no template: plain format
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.content == expected.text
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens == 30
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text


def test_models_health_and_seeded_sampling(ports, client):
    assert [m.id for m in client.models.list().data] == [MODEL, "tiny"]  # a LoRA adapter is a model
    with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/health") as r:
        assert json.load(r) == {"status": "ok"}
    a, b = (client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=1, top_p=0.9, seed=7)
            for _ in range(2))
    assert a.choices[0].text == b.choices[0].text


@pytest.mark.parametrize("fields, status, param", [
    ({"temperature": -1}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": 600}, 400, "max_tokens"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "word " * 600}, 400, "prompt"),
    ({"prompt": [1, 99999]}, 400, "prompt"),
    ({"n": 2}, 400, "n"),
    ({"stop": [""]}, 400, "stop"),
    ({"model": "no-such-model"}, 404, "model"),
    ({"temperature": "hot"}, 400, "temperature"),
    ({"stop": ["x"] * 17}, 400, "stop"),
    ({"stop_token_ids": [3] * 65}, 400, "stop_token_ids"),
    ({"prompt": "é" * 8193}, 400, "prompt"),  # 16386 bytes: over prompt_bytes (32 per token of context)
    ({"max_tokens": 10**9}, 400, "max_tokens"),
    ({"logprobs": 5}, 400, "logprobs"),
])
def test_bad_completions_are_4xx_naming_the_field(ports, client, fields, status, param):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 5, **fields}
    request = urllib.request.Request(f"http://127.0.0.1:{ports[0]}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json", **AUTH})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request)
    error = json.load(e.value)["error"]
    assert e.value.code == status and error["param"] == param and error["message"]
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3).usage.completion_tokens == 3


def test_bad_chat_request_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=5)
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], top_p=1.5)


def test_lora_adapter_by_name_through_the_serve_proxy(adapter, channel):
    check_lora(inference_pb2_grpc.InferenceStub(channel), adapter, 8, 512)  # as test_grpc_server's, through Serve


def test_grpc_through_the_serve_proxy(engine, channel):
    stub = inference_pb2_grpc.InferenceStub(channel)
    expected = alone(engine, PROMPT, 25)
    unary = stub.Generate(pb.GenerateRequest(text=PROMPT, temperature=0, max_tokens=25, request_id="r7"))
    assert list(unary.token_ids) == expected.tokens and unary.text == expected.text and unary.request_id == "r7"
    assert unary.finish_reason == pb.FINISH_REASON_LENGTH and unary.usage.completion_tokens == 25
    parts = list(stub.GenerateStream(pb.GenerateRequest(text=PROMPT, temperature=0, max_tokens=25)))
    assert [t for p in parts for t in p.token_ids] == expected.tokens and parts[-1].usage.completion_tokens == 25
    assert list(stub.Tokenize(pb.TokenizeRequest(text=PROMPT)).token_ids) == engine.tokenizer.encode(PROMPT)
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.name, info.vocab_size, info.context_length, info.slots) == (MODEL, 512, 512, 8)
    orchestrator = jetstream_pb2_grpc.OrchestratorStub(channel)
    decoded = list(orchestrator.Decode(js.DecodeRequest(text_content=js.DecodeRequest.TextContent(text=PROMPT),
                                                        max_tokens=25)))
    assert "".join(r.stream_content.samples[0].text for r in decoded) == expected.text
    assert orchestrator.HealthCheck(js.HealthCheckRequest()).is_live


@pytest.mark.parametrize("request_, code, field", [
    (pb.GenerateRequest(text=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (pb.GenerateRequest(text=PROMPT, temperature=-1), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (pb.GenerateRequest(text=PROMPT, max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    (pb.GenerateRequest(text=PROMPT, adapter="fr"), grpc.StatusCode.INVALID_ARGUMENT, "adapter"),
    (pb.GenerateRequest(text=PROMPT, hire=True), grpc.StatusCode.UNIMPLEMENTED, "hire"),
])
def test_bad_grpc_requests_through_the_proxy(channel, request_, code, field):
    stub = inference_pb2_grpc.InferenceStub(channel)
    for call in (stub.Generate, lambda r: list(stub.GenerateStream(r))):
        with pytest.raises(grpc.RpcError) as e:
            call(request_)
        assert e.value.code() == code and e.value.details().startswith(field)
    assert stub.Generate(pb.GenerateRequest(text=PROMPT, max_tokens=2)).usage.completion_tokens == 2


def test_a_closed_stream_is_cancelled_in_the_engine(client):
    before = engine_load()["cancelled"]
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=480, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 20  # counted when the call ends; the slot is freed before the next chunk
    while (load := engine_load())["cancelled"] != before + 1 or load["busy_slots"]:
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert load["cancelled"] == before + 1 and load["busy_slots"] == 0


def test_64_concurrent_streams_equal_each_alone(engine, ports):
    prompts = [f"{name} {verb}" for name in ("Tom", "Lily", "The dog", "A bird", "Sam", "The king", "Mia", "A fish")
               for verb in ("went", "saw", "wanted", "found", "liked", "was", "had", "said")]
    lengths = [5 + (7 * i) % 60 for i in range(64)]

    async def one(stub, prompt: str, n: int) -> list[int]:
        call = stub.GenerateStream(pb.GenerateRequest(text=prompt, temperature=0, max_tokens=n), metadata=bearer(KEY))
        return [t async for msg in call for t in msg.token_ids]

    async def run() -> list[list[int]]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports[1]}") as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            return await asyncio.gather(*(one(stub, p, n) for p, n in zip(prompts, lengths)))

    for prompt, n, tokens in zip(prompts, lengths, asyncio.run(run())):
        assert tokens == alone(engine, prompt, n).tokens


def test_ray_is_really_there(ports):
    assert ray.is_initialized() and {"engine", "ingress"} <= set(serve.status().applications[launch.APP].deployments)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=30),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=8)
FIELDS = ("model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
          "stop", "stop_token_ids", "ignore_eos", "stream", "stream_options", "n", "logprobs", "echo", "user")
VALUES = {"model": st.sampled_from([MODEL, "other"]) | JSON, "prompt": st.text(max_size=40) | st.lists(
    st.integers(-5, 600), max_size=20) | JSON, "messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "robot"]), "content": st.text(max_size=20) | JSON}), max_size=3),
    "max_tokens": st.integers(-2, 40) | JSON, "stream": st.booleans(), "temperature": st.floats(-1, 3) | JSON}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(route=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models"]),
       body=st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=8).flatmap(
           lambda d: st.fixed_dictionaries({k: VALUES.get(k, st.just(v)) for k, v in d.items()})),
       raw=st.booleans(), scheme=st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "", "Bearer:"]),
       key=st.sampled_from([KEY, OTHER_KEY, KEY[:-1], KEY + "0", KEY.upper(), "", "anything"]))
def test_no_request_gets_a_5xx_or_past_a_wrong_key(ports, route, body, raw, scheme, key):
    data = json.dumps(body).encode() if not raw else json.dumps(body).encode()[:-1]  # raw: cut off, not JSON
    authorization = f"{scheme} {key}".strip()
    status, out = http(ports, route, data if route != "/v1/models" else None,
                       {"Authorization": authorization} if authorization else {})
    assert status < 500 and (status != 200 or "error" not in out), (route, body)
    valid = scheme.lower() == "bearer" and key in (KEY, OTHER_KEY)
    assert (status == 401) == (not valid), (authorization, status)
    if status != 200:
        assert out["error"]["message"]


def test_still_serving_after_the_fuzz(client):
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3).usage.completion_tokens == 3


def test_keys_on_every_http_route_but_health(ports):
    completion = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 2}).encode()
    routes = [("/v1/models", None), ("/v1/completions", completion), ("/v1/chat/completions", b"{}"),
              ("/docs", None), ("/openapi.json", None), ("/no/such/route", None)]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": f"Bearer {KEY[:-1]}"}):
        for path, body in routes:
            status, error = http(ports, path, body, headers)
            assert status == 401 and "API key" in error["error"]["message"], (path, headers)
    assert http(ports, "/health") == (200, {"status": "ok"})
    for value in (f"Bearer {KEY}", f"bearer {OTHER_KEY}", f"BEARER {KEY}"):  # RFC 6750: any case
        status, out = http(ports, "/v1/completions", completion, {"Authorization": value})
        assert status == 200 and out["usage"]["completion_tokens"] == 2


def test_bodies_over_request_bytes_are_413(ports):
    big = json.dumps({"model": MODEL, "prompt": "a" * REQUEST_BYTES, "max_tokens": 2}).encode()
    status, error = http(ports, "/v1/completions", big, AUTH)
    assert status == 413 and "limit request_bytes" in error["error"]["message"]

    def chunks():  # no Content-Length: the body is counted as it arrives
        for _ in range(REQUEST_BYTES // 2**14 + 2):
            yield b" " * 2**14
    request = urllib.request.Request(f"http://127.0.0.1:{ports[0]}/v1/completions", chunks(),
                                     {"Content-Type": "application/json", **AUTH})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=60)
    assert e.value.code == 413


def test_keys_on_every_grpc_method_but_health(bare):
    inference, orchestrator = inference_pb2_grpc.InferenceStub(bare), jetstream_pb2_grpc.OrchestratorStub(bare)
    text = js.DecodeRequest.TextContent(text=PROMPT)
    calls = [lambda m: inference.Generate(pb.GenerateRequest(text=PROMPT, max_tokens=2), metadata=m),
             lambda m: list(inference.GenerateStream(pb.GenerateRequest(text=PROMPT, max_tokens=2), metadata=m)),
             lambda m: inference.Tokenize(pb.TokenizeRequest(text=PROMPT), metadata=m),
             lambda m: inference.GetModelInfo(pb.GetModelInfoRequest(), metadata=m),
             lambda m: list(orchestrator.Decode(js.DecodeRequest(text_content=text, max_tokens=2), metadata=m)),
             lambda m: orchestrator.HealthCheck(js.HealthCheckRequest(), metadata=m)]
    for metadata in ((), (("authorization", "Bearer nope"),), (("authorization", KEY),)):
        for call in calls:
            with pytest.raises(grpc.RpcError) as e:
                call(metadata)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "API key" in e.value.details()
    for call in calls:
        call((("authorization", f"bearer {OTHER_KEY}"),))
    check = health_pb2_grpc.HealthStub(bare).Check  # no key: probes
    for service in ("", "hire.v1.Inference", "jetstream_proto.Orchestrator"):
        assert check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as e:
        check(health_pb2.HealthCheckRequest(service="no.Such"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    watch = health_pb2_grpc.HealthStub(bare).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    ask = reflection_pb2_grpc.ServerReflectionStub(bare).ServerReflectionInfo
    listed = next(ask(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert {"hire.v1.Inference", "jetstream_proto.Orchestrator", "grpc.health.v1.Health"} <= \
        {s.name for s in listed.list_services_response.service}


def test_grpc_limits_through_the_proxy(channel):
    stub = inference_pb2_grpc.InferenceStub(channel)
    for size, says in ((REQUEST_BYTES + 10, "limit request_bytes"), (5 * 2**20, "")):  # the ingress; the proxy
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(pb.GenerateRequest(tokens=pb.TokenIds(ids=[5] * size)), timeout=60)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and says in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.Tokenize(pb.TokenizeRequest(text="a" * 20000))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("text: 20000 bytes")
    with pytest.raises(grpc.RpcError) as e:
        list(jetstream_pb2_grpc.OrchestratorStub(channel).Decode(js.DecodeRequest(
            text_content=js.DecodeRequest.TextContent(text=PROMPT), max_tokens=10**9)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in e.value.details()
