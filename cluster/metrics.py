"""Prometheus metrics of a server: requests by status, latencies, tokens, queue depth, batch occupancy."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from hire.generate import Completion
from hire.scheduler import Scheduler

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
PER_TOKEN = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class Metrics:
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

    def completed(self, out: Completion, seconds: float) -> None:
        """Record a generation request that ran to its end in `seconds`."""
        n = len(out.tokens)
        self.latency.observe(seconds)
        self.tokens.inc(n)
        self.ttft.observe(out.time_to_first_token)
        if n > 1:
            self.tpot.observe((seconds - out.time_to_first_token) / (n - 1))
