"""`hire bench serving`: what the front doors add over calling the engine directly, and throughput by concurrency.

One engine configuration is reached four ways in the same run, closed loop at each concurrency (every
client sends its next request when the last one ends), greedy with a fixed number of output tokens:

- `direct`: the Scheduler in this process (the continuous batching every front door uses);
- `grpc`: the standalone gRPC server (`hire serve-grpc`) on loopback, over the same engine;
- `serve_grpc` and `serve_http`: the Ray Serve application (`hire serve`): hire.v1 through Serve's gRPC
  proxy, and the OpenAI API over HTTP with SSE streaming, its engine in a Serve replica.

Per request: time to first token, time per output token after the first, end-to-end latency (medians);
per run: requests/s and output tokens/s. `added_*` compare each door's medians with `direct` at the same
concurrency, measured side by side.
"""
from __future__ import annotations

import asyncio
import json
import socket
import statistics
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import grpc

from cluster import launch
from cluster.grpc_server import GrpcServer, Options
from cluster.requests import Served
from hire.checkpoint import load_model
from hire.engine import Engine
from hire.sampling import SamplingParams
from hire.scheduler import Scheduler, Stream
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc

# A request: prompt -> async iterator of the number of tokens in each message that arrives.
Send = Callable[[str], AsyncIterator[int]]
WORDS = ("import", "def", "class", "return", "for", "with", "if", "from", "self", "value")


def prompts(n: int) -> list[str]:
    return [f"{WORDS[i % 10]} {WORDS[(3 * i + 1) % 10]} {WORDS[(7 * i + 2) % 10]}" for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def closed_loop(send: Send, texts: list[str], concurrency: int) -> dict:
    """Send every prompt of `texts` with `concurrency` clients; the medians and rates of the run."""
    todo = list(reversed(texts))
    ttft, tpot, latency, tokens = [], [], [], 0

    async def client() -> None:
        nonlocal tokens
        while todo:
            prompt = todo.pop()
            start = time.perf_counter()
            first = n = 0
            async for k in send(prompt):
                if k and not n:
                    first = time.perf_counter() - start
                n += k
            end = time.perf_counter() - start
            ttft.append(first)
            latency.append(end)
            tokens += n
            if n > 1:
                tpot.append((end - first) / (n - 1))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    ms = lambda xs: round(1000 * statistics.median(xs), 3)  # noqa: E731
    return {"requests_per_s": round(len(texts) / seconds, 2), "output_tokens_per_s": round(tokens / seconds, 1),
            "ttft_ms": ms(ttft), "tpot_ms": ms(tpot), "latency_ms": ms(latency), "tokens": tokens}


def doors(scheduler: Scheduler, grpc_port: int, serve_grpc_port: int, http_port: int, model: str,
          max_tokens: int, channels: dict[int, grpc.aio.Channel],
          sessions: list[aiohttp.ClientSession]) -> dict[str, Send]:
    """The four ways in; the gRPC channels and HTTP session they open are left in `channels` and `sessions`."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    engine = scheduler.engine

    async def direct(prompt: str) -> AsyncIterator[int]:
        with Stream(scheduler, engine.tokenizer.encode(prompt), params) as stream:
            async for batch in stream.batches():
                yield sum(not e.stop_token for e in batch)

    def over_grpc(port: int) -> Send:
        async def send(prompt: str) -> AsyncIterator[int]:
            if port not in channels:
                channels[port] = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            stub = inference_pb2_grpc.InferenceStub(channels[port])
            request = pb.GenerateRequest(text=prompt, temperature=0, max_tokens=max_tokens, ignore_eos=True)
            async for msg in stub.GenerateStream(request):
                yield len(msg.token_ids)
        return send

    async def serve_http(prompt: str) -> AsyncIterator[int]:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        seen = 0  # OpenAI chunks carry text, not token counts: the first token, then the rest from the usage
        if not sessions:
            sessions.append(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)))
        async with sessions[0].post(f"http://127.0.0.1:{http_port}/v1/completions", json=body) as response:
            response.raise_for_status()
            async for raw in response.content:
                if (line := raw.decode()).startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        yield chunk["usage"]["completion_tokens"] - seen
                    elif not seen and chunk["choices"][0]["text"]:
                        seen = 1
                        yield 1

    return {"direct": direct, "grpc": over_grpc(grpc_port), "serve_grpc": over_grpc(serve_grpc_port),
            "serve_http": serve_http}


async def run(model: str, concurrency: list[int], max_tokens: int, requests: int, slots: int, max_len: int) -> list:
    loaded = load_model(model)
    engine = Engine(loaded, slots=slots, max_len=max_len)
    server = GrpcServer(Served(engine, loaded.cfg.name), Options(port=0), queue_size=1024)
    await server.start()
    http_port, serve_grpc_port = free_port(), free_port()
    await asyncio.to_thread(launch.start, {"model": model, "slots": slots, "max_len": max_len, "queue_size": 1024},
                            http_port=http_port, grpc_port=serve_grpc_port)
    channels, sessions = {}, []
    sends = doors(server.scheduler, server.port, serve_grpc_port, http_port, loaded.cfg.name, max_tokens, channels,
                  sessions)
    out = []
    try:
        for name, send in sends.items():  # warm up: compile every prompt bucket and chunk program
            await closed_loop(send, prompts(slots), slots)
        for c in concurrency:
            texts = prompts(max(requests, 2 * c))
            row = {"concurrency": c, "requests": len(texts), "max_tokens": max_tokens}
            for name, send in sends.items():
                row[name] = await closed_loop(send, texts, c)
            for name in ("grpc", "serve_grpc", "serve_http"):
                row[name]["added_latency_ms"] = round(row[name]["latency_ms"] - row["direct"]["latency_ms"], 3)
                row[name]["added_tpot_ms"] = round(row[name]["tpot_ms"] - row["direct"]["tpot_ms"], 3)
                row[name]["throughput_ratio"] = round(row[name]["output_tokens_per_s"]
                                                      / row["direct"]["output_tokens_per_s"], 3)
            out.append(row)
            print(json.dumps(row), flush=True)
    finally:
        for closing in [*(c.close() for c in channels.values()), *(s.close() for s in sessions)]:
            await closing
        await server.stop(grace=1)
        await asyncio.to_thread(launch.stop)
    return out
