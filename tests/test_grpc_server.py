"""The gRPC server on 127.0.0.1 with real clients: every RPC, bad requests, cancellation, deadlines,
a full queue, 64 concurrent streams, request limits, API keys, TLS, metrics and up-to-date generated stubs."""
from __future__ import annotations

import asyncio
import datetime
import filecmp
import ipaddress
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from safetensors.numpy import save_file

from cluster.config import ServeConfig
from cluster.grpc_server import GrpcServer
from cluster.requests import Served
from hire.checkpoint import load_model
from hire.cli import main
from hire.drafters import load_drafter
from hire.engine import Engine
from hire.generate import generate
from hire.lora import load_adapters
from hire.request import make_requests
from hire.sampling import SamplingParams
from hire.scheduler import run
from hire.speculative import SpeculativeBatch, _block_jit, _prefill_jit
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc, jetstream_pb2_grpc
from protos import jetstream_pb2 as js

REPO = Path(__file__).resolve().parents[1]
CODE = grpc.StatusCode
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def engine() -> Engine:
    """stories260K with every program the tests run compiled (so that timings hold in any test order)."""
    engine = Engine(load_model("stories260K"), slots=8, max_len=128)
    alone(engine, PROMPT, 120, ignore_eos=True)
    return engine


class Paced:
    """The engine with every decode chunk held to `seconds`, so that tests can act while requests decode."""

    def __init__(self, engine: Engine, seconds: float):
        self._engine, self._seconds = engine, seconds

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def generate_steps(self, state, n: int, reach: int | None = None):
        time.sleep(self._seconds)
        return self._engine.generate_steps(state, n, reach)


class Running:
    """A GrpcServer serving from its own event-loop thread."""

    def __init__(self, served: Served, config: ServeConfig, drafter=None):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = GrpcServer(served, config, drafter)
        self.port = self._run(self.server.start())
        self.scheduler = self.server.scheduler

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"127.0.0.1:{self.port}")

    def close(self) -> None:
        self._run(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


@contextmanager
def running(engine, drafter=None, **settings) -> Iterator[Running]:
    """A server of `engine` on a free port, with ServeConfig `settings` (and a `drafter` for config.draft)."""
    server = Running(Served(engine, "stories260K"), ServeConfig(grpc_port=0, **settings), drafter)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def server(engine) -> Iterator[Running]:
    with running(engine) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server) -> Iterator[inference_pb2_grpc.InferenceStub]:
    with server.channel() as channel:
        yield inference_pb2_grpc.InferenceStub(channel)


def greedy(max_tokens: int, prompt: str = PROMPT, **fields) -> pb.GenerateRequest:
    return pb.GenerateRequest(text=prompt, temperature=0, max_tokens=max_tokens, **fields)


def alone(engine: Engine, prompt: str | list[int], max_tokens: int, **params):
    """The library's completion of one prompt decoding by itself."""
    return generate(engine, [prompt], SamplingParams(temperature=0, max_tokens=max_tokens, **params), chunk=4)[0]


def wait_for(condition, seconds: float = 10) -> None:
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_generate_and_stream_match_the_library(engine, stub):
    expected = alone(engine, PROMPT, 40, logprobs=True)
    unary = stub.Generate(greedy(40, logprobs=True, request_id="r1"))
    assert unary.request_id == "r1" and list(unary.token_ids) == expected.tokens and unary.text == expected.text
    assert unary.finish_reason == pb.FINISH_REASON_LENGTH
    assert unary.usage.prompt_tokens == len(expected.prompt_tokens) and unary.usage.completion_tokens == 40
    assert unary.usage.time_to_first_token > 0 and list(unary.logprobs) == pytest.approx(expected.logprobs, abs=1e-6)
    parts = list(stub.GenerateStream(greedy(40, logprobs=True)))
    assert [t for p in parts for t in p.token_ids] == expected.tokens and "".join(p.text for p in parts) == unary.text
    assert [lp for p in parts for lp in p.logprobs] == pytest.approx(expected.logprobs, abs=1e-6)
    assert all(not p.HasField("usage") and not p.finish_reason for p in parts[:-1])
    assert parts[-1].usage.completion_tokens == 40 and len({p.request_id for p in parts}) == 1


def test_stop_ids_and_strings_with_a_tokens_prompt(engine, stub):
    ids = engine.tokenizer.encode("The cat")
    free = alone(engine, ids, 40)
    k = next(i for i, t in enumerate(free.tokens) if i >= 5 and t not in free.tokens[:i])
    parts = list(stub.GenerateStream(pb.GenerateRequest(tokens=pb.TokenIds(ids=ids), temperature=0, max_tokens=40,
                                                        stop_token_ids=[free.tokens[k]])))
    assert [t for p in parts for t in p.token_ids] == free.tokens[:k]  # the stop token itself is not returned
    assert parts[-1].finish_reason == pb.FINISH_REASON_STOP and parts[-1].usage.completion_tokens == k
    cut = free.text[20:24]
    stopped = stub.Generate(greedy(40, "The cat", stop=[cut]))
    assert stopped.finish_reason == pb.FINISH_REASON_STOP and stopped.text == free.text[: free.text.index(cut)]


def test_seeded_sampling_replays(stub):
    a, b = (stub.Generate(pb.GenerateRequest(text=PROMPT, temperature=1, top_p=0.9, seed=5, max_tokens=30))
            for _ in range(2))
    assert a.token_ids == b.token_ids and a.usage.seed == 5


def test_tokenize_and_model_info(engine, stub):
    assert list(stub.Tokenize(pb.TokenizeRequest(text=PROMPT)).token_ids) == engine.tokenizer.encode(PROMPT)
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.name, info.vocab_size, info.context_length, info.slots) == ("stories260K", 512, 128, 8)
    assert list(info.modes) == [pb.DECODING_MODE_PLAIN] and not info.hire and not info.adapters
    assert (info.bos_id, info.eos_id, info.dtype) == (1, 2, "float32")


def test_jetstream_decode_and_health_check(engine, server):
    expected = alone(engine, "The dog", 20)
    with server.channel() as channel:
        orchestrator = jetstream_pb2_grpc.OrchestratorStub(channel)
        text = js.DecodeRequest(text_content=js.DecodeRequest.TextContent(text="The dog"), max_tokens=20)
        samples = [r.stream_content.samples[0] for r in orchestrator.Decode(text)]
        assert "".join(s.text for s in samples) == expected.text
        assert [t for s in samples for t in s.token_ids] == expected.tokens
        ids = js.DecodeRequest(token_content=js.DecodeRequest.TokenContent(token_ids=expected.prompt_tokens),
                               max_tokens=20)
        samples = [r.stream_content.samples[0] for r in orchestrator.Decode(ids)]
        assert [t for s in samples for t in s.token_ids] == expected.tokens and not any(s.text for s in samples)
        assert orchestrator.HealthCheck(js.HealthCheckRequest()).is_live


def test_standard_health_and_reflection(server):
    with server.channel() as channel:
        check, serving = health_pb2_grpc.HealthStub(channel).Check, health_pb2.HealthCheckResponse.SERVING
        for service in ("", "hire.v1.Inference", "jetstream_proto.Orchestrator"):
            assert check(health_pb2.HealthCheckRequest(service=service)).status == serving
        ask = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo
        listed = next(ask(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        assert {"hire.v1.Inference", "jetstream_proto.Orchestrator", "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection"} <= {s.name for s in listed.list_services_response.service}
        found = next(ask(iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="hire.v1.Inference")])))
        assert found.file_descriptor_response.file_descriptor_proto


BAD = [
    (pb.GenerateRequest(text=""), CODE.INVALID_ARGUMENT, "prompt"),
    (pb.GenerateRequest(), CODE.INVALID_ARGUMENT, "prompt"),
    (pb.GenerateRequest(tokens=pb.TokenIds(ids=[])), CODE.INVALID_ARGUMENT, "prompt"),
    (pb.GenerateRequest(tokens=pb.TokenIds(ids=[1, 512])), CODE.INVALID_ARGUMENT, "prompt"),
    (pb.GenerateRequest(tokens=pb.TokenIds(ids=[1, -3])), CODE.INVALID_ARGUMENT, "prompt"),
    (pb.GenerateRequest(tokens=pb.TokenIds(ids=[5] * 128)), CODE.INVALID_ARGUMENT, "prompt"),
    (greedy(0), CODE.INVALID_ARGUMENT, "max_tokens"),
    (greedy(-4), CODE.INVALID_ARGUMENT, "max_tokens"),
    (greedy(126), CODE.INVALID_ARGUMENT, "max_tokens"),  # 5 prompt tokens leave 123
    (pb.GenerateRequest(text=PROMPT, temperature=-0.5), CODE.INVALID_ARGUMENT, "temperature"),
    (pb.GenerateRequest(text=PROMPT, top_p=0), CODE.INVALID_ARGUMENT, "top_p"),
    (pb.GenerateRequest(text=PROMPT, top_p=1.5), CODE.INVALID_ARGUMENT, "top_p"),
    (pb.GenerateRequest(text=PROMPT, top_k=-1), CODE.INVALID_ARGUMENT, "top_k"),
    (greedy(4, adapter="french"), CODE.INVALID_ARGUMENT, "adapter"),
    (greedy(4, stop=["the", ""]), CODE.INVALID_ARGUMENT, "stop"),
    (greedy(4, stop_token_ids=[600]), CODE.INVALID_ARGUMENT, "stop_token_ids"),
    (greedy(4, mode=pb.DECODING_MODE_SPECULATIVE, drafter="tiny", gamma=4), CODE.INVALID_ARGUMENT, "unknown drafter"),
    (greedy(4, mode=pb.DECODING_MODE_SPECULATIVE), CODE.INVALID_ARGUMENT, "drafter"),
    (greedy(4, mode=pb.DECODING_MODE_TANDEM, gamma=4), CODE.UNIMPLEMENTED, "mode"),
    (greedy(4, mode=9), CODE.INVALID_ARGUMENT, "mode"),
    (greedy(4, gamma=3), CODE.INVALID_ARGUMENT, "gamma"),
    (greedy(4, hire=True), CODE.UNIMPLEMENTED, "hire"),
    # over a limit (docs/serving.md, "Limits"; max_len 128): each names the field and the limit
    (greedy(4, stop=["x"] * 17), CODE.INVALID_ARGUMENT, "stop: 17 stop strings, over the limit of 16"),
    (greedy(4, stop=["é" * 129]), CODE.INVALID_ARGUMENT, "stop: a stop string of 258 bytes, over the limit of 256"),
    (greedy(4, stop_token_ids=[3] * 65), CODE.INVALID_ARGUMENT, "stop_token_ids: 65 ids, over the limit of 64"),
    (greedy(4, "a" * 4097), CODE.INVALID_ARGUMENT, "prompt: 4097 bytes, over the limit of 4096 (limit prompt_bytes)"),
    (greedy(4, "€" * 1366), CODE.INVALID_ARGUMENT, "prompt: 4098 bytes"),
]


@pytest.mark.parametrize("request_, code, field", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_requests_are_named_and_the_server_goes_on(stub, request_, code, field):
    for call in (stub.Generate, lambda r: list(stub.GenerateStream(r))):
        with pytest.raises(grpc.RpcError) as e:
            call(request_)
        assert e.value.code() == code and field in e.value.details()
    assert stub.Generate(greedy(3)).usage.completion_tokens == 3


@pytest.mark.parametrize("request_, code, field", [
    (js.DecodeRequest(max_tokens=5), CODE.INVALID_ARGUMENT, "prompt"),
    (js.DecodeRequest(text_content=js.DecodeRequest.TextContent(text="Hi"), max_tokens=0), CODE.INVALID_ARGUMENT,
     "max_tokens"),
    (js.DecodeRequest(token_content=js.DecodeRequest.TokenContent(token_ids=[1, 9999]), max_tokens=5),
     CODE.INVALID_ARGUMENT, "prompt"),
    (js.DecodeRequest(text_content=js.DecodeRequest.TextContent(text="Hi"), max_tokens=5, num_samples=2),
     CODE.UNIMPLEMENTED, "num_samples"),
    (js.DecodeRequest(text_content=js.DecodeRequest.TextContent(text="Hi"), max_tokens=10**9), CODE.INVALID_ARGUMENT,
     "max_tokens: 1000000000 runs past the context: the prompt's 3 tokens leave 125 of 128"),
    (js.DecodeRequest(text_content=js.DecodeRequest.TextContent(text="a" * 5000), max_tokens=5),
     CODE.INVALID_ARGUMENT, "prompt: 5000 bytes, over the limit of 4096"),
])
def test_bad_jetstream_requests(server, request_, code, field):
    with server.channel() as channel:
        with pytest.raises(grpc.RpcError) as e:
            list(jetstream_pb2_grpc.OrchestratorStub(channel).Decode(request_))
    assert e.value.code() == code and field in e.value.details()


def long_streams(stub, n: int, **call) -> list:
    """n streams that would each decode for seconds on a paced server; returns once all have a token."""
    streams = [stub.GenerateStream(greedy(100, ignore_eos=True), **call) for _ in range(n)]
    for s in streams:
        next(s)
    return streams


def test_cancel_frees_the_slot_at_once(engine):
    # 1 s per chunk of 4 tokens: each long stream would hold its slot for 25 s; the newcomer
    # must get in at the next chunk boundary. The bound leaves room for a loaded machine.
    with running(Paced(engine, 1.0)) as server, server.channel() as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        streams = long_streams(stub, 8)
        waiting = stub.GenerateStream(greedy(100, ignore_eos=True))
        wait_for(lambda: server.scheduler.queue_depth == 1)
        start = time.perf_counter()
        streams[0].cancel()
        next(waiting)
        assert time.perf_counter() - start < 6
        assert server.scheduler.busy_slots == 8  # the other seven still decode, beside the newcomer
        for s in streams[1:] + [waiting]:
            s.cancel()
        wait_for(lambda: server.scheduler.busy_slots == 0)


def test_deadline_ends_the_call_and_frees_its_slot(engine):
    # 1 s per chunk of 4 tokens: the long streams would hold every slot for 25 s.
    with running(Paced(engine, 1.0)) as server, server.channel() as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        start = time.perf_counter()
        streams = long_streams(stub, 8, timeout=4)  # time to be admitted and start, far from 25 s
        waiting = stub.Generate.future(greedy(3), timeout=30)
        for s in streams:
            with pytest.raises(grpc.RpcError) as e:
                list(s)
            assert e.value.code() == CODE.DEADLINE_EXCEEDED
        assert waiting.result().usage.completion_tokens == 3 and time.perf_counter() - start < 15
        wait_for(lambda: server.scheduler.busy_slots == 0)
        assert stub.Generate(greedy(3), timeout=5).finish_reason == pb.FINISH_REASON_LENGTH


def test_full_queue_is_resource_exhausted(engine):
    with running(Paced(engine, 0.05), queue_size=2) as server, server.channel() as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        streams = long_streams(stub, 8) + [stub.GenerateStream(greedy(3)) for _ in range(2)]
        wait_for(lambda: server.scheduler.queue_depth == 2)
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(greedy(3))
        assert e.value.code() == CODE.RESOURCE_EXHAUSTED
        for s in streams:
            s.cancel()
        wait_for(lambda: server.scheduler.busy_slots == server.scheduler.queue_depth == 0)
        assert stub.Generate(greedy(3)).usage.completion_tokens == 3


def test_64_concurrent_streams_equal_each_alone(engine, stub):
    names, starts = ["Tom", "Lily", "The dog", "A bird", "Sam", "The king", "Mia", "A little fish"], \
        ["went", "saw", "wanted", "found", "liked", "was", "had", "said"]
    prompts = [f"{n} {s}" for n in names for s in starts]
    lengths = [5 + (7 * i) % 60 for i in range(64)]
    start = time.perf_counter()
    calls = [stub.GenerateStream(greedy(m, p)) for p, m in zip(prompts, lengths)]
    outs = [list(c) for c in calls]
    seconds = time.perf_counter() - start
    for p, m, parts in zip(prompts, lengths, outs):
        expected = alone(engine, p, m)
        assert [t for r in parts for t in r.token_ids] == expected.tokens
        assert "".join(r.text for r in parts) == expected.text
    print(f"\n64 concurrent streams, {sum(len(o) for o in outs)} responses: {seconds:.2f}s")


def test_draft_ngram_gives_the_greedy_text_of_plain_decoding(engine, stub):
    """hire serve-grpc --draft ngram: speculative decoding in the server's process (hire.speculative's batch driven
    by its Scheduler) streams what the plain server streams, token for token."""
    prompts = ["Tom went to the park. Tom went", "Lily saw a cat. The cat", "Once upon a time", "The dog"]
    plain = [stub.Generate(greedy(48, p, ignore_eos=True)) for p in prompts]
    drafter = load_drafter("ngram", load_model("stories260K"))
    with running(engine, drafter, draft="ngram", gamma=3) as server, server.channel() as channel:
        spec = inference_pb2_grpc.InferenceStub(channel)
        info = spec.GetModelInfo(pb.GetModelInfoRequest())
        assert list(info.drafters) == ["ngram"] and pb.DECODING_MODE_SPECULATIVE in info.modes
        calls = [spec.GenerateStream(greedy(48, p, ignore_eos=True)) for p in prompts]  # decoding together
        for want, parts in zip(plain, [list(c) for c in calls]):
            assert [t for r in parts for t in r.token_ids] == list(want.token_ids)
            assert "".join(r.text for r in parts) == want.text
        named = spec.Generate(greedy(48, prompts[0], ignore_eos=True, mode=pb.DECODING_MODE_SPECULATIVE,
                                     drafter="ngram", gamma=3))
        assert named.text == plain[0].text
        with pytest.raises(grpc.RpcError) as e:
            spec.Generate(greedy(4, mode=pb.DECODING_MODE_SPECULATIVE, drafter="ngram", gamma=2))
        assert e.value.code() == CODE.INVALID_ARGUMENT and "gamma: this server drafts 3" in e.value.details()
        accepted = server.server.metrics.registry.get_sample_value("hire_speculative_acceptance_rate")
        assert 0 < accepted <= 1  # the prompts repeat themselves: prompt lookup has drafts accepted


def test_draft_warm_up_compiles_every_speculative_program():
    """hire serve-grpc --draft: the server's warm-up compiles the Speculator's programs (every prompt bucket, every
    attention span), so that no request, whatever its length or sampling, waits for a compilation. A context of 64
    (buckets 16, 32, 64; the prompts below take one each) keeps the warm-up short."""
    engine = Engine(load_model("stories260K"), slots=4, max_len=64)
    drafter = load_drafter("ngram", load_model("stories260K"))  # a drafter of its own: programs of its own
    server = GrpcServer(Served(engine, "stories260K"), ServeConfig(grpc_port=0, draft="ngram", gamma=3), drafter)
    programs = lambda: (_prefill_jit._cache_size(), _block_jit._cache_size())  # noqa: E731
    before = programs()
    server.warm_up()
    warm = programs()
    assert warm[0] > before[0] and warm[1] > before[1]
    prompts = ["Once", "Tom went to the park. " * 2, "Lily saw a cat. " * 6]  # 2, 22 and 38 tokens
    params = [SamplingParams(temperature=t, max_tokens=64, ignore_eos=True, seed=0) for t in (0.0, 1.0, 0.7)]
    events = list(run(engine, make_requests(engine, prompts, params, None), lambda: SpeculativeBatch(server.spec)))
    assert len(events) > 100 and programs() == warm and server.stats.tokens == 0


def tiny_adapter(folder: Path) -> Path:
    """A rank-4 PEFT LoRA adapter (adapter_config.json, adapter_model.safetensors) on stories260K's q and v
    projections, strong enough to change its greedy text."""
    rng = np.random.default_rng(0)
    tensors = {}
    for layer in range(5):
        for proj, n_out in (("q_proj", 64), ("v_proj", 32)):
            key = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{key}.lora_A.weight"] = rng.normal(0, 0.3, (4, 64)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = rng.normal(0, 0.3, (n_out, 4)).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                            "target_modules": ["q_proj", "v_proj"]}))
    return folder


def check_lora(stub: inference_pb2_grpc.InferenceStub, adapter: Path, slots: int, max_len: int) -> None:
    """A server of stories260K with `adapter` loaded as "tiny" (`slots` and `max_len` its engine's) answers a
    request naming it as the library does with the adapter, and one naming none as the base model. The library's
    engine has the server's shapes: its programs are the ones the server compiled, read from the compilation cache."""
    loaded, names = load_adapters(load_model("stories260K"), {"tiny": adapter})
    want = generate(Engine(loaded, slots=slots, max_len=max_len), [PROMPT, PROMPT],
                    SamplingParams(temperature=0, max_tokens=24), adapters=[names["tiny"], -1], chunk=4)
    assert want[0].tokens != want[1].tokens
    assert list(stub.GetModelInfo(pb.GetModelInfoRequest()).adapters) == ["tiny"]
    for name, expected in (("tiny", want[0]), ("", want[1])):
        assert list(stub.Generate(greedy(24, adapter=name)).token_ids) == expected.tokens
        parts = list(stub.GenerateStream(greedy(24, adapter=name)))
        assert "".join(p.text for p in parts) == expected.text


def test_lora_adapter_by_name(tmp_path):
    adapter = tiny_adapter(tmp_path / "tiny")
    loaded, names = load_adapters(load_model("stories260K"), {"tiny": adapter})
    served = Served(Engine(loaded, slots=4, max_len=128), "stories260K", names)
    server = Running(served, ServeConfig(grpc_port=0))
    try:
        with server.channel() as channel:
            check_lora(inference_pb2_grpc.InferenceStub(channel), adapter, 4, 128)
    finally:
        server.close()


def test_oversized_messages_and_texts_are_refused_before_any_work(stub):
    request_bytes = 8 * 4096 + 2**16  # Limits.request_bytes for a context of 128
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(pb.GenerateRequest(tokens=pb.TokenIds(ids=[5] * request_bytes)))
    assert e.value.code() == CODE.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as e:
        stub.Tokenize(pb.TokenizeRequest(text="a" * 5000))
    assert e.value.code() == CODE.INVALID_ARGUMENT and e.value.details().startswith("text: 5000 bytes")
    assert stub.Generate(greedy(3)).usage.completion_tokens == 3


def test_api_keys(engine):
    with running(engine, api_keys=("s3cret-one", "s3cret-two")) as server, \
            server.channel() as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        for value in (None, "Bearer wrong", "s3cret-one", "Basic s3cret-one", "Bearer s3cret-one,s3cret-two",
                      "Bearer s3cret-on", "Bearer s3cret-one-and-more", "Bearer"):
            metadata = (("authorization", value),) if value is not None else ()
            for call in (lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata),
                         lambda: stub.Tokenize(pb.TokenizeRequest(text="hi"), metadata=metadata),
                         lambda: list(stub.GenerateStream(greedy(3), metadata=metadata)),
                         lambda: jetstream_pb2_grpc.OrchestratorStub(channel).HealthCheck(js.HealthCheckRequest(),
                                                                                          metadata=metadata)):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == CODE.UNAUTHENTICATED, value
        for value in ("Bearer s3cret-one", "bearer s3cret-two", "BEARER  s3cret-one "):  # RFC 6750: any case
            good = (("authorization", value),)
            assert sum(len(r.token_ids) for r in stub.GenerateStream(greedy(3), metadata=good)) == 3
            assert stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=good).slots == 8
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())  # probes need no key
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_no_key_means_loopback_only(engine):
    with pytest.raises(ValueError, match="host: 0.0.0.0 lets anyone"):
        asyncio.run(GrpcServer(Served(engine, "stories260K"), ServeConfig(host="0.0.0.0", grpc_port=0)).start())
    with running(engine, host="0.0.0.0", insecure=True) as server, server.channel() as channel:
        assert inference_pb2_grpc.InferenceStub(channel).Generate(greedy(2)).usage.completion_tokens == 2


def test_serve_config_names_a_bad_setting():
    for bad, message in (({"slots": 0}, "slots: 0 is not a number >= 1"),
                         ({"prompts": 3}, "prompts: not a serving setting"),
                         ({"limits": {"stop_bytes": -1}}, "limit stop_bytes: -1 is not a whole number"),
                         ({"api_keys": "two words"}, "api key: a key is visible ASCII characters"),
                         ({"placement": "ANYWHERE"}, "placement: 'ANYWHERE' is not one of")):
        with pytest.raises(ValueError) as e:
            ServeConfig.of(bad)
        assert str(e.value).startswith(message), e.value
    config = ServeConfig.of({"api_keys": "k1,k2", "limits": {"stop_strings": 4}})  # as deploy/serve.yaml's args
    assert config.api_keys == ("k1", "k2") and config.limits.stop_strings == 4


def certificate(name: str, issuer: tuple | None = None) -> tuple[bytes, bytes, tuple]:
    """A PEM certificate and key for `name` (and 127.0.0.1), signed by `issuer` (cert, key) or itself as a CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
               .add_extension(x509.SubjectAlternativeName([x509.DNSName(name),
                                                           x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                              critical=False))
    issuer_cert, issuer_key = issuer or (None, key)
    cert = builder.issuer_name(issuer_cert.subject if issuer_cert else subject).sign(issuer_key, hashes.SHA256())
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), pem_key, (cert, key)


@pytest.mark.parametrize("mutual", [False, True])
def test_tls(engine, tmp_path, mutual):
    ca_pem, _, ca = certificate("hire test CA")
    server_pem, server_key, _ = certificate("localhost", ca)
    client_pem, client_key, _ = certificate("client", ca)
    for name, data in {"ca.pem": ca_pem, "server.pem": server_pem, "server.key": server_key}.items():
        (tmp_path / name).write_bytes(data)
    tls = dict(tls_cert=str(tmp_path / "server.pem"), tls_key=str(tmp_path / "server.key"),
               tls_client_ca=str(tmp_path / "ca.pem") if mutual else None)
    with running(engine, **tls) as server:
        target = f"localhost:{server.port}"
        with grpc.secure_channel(target, grpc.ssl_channel_credentials(ca_pem, client_key, client_pem)) as channel:
            assert inference_pb2_grpc.InferenceStub(channel).Generate(greedy(3)).usage.completion_tokens == 3
        refused = [grpc.insecure_channel(target)] + ([grpc.secure_channel(target, grpc.ssl_channel_credentials(ca_pem))]
                                                     if mutual else [])
        for channel in refused:
            with channel, pytest.raises(grpc.RpcError) as e:
                inference_pb2_grpc.InferenceStub(channel).Generate(greedy(3), timeout=5)
            assert e.value.code() == CODE.UNAVAILABLE


def test_metrics(stub, server):
    registry = server.server.metrics.registry
    value = lambda name, **labels: registry.get_sample_value(name, labels) or 0.0  # noqa: E731
    before = value("hire_requests_total", rpc="Generate", status="OK"), value("hire_generated_tokens_total")
    stub.Generate(greedy(7))
    with pytest.raises(grpc.RpcError):
        stub.Generate(greedy(0))
    assert value("hire_requests_total", rpc="Generate", status="OK") == before[0] + 1
    assert value("hire_generated_tokens_total") == before[1] + 7
    assert value("hire_requests_total", rpc="Generate", status="INVALID_ARGUMENT") >= 1
    for histogram in ("hire_time_to_first_token_seconds", "hire_time_per_output_token_seconds",
                      "hire_request_latency_seconds"):
        assert value(f"{histogram}_count") >= 1
    assert value("hire_queue_depth") == 0 and value("hire_batch_occupancy") == 0
    assert value("hire_speculative_acceptance_rate") == 0


def test_generated_stubs_are_fresh(tmp_path):
    subprocess.run(["bash", "scripts/gen_protos.sh", str(tmp_path)], cwd=REPO, check=True,
                   env={**os.environ, "PYTHON": sys.executable})
    fresh = sorted(p.name for p in (tmp_path / "protos").iterdir())
    committed = sorted(p.name for p in (REPO / "protos").glob("*_pb2*.py*"))
    assert fresh == committed, "run scripts/gen_protos.sh"
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "protos", REPO / "protos", fresh, shallow=False)
    assert not mismatch and not errors, f"stale: {mismatch + errors}; run scripts/gen_protos.sh"


def test_serve_grpc_command_checks_tls_access_and_limit_flags(tmp_path):
    (tmp_path / "ca.pem").write_text("")
    result = CliRunner().invoke(main, ["serve-grpc", "--tls-client-ca", str(tmp_path / "ca.pem")])
    assert result.exit_code != 0 and "--tls-client-ca needs --tls-cert" in result.output
    for args, message in ((["--host", "0.0.0.0"], "host: 0.0.0.0 lets anyone who can reach it use the server"),
                          (["--api-key", "two words"], "a key is visible ASCII characters"),
                          (["--limit", "prompt_bytes"], "expected NAME=VALUE"),
                          (["--limit", "prompts=3"], "unknown limit 'prompts'"),
                          (["--limit", "stop_bytes=-1"], "limit stop_bytes: -1 is not a whole number")):
        result = CliRunner().invoke(main, ["serve-grpc", *args], env={"HIRE_API_KEY": ""})
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
