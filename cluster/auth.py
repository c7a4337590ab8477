"""Who may call the servers: API keys (bearer tokens) and TLS credentials.

One check for every door: workers.auth.ApiKeys (constant time). hire serve's ingress applies it to HTTP requests and
to the gRPC methods behind Serve's proxy; `ApiKeyInterceptor` to every call of the standalone gRPC server
(`hire serve-grpc`), workers.auth.SecretInterceptor to the internal worker RPC (a per-deployment secret). Standard
health checks (grpc.health.v1.Health, HTTP /health) need no key, so that load balancers and orchestrators can probe.
"""
from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path

import grpc

from workers.auth import OPEN_METHODS, ApiKeys, refusal

ENV = "HIRE_API_KEY"  # one key, or several separated by commas
REFUSED = "missing or wrong API key: send 'authorization: Bearer KEY'"
_KEY = re.compile(r"[!-~]+")  # visible ASCII: what an HTTP header and gRPC metadata carry unchanged


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
        return refusal(handler, refuse)
