"""A request on its way through decoding: its stopping rules (`Request`), each token as it is streamed
(`Event`) and the result (`Completion`). Every decode path (plain, speculative, the coordinator's) pushes its
tokens through `Request.push`, so stopping is decided in one place.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from hire.engine_api import Engine
from hire.sampling import SamplingParams
from hire.tokenizer import StreamDecoder


@dataclass
class Completion:
    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" or "length"
    time_to_first_token: float = 0.0


@dataclass
class Event:
    """One streamed token of request `index`; `finish_reason` is set on its last event.

    `stop_token` marks a last event whose token is the stop token (an end id or a stop id): not part of
    the completion's tokens, its text is what the decoder still held back.
    """

    index: int
    token: int
    text: str
    logprob: float
    finish_reason: str | None
    stop_token: bool = False


class Request:
    """Tracks one request's output and decides when it ends."""

    def __init__(self, index: int, prompt: list[int], params: SamplingParams, adapter: int, engine: Engine):
        engine.check_request(prompt, adapter)
        self.index, self.params, self.adapter = index, params, adapter
        self.out = Completion(prompt)
        self.decoder = StreamDecoder(engine.tokenizer, prompt)
        self.room = engine.max_len - len(prompt)
        self.stops = set(params.stop_ids) | (set() if params.ignore_eos else set(engine.tokenizer.end_ids))
        self.start = time.perf_counter()

    def push(self, token: int, logprob: float) -> Event:
        out = self.out
        if not out.tokens and not out.finish_reason:
            out.time_to_first_token = time.perf_counter() - self.start
        if token in self.stops:
            out.finish_reason = "stop"
            out.text += (tail := self.decoder.flush())
            return Event(self.index, token, tail, logprob, "stop", stop_token=True)
        out.tokens.append(token)
        if self.params.logprobs:
            out.logprobs.append(logprob)
        last = len(out.tokens) >= min(self.params.max_tokens, self.room)
        text = out.text + self.decoder.push(token) + (self.decoder.flush() if last else "")
        hits = [i for i in (text.find(s, max(0, len(out.text) - len(s))) for s in self.params.stop_strings) if i >= 0]
        if hits:
            text, out.finish_reason = text[: min(hits)], "stop"
        elif last:
            out.finish_reason = "length"
        delta, out.text = text[len(out.text):], text
        return Event(self.index, token, delta, logprob, out.finish_reason)


def encode_prompt(engine: Engine, prompt: str | Sequence[int]) -> list[int]:
    """A prompt's token ids: text is tokenized (with BOS, unless the text starts with BOS itself, as a chat
    template may write it), ids are taken as they are."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt: empty prompt")
        ids, bos = engine.tokenizer.encode(prompt, bos=False), engine.tokenizer.bos_id
        return ids if bos is not None and ids[:1] == [bos] else engine.tokenizer.encode(prompt)
    return list(prompt)


def make_requests(engine: Engine, prompts: Sequence[str | Sequence[int]],
                  params: SamplingParams | Sequence[SamplingParams], adapters: Sequence[int] | None) -> list[Request]:
    """A Request per prompt (text or token ids), with one params or one per prompt, and one adapter per prompt
    (None: the base model's)."""
    params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    adapters = list(adapters) if adapters is not None else [-1] * len(prompts)
    if not len(prompts) == len(params) == len(adapters):
        raise ValueError("prompts, params and adapters differ in length")
    encoded = [encode_prompt(engine, p) for p in prompts]
    return [Request(i, *args, engine) for i, args in enumerate(zip(encoded, params, adapters))]
