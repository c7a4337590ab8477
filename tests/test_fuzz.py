"""Bad input at scale: hypothesis draws hire.v1 and JetStream requests with arbitrary field values and sends them to
a real gRPC server. A client's mistake is answered with a client status (never INTERNAL or UNKNOWN), every
answer comes before its deadline, and the server keeps serving well-formed requests throughout."""
from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.grpc_server import GrpcServer, Options
from cluster.requests import Served
from hire.checkpoint import load_model
from hire.engine import Engine
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc, jetstream_pb2_grpc
from protos import jetstream_pb2 as js

CLIENT_MISTAKES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED,
                   grpc.StatusCode.RESOURCE_EXHAUSTED}
INT32, UINT32 = st.integers(-2**31, 2**31 - 1), st.integers(0, 2**32 - 1)
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)
TOKENS = st.lists(st.one_of(st.integers(-5, 600), INT32), max_size=140)


@pytest.fixture(scope="module")
def channel():
    engine = Engine(load_model("stories260K"), slots=4, max_len=128)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    server = GrpcServer(Served(engine, "stories260K"), Options(port=0), queue_size=64)
    port = asyncio.run_coroutine_threadsafe(server.start(), loop).result(60)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(60)
    loop.call_soon_threadsafe(loop.stop)


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    msg = pb.GenerateRequest()
    if draw(st.booleans()):
        msg.text = draw(st.text(max_size=300))
    else:
        msg.tokens.ids.extend(draw(st.lists(INT32, max_size=140)) if draw(st.booleans()) else draw(TOKENS))
    for name, strategy in (("temperature", FLOATS), ("top_p", FLOATS), ("seed", st.integers(-2**63, 2**63 - 1)),
                           ("max_tokens", st.one_of(st.integers(-3, 140), INT32))):
        if draw(st.booleans()):
            setattr(msg, name, draw(strategy))
    msg.top_k = draw(st.one_of(st.integers(-2, 600), INT32))
    msg.stop.extend(draw(st.lists(st.text(max_size=5), max_size=3)))
    msg.stop_token_ids.extend(draw(st.lists(INT32, max_size=3)))
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
