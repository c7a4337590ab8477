"""Client requests (hire.v1 GenerateRequest, JetStream DecodeRequest) checked and turned into engine work.

A bad field raises ValueError and a mode that is not implemented yet NotImplementedError, each
message starting with the field's name; transports map them to their status codes.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from hire.engine import Engine
from hire.generate import encode_prompt
from hire.sampling import SamplingParams
from protos import inference_pb2 as pb
from protos import jetstream_pb2 as js

MODES = {pb.DECODING_MODE_PLAIN: "plain", pb.DECODING_MODE_SPECULATIVE: "speculative",
         pb.DECODING_MODE_TANDEM: "tandem"}


@dataclass
class Served:
    """What a server serves: the engine, its LoRA adapters' and drafters' names, and the model's name. A server
    that decodes speculatively (cluster.coordinator.Coordinator as the engine) names its drafter, its `mode`
    (SPECULATIVE, or TANDEM when the drafter is a tandem model) and `gamma`."""

    engine: Engine
    name: str
    adapters: Mapping[str, int] = field(default_factory=dict)  # name -> the engine's adapter index
    drafters: Collection[str] = ()
    mode: int = pb.DECODING_MODE_PLAIN
    gamma: int = 0


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
    """Check a hire.v1 request: prompt, decoding mode, adapter, sampling, and max_tokens within the context."""
    engine = served.engine
    if msg.WhichOneof("prompt") == "tokens":
        prompt = list(msg.tokens.ids)
    else:
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
    if params.max_tokens > room:
        raise ValueError(f"max_tokens: {params.max_tokens} runs past the context: the prompt's {len(prompt)} tokens "
                         f"leave {room} of {engine.max_len}")
    return Work(prompt, params, adapter)


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
    """Check a JetStream request: greedy, max_tokens > 0 and cut at the end of the context, one sample."""
    engine = served.engine
    if msg.num_samples > 1:
        raise NotImplementedError(f"num_samples: {msg.num_samples} samples per request are not supported; use 1")
    if msg.WhichOneof("content") == "token_content":
        prompt = list(msg.token_content.token_ids)
    else:
        prompt = encode_prompt(engine, msg.text_content.text)
    engine.check_request(prompt)
    if msg.max_tokens <= 0:
        raise ValueError(f"max_tokens: must be > 0, got {msg.max_tokens}")
    return Work(prompt, SamplingParams(temperature=0.0, max_tokens=msg.max_tokens), -1)
