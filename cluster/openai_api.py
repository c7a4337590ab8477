"""The OpenAI-compatible HTTP API's messages: requests checked and turned into hire.v1 requests, and
hire.v1 responses turned into OpenAI completion and chat completion bodies and stream chunks.

Checking is split as in the gRPC server: this module refuses what the OpenAI schema allows but hire
does not run (n > 1, penalties, echo, prompt batches), naming the field; the engine checks the rest
(prompt length, sampling ranges, stop ids) when the request arrives, with the same field names.
Beyond OpenAI's fields, requests may carry vLLM's `top_k`, `stop_token_ids` and `ignore_eos`.
"""
from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cluster.requests import UnknownModel
from hire.chat import ChatTemplate, chat_prompt
from protos import inference_pb2 as pb

FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat runs to a stop or the context's end


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """The fields completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int]
    logprobs: int | None = None
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = ""  # text, or OpenAI's content parts (text ones only)


class ChatRequest(Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


def to_generate(body: CompletionRequest | ChatRequest, model: str, adapters: list[str],
                template: ChatTemplate | None = None) -> pb.GenerateRequest:
    """The hire.v1 request for an OpenAI one. `model` is the served model's name; an adapter name selects it.
    Chat messages become a prompt by the model's chat `template`, or in hire's plain format (hire.chat)."""
    if body.model != model and body.model not in adapters:
        raise UnknownModel(f"model: {body.model!r} is not served here; models: {[model, *adapters]}")
    for name, default in (("n", 1), ("presence_penalty", 0.0), ("frequency_penalty", 0.0)):
        if getattr(body, name) != default:
            raise NotImplementedError(f"{name}: only {default} is supported")
    msg = pb.GenerateRequest(ignore_eos=body.ignore_eos, adapter=body.model if body.model != model else "")
    msg.stop.extend([body.stop] if isinstance(body.stop, str) else body.stop or [])
    for name in ("temperature", "top_p", "seed", "top_k", "stop_token_ids"):
        put(msg, name, getattr(body, name))
    if isinstance(body, ChatRequest):
        if body.top_logprobs:
            raise NotImplementedError("top_logprobs: only the sampled token's log-probability is available")
        msg.text = chat_prompt(template, [m.model_dump() for m in body.messages])
        msg.logprobs = body.logprobs
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    else:
        if body.echo:
            raise NotImplementedError("echo: echoing the prompt is not supported")
        if body.logprobs not in (None, 0, 1):
            raise NotImplementedError("logprobs: only the sampled token's log-probability is available (0 or 1)")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise NotImplementedError("prompt: one prompt per request; send a batch as concurrent requests")
            prompt = prompt[0]
        if isinstance(prompt, str):
            msg.text = prompt
        else:
            put(msg.tokens, "ids", prompt, "prompt")
        msg.logprobs = body.logprobs is not None
        max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETION_MAX_TOKENS
    put(msg, "max_tokens", max_tokens)
    return msg


def put(msg, name: str, value, field: str | None = None) -> None:
    """Set (or extend) a field unless `value` is None; a value the field cannot hold is a ValueError naming it."""
    if value is None:
        return
    try:
        if isinstance(value, list):
            getattr(msg, name).extend(value)
        else:
            setattr(msg, name, value)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{field or name}: {e}") from None


def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def usage(msg: pb.GenerateResponse) -> dict:
    u = msg.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens}


def logprobs(texts: list[str], values: list[float], chat: bool) -> dict:
    """OpenAI's logprobs object for the sampled tokens `texts` (only the sampled one at each position)."""
    if chat:
        return {"content": [{"token": t, "logprob": v, "bytes": list(t.encode()), "top_logprobs": []}
                            for t, v in zip(texts, values)]}
    return {"tokens": texts, "token_logprobs": values, "top_logprobs": None, "text_offset": None}


def choice(msg: pb.GenerateResponse, chat: bool, stream: bool, first: bool, logprob: dict | None) -> dict:
    """One choice of a response body (the whole completion) or of a stream chunk (its delta)."""
    out = {"index": 0, "finish_reason": FINISH.get(msg.finish_reason), "logprobs": logprob}
    if not chat:
        out["text"] = msg.text
    elif stream:
        out["delta"] = {"role": "assistant", "content": msg.text} if first else {"content": msg.text}
    else:
        out["message"] = {"role": "assistant", "content": msg.text}
    return out


def body(request_id: str, model: str, chat: bool, stream: bool, choices: list[dict]) -> dict:
    kind = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": choices}


def error(message: str, kind: str, param: str | None = None) -> dict:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def field_of(message: str) -> str | None:
    """The field a hire error message starts with ("max_tokens: ..." or "temperature must ...")."""
    head = re.match(r"([a-z_]+)[: ]", message)
    return head.group(1) if head else None
