"""A server's metrics: requests by status, latencies, tokens, queue depth, batch occupancy.

`Metrics` keeps them in a prometheus-client registry (the standalone gRPC server's /metrics);
`RayMetrics` reports the same names through ray.util.metrics from a Ray Serve replica, and Ray
exports them with its own (serve_*) metrics on each node's metrics port.
"""
from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from hire.request import Completion
from hire.scheduler import Scheduler

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
PER_TOKEN = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class Latencies:
    """What both kinds record per completed request (prometheus-client and Ray share these calls)."""

    latency: Any
    tokens: Any
    ttft: Any
    tpot: Any

    def completed(self, out: Completion, seconds: float) -> None:
        """Record a generation request that ran to its end in `seconds`."""
        self.latency.observe(seconds)
        self.tokens.inc(len(out.tokens))
        self.ttft.observe(out.time_to_first_token)
        if (tpot := time_per_token(out, seconds)) is not None:
            self.tpot.observe(tpot)


class Metrics(Latencies):
    """One server's metrics, in their own registry (`registry`), which /metrics exposes."""

    def __init__(self, scheduler: Scheduler, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        self.requests = Counter("hire_requests", "Finished RPCs by method and gRPC status code.", ["rpc", "status"],
                                registry=r)
        self.ttft = Histogram("hire_time_to_first_token_seconds", "From arrival (queueing included) to the first "
                              "token.", buckets=SECONDS, registry=r)
        self.tpot = Histogram("hire_time_per_output_token_seconds", "Mean time per token after the first, per "
                              "request.", buckets=PER_TOKEN, registry=r)
        self.latency = Histogram("hire_request_latency_seconds", "End-to-end time of completed generation "
                                 "requests.", buckets=SECONDS, registry=r)
        self.tokens = Counter("hire_generated_tokens", "Tokens generated for completed requests.", registry=r)
        Gauge("hire_queue_depth", "Requests waiting for a slot.", registry=r).set_function(
            lambda: scheduler.queue_depth)
        Gauge("hire_batch_occupancy", "Fraction of the engine's slots holding a request.", registry=r).set_function(
            lambda: scheduler.busy_slots / scheduler.engine.slots)
        self.acceptance = Gauge("hire_speculative_acceptance_rate", "Fraction of drafted tokens accepted; stays 0 "
                                "until speculative decoding lands.", registry=r)

    def request(self, rpc: str, status: str) -> None:
        self.requests.labels(rpc, status).inc()


def time_per_token(out: Completion, seconds: float) -> float | None:
    """Mean time per output token after the first, or None with fewer than two tokens."""
    n = len(out.tokens)
    return (seconds - out.time_to_first_token) / (n - 1) if n > 1 else None


class RayMetrics(Latencies):
    """The same metrics through ray.util.metrics (import only inside a Ray worker); `sample` sets the gauges."""

    def __init__(self, scheduler: Scheduler):
        from ray.util import metrics

        self.scheduler = scheduler
        self.requests = metrics.Counter("hire_requests", "Finished requests by method and status.",
                                        tag_keys=("rpc", "status"))
        self.ttft = metrics.Histogram("hire_time_to_first_token_seconds", "From arrival to the first token.",
                                      boundaries=list(SECONDS))
        self.tpot = metrics.Histogram("hire_time_per_output_token_seconds", "Mean time per token after the first.",
                                      boundaries=list(PER_TOKEN))
        self.latency = metrics.Histogram("hire_request_latency_seconds", "End-to-end time of completed requests.",
                                         boundaries=list(SECONDS))
        self.tokens = metrics.Counter("hire_generated_tokens", "Tokens generated for completed requests.")
        self.queue = metrics.Gauge("hire_queue_depth", "Requests waiting for a slot.")
        self.occupancy = metrics.Gauge("hire_batch_occupancy", "Fraction of the engine's slots holding a request.")

    def request(self, rpc: str, status: str) -> None:
        self.requests.inc(tags={"rpc": rpc, "status": status})

    def sample(self) -> None:
        s = self.scheduler
        self.queue.set(s.queue_depth)
        self.occupancy.set(s.busy_slots / s.engine.slots)
