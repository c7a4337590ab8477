"""Serving settings as one object: what `hire serve` and `hire serve-grpc` take as flags and deploy/serve.yaml as
`args`, from the model and its engine to the addresses, keys and limits. Built once (from the flags, or `ServeConfig.of`
a mapping) and handed to cluster.launch, the Serve deployments and cluster.grpc_server. A bad value is a ValueError
that names the field.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.auth import parse_keys
from cluster.requests import Limits
from hire.checkpoint import DEFAULT_MODEL, load, model_folder, resolve_model
from hire.config import HIRE_FIELDS, ModelConfig, OptionError
from hire.formats import CheckpointError
from hire.loaded import LoadedModel
from hire.predictor_files import serving_settings

PLACEMENTS = ("STRICT_SPREAD", "SPREAD", "PACK", "STRICT_PACK")
AT_LEAST = {"slots": 1, "queue_size": 1, "chunk": 1, "prefills": 1, "gamma": 1, "plain_from": 1, "hosts": 1,
            "devices_per_host": 1, "replicas": 1, "max_len": 2, "http_port": 0, "grpc_port": 0, "metrics_port": 0,
            "grace": 0, "num_cpus": 1}


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
    # hire serve-grpc: with this many requests live or more, decode plainly (drafting nothing: docs/speculative.md
    # measured speculation paying at 1-2 live rows on SmolLM2, not at 4); None: always draft
    plain_from: int | None = 3
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

    def load(self) -> tuple[LoadedModel, dict[str, int]]:
        """The model as served in this process (hire.checkpoint.load): its folder's recommended HiRE setting under
        `hire` (hire.predictor_files.serving_settings), said in the log, and the `lora` adapters, with each one's
        index."""
        from hire.lora import load_adapters

        settings = serving_settings(model_folder(self.model), self.hire, self.dtype, self.quantize)
        loaded = load(self.model, self.dtype, settings, self.quantize)
        log_hire(loaded.cfg)
        return load_adapters(loaded, self.lora) if self.lora else (loaded, {})

    def checked(self) -> ServeConfig:
        """This config with paths for the model, the drafter and the adapters (`hire serve` hands them to replicas),
        checked here rather than in a replica: the model is there (a GGUF file sound), so is the drafter, the HiRE
        setting loads (said in the log), and with `hosts` > 1 the model is servable over them
        (workers.shards.check_servable). A bad value is an OptionError naming its option."""
        from hire.checkpoint import detect_format

        model = str(resolve_model(self.model))
        if detect_format(Path(model)) == "gguf":
            from hire.formats.gguf import check_gguf

            check_gguf(model)
        try:
            draft = self.draft if self.draft in (None, "ngram") else str(resolve_model(self.draft))
        except CheckpointError as e:
            raise OptionError(str(e), "--draft") from None
        config = self.replace(model=model, draft=draft, lora={name: str(Path(path).resolve())
                                                              for name, path in self.lora.items()})
        if settings := serving_settings(model_folder(model), config.hire, config.dtype, config.quantize):
            log_hire(load(model, config.dtype, settings, config.quantize).cfg)
        if config.hosts > 1:
            from workers.shards import check_servable

            try:
                check_servable(model, config.lora or None, config.hire, config.dtype)
            except ValueError as e:
                option = {"lora": "--lora", "model": "--model"}.get(str(e).split(":")[0], "--softmax / --ffn / --hire")
                raise OptionError(str(e), option) from None
        return config


def log_hire(cfg: ModelConfig) -> None:
    """Say in the server's log which HiRE setting it runs, if any."""
    if cfg.sparse:
        logging.getLogger("hire").info("HiRE on: softmax %s, ffn %s (%s)", cfg.softmax, cfg.ffn, ", ".join(
            f"{k}={getattr(cfg, k)}" for k in HIRE_FIELDS if k not in ("softmax", "ffn")))
