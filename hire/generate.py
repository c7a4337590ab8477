"""Generation on top of the engine: batch `generate` and token-by-token `stream`, in this process.

Both drive the server's loop (hire.scheduler) on the caller's thread: prompts wait in a queue, enter free
slots after prefill, and leave when they hit a stop token, a stop string, max_tokens or the end of the
context (hire.request.Request's rules); a hire.batch.PlainBatch decodes all slots `chunk` steps at a time.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from hire.batch import Batch, PlainBatch
from hire.engine_api import Engine
from hire.request import Completion, Event, Request
from hire.sampling import SamplingParams
from hire.scheduler import Scheduler


def run(engine: Engine, requests: Sequence[Request], batch: Callable[[], Batch]) -> Iterator[Event]:
    """Decode every request on this thread through a hire.scheduler.Scheduler of `batch()`es, each request entering
    as soon as a slot is free; yields the events as tokens arrive."""
    scheduler = Scheduler(engine, queue_size=max(len(requests), 1), prefills=engine.slots, batch=batch)
    return scheduler.drain(requests)


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
    for _ in run(engine, requests, lambda: PlainBatch(engine, chunk)):
        pass
    return [r.out for r in requests]


def stream(engine: Engine, prompt: str | Sequence[int], params: SamplingParams, adapter: int = -1,
           chunk: int = 1) -> Iterator[Event]:
    """Yield one prompt's tokens and text deltas as they are decoded (`hire generate`, `hire chat`), attention
    over the `whole` span from the first step (see hire.batch.PlainBatch)."""
    return run(engine, _requests(engine, [prompt], params, [adapter]), lambda: PlainBatch(engine, chunk, whole=True))
