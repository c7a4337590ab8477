"""`hire loadtest`: drive a hire server with a workload and report what vLLM's and JetStream's serving benchmarks
report: time to first token (TTFT), time per output token after the first (TPOT), inter-token latency (ITL) and
end-to-end latency (mean, p50, p90, p99), requests/s, output tokens/s, goodput under a latency SLO, and errors by
status code.

Targets: `grpc://HOST:PORT` (hire.v1.Inference GenerateStream), `jetstream://HOST:PORT` (JetStream's
Orchestrator/Decode) and `http://HOST:PORT` (the OpenAI completions API, streamed). Load: open loop (Poisson
arrivals at a rate) or closed loop (a fixed number of clients, each sending its next request when the last ends),
each for a duration or a number of requests, and a sweep of either.

A message may carry several tokens (hire sends every token that is ready): ITL spreads the gap before a message
evenly over its tokens, as if they had arrived one by one.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import grpc
import numpy as np
from tqdm import tqdm

from cluster.auth import env_keys
from hire.config import OptionError
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc, jetstream_pb2_grpc
from protos import jetstream_pb2 as js
from workers.auth import bearer

PERCENTILES = (50, 90, 99)


# Workloads


@dataclass(frozen=True)
class Dist:
    """A length: `N` (fixed), `uniform:LO:HI`, `normal:MEAN:STD` or `exponential:MEAN`; samples are at least 1."""

    spec: str

    def __post_init__(self) -> None:
        kind, *args = self.spec.split(":")
        bad = ValueError(f"length {self.spec!r}: not N, uniform:LO:HI, normal:MEAN:STD or exponential:MEAN (all > 0)")
        try:
            values = [float(a) for a in ([kind] if not args else args)]
        except ValueError:
            raise bad from None
        arity = {"uniform": 2, "normal": 2, "exponential": 1}
        if (args and (kind not in arity or len(values) != arity[kind])) or min(values) <= 0:
            raise bad
        if not args and not kind.isdigit():
            raise bad

    def sample(self, rng: random.Random) -> int:
        kind, *args = self.spec.split(":")
        if not args:
            return int(kind)
        a = [float(x) for x in args]
        value = {"uniform": lambda: rng.uniform(a[0], a[1]), "normal": lambda: rng.gauss(a[0], a[1]),
                 "exponential": lambda: rng.expovariate(1 / a[0])}[kind]()
        return max(1, round(value))


@dataclass(frozen=True)
class Item:
    """One request: a prompt (text or token ids) and how many tokens to generate."""

    prompt: str | list[int]
    max_tokens: int


@dataclass
class Workload:
    """Synthetic prompts (random token ids of `input_len` tokens from [10, vocab)) or prompts from a JSONL file
    (objects with "prompt" and optionally "max_tokens"), cycled, with `output_len` tokens unless the file says."""

    input_len: Dist = Dist("128")
    output_len: Dist = Dist("64")
    prompts: Path | None = None
    vocab: int = 512
    seed: int = 0

    def items(self) -> Iterator[Item]:
        rng = random.Random(self.seed)
        if self.prompts is None:
            while True:
                n = self.input_len.sample(rng)
                yield Item([rng.randrange(10, self.vocab) for _ in range(n)], self.output_len.sample(rng))
        rows = [json.loads(line) for line in self.prompts.read_text().splitlines() if line.strip()]
        if not rows or any(not isinstance(r, dict) or "prompt" not in r for r in rows):
            raise ValueError(f"{self.prompts}: each line must be a JSON object with a \"prompt\"")
        while True:
            for r in rows:
                yield Item(r["prompt"], int(r.get("max_tokens") or self.output_len.sample(rng)))


# Targets


class RequestFailed(Exception):
    """A request that ended with a status other than success; `status` is a gRPC code name or HTTP_<code>."""

    def __init__(self, status: str, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status


class Target:
    """Where requests go: `send` yields the number of tokens in each message that arrives."""

    url: str

    async def model_vocab(self) -> int | None:
        return None

    def send(self, item: Item) -> AsyncIterator[int]:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class GrpcTarget(Target):
    """hire.v1.Inference GenerateStream, greedy to exactly max_tokens (ignore_eos)."""

    def __init__(self, address: str, timeout: float | None = None, api_key: str | None = None):
        self.url, self.timeout = f"grpc://{address}", timeout
        self.metadata = bearer(api_key) if api_key else ()
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)

    async def model_vocab(self) -> int | None:
        return (await self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.metadata, timeout=30)).vocab_size

    async def send(self, item: Item) -> AsyncIterator[int]:
        request = pb.GenerateRequest(temperature=0, max_tokens=item.max_tokens, ignore_eos=True)
        if isinstance(item.prompt, str):
            request.text = item.prompt
        else:
            request.tokens.ids.extend(item.prompt)
        try:
            async for msg in self.stub.GenerateStream(request, metadata=self.metadata, timeout=self.timeout):
                yield len(msg.token_ids)
        except grpc.aio.AioRpcError as e:
            raise RequestFailed(e.code().name, e.details() or "") from None

    async def close(self) -> None:
        await self.channel.close()


class JetStreamTarget(GrpcTarget):
    """JetStream's Orchestrator/Decode (greedy; it stops at EOS, so outputs may be shorter than max_tokens)."""

    def __init__(self, address: str, timeout: float | None = None, api_key: str | None = None):
        super().__init__(address, timeout, api_key)
        self.url, self.orchestrator = f"jetstream://{address}", jetstream_pb2_grpc.OrchestratorStub(self.channel)

    async def model_vocab(self) -> int | None:
        return None

    async def send(self, item: Item) -> AsyncIterator[int]:
        if isinstance(item.prompt, str):
            request = js.DecodeRequest(text_content=js.DecodeRequest.TextContent(text=item.prompt))
        else:
            request = js.DecodeRequest(token_content=js.DecodeRequest.TokenContent(token_ids=item.prompt))
        request.max_tokens = item.max_tokens
        try:
            async for msg in self.orchestrator.Decode(request, metadata=self.metadata, timeout=self.timeout):
                yield sum(len(s.token_ids) for s in msg.stream_content.samples)
        except grpc.aio.AioRpcError as e:
            raise RequestFailed(e.code().name, e.details() or "") from None


class HttpTarget(Target):
    """The OpenAI completions API, streamed with usage; `model` defaults to the server's first model."""

    def __init__(self, base: str, model: str | None = None, timeout: float | None = None, api_key: str | None = None):
        self.url, self.model = base.rstrip("/"), model
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             timeout=aiohttp.ClientTimeout(total=timeout),
                                             headers=dict(bearer(api_key)) if api_key else None)

    async def _model(self) -> str:
        if self.model is None:
            async with self.session.get(f"{self.url}/v1/models") as r:
                self.model = (await r.json())["data"][0]["id"]
        return self.model

    async def send(self, item: Item) -> AsyncIterator[int]:
        body = {"model": await self._model(), "prompt": item.prompt, "max_tokens": item.max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        seen = 0  # OpenAI chunks carry text, not token counts: one token at the first text, the rest from the usage
        try:
            async with self.session.post(f"{self.url}/v1/completions", json=body) as r:
                if r.status != 200:
                    raise RequestFailed(f"HTTP_{r.status}", (await r.text())[:200])
                async for raw in r.content:
                    line = raw.decode().strip()
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise RequestFailed("STREAM_ERROR", chunk["error"].get("message", ""))
                    if chunk.get("usage"):
                        yield chunk["usage"]["completion_tokens"] - seen
                    elif not seen and chunk["choices"] and chunk["choices"][0].get("text"):
                        seen = 1
                        yield 1
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise RequestFailed("TIMEOUT" if isinstance(e, asyncio.TimeoutError) else "CONNECTION_ERROR",
                                str(e)) from None

    async def close(self) -> None:
        await self.session.close()


def connect(url: str, model: str | None = None, timeout: float | None = None, api_key: str | None = None) -> Target:
    """The target at `url`; `api_key` is sent with every request (default: the first key in $HIRE_API_KEY)."""
    api_key = api_key or next(iter(env_keys()), None)
    parts = urlsplit(url)
    if not parts.hostname or not parts.port:
        raise ValueError(f"target {url!r}: expected grpc://HOST:PORT, jetstream://HOST:PORT or http://HOST:PORT")
    address = f"{parts.hostname}:{parts.port}"
    if parts.scheme == "grpc":
        return GrpcTarget(address, timeout, api_key)
    if parts.scheme == "jetstream":
        return JetStreamTarget(address, timeout, api_key)
    if parts.scheme in ("http", "https"):
        return HttpTarget(url, model, timeout, api_key)
    raise ValueError(f"target {url!r}: unknown scheme {parts.scheme!r} (grpc, jetstream, http)")


# Running a load


@dataclass
class Record:
    """One request's timings (seconds from its start) and outcome."""

    start: float
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (time, tokens in that message)
    end: float = 0.0
    status: str = "OK"
    wanted: int = 0  # the tokens asked for

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.arrivals)


async def one(target: Target, item: Item, t0: float) -> Record:
    record = Record(time.perf_counter() - t0, wanted=item.max_tokens)
    start = time.perf_counter()
    try:
        async for n in target.send(item):
            if n:
                record.arrivals.append((time.perf_counter() - start, n))
    except RequestFailed as e:
        record.status = e.status
    except Exception as e:  # noqa: BLE001 - a client-side fault is reported as an error, not a crash
        record.status = type(e).__name__
    record.end = time.perf_counter() - start
    return record


@dataclass(frozen=True)
class Load:
    """Open loop at `rate` requests/s (Poisson) or closed loop with `concurrency` clients."""

    rate: float | None = None
    concurrency: int | None = None

    @property
    def name(self) -> str:
        return f"rate {self.rate}/s" if self.rate else f"concurrency {self.concurrency}"


async def drive(target: Target, items: Iterator[Item], load: Load, requests: int | None, duration: float | None,
                seed: int = 0, progress: bool = True, t0: float | None = None) -> tuple[list[Record], float]:
    """Send requests until `requests` were sent or `duration` seconds passed; wait for all. Records and seconds.

    Times are from `t0` (a time.perf_counter() reading; default: now), which a caller may share."""
    rng, t0, records = random.Random(seed), time.perf_counter() if t0 is None else t0, []
    bar = tqdm(total=requests, desc=load.name, unit="req", disable=not progress, leave=False)

    def more() -> bool:
        sent = len(records) + len(pending)
        return (requests is None or sent < requests) and (duration is None or time.perf_counter() - t0 < duration)

    async def run(item: Item) -> None:
        records.append(await one(target, item, t0))
        bar.update()

    pending: set[asyncio.Task] = set()
    if load.rate:
        while more():
            task = asyncio.create_task(run(next(items)))
            pending.add(task)
            task.add_done_callback(pending.discard)
            await asyncio.sleep(rng.expovariate(load.rate))
    else:
        async def client() -> None:
            while more():
                task = asyncio.current_task()
                pending.add(task)
                await run(next(items))
                pending.discard(task)
        await asyncio.gather(*(client() for _ in range(load.concurrency)))
    await asyncio.gather(*list(pending))
    bar.close()
    return records, time.perf_counter() - t0


# Reporting


def stats(values: list[float]) -> dict[str, float] | None:
    """Mean and percentiles in milliseconds."""
    if not values:
        return None
    ms = np.asarray(values) * 1000
    return {"mean": round(float(ms.mean()), 3), **{f"p{p}": round(float(np.percentile(ms, p)), 3)
                                                   for p in PERCENTILES}}


@dataclass(frozen=True)
class Slo:
    """A request counts towards goodput when it succeeded within every bound that is set (milliseconds)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def met(self, ttft: float, tpot: float | None, e2e: float) -> bool:
        bounds = ((self.ttft_ms, ttft), (self.tpot_ms, tpot or 0.0), (self.e2e_ms, e2e))
        return all(bound is None or value * 1000 <= bound for bound, value in bounds)


def longest_gap(records: list[Record], start: float, end: float | None = None) -> float:
    """The longest stretch from `start` to `end` (default: the last completion) without a request completing
    successfully (times on the records' clock)."""
    marks = sorted(t for r in records if r.status == "OK" and r.arrivals and start < (t := r.start + r.end))
    marks = [start, *marks, *([] if end is None else [max([end, *marks])])]
    return max((b - a for a, b in zip(marks, marks[1:])), default=0.0)


def summarize(records: list[Record], seconds: float, load: Load, slo: Slo, window: float | None = None,
              t: float = 0.0) -> dict:
    """The run's report, for requests that ended from `t` to `t` + `seconds`; `longest_gap_s` is the longest stretch
    of those without a completion and `longest_request_s` the longest any of them took, whatever its status (a
    hang shows there, failures too). With `window` (seconds) also `windows`: the same figures for the requests that
    ended in each window of the run in turn (`t_s` its start), to watch latency, errors and throughput over time."""
    ok = [r for r in records if r.status == "OK" and r.arrivals]
    ttft = [r.arrivals[0][0] for r in ok]
    tpot = {id(r): (r.end - r.arrivals[0][0]) / (r.tokens - 1) for r in ok if r.tokens > 1}
    itl = [(t - prev) / n for r in ok for (prev, _), (t, n) in zip(r.arrivals, r.arrivals[1:])
           for _ in range(n)]
    good = sum(slo.met(r.arrivals[0][0], tpot.get(id(r)), r.end) for r in ok)
    errors = Counter(r.status for r in records if r.status != "OK" or not r.arrivals)
    report = {"load": asdict(load), "requests": len(records), "completed": len(ok),
              "errors": {("EMPTY" if k == "OK" else k): v for k, v in sorted(errors.items())},
              "duration_s": round(seconds, 3), "requests_per_s": round(len(ok) / seconds, 3),
              "output_tokens_per_s": round(sum(r.tokens for r in ok) / seconds, 2),
              "goodput_requests_per_s": round(good / seconds, 3), "slo": asdict(slo),
              "ttft_ms": stats(ttft), "tpot_ms": stats(list(tpot.values())), "itl_ms": stats(itl),
              "e2e_ms": stats([r.end for r in ok]), "longest_gap_s": round(longest_gap(ok, t, t + seconds), 3),
              "longest_request_s": round(max((r.end for r in records), default=0.0), 3)}
    if window:
        report["windows"] = [  # every request ends within the run's `seconds`
            {"t_s": round(float(w), 3), **{k: v for k, v in summarize(
                [r for r in records if w <= r.start + r.end < w + window], min(window, seconds - w), load,
                slo, t=float(w)).items() if k not in ("load", "slo")}} for w in np.arange(0.0, seconds, window)]
    return report


def plot(report: dict, path: Path) -> None:
    """Latency percentiles and throughput against load, one figure per report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    x = [r["load"]["rate"] or r["load"]["concurrency"] for r in runs]
    xlabel = "request rate (/s)" if runs[0]["load"]["rate"] else "concurrency"
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, metric in zip(axes, ("ttft_ms", "tpot_ms", "e2e_ms")):
        for p in ("p50", "p90", "p99"):
            ax.plot(x, [(r[metric] or {}).get(p, float("nan")) for r in runs], marker="o", label=p)
        ax.set(title=metric.replace("_ms", " (ms)"), xlabel=xlabel)
        ax.legend()
    axes[3].plot(x, [r["output_tokens_per_s"] for r in runs], marker="o", label="output tokens/s")
    axes[3].set(title="throughput", xlabel=xlabel)
    axes[3].legend()
    fig.suptitle(f"hire loadtest: {report['target']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare(a: dict, b: dict) -> list[dict]:
    """Run by run (same order), each headline metric of A and B and B/A."""
    rows = []
    for ra, rb in zip(a["runs"], b["runs"]):
        for metric, key in (("requests_per_s", None), ("output_tokens_per_s", None), ("goodput_requests_per_s", None),
                            ("ttft_ms", "p50"), ("ttft_ms", "p99"), ("tpot_ms", "p50"), ("tpot_ms", "p99"),
                            ("e2e_ms", "p50"), ("e2e_ms", "p99")):
            va, vb = ((r[metric] or {}).get(key) if key else r[metric] for r in (ra, rb))
            rows.append({"load": Load(**ra["load"]).name, "metric": f"{metric}{'.' + key if key else ''}",
                         "a": va, "b": vb, "b_over_a": round(vb / va, 3) if va and vb is not None else None})
    return rows


async def loadtest(url: str, loads: list[Load], workload: Workload, requests: int | None, duration: float | None,
                   slo: Slo, model: str | None = None, timeout: float | None = None, progress: bool = True,
                   window: float | None = None) -> dict:
    """Run each load in turn against `url`; the report (JSON-ready), with per-`window` figures if set."""
    target = connect(url, model, timeout)
    try:
        if workload.prompts is None and (vocab := await target.model_vocab()):
            workload.vocab = vocab
        items = workload.items()
        runs = []
        for load in loads:
            records, seconds = await drive(target, items, load, requests, duration, workload.seed, progress)
            runs.append(summarize(records, seconds, load, slo, window))
        return {"target": url, "runs": runs,
                "workload": {"input_len": workload.input_len.spec, "output_len": workload.output_len.spec,
                             "prompts": workload.prompts and str(workload.prompts), "vocab": workload.vocab,
                             "seed": workload.seed, "requests": requests, "duration_s": duration,
                             "window_s": window}}
    finally:
        await target.close()


def run_loadtest(target: str | None, rates: Sequence[float], concurrencies: Sequence[int], requests: int | None,
                 duration: float | None, input_len: str, output_len: str, prompts: str | None, seed: int, slo: Slo,
                 model: str | None = None, timeout: float | None = None, window: float | None = None,
                 out: str | None = None, plot_to: str | None = None, compare_files: Sequence[str] = (),
                 progress: bool = True) -> None:
    """`hire loadtest`: run each load (`rates`: open loop; else `concurrencies`, closed loop; neither: one client) of
    `requests` (100 without a `duration`) or for `duration` seconds against `target`, and print the JSON report
    (written to `out` too, and plotted to `plot_to`); with two `compare_files`, print their comparison instead
    (`compare`). A bad value is an OptionError."""
    if compare_files:
        a, b = (json.loads(Path(p).read_text()) for p in compare_files)
        print(json.dumps(compare(a, b), indent=1))
        return
    if not target:
        raise OptionError("--target is needed (or --compare A B)")
    if rates and concurrencies:
        raise OptionError("--rate (open loop) and --concurrency (closed loop) do not mix in one run")
    loads = [Load(rate=r) for r in rates] or [Load(concurrency=c) for c in concurrencies or (1,)]
    try:
        workload = Workload(Dist(input_len), Dist(output_len), prompts and Path(prompts), seed=seed)
        report = asyncio.run(loadtest(target, loads, workload, requests or (None if duration else 100), duration, slo,
                                      model, timeout, progress, window))
    except ValueError as e:
        raise OptionError(str(e)) from None
    text = json.dumps(report, indent=1)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
    if plot_to:
        plot(report, Path(plot_to))
