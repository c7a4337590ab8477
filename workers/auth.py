"""Bearer keys on gRPC: the constant-time check (`ApiKeys`), the metadata a client sends (`bearer`, `WithKey`), and
`SecretInterceptor`, which lets only calls carrying the deployment's secret into the internal worker RPC.

One check for every door: `ApiKeys.allows` reads an `Authorization: Bearer KEY` value (the scheme in any case, as
RFC 6750 has it) and compares KEY with every accepted key in constant time; cluster.auth builds the public servers'
checks on it. Standard health checks (grpc.health.v1.Health) need no key, so that load balancers and orchestrators
can probe.
"""
from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Sequence

import grpc

OPEN_METHODS = ("/grpc.health.v1.Health/",)
_BEARER = re.compile(r"[ \t]*bearer[ \t]+(\S+)[ \t]*", re.IGNORECASE)
HANDLERS = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}


class ApiKeys:
    """The keys a server accepts."""

    def __init__(self, keys: Iterable[str]):
        keys = list(keys)
        if not keys or not all(keys):
            raise ValueError("api key: an empty key would let anyone in")
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def allows(self, authorization: str | bytes | None) -> bool:
        """Whether an Authorization header value is "Bearer KEY" with an accepted KEY. Digests of equal length are
        compared, every one of them, so the time taken tells nothing of the keys."""
        if isinstance(authorization, bytes):
            authorization = authorization.decode("latin-1")
        given = _BEARER.fullmatch(authorization or "")
        digest = hashlib.sha256(given.group(1).encode() if given else b"").digest()
        found = False
        for expected in self._digests:
            found |= hmac.compare_digest(digest, expected)
        return found and given is not None

    def allows_metadata(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        """Whether gRPC invocation metadata carries an accepted key."""
        return self.allows(next((v for k, v in metadata or () if k == "authorization"), None))


class SecretInterceptor(grpc.ServerInterceptor):
    """The synchronous servers' check (the internal worker RPC): UNAUTHENTICATED unless the call carries the
    deployment's secret (health checks exempt)."""

    def __init__(self, secret: str):
        self.keys = ApiKeys([secret])

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS) or \
                self.keys.allows_metadata(details.invocation_metadata):
            return handler

        def refuse(request, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong deployment secret")
        return refusal(handler, refuse)


def refusal(handler: grpc.RpcMethodHandler, refuse: Callable) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s shape that only runs `refuse`."""
    make = HANDLERS[handler.request_streaming, handler.response_streaming]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries `key`."""
    return (("authorization", f"Bearer {key}"),)


class WithKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor, grpc.StreamUnaryClientInterceptor,
              grpc.StreamStreamClientInterceptor):
    """Sends `key` with every call of a channel: `grpc.intercept_channel(channel, WithKey(key))`."""

    def __init__(self, key: str):
        self.metadata = bearer(key)

    def _call(self, continuation: Callable, details: grpc.ClientCallDetails, request):
        return continuation(details._replace(metadata=[*(details.metadata or ()), *self.metadata]), request)

    intercept_unary_unary = intercept_unary_stream = intercept_stream_unary = intercept_stream_stream = _call
