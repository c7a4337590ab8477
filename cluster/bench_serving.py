"""`hire bench serving`: what the front doors add over calling the engine directly, and throughput by concurrency.

One engine configuration is reached four ways in the same run, closed loop at each concurrency (every
client sends its next request when the last one ends; `hire loadtest`'s driver), greedy with a fixed
number of prompt and output tokens:

- `direct`: the Scheduler in this process (the continuous batching every front door uses);
- `grpc`: the standalone gRPC server (`hire serve-grpc`) on loopback, over the same engine;
- `serve_grpc` and `serve_http`: the Ray Serve application (`hire serve`): hire.v1 through Serve's gRPC
  proxy, and the OpenAI API over HTTP with SSE streaming, its engine in a Serve replica.

Per door and concurrency: `hire loadtest`'s summary (TTFT, TPOT, ITL, end-to-end percentiles, rates);
`added_*_ms` compare the door's medians with `direct`'s at the same concurrency, measured side by side.
"""
from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator

from cluster import launch
from cluster import loadtest as lt
from cluster.config import ServeConfig
from cluster.grpc_server import GrpcServer
from cluster.requests import Served
from hire.checkpoint import load_model
from hire.engine import Engine
from hire.sampling import SamplingParams
from hire.scheduler import Scheduler, Stream


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Direct(lt.Target):
    """The scheduler itself, in this process: what every front door adds its cost to."""

    def __init__(self, scheduler: Scheduler):
        self.url, self.scheduler = "direct", scheduler

    async def send(self, item: lt.Item) -> AsyncIterator[int]:
        params = SamplingParams(temperature=0.0, max_tokens=item.max_tokens, ignore_eos=True)
        with Stream(self.scheduler, item.prompt, params) as stream:
            async for batch in stream.batches():
                yield sum(not e.stop_token for e in batch)


async def run(model: str, concurrency: list[int], prompt_len: int, max_tokens: int, requests: int, slots: int,
              max_len: int) -> list[dict]:
    loaded = load_model(model)
    engine = Engine(loaded, slots=slots, max_len=max_len)
    config = ServeConfig(model=model, slots=slots, max_len=max_len, queue_size=1024, grpc_port=0)
    server = GrpcServer(Served(engine, loaded.cfg.name), config)
    await asyncio.to_thread(server.warm_up)
    await server.start()
    http_port, serve_grpc_port = free_port(), free_port()
    await asyncio.to_thread(launch.start, config.replace(http_port=http_port, grpc_port=serve_grpc_port))
    doors = {"direct": Direct(server.scheduler), "grpc": lt.GrpcTarget(f"127.0.0.1:{server.port}"),
             "serve_grpc": lt.GrpcTarget(f"127.0.0.1:{serve_grpc_port}"),
             "serve_http": lt.HttpTarget(f"http://127.0.0.1:{http_port}", loaded.cfg.name)}
    workload = lt.Workload(lt.Dist(str(prompt_len)), lt.Dist(str(max_tokens)), vocab=loaded.cfg.vocab_size)
    out = []
    try:
        for door in doors.values():  # warm up the connections and the Serve replica
            await lt.drive(door, workload.items(), lt.Load(concurrency=slots), slots, None, progress=False)
        for c in concurrency:
            load, n = lt.Load(concurrency=c), max(requests, 2 * c)
            row = {"concurrency": c, "requests": n, "prompt_tokens": prompt_len, "max_tokens": max_tokens}
            for name, door in doors.items():
                records, seconds = await lt.drive(door, workload.items(), load, n, None, progress=False)
                row[name] = lt.summarize(records, seconds, load, lt.Slo())
            base = row["direct"]
            for name in ("grpc", "serve_grpc", "serve_http"):
                r = row[name]
                r["added_e2e_ms"] = round(r["e2e_ms"]["p50"] - base["e2e_ms"]["p50"], 3)
                r["added_ttft_ms"] = round(r["ttft_ms"]["p50"] - base["ttft_ms"]["p50"], 3)
                r["added_tpot_ms"] = round(r["tpot_ms"]["p50"] - base["tpot_ms"]["p50"], 3)
                r["throughput_ratio"] = round(r["output_tokens_per_s"] / base["output_tokens_per_s"], 3)
            out.append(row)
            print(json.dumps(row), flush=True)
    finally:
        for door in doors.values():
            await door.close()
        await server.stop(grace=1)
        await asyncio.to_thread(launch.stop)
    return out
