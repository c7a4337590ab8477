"""Serving settings as one object: what `hire serve` and `hire serve-grpc` take as flags and deploy/serve.yaml as
`args`, from the model and its engine to the addresses, keys and limits. Built once (from the flags, or `ServeConfig.of`
a mapping) and handed to cluster.launch, the Serve deployments and cluster.grpc_server. A bad value is a ValueError
that names the field.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cluster.auth import parse_keys
from cluster.requests import Limits
from hire.checkpoint import DEFAULT_MODEL

PLACEMENTS = ("STRICT_SPREAD", "SPREAD", "PACK", "STRICT_PACK")
AT_LEAST = {"slots": 1, "queue_size": 1, "chunk": 1, "prefills": 1, "gamma": 1, "hosts": 1, "devices_per_host": 1,
            "replicas": 1, "max_len": 2, "http_port": 0, "grpc_port": 0, "metrics_port": 0, "grace": 0, "num_cpus": 1}


@dataclass(frozen=True)
class ServeConfig:
    """How a model is served (docs/serving.md). Left out, `max_len` is the model's context and `replicas` Serve's
    (deploy/serve.yaml may autoscale them)."""

    model: str = DEFAULT_MODEL  # a name under models/ or a path
    # the engine and its scheduling
    slots: int = 8  # requests decoding together
    max_len: int | None = None  # context length per slot
    queue_size: int = 128  # requests that may wait while every slot is busy
    chunk: int = 4  # decode steps between admissions
    prefills: int = 4  # prompts prefilled at most between two decode chunks
    dtype: str | None = None
    quantize: str | None = None
    hire: Mapping[str, Any] = field(default_factory=dict)  # ModelConfig HiRE overrides (--softmax, --ffn, --hire)
    lora: Mapping[str, str] = field(default_factory=dict)  # adapter name -> PEFT folder
    # speculative decoding
    draft: str | None = None  # a drafter's name or path, or "ngram"
    gamma: int = 4  # tokens drafted per block
    pipelined: bool = True  # draft block b+1 while b is verified (hire serve)
    # where the model runs (hire serve)
    hosts: int = 1  # host actors the model is sharded over
    devices_per_host: int = 1
    placement: str | None = None  # their placement group's strategy
    replicas: int | None = None  # engine replicas
    replica_resource: str | None = None  # a Ray resource each engine replica takes one unit of
    address: str | None = None  # a running Ray cluster to join ("auto": the local one); else a Ray of its own
    num_cpus: int | None = None  # CPUs the Ray started here may use
    # who may call and how
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 50051  # 0 picks a free one (hire serve-grpc)
    api_keys: tuple[str, ...] = ()  # one is needed on every call but health checks
    insecure: bool = False  # listen beyond loopback with no key
    limits: Limits = field(default_factory=Limits)
    grace: float = 20.0  # seconds the calls in flight have to finish on SIGTERM
    tls_cert: str | None = None  # hire serve-grpc: serve TLS with this certificate chain and its key
    tls_key: str | None = None
    tls_client_ca: str | None = None  # require client certificates it signed (mutual TLS)
    metrics_port: int | None = None  # hire serve-grpc: serve Prometheus metrics here
    metrics_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        for name, low in AT_LEAST.items():
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value < low):
                raise ValueError(f"{name}: {value!r} is not a number >= {low}")
        if self.placement is not None and self.placement not in PLACEMENTS:
            raise ValueError(f"placement: {self.placement!r} is not one of {', '.join(PLACEMENTS)}")
        if not isinstance(self.limits, Limits):
            object.__setattr__(self, "limits", Limits.parse(self.limits))
        keys = self.api_keys
        object.__setattr__(self, "api_keys", tuple(parse_keys([keys] if isinstance(keys, str) else keys or ())))
        object.__setattr__(self, "hire", dict(self.hire or {}))
        object.__setattr__(self, "lora", dict(self.lora or {}))
        if self.quantize and (self.draft or self.hosts > 1):
            raise ValueError("quantize: quantized weights are served by one engine per replica; they do not combine "
                             "with draft or hosts yet")

    @classmethod
    def of(cls, settings: Mapping[str, Any]) -> ServeConfig:
        """The config of a mapping (deploy/serve.yaml's `args`); ValueError naming an unknown field."""
        names = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(settings) - names):
            raise ValueError(f"{unknown[0]}: not a serving setting; one of {', '.join(sorted(names))}")
        return cls(**settings)

    def replace(self, **changes) -> ServeConfig:
        return dataclasses.replace(self, **changes)

    @property
    def scheduling(self) -> dict[str, int]:
        """hire.scheduler.Scheduler's settings."""
        return {"queue_size": self.queue_size, "chunk": self.chunk, "prefills": self.prefills}
