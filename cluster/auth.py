"""Who may call the servers: API keys (bearer tokens) and TLS credentials.

One check for every door: `ApiKeys.allows` reads an `Authorization: Bearer KEY` value (the scheme in any case, as
RFC 6750 has it) and compares KEY with every accepted key in constant time. hire serve's ingress applies it to HTTP
requests and to the gRPC methods behind Serve's proxy; `ApiKeyInterceptor` to every call of the standalone gRPC server
(`hire serve-grpc`), `SecretInterceptor` to the internal worker RPC (a per-deployment secret). Standard health checks
(grpc.health.v1.Health, HTTP /health) need no key, so that load balancers and orchestrators can probe.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path

import grpc

ENV = "HIRE_API_KEY"  # one key, or several separated by commas
OPEN_METHODS = ("/grpc.health.v1.Health/",)
REFUSED = "missing or wrong API key: send 'authorization: Bearer KEY'"
_BEARER = re.compile(r"[ \t]*bearer[ \t]+(\S+)[ \t]*", re.IGNORECASE)
_KEY = re.compile(r"[!-~]+")  # visible ASCII: what an HTTP header and gRPC metadata carry unchanged
HANDLERS = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}


def parse_keys(values: Iterable[str]) -> list[str]:
    """The keys in `values` (each one key or several separated by commas); ValueError for a key with spaces or
    characters a header cannot carry."""
    keys = [k.strip() for value in values for k in value.split(",") if k.strip()]
    for key in keys:
        if not _KEY.fullmatch(key):
            raise ValueError("api key: a key is visible ASCII characters without spaces or commas")
    return keys


def env_keys() -> list[str]:
    """The keys in $HIRE_API_KEY."""
    return parse_keys([os.environ.get(ENV, "")])


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


def loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, keys: Sequence[str], insecure: bool) -> None:
    """ValueError when a server would listen beyond this machine with no key and `insecure` is not set."""
    if not keys and not insecure and not loopback(host):
        raise ValueError(f"host: {host} lets anyone who can reach it use the server; give an API key (--api-key or "
                         f"${ENV}), or say --insecure")


def server_credentials(cert: str | Path, key: str | Path,
                       client_ca: str | Path | None = None) -> grpc.ServerCredentials:
    """TLS with a PEM certificate chain and key; with `client_ca`, clients must present a certificate it signed."""
    ca = Path(client_ca).read_bytes() if client_ca else None
    return grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())], root_certificates=ca,
                                       require_client_auth=ca is not None)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Answers UNAUTHENTICATED unless the call carries an accepted key (health checks exempt)."""

    def __init__(self, keys: ApiKeys):
        self.keys = keys

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS) or \
                self.keys.allows_metadata(details.invocation_metadata):
            return handler

        async def refuse(request, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSED)
        return _refusal(handler, refuse)


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
        return _refusal(handler, refuse)


def _refusal(handler: grpc.RpcMethodHandler, refuse: Callable) -> grpc.RpcMethodHandler:
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
