"""The batch contract, decode slots and the requests in them, the unit that hire.scheduler drives; and the plain
batch.

The scheduler is the only decode loop: between steps it drops cancelled requests, `admit`s waiting
ones into `free_slots()`, then calls `step()`, which advances every live request and returns their
events (hire.request.Event; a request leaves `live` with its last one). How a step decodes is the
batch's business:

- PlainBatch (below): `chunk` tokens per slot from an engine (hire.engine_api.Engine), with
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

import numpy as np

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


WHOLE_SPAN = 512  # PlainBatch(whole=True): the longest attention span taken from the first step


class SlotBatch:
    """What the batches share: the requests by slot, what a request prefills, and handing tokens to them."""

    engine: Engine
    live: dict[int, Request]

    def free_slots(self) -> list[int]:
        return [slot for slot in range(self.engine.slots) if slot not in self.live]

    def drop(self, req: Request) -> None:
        """Free `req`'s slot, if it holds one; its remaining tokens are never decoded."""
        self.live = {slot: r for slot, r in self.live.items() if r is not req}

    def reach(self, n: int, whole: bool = False) -> int:
        """A bound on every live request's position `n` tokens on (the attention span to run); with `whole`, at least
        the span of each one's last position too, up to WHOLE_SPAN (see PlainBatch)."""
        reach = max(len(r.out.prompt_tokens) + len(r.out.tokens) + n for r in self.live.values())
        if whole:
            last = max(len(r.out.prompt_tokens) + min(r.params.max_tokens, r.room) for r in self.live.values())
            reach = max(reach, min(last, WHOLE_SPAN))
        return reach

    @staticmethod
    def context(req: Request) -> list[int]:
        """What to prefill for `req`: its prompt, and the tokens it already has when retried after the engine was
        rebuilt, so that it goes on where it stopped (a token's sample depends only on the request's seed, its
        position and what precedes it, so the output is the one it would have had)."""
        return req.out.prompt_tokens + req.out.tokens

    def _emit(self, tokens: np.ndarray, logprobs: np.ndarray, counts: np.ndarray) -> list[Event]:
        """Push the first counts[slot] of tokens [slots, n] (and logprobs) to each live slot's request, until its last
        event; the events, each request's in order."""
        events = []
        for slot, req in list(self.live.items()):
            for t in range(counts[slot]):
                events.append(event := req.push(int(tokens[slot, t]), float(logprobs[slot, t])))
                if event.finish_reason:
                    del self.live[slot]
                    break
        return events


class PlainBatch(SlotBatch):
    """The Batch over an engine's slots: each step decodes every slot `chunk` tokens.

    With `whole`, attention spans the bucket of the live requests' last position (up to WHOLE_SPAN) from the
    first step: one decode program where the span would otherwise cross several buckets, each a program to
    compile or load from the cache (1.3-3 s apiece for SmolLM2's 30 layers), for attention over at most
    WHOLE_SPAN positions early on (`hire generate`, `hire chat`).
    """

    def __init__(self, engine: Engine, chunk: int, whole: bool = False):
        self.engine, self.chunk, self.whole = engine, chunk, whole
        self.state = engine.init_state()
        self.live: dict[int, Request] = {}

    def admit(self, req: Request, slot: int) -> Event:
        """Prefill `req`'s `context` into the free `slot`; its next event (it stays only if that is not its last)."""
        prefix = self.engine.prefill(self.context(req), req.params, req.adapter)
        # read as NumPy: indexing the device arrays would dispatch two more JAX operations (0.8 ms a request)
        event = req.push(int(np.asarray(prefix.token)[0]), float(np.asarray(prefix.logprob)[0]))
        if event.finish_reason is None:
            self.state = self.engine.insert(prefix, self.state, slot)
            self.live[slot] = req
        return event

    def step(self) -> list[Event]:
        """Decode `chunk` tokens in every slot; the live requests' events, each request's in order."""
        n = self.chunk
        self.state, out = self.engine.generate_steps(self.state, n, self.reach(n, self.whole))
        return self._emit(np.asarray(out.tokens).T, np.asarray(out.logprobs).T, np.full(self.engine.slots, n))
