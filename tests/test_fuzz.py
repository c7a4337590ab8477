"""Bad input at scale: hypothesis draws hire.v1 and JetStream requests with arbitrary field values, sizes past
every limit, and authorization values near the server's API key, and sends them to a real gRPC server. A client's
mistake is answered with a client status (never INTERNAL or UNKNOWN), a request over a limit is refused, no call
without a valid key gets past but health checks, every answer comes before its deadline, the server keeps serving
well-formed requests throughout, and a flood of oversized requests leaves their latency within 2x."""
from __future__ import annotations

import asyncio
import statistics
import string
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.config import ServeConfig
from cluster.grpc_server import GrpcServer
from cluster.requests import Served
from hire.checkpoint import load_model
from hire.engine import Engine
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc, jetstream_pb2_grpc
from protos import jetstream_pb2 as js
from workers.auth import WithKey, bearer

CLIENT_MISTAKES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED,
                   grpc.StatusCode.RESOURCE_EXHAUSTED}
INT32, UINT32 = st.integers(-2**31, 2**31 - 1), st.integers(0, 2**32 - 1)
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)
TOKENS = st.lists(st.one_of(st.integers(-5, 600), INT32), max_size=140)
KEY = "fuzz-key-5d1c"
PROMPT_BYTES = 32 * 128  # the limits of a context of 128 (cluster.requests.Limits)
STOP_STRINGS, STOP_BYTES, STOP_IDS = 16, 256, 64


@pytest.fixture(scope="module")
def port():
    engine = Engine(load_model("stories260K"), slots=4, max_len=128)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    server = GrpcServer(Served(engine, "stories260K"), ServeConfig(grpc_port=0, api_keys=(KEY,), queue_size=64))
    engine.warm_up(server.scheduler.chunk)  # as `hire serve-grpc` does: no call waits for a compilation
    yield asyncio.run_coroutine_threadsafe(server.start(), loop).result(60)
    asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(60)
    loop.call_soon_threadsafe(loop.stop)


@pytest.fixture(scope="module")
def bare(port):
    """A channel whose calls carry no key."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel


@pytest.fixture(scope="module")
def channel(bare):
    return grpc.intercept_channel(bare, WithKey(KEY))


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    msg = pb.GenerateRequest()
    if draw(st.booleans()):
        msg.text = draw(st.text(max_size=300) | st.text(min_size=PROMPT_BYTES // 4, max_size=PROMPT_BYTES + 200))
    else:
        msg.tokens.ids.extend(draw(st.lists(INT32, max_size=140)) if draw(st.booleans()) else draw(TOKENS))
    for name, strategy in (("temperature", FLOATS), ("top_p", FLOATS), ("seed", st.integers(-2**63, 2**63 - 1)),
                           ("max_tokens", st.one_of(st.integers(-3, 140), INT32))):
        if draw(st.booleans()):
            setattr(msg, name, draw(strategy))
    msg.top_k = draw(st.one_of(st.integers(-2, 600), INT32))
    msg.stop.extend(draw(st.lists(st.text(max_size=5), max_size=3) | st.lists(
        st.text(max_size=5) | st.text(min_size=STOP_BYTES // 4, max_size=STOP_BYTES + 10), max_size=STOP_STRINGS + 4)))
    msg.stop_token_ids.extend(draw(st.lists(INT32, max_size=3) | st.lists(st.integers(0, 600), max_size=STOP_IDS + 4)))
    msg.ignore_eos, msg.logprobs, msg.hire = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    msg.adapter = draw(st.sampled_from(["", "", "fr", "\x00"]))
    msg.mode = draw(st.integers(0, 5))
    msg.drafter = draw(st.sampled_from(["", "", "stdlib-9m-draft"]))
    msg.gamma = draw(st.integers(-3, 20))
    msg.request_id = draw(st.text(max_size=20))
    return msg


def outcome(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def assert_still_serving(channel) -> None:
    stub = inference_pb2_grpc.InferenceStub(channel)
    assert stub.Generate(pb.GenerateRequest(text="Once", max_tokens=2), timeout=30).usage.completion_tokens == 2


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(request=generate_requests(), streamed=st.booleans())
def test_any_generate_request_gets_a_client_status_or_an_answer(channel, request, streamed):
    stub = inference_pb2_grpc.InferenceStub(channel)
    call = (lambda: list(stub.GenerateStream(request, timeout=30))) if streamed else \
        (lambda: stub.Generate(request, timeout=30))
    code = outcome(call)
    assert code == grpc.StatusCode.OK or code in CLIENT_MISTAKES, (code, request)
    over = (len(request.text.encode()) > PROMPT_BYTES or len(request.stop) > STOP_STRINGS or
            any(len(s.encode()) > STOP_BYTES for s in request.stop) or len(request.stop_token_ids) > STOP_IDS)
    assert not over or code == grpc.StatusCode.INVALID_ARGUMENT, (code, request)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.none(), st.text(max_size=200)), ids=TOKENS, max_tokens=st.one_of(st.integers(-3, 140), INT32),
       samples=st.integers(-2, 4))
def test_any_jetstream_request_gets_a_client_status_or_an_answer(channel, text, ids, max_tokens, samples):
    request = js.DecodeRequest(max_tokens=max_tokens, num_samples=samples)
    if text is None:
        request.token_content.token_ids.extend(ids)
    else:
        request.text_content.text = text
    code = outcome(lambda: list(jetstream_pb2_grpc.OrchestratorStub(channel).Decode(request, timeout=30)))
    assert code == grpc.StatusCode.OK or code in CLIENT_MISTAKES, (code, request)


def test_the_server_is_still_serving(channel):
    assert_still_serving(channel)


SCHEMES = st.sampled_from(["Bearer", "bearer", "BEARER", "bEaReR", "Basic", "Token", "Bearer:", "", "Bearerx"])
NEAR_KEYS = st.sampled_from([KEY, KEY[:-1], KEY + "x", KEY.upper(), KEY[1:], "x" + KEY, KEY.replace("-", "_"), ""])
PRINTABLE = st.text(alphabet=string.ascii_letters + string.digits + string.punctuation, max_size=40)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scheme=SCHEMES, key=NEAR_KEYS | PRINTABLE, spaces=st.integers(1, 3), absent=st.booleans(),
       method=st.integers(0, 5))
def test_no_call_without_a_valid_key_gets_past(bare, scheme, key, spaces, absent, method):
    value = f"{scheme}{' ' * spaces}{key}".strip()
    metadata = () if absent or not value else (("authorization", value),)
    valid = bool(metadata) and scheme.lower() == "bearer" and key == KEY
    inference, orchestrator = inference_pb2_grpc.InferenceStub(bare), jetstream_pb2_grpc.OrchestratorStub(bare)
    call = [lambda: inference.Generate(pb.GenerateRequest(text="Once", max_tokens=2), metadata=metadata, timeout=30),
            lambda: list(inference.GenerateStream(pb.GenerateRequest(text="Once", max_tokens=2), metadata=metadata,
                                                  timeout=30)),
            lambda: inference.Tokenize(pb.TokenizeRequest(text="Once"), metadata=metadata, timeout=30),
            lambda: inference.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata, timeout=30),
            lambda: list(orchestrator.Decode(js.DecodeRequest(text_content=js.DecodeRequest.TextContent(text="Once"),
                                                              max_tokens=2), metadata=metadata, timeout=30)),
            lambda: orchestrator.HealthCheck(js.HealthCheckRequest(), metadata=metadata, timeout=30)][method]
    assert outcome(call) == (grpc.StatusCode.OK if valid else grpc.StatusCode.UNAUTHENTICATED), metadata
    health = health_pb2_grpc.HealthStub(bare).Check(health_pb2.HealthCheckRequest(), metadata=metadata, timeout=30)
    assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no key, whatever they carry


OVERSIZED = [pb.GenerateRequest(text="Once", stop=["stopword"] * 300_000),  # 2.4 MB: past the message limit
             pb.GenerateRequest(tokens=pb.TokenIds(ids=[5] * 200_000)),
             pb.GenerateRequest(text="a" * (PROMPT_BYTES + 1)),  # each of these past one limit, under the others
             pb.GenerateRequest(text="Once", stop=["x"] * (STOP_STRINGS + 1)),
             pb.GenerateRequest(text="Once", stop=["x" * (STOP_BYTES + 1)]),
             pb.GenerateRequest(text="Once", stop_token_ids=[3] * (STOP_IDS + 1)),
             pb.GenerateRequest(text="Once", max_tokens=10**9)]


def test_a_flood_of_oversized_requests_leaves_latency_within_2x(port, channel):
    """Well-formed requests timed alone and under a flood of oversized ones (8 concurrent senders, each request
    serialized once beforehand), in alternating short phases so that the machine's own load falls on both alike; the
    medians are compared (a second time where the first is past 2x)."""
    stub, good = inference_pb2_grpc.InferenceStub(channel), pb.GenerateRequest(text="Once upon a time", max_tokens=16,
                                                                               temperature=0, ignore_eos=True)
    flooding, done, refused = threading.Event(), threading.Event(), []

    async def flood() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as aio:
            send = aio.unary_unary("/hire.v1.Inference/Generate", response_deserializer=pb.GenerateResponse.FromString)
            raw = [m.SerializeToString() for m in OVERSIZED]

            async def sender(i: int) -> None:
                while not done.is_set():
                    if not flooding.is_set():
                        await asyncio.sleep(0.01)
                        continue
                    try:
                        await send(raw[i % len(raw)], metadata=bearer(KEY), timeout=60)
                        refused.append("OK")
                    except grpc.aio.AioRpcError as e:
                        refused.append(e.code().name)
                    i += 1
            await asyncio.gather(*(sender(i) for i in range(8)))

    def timed(n: int) -> list[float]:
        out = []
        for _ in range(n):
            start = time.perf_counter()
            assert stub.Generate(good, timeout=60).usage.completion_tokens == 16
            out.append(time.perf_counter() - start)
        return out

    def ratio() -> float:
        alone, flooded = [], []
        for _ in range(12):
            flooding.clear()
            alone += timed(4)
            flooding.set()
            time.sleep(0.05)
            flooded += timed(4)
        flooding.clear()
        print(f"\nmedian latency alone {statistics.median(alone) * 1e3:.1f} ms, under the flood "
              f"{statistics.median(flooded) * 1e3:.1f} ms; {len(refused)} oversized requests sent")
        return statistics.median(flooded) / statistics.median(alone)

    flooder = threading.Thread(target=asyncio.run, args=(flood(),))
    flooder.start()
    try:
        timed(3)
        # measured again once past 2x: another process's burst on a 2-core machine can double one measurement
        ratios = [ratio()]
        if ratios[0] > 2.0:
            ratios.append(ratio())
    finally:
        done.set()
        flooder.join()
    assert set(refused) <= {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"} and len(refused) >= len(OVERSIZED)
    assert min(ratios) <= 2.0, ratios
