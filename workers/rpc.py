"""What the internal gRPC services (protos/internal.proto) share: numpy arrays as bytes, sampling rows, error
status codes, message limits, and a server on a free port with standard health checking that answers only calls
carrying the deployment's secret (`authorization: Bearer SECRET`; workers.coordinator makes it and hands it to the
worker actors through Ray).

No jax at the top (see workers.shard): the workers import it once the actor process has started.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from hire.sampling import SamplingParams
from protos import internal_pb2 as pb
from workers.auth import SecretInterceptor

log = logging.getLogger(__name__)

# HTTP/2 keepalive pings every 5 s, a connection dead after 5 s without an answer: a call to a worker on a node cut
# off the network fails UNAVAILABLE within about 10 s instead of waiting for its deadline; servers allow the pings.
KEEPALIVE = [("grpc.keepalive_time_ms", 5000), ("grpc.keepalive_timeout_ms", 5000),
             ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
             ("grpc.http2.min_ping_interval_without_data_ms", 4000)]
DTYPES = ("bool", "int32", "float32")


def pack(a: Any) -> pb.Array:
    """A numpy (or jax) array as an Array message."""
    a = np.asarray(a)
    if a.dtype.name not in DTYPES:
        raise TypeError(f"cannot send dtype {a.dtype.name}; one of {DTYPES}")
    return pb.Array(data=np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes(),
                    shape=a.shape, dtype=a.dtype.name)


def unpack(m: pb.Array, name: str, shape: tuple[int | None, ...] | None = None,
           dtype: str | None = None) -> np.ndarray:
    """The array an Array message holds; ValueError naming `name` when it is missing, malformed, or not of `shape`
    (None for any size along an axis) and `dtype`."""
    if m.dtype not in DTYPES:
        raise ValueError(f"{name}: missing, or dtype {m.dtype!r} is not one of {DTYPES}")
    item = np.dtype(m.dtype).newbyteorder("<")
    if len(m.data) != item.itemsize * int(np.prod(m.shape)):
        raise ValueError(f"{name}: {len(m.data)} bytes do not hold a {m.dtype} array of shape {tuple(m.shape)}")
    if dtype is not None and m.dtype != dtype:
        raise ValueError(f"{name}: dtype {m.dtype}, expected {dtype}")
    if shape is not None and (len(shape) != len(m.shape) or any(w not in (None, g) for w, g in zip(shape, m.shape))):
        raise ValueError(f"{name}: shape {tuple(m.shape)}, expected {tuple('*' if w is None else w for w in shape)}")
    return np.frombuffer(m.data, item).astype(m.dtype).reshape(tuple(m.shape))


def sampling_message(params: SamplingParams) -> pb.Sampling:
    return pb.Sampling(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=params.seed)


def sampling_params(m: pb.Sampling) -> SamplingParams:
    """SamplingParams of a Sampling message (ValueError naming a bad field)."""
    return SamplingParams(temperature=m.temperature, top_k=m.top_k, top_p=m.top_p, seed=m.seed)


def handler(method: Callable) -> Callable:
    """A servicer method whose ValueError (a bad request) answers INVALID_ARGUMENT with its message, its
    hire.engine_api.EngineUnavailable (a host of its shard group died or hangs) UNAVAILABLE, and whose other exceptions
    answer INTERNAL naming them (and are logged)."""
    @functools.wraps(method)
    def wrapped(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception as e:
            from hire.engine_api import EngineUnavailable  # here, not at the top: see the module's docstring

            if isinstance(e, EngineUnavailable):
                context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
    return wrapped


def message_limit(slots: int, max_len: int, gamma: int, vocab: int = 0, hidden: int = 0) -> int:
    """The largest message of a speculative deployment, in bytes, with room for its small fields: draft
    distributions q [slots, γ, vocab] (drafter to verifier) or the large model's hidden states, `hidden` floats per
    position (layers read x width), at a prefill [1, max_len] or a block [slots, γ + 1] (to the drafter); float32."""
    return 4 * max(slots * gamma * vocab, max(max_len, slots * (gamma + 1)) * hidden) + 16 * max_len + 2**20


def options(limit: int) -> list[tuple[str, int]]:
    """Channel and server options: messages received up to `limit` bytes, and keepalive."""
    return [("grpc.max_receive_message_length", limit), *KEEPALIVE]


def serve(add: Callable[[grpc.Server], None], service: str, secret: str, limit: int,
          host: str = "127.0.0.1") -> tuple[grpc.Server, int]:
    """A started gRPC server on a free port of `host` with the services `add` registers, health checking (`service`
    and "" SERVING), every other call refused UNAUTHENTICATED without `secret`, requests up to `limit` bytes (larger
    ones RESOURCE_EXHAUSTED); the server and its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=options(limit),
                         interceptors=[SecretInterceptor(secret)])
    add(server)
    checks = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    port = server.add_insecure_port(f"{host}:0")
    server.start()
    for name in ("", service):
        checks.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port


def check_slot(slot: int, slots: int) -> int:
    if not 0 <= slot < slots:
        raise ValueError(f"slot: {slot} is not in [0, {slots})")
    return slot


def rows_mask(m: pb.Array, slots: int, name: str = "rows") -> np.ndarray:
    return unpack(m, name, (slots,), "bool")
