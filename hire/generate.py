"""Generation on top of the engine: batch `generate` and token-by-token `stream`.

Both run the same loop: prompts wait in a queue, enter free slots after prefill, and leave
when they hit a stop token, a stop string, max_tokens or the end of the context; the engine
decodes all slots `chunk` steps at a time. `Request` holds the stopping rules and `Batch` the
slots, shared with the server's scheduler (hire.scheduler).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np

from hire.engine import Engine
from hire.request import Completion, Event, Request
from hire.sampling import SamplingParams

WHOLE_SPAN = 512  # run(whole=True): the longest attention span taken from the first step


class PlainBatch:
    """hire.batch.Batch over an engine's slots: each step decodes every slot `chunk` tokens.

    `admit` prefills a request into a free slot, `step` decodes every slot `chunk` tokens and
    pushes them to their requests, `drop` frees a slot at once. One thread drives a batch.
    """

    def __init__(self, engine: Engine, chunk: int, whole: bool = False):
        self.engine, self.chunk, self.whole = engine, chunk, whole
        self.state = engine.init_state()
        self.live: dict[int, Request] = {}

    def free_slots(self) -> list[int]:
        return [slot for slot in range(self.engine.slots) if slot not in self.live]

    def admit(self, req: Request, slot: int) -> Event:
        """Prefill `req` into the free `slot`; returns its next event (it stays only if that is not its last).

        A request that already has tokens (retried after the engine was rebuilt) is prefilled with its prompt and
        those tokens, so it goes on where it stopped: a token's sample depends only on the request's seed, its
        position and what precedes it, so the output is the one it would have had.
        """
        prefix = self.engine.prefill(req.out.prompt_tokens + req.out.tokens, req.params, req.adapter)
        event = req.push(int(prefix.token[0]), float(prefix.logprob[0]))
        if event.finish_reason is None:
            self.state = self.engine.insert(prefix, self.state, slot)
            self.live[slot] = req
        return event

    def step(self) -> list[Event]:
        """Decode `chunk` tokens in every slot; the live requests' events, each request's in order."""
        n = self.chunk
        reach = max(len(r.out.prompt_tokens) + len(r.out.tokens) + n for r in self.live.values())
        if self.whole:  # at least the span of every request's last position, up to WHOLE_SPAN
            last = max(len(r.out.prompt_tokens) + min(r.params.max_tokens, r.room) for r in self.live.values())
            reach = max(reach, min(last, WHOLE_SPAN))
        self.state, out = self.engine.generate_steps(self.state, n, reach)
        tokens, logprobs = np.asarray(out.tokens), np.asarray(out.logprobs)
        events = []
        for slot, req in list(self.live.items()):
            for t in range(n):
                events.append(event := req.push(int(tokens[t, slot]), float(logprobs[t, slot])))
                if event.finish_reason:
                    del self.live[slot]
                    break
        return events

    def drop(self, req: Request) -> None:
        """Free `req`'s slot, if it holds one; its remaining tokens are never decoded."""
        self.live = {slot: r for slot, r in self.live.items() if r is not req}


def run(engine: Engine, requests: Sequence[Request], chunk: int = 16, whole: bool = False) -> Iterator[Event]:
    """Decode every request, yielding events as tokens arrive. With `whole`, attention spans the bucket of the
    requests' last position (up to WHOLE_SPAN) from the first step: one decode program where the span would
    otherwise cross several buckets, each a program to compile or load from the cache (1.3-3 s apiece for
    SmolLM2's 30 layers), for attention over at most WHOLE_SPAN positions early on."""
    queue, batch = deque(requests), PlainBatch(engine, chunk, whole)
    while queue or batch.live:
        for slot in batch.free_slots()[: len(queue)]:
            yield batch.admit(queue.popleft(), slot)
        if batch.live:
            yield from batch.step()


def encode_prompt(engine: Engine, prompt: str | Sequence[int]) -> list[int]:
    """A prompt's token ids: text is tokenized (with BOS, unless the text starts with BOS itself, as a chat
    template may write it), ids are taken as they are."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt: empty prompt")
        ids, bos = engine.tokenizer.encode(prompt, bos=False), engine.tokenizer.bos_id
        return ids if bos is not None and ids[:1] == [bos] else engine.tokenizer.encode(prompt)
    return list(prompt)


def _requests(engine: Engine, prompts: Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
              adapters: Sequence[int] | None) -> list[Request]:
    params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    adapters = list(adapters) if adapters is not None else [-1] * len(prompts)
    if not len(prompts) == len(params) == len(adapters):
        raise ValueError("prompts, params and adapters differ in length")
    encoded = [encode_prompt(engine, p) for p in prompts]
    return [Request(i, *args, engine) for i, args in enumerate(zip(encoded, params, adapters))]


def generate(engine: Engine, prompts: Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
             adapters: Sequence[int] | None = None, chunk: int = 16) -> list[Completion]:
    """Complete every prompt (text or token ids, one params or one per prompt); results in order."""
    requests = _requests(engine, prompts, params, adapters)
    for _ in run(engine, requests, chunk):
        pass
    return [r.out for r in requests]


def stream(engine: Engine, prompt: str | Sequence[int], params: SamplingParams, adapter: int = -1,
           chunk: int = 1) -> Iterator[Event]:
    """Yield one prompt's tokens and text deltas as they are decoded (`hire generate`, `hire chat`), attention
    over the `whole` span (see run)."""
    return run(engine, _requests(engine, [prompt], params, [adapter]), chunk, whole=True)
