"""Engine events turned into response messages: hire.v1 GenerateResponse and JetStream DecodeResponse.

A streamed message carries every token that was ready when it was sent (one or more), so a client
slower than the engine receives fewer, larger messages rather than falling behind.
"""
from __future__ import annotations

import uuid
from collections.abc import Sequence

from hire.request import Event, Request
from protos import inference_pb2 as pb
from protos import jetstream_pb2 as js

FINISH = {None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


def request_id(msg: pb.GenerateRequest) -> str:
    """The client's request id, or a fresh one."""
    return msg.request_id or uuid.uuid4().hex


def usage(req: Request) -> pb.Usage:
    out = req.out
    return pb.Usage(prompt_tokens=len(out.prompt_tokens), completion_tokens=len(out.tokens),
                    time_to_first_token=out.time_to_first_token, seed=req.params.seed)


def stream_response(batch: Sequence[Event], req: Request, request_id: str) -> pb.GenerateResponse:
    """One streamed message for `batch`; the last of a request carries its finish reason and usage.

    A stop token (EOS or a stop id) is not returned, only the text its arrival released.
    """
    events = [e for e in batch if not e.stop_token]
    finish = batch[-1].finish_reason
    return pb.GenerateResponse(request_id=request_id, token_ids=[e.token for e in events],
                               text="".join(e.text for e in batch),
                               logprobs=[e.logprob for e in events] if req.params.logprobs else [],
                               finish_reason=FINISH[finish], usage=usage(req) if finish else None)


def full_response(req: Request, request_id: str) -> pb.GenerateResponse:
    """The whole completion of a finished request."""
    out = req.out
    return pb.GenerateResponse(request_id=request_id, token_ids=out.tokens, text=out.text, logprobs=out.logprobs,
                               finish_reason=FINISH[out.finish_reason], usage=usage(req))


def decode_response(msg: pb.GenerateResponse, text: bool) -> js.DecodeResponse | None:
    """A JetStream stream message (ids, and text for text requests) or None when there is nothing to send."""
    if not msg.token_ids and not (text and msg.text):
        return None
    sample = js.DecodeResponse.StreamContent.Sample(text=msg.text if text else "", token_ids=msg.token_ids)
    return js.DecodeResponse(stream_content=js.DecodeResponse.StreamContent(samples=[sample]))
