"""SIGTERM under load to `hire serve-grpc` and `hire serve`, each run as a user runs it (a process of its own): the
server stops taking requests (a health Watch turns NOT_SERVING and new calls are refused UNAVAILABLE), the streams in
flight finish within the grace period, and the process exits 0. What finished, was refused and was cut is counted
(printed with -s); with a grace period too short for the streams in flight, they are cut, each with a status."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.bench_serving import free_port
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
STREAMS, TOKENS = 8, 480  # on 2 slots: four rounds of 480 tokens, seconds of work when SIGTERM comes
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
FLAGS = ["--model", "stories260K", "--max-len", "512", "--slots", "2"]


def launch(command: str, args: list[str], log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "HIRE_API_KEY"} | {"PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", "from hire.cli import main; main()", command, *FLAGS, *args],
                            cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


async def serving(target: str, process: subprocess.Popen, log: Path, seconds: float = 300) -> None:
    """Wait until the server's health check says SERVING."""
    deadline = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(target) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"not serving after {seconds}s:\n{log.read_text()[-3000:]}"
            try:
                if (await check(health_pb2.HealthCheckRequest(), timeout=10)).status == SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.5)


async def sigterm_under_load(target: str, process: subprocess.Popen) -> Counter:
    """Start STREAMS streams, send SIGTERM once two are decoding, then (health NOT_SERVING) try new requests; the
    count of each outcome. Streams that reached the server only after SIGTERM (Serve's proxy can be slow to pass them
    on) are refused like new requests: "late, refused"."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == SERVING
        started = Counter()

        async def stream(i: int) -> str:
            request = pb.GenerateRequest(text=f"Once upon a time {i}", temperature=0, max_tokens=TOKENS,
                                         ignore_eos=True)
            got = 0
            try:
                async for msg in stub.GenerateStream(request, timeout=120):
                    started[i] = 1
                    got += len(msg.token_ids)
            except grpc.aio.AioRpcError as e:
                if not started[i] and "shutting down" in (e.details() or ""):
                    return f"late, refused {e.code().name}"  # reached the server after SIGTERM (a busy machine)
                return f"cut {e.code().name}"
            return "finished" if got == TOKENS else f"short {got}"

        streams = [asyncio.create_task(stream(i)) for i in range(STREAMS)]
        while sum(started.values()) < 2:
            await asyncio.sleep(0.005)
        process.send_signal(signal.SIGTERM)
        while (await watch.read()).status != NOT_SERVING:
            pass
        watch.cancel()
        outcomes = Counter()
        for _ in range(3):  # after NOT_SERVING: refused
            try:
                await stub.Generate(pb.GenerateRequest(text="Once", max_tokens=2), timeout=30)
                outcomes["new, served"] += 1
            except grpc.aio.AioRpcError as e:
                outcomes[f"new, refused {e.code().name}"] += 1
        outcomes.update(await asyncio.gather(*streams))
    return outcomes


def stopped(process: subprocess.Popen, log: Path, seconds: float) -> int:
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"still running {seconds}s after SIGTERM:\n{log.read_text()[-3000:]}")


@pytest.mark.parametrize("grace, cut", [(60, False), (0.2, True)])
def test_serve_grpc_stops_gracefully(tmp_path, grace, cut):
    port, log = free_port(), tmp_path / "serve-grpc.log"
    process = launch("serve-grpc", ["--port", str(port), "--grace", str(grace)], log)
    target = f"127.0.0.1:{port}"
    asyncio.run(serving(target, process, log))
    outcomes = asyncio.run(sigterm_under_load(target, process))
    print(json.dumps({"grace": grace, **outcomes}))
    assert stopped(process, log, grace + 60) == 0, log.read_text()[-3000:]
    assert outcomes["new, refused UNAVAILABLE"] == 3
    if cut:  # seconds of decoding left, 0.2 s to do it: every stream still running is cut, with a status
        assert outcomes["finished"] < STREAMS and outcomes["finished"] + outcomes["cut UNAVAILABLE"] + \
            outcomes["cut CANCELLED"] + outcomes["late, refused UNAVAILABLE"] == STREAMS, outcomes
    else:
        assert outcomes["finished"] >= 2 and \
            outcomes["finished"] + outcomes["late, refused UNAVAILABLE"] == STREAMS, outcomes


def test_serve_stops_gracefully(tmp_path):
    http, port, log = free_port(), free_port(), tmp_path / "serve.log"
    process = launch("serve", ["--http-port", str(http), "--grpc-port", str(port), "--num-cpus", "2",
                               "--grace", "60"], log)
    target = f"127.0.0.1:{port}"
    try:
        asyncio.run(serving(target, process, log, seconds=600))
        outcomes = asyncio.run(sigterm_under_load(target, process))
    except BaseException:
        process.kill()
        print(log.read_text()[-5000:])
        raise
    print(json.dumps({"grace": 60, **outcomes}))
    assert stopped(process, log, 120) == 0, log.read_text()[-3000:]
    # every stream that reached the server finished (those that came after SIGTERM were refused)
    assert outcomes["new, refused UNAVAILABLE"] == 3 and outcomes["finished"] >= 2 and \
        outcomes["finished"] + outcomes["late, refused UNAVAILABLE"] == STREAMS, outcomes
    assert "requests still running are cut" in log.read_text()
