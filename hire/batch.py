"""The batch contract: decode slots and the requests in them, the unit that hire.scheduler drives.

The scheduler is the only decode loop: between steps it drops cancelled requests, `admit`s waiting
ones into `free_slots()`, then calls `step()`, which advances every live request and returns their
events (hire.request.Event; a request leaves `live` with its last one). How a step decodes is the
batch's business:

- hire.generate.PlainBatch: `chunk` tokens per slot from an engine (hire.engine_api.Engine), with
  whatever HiRE, LoRA, quantization or sharding that engine carries;
- hire.speculative.SpeculativeBatch: a block drafted by any hire.speculative.Drafter (standalone,
  tandem, n-gram) and verified by the engine, in one process;
- workers.coordinator's batch: the same block with drafter and verifier in separate actors over gRPC,
  drafting the next block while the current one is verified.

A batch that fails as a whole raises hire.engine_api.EngineUnavailable; the scheduler then builds a
fresh one. One thread drives a batch.
"""
from __future__ import annotations

from typing import Protocol

from hire.engine_api import Engine
from hire.request import Event, Request


class Batch(Protocol):
    engine: Engine  # limits, tokenizer and request checks of the model the batch decodes
    live: dict[int, Request]  # by slot: the requests decoding

    def free_slots(self) -> list[int]:
        """Slots `admit` may fill now."""

    def admit(self, req: Request, slot: int) -> Event:
        """Prefill `req` into the free `slot`; its first event (it stays live only if that is not its last)."""

    def step(self) -> list[Event]:
        """Advance every live request; their events, each request's in order."""

    def drop(self, req: Request) -> None:
        """Free `req`'s slot at once, if it holds one; its remaining tokens are never decoded."""
