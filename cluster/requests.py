"""Client requests (hire.v1 GenerateRequest, JetStream DecodeRequest) checked and turned into engine work.

A bad field raises ValueError and a mode that is not implemented yet NotImplementedError, each
message starting with the field's name; transports map them to their status codes. The bounds of `Limits`
are checked first, before any work is done for a request (a prompt is measured before it is tokenized).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from hire.engine import Engine
from hire.request import encode_prompt
from hire.sampling import SamplingParams
from protos import inference_pb2 as pb
from protos import jetstream_pb2 as js

MODES = {pb.DECODING_MODE_PLAIN: "plain", pb.DECODING_MODE_SPECULATIVE: "speculative",
         pb.DECODING_MODE_TANDEM: "tandem"}


class UnknownModel(LookupError):
    """The request names a model this server does not serve (HTTP 404)."""


@dataclass(frozen=True)
class Limits:
    """What one request may carry (docs/serving.md, "Limits"); hire serve and serve-grpc take `--limit NAME=VALUE`,
    deploy/serve.yaml `limits: {NAME: VALUE}`. Left at 0, the first two follow the context length."""

    prompt_bytes: int = 0  # a text prompt's UTF-8 bytes (0: 32 per token of context)
    request_bytes: int = 0  # an HTTP request body or a gRPC request message (0: 8 x prompt_bytes + 64 KiB)
    stop_strings: int = 16  # stop strings in one request
    stop_bytes: int = 256  # each stop string's UTF-8 bytes
    stop_token_ids: int = 64  # stop token ids in one request

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"limit {f.name}: {value!r} is not a whole number >= 0")

    @classmethod
    def parse(cls, specs: Iterable[str] | Mapping[str, int] | None) -> Limits:
        """Limits from "NAME=VALUE" strings or a mapping; ValueError naming an unknown or bad one."""
        if specs is None:
            return cls()
        if not isinstance(specs, Mapping):
            pairs = [s.split("=", 1) for s in specs]
            if bad := [s for s, p in zip(specs, pairs) if len(p) != 2]:
                raise ValueError(f"limit: expected NAME=VALUE, got {bad[0]!r}")
            try:
                specs = {name.strip(): int(value) for name, value in pairs}
            except ValueError as e:
                raise ValueError(f"limit: {e}") from None
        names = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(specs) - names):
            raise ValueError(f"limit: unknown limit {unknown[0]!r}; one of {sorted(names)}")
        return cls(**specs)

    def for_context(self, max_len: int) -> Limits:
        """These limits with the ones left at 0 set for a context of `max_len` tokens."""
        prompt = self.prompt_bytes or 32 * max_len
        return dataclasses.replace(self, prompt_bytes=prompt, request_bytes=self.request_bytes or 8 * prompt + 2**16)

    def check_text(self, name: str, text: str) -> None:
        """ValueError naming `name` when `text` is over prompt_bytes (before any tokenizing)."""
        if len(text) > self.prompt_bytes or len(text.encode()) > self.prompt_bytes:  # a char is 1 to 4 bytes
            raise ValueError(f"{name}: {len(text.encode())} bytes, over the limit of {self.prompt_bytes} "
                             f"(limit prompt_bytes)")

    def check_stops(self, strings: Collection[str], ids: Collection[int]) -> None:
        if len(strings) > self.stop_strings:
            raise ValueError(f"stop: {len(strings)} stop strings, over the limit of {self.stop_strings} "
                             f"(limit stop_strings)")
        if long := [s for s in strings if len(s.encode()) > self.stop_bytes]:
            raise ValueError(f"stop: a stop string of {len(long[0].encode())} bytes, over the limit of "
                             f"{self.stop_bytes} (limit stop_bytes)")
        if len(ids) > self.stop_token_ids:
            raise ValueError(f"stop_token_ids: {len(ids)} ids, over the limit of {self.stop_token_ids} "
                             f"(limit stop_token_ids)")


@dataclass
class Served:
    """What a server serves: the engine, its LoRA adapters' and drafters' names, and the model's name. A server
    that decodes speculatively (workers.coordinator.CoordinatorEngine as the engine) names its drafter, its `mode`
    (SPECULATIVE, or TANDEM when the drafter is a tandem model) and `gamma`."""

    engine: Engine
    name: str
    adapters: Mapping[str, int] = field(default_factory=dict)  # name -> the engine's adapter index
    drafters: Collection[str] = ()
    mode: int = pb.DECODING_MODE_PLAIN
    gamma: int = 0
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        self.limits = self.limits.for_context(self.engine.max_len)


def model_info(served: Served, queue_size: int) -> pb.ModelInfo:
    """hire.v1 GetModelInfo's answer."""
    engine, tok = served.engine, served.engine.tokenizer
    return pb.ModelInfo(name=served.name, vocab_size=engine.cfg.vocab_size, context_length=engine.max_len,
                        slots=engine.slots, queue_size=queue_size, adapters=sorted(served.adapters),
                        drafters=sorted(served.drafters), modes=sorted({pb.DECODING_MODE_PLAIN, served.mode}),
                        hire=engine.cfg.sparse, dtype=engine.cfg.dtype,
                        bos_id=-1 if tok.bos_id is None else tok.bos_id,
                        eos_id=-1 if tok.eos_id is None else tok.eos_id)


class Work(NamedTuple):
    """A checked request, ready for Scheduler.submit."""

    prompt: list[int]
    params: SamplingParams
    adapter: int


def from_generate(msg: pb.GenerateRequest, served: Served) -> Work:
    """Check a hire.v1 request: its limits, prompt, decoding mode, adapter, sampling, and max_tokens within the
    context."""
    engine, limits = served.engine, served.limits
    limits.check_stops(msg.stop, msg.stop_token_ids)
    if msg.WhichOneof("prompt") == "tokens":
        prompt = list(msg.tokens.ids)
    else:
        limits.check_text("prompt", msg.text)
        prompt = encode_prompt(engine, msg.text)
    check_decoding(msg, served)
    if msg.hire and not engine.cfg.sparse:  # HiRE is the server's setting (hire serve --softmax/--ffn), not a call's
        raise NotImplementedError("hire: this server runs its model without HiRE (serve it with --softmax/--ffn, or "
                                  "a model whose folder recommends a HiRE setting: docs/hire.md)")
    if msg.adapter and msg.adapter not in served.adapters:
        raise ValueError(f"adapter: unknown adapter {msg.adapter!r}; loaded: {sorted(served.adapters) or 'none'}")
    adapter = served.adapters.get(msg.adapter, -1) if msg.adapter else -1
    engine.check_request(prompt, adapter)
    if any(not s for s in msg.stop):
        raise ValueError("stop: empty stop string")
    check_token_ids("stop_token_ids", msg.stop_token_ids, engine.cfg.vocab_size)
    room = engine.max_len - len(prompt)
    optional = {name: getattr(msg, name) for name in ("temperature", "top_p", "seed", "max_tokens")
                if msg.HasField(name)}
    params = SamplingParams(**{"max_tokens": room, **optional}, top_k=msg.top_k, stop_ids=tuple(msg.stop_token_ids),
                            stop_strings=tuple(msg.stop), logprobs=msg.logprobs, ignore_eos=msg.ignore_eos)
    check_max_tokens(params.max_tokens, len(prompt), engine.max_len)
    return Work(prompt, params, adapter)


def check_max_tokens(max_tokens: int, prompt: int, max_len: int) -> None:
    """ValueError naming max_tokens and the limit when `max_tokens` after a `prompt`-token prompt runs past the
    context."""
    if max_tokens > max_len - prompt:
        raise ValueError(f"max_tokens: {max_tokens} runs past the context: the prompt's {prompt} tokens leave "
                         f"{max_len - prompt} of {max_len}")


def check_decoding(msg: pb.GenerateRequest, served: Served) -> None:
    """Decoding is the server's: plain, or speculative with the drafter and γ it was started with (`hire serve
    --draft`). A request may leave mode, drafter and gamma out, or name what the server does; anything else is
    refused, naming the field. Speculative output is exactly the model's, so a plain request on a speculative
    server is served speculatively."""
    if msg.mode not in MODES:
        raise ValueError(f"mode: unknown decoding mode {msg.mode}")
    mode = MODES[msg.mode]
    if msg.drafter and msg.drafter not in served.drafters:
        raise ValueError(f"drafter: unknown drafter {msg.drafter!r}; loaded: {sorted(served.drafters) or 'none'}")
    if msg.mode == pb.DECODING_MODE_SPECULATIVE and not msg.drafter:
        raise ValueError("drafter: speculative decoding needs a drafter")
    if msg.gamma < 0 or (mode == "plain" and msg.gamma):
        raise ValueError(f"gamma: {msg.gamma} is not a draft length (> 0, speculative and tandem modes only)")
    if mode != "plain" and msg.mode != served.mode:
        does = ("decodes plainly (speculative decoding: hire serve --draft NAME)" if not served.drafters else
                f"runs {MODES[served.mode]} decoding with {', '.join(served.drafters)}")
        raise NotImplementedError(f"mode: {mode} decoding is not served here; this server {does}")
    if msg.gamma and msg.gamma != served.gamma:
        raise ValueError(f"gamma: this server drafts {served.gamma} tokens per block, not {msg.gamma}")


def check_token_ids(name: str, ids: Collection[int], vocab_size: int) -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{name}: token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")


def from_decode(msg: js.DecodeRequest, served: Served) -> Work:
    """Check a JetStream request: greedy, one sample, 0 < max_tokens within the context."""
    engine = served.engine
    if msg.num_samples > 1:
        raise NotImplementedError(f"num_samples: {msg.num_samples} samples per request are not supported; use 1")
    if msg.max_tokens <= 0:
        raise ValueError(f"max_tokens: must be > 0, got {msg.max_tokens}")
    if msg.WhichOneof("content") == "token_content":
        prompt = list(msg.token_content.token_ids)
    else:
        served.limits.check_text("prompt", msg.text_content.text)
        prompt = encode_prompt(engine, msg.text_content.text)
    engine.check_request(prompt)
    check_max_tokens(msg.max_tokens, len(prompt), engine.max_len)
    return Work(prompt, SamplingParams(temperature=0.0, max_tokens=msg.max_tokens), -1)
