"""A server's metrics: requests by status, latencies, tokens, queue depth, batch occupancy, draft acceptance.

One set of names, kept by either kind of instruments: `Prometheus` (a prometheus-client registry: the standalone gRPC
server's /metrics) or `Ray` (ray.util.metrics, from a Ray Serve replica; Ray exports them with its own serve_*
metrics on each node's metrics port). Where the scheduler runs the gauges read it; where calls arrive the calls are
counted (in `hire serve` the ingress and the engine replicas are different actors, each with its part).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from hire.request import Completion
from hire.scheduler import Scheduler

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
PER_TOKEN = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class Prometheus:
    """Instruments in their own registry (`registry`), which /metrics exposes; gauges are read when scraped."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()

    def counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Callable[..., None]:
        c = Counter(name, doc, labels, registry=self.registry)
        return lambda n=1, **tags: (c.labels(**tags) if tags else c).inc(n)

    def histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Callable[[float], None]:
        return Histogram(name, doc, buckets=buckets, registry=self.registry).observe

    def gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        Gauge(name, doc, registry=self.registry).set_function(read)

    def sample(self) -> None:
        """Nothing to do: a scrape reads the gauges."""


class Ray:
    """Instruments through ray.util.metrics (import only inside a Ray worker); `sample` sets the gauges."""

    def __init__(self):
        from ray.util import metrics

        self._metrics, self._gauges = metrics, []

    def counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Callable[..., None]:
        c = self._metrics.Counter(name, doc, tag_keys=labels)
        return lambda n=1, **tags: c.inc(n, tags=tags or None)

    def histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Callable[[float], None]:
        return self._metrics.Histogram(name, doc, boundaries=list(buckets)).observe

    def gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        self._gauges.append((self._metrics.Gauge(name, doc), read))

    def sample(self) -> None:
        for gauge, read in self._gauges:
            gauge.set(read())


class Metrics:
    """The metrics of one server (or one Serve actor): `request` counts finished calls, `completed` the generation
    requests that ran to their end; with a `scheduler`, gauges of its queue, slots and draft acceptance (of `drafts`,
    a speculative batch's SpecStats, or its engine's `stats`)."""

    def __init__(self, instruments: Prometheus | Ray, scheduler: Scheduler | None = None, drafts: Any = None):
        self.instruments = i = instruments
        self._requests = i.counter("hire_requests", "Finished calls by method and status.", ("rpc", "status"))
        self._ttft = i.histogram("hire_time_to_first_token_seconds", "From arrival (queueing included) to the first "
                                 "token.", SECONDS)
        self._tpot = i.histogram("hire_time_per_output_token_seconds", "Mean time per token after the first, per "
                                 "request.", PER_TOKEN)
        self._latency = i.histogram("hire_request_latency_seconds", "End-to-end time of completed generation "
                                    "requests.", SECONDS)
        self._tokens = i.counter("hire_generated_tokens", "Tokens generated for completed requests.")
        if scheduler is not None:
            s = scheduler
            i.gauge("hire_queue_depth", "Requests waiting for a slot.", lambda: s.queue_depth)
            i.gauge("hire_batch_occupancy", "Fraction of the engine's slots holding a request.",
                    lambda: s.busy_slots / s.engine.slots)
            i.gauge("hire_speculative_acceptance_rate", "Fraction of drafted tokens accepted (0 without a drafter).",
                    lambda: acceptance(drafts or getattr(s.engine, "stats", None)))

    @property
    def registry(self) -> CollectorRegistry:
        """The Prometheus registry (a standalone server's)."""
        return self.instruments.registry

    def request(self, rpc: str, status: str) -> None:
        self._requests(rpc=rpc, status=status)

    def completed(self, out: Completion, seconds: float) -> None:
        """Record a generation request that ran to its end in `seconds`."""
        self._latency(seconds)
        self._tokens(len(out.tokens))
        self._ttft(out.time_to_first_token)
        if (tpot := time_per_token(out, seconds)) is not None:
            self._tpot(tpot)

    def sample(self) -> None:
        """Set the gauges now (Ray's: a replica calls it every second)."""
        self.instruments.sample()


def acceptance(stats: Any) -> float:
    """Accepted / proposed draft tokens so far (hire.speculative.SpecStats or the like), else 0."""
    return stats.accepted / stats.proposed if stats is not None and stats.proposed else 0.0


def time_per_token(out: Completion, seconds: float) -> float | None:
    """Mean time per output token after the first, or None with fewer than two tokens."""
    n = len(out.tokens)
    return (seconds - out.time_to_first_token) / (n - 1) if n > 1 else None
