"""`hire serve`: start (or join) Ray, start Serve's HTTP and gRPC proxies, deploy the application, wait; on SIGTERM
or Ctrl-C stop taking requests, let those in flight finish, shut down."""
from __future__ import annotations

import logging
import os
import signal
import threading
import time

import ray
from ray import serve
from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

from cluster.auth import check_exposure, env_keys, loopback
from cluster.config import ServeConfig
from cluster.serve_app import GRPC_SERVICERS, build

log = logging.getLogger(__name__)
APP = "hire"
GRPC_MESSAGE = 4 * 2**20  # Serve's gRPC proxy takes messages up to this (gRPC's default), or request_bytes if larger
PROXY_DRAINED_AFTER_S = "0.2"  # a proxy of a Ray started here counts as drained this long after its last call ended


def start(config: ServeConfig) -> None:
    """Deploy the application of `config` and return when it answers, its proxies on `config.host`'s http_port and
    grpc_port. `config.address` joins a running Ray cluster ("auto" finds a local one); by default a local Ray starts
    inside this process and ends with it.

    With no API key (`config.api_keys` or $HIRE_API_KEY) a host beyond loopback needs `config.insecure`.
    """
    check_exposure(config.host, config.api_keys or env_keys(), config.insecure)
    config = config.replace(insecure=config.insecure or loopback(config.host))
    init_ray(config)
    serve.start(http_options={"host": config.host, "port": config.http_port},
                grpc_options={"port": config.grpc_port, "grpc_servicer_functions": list(GRPC_SERVICERS)})
    serve.run(build(config), name=APP, route_prefix="/")


def init_ray(config: ServeConfig) -> None:
    """Join Ray at `config.address`, or start a local Ray in this process (unless one is connected already)."""
    if ray.is_initialized():
        return
    # the proxy processes Ray starts here read their gRPC message limit from the environment
    limit = max(GRPC_MESSAGE, config.limits.request_bytes)
    os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(limit))
    os.environ.setdefault("RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S", PROXY_DRAINED_AFTER_S)  # Serve's default: 30 s
    # "local": a Ray of its own, even where another runs on this machine (None would join the latest one)
    ray.init(address=config.address or "local", num_cpus=config.num_cpus if config.address is None else None,
             include_dashboard=False, namespace="hire")


def drain(grace: float, cut: threading.Event | None = None) -> list[int] | None:
    """Have every ingress replica stop taking requests (health NOT_SERVING, new ones refused) and wait up to `grace`
    seconds for those in flight, then for Serve's proxies to deliver what they still hold; the number each ingress
    replica still had running, or None when `cut` was set first."""
    deadline = time.monotonic() + grace
    response = serve.get_app_handle(APP).broadcast("drain", grace)
    out: list = []
    waiter = threading.Thread(target=lambda: out.append(response.results(timeout_s=grace + 30,
                                                                          return_exceptions=True)), daemon=True)
    waiter.start()
    while waiter.is_alive() and not (cut is not None and cut.wait(0.1)):
        waiter.join(0.1)
    if not out:
        return None
    drain_proxies(deadline, cut)
    return [n for n in out[0] if isinstance(n, int)]


def drain_proxies(deadline: float, cut: threading.Event | None = None) -> None:
    """Wait until Serve's proxies have ended every call they took, or `deadline`: an ingress replica is done with a
    stream once it has handed on its last message, which a proxy may still be sending to a slow reader."""
    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    proxies = list(ray.get(controller.get_proxies.remote()).values())
    ray.get([p.update_draining.remote(True) for p in proxies])  # the controller leaves a healthy proxy's flag be
    while proxies and time.monotonic() < deadline and not (cut is not None and cut.is_set()):
        proxies = [p for p, drained in zip(proxies, ray.get([p.is_drained.remote() for p in proxies])) if not drained]
        time.sleep(0.05)


def stop() -> None:
    serve.shutdown()
    ray.shutdown()


def serve_until_signal(config: ServeConfig) -> None:
    """`hire serve`: `start` the `ServeConfig.checked` config, then serve until SIGINT or SIGTERM; then `drain` for up
    to `config.grace` seconds (a second signal cuts it short) and shut Serve (and a Ray started here) down."""
    config = config.checked()
    stopping, cut = threading.Event(), threading.Event()

    def handle(*_) -> None:
        (cut if stopping.is_set() else stopping).set()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handle)
    init_ray(config)
    signal.signal(signal.SIGTERM, handle)  # again: a Ray started here put its own (kill everything, exit 1)
    start(config)
    log.info("serving: HTTP http://%s:%d/v1, gRPC %s:%d; Ctrl-C stops", config.host, config.http_port, config.host,
             config.grpc_port)
    stopping.wait()
    log.info("stopping: new requests are refused, those in flight have %.0f s (a second signal stops now)",
             config.grace)
    left = drain(config.grace, cut)
    log.info("stopping: %s", "cut short" if left is None else f"{sum(left)} requests still running are cut")
    stop()
