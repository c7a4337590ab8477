"""The engine contract: what the batches (hire.batch) and so the scheduler need of an engine.

It is JetStream's engine_api in shape. An engine owns a fixed number of decode slots and the
cache behind them; a prompt is `prefill`ed on its own into a prefix, `insert`ed into a free slot
of the decode state, and `generate_steps` advances every slot n tokens at once. The state and
the prefixes are the engine's own values (arrays here, handles to remote arrays for the sharded
engine): callers only pass them back. HiRE, LoRA, quantized weights and sharding over hosts are
properties of an engine, invisible behind this contract.

Implementations: hire.engine.Engine (this process), workers.shards.ShardedEngine (host actors).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax

from hire.config import ModelConfig
from hire.sampling import SamplingParams
from hire.tokenizer import Tokenizer


class StepOutput(NamedTuple):
    tokens: jax.Array  # [slots] (or [n, slots] from generate_steps)
    logprobs: jax.Array


class EngineUnavailable(RuntimeError):
    """The engine failed as a whole (a host died or hung): its decode states and prefixes are lost. An engine
    that can rebuild itself has `recover()`; hire.scheduler then retries the requests that had no token yet.
    `retry_after`: seconds after which a client's retry may find it back (servers pass it on), or None."""

    def __init__(self, message: str = "", retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class Engine(Protocol):
    """Decode slots over one model. One thread drives an engine (hire.scheduler's)."""

    cfg: ModelConfig
    tokenizer: Tokenizer
    slots: int  # decode slots in a state
    max_len: int  # context length: prompt and output together

    def check_request(self, tokens: list[int], adapter: int = -1) -> None:
        """Raise ValueError, naming the field, for a prompt or adapter this engine cannot run."""

    def init_state(self) -> Any:
        """A decode state with every slot free."""

    def prefill(self, tokens: list[int], params: SamplingParams, adapter: int = -1) -> Any:
        """Run a prompt and sample its first token: a prefix whose `token` and `logprob` ([1]) can be read."""

    def insert(self, prefix: Any, state: Any, slot: int) -> Any:
        """The state with `prefix` in `slot` (the old state may be consumed)."""

    def generate_steps(self, state: Any, n: int, reach: int | None = None) -> tuple[Any, StepOutput]:
        """n decode steps for every slot; outputs [n, slots]. `reach` bounds every live slot's position after the
        n steps, when the caller knows it (attention then reads only that much of the cache)."""

    def warm_up(self, chunk: int) -> None:
        """Compile what serving will call, so that no request waits for a compilation."""


@runtime_checkable
class Recoverable(Protocol):
    """An engine that can rebuild itself after EngineUnavailable (the sharded engine, over fewer hosts)."""

    def recover(self, grow: bool = False) -> bool:
        """Rebuild if down (or, with `grow`, onto more hosts); True when it rebuilt. Raises EngineUnavailable
        when no engine can be built."""
