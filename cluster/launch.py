"""`hire serve`: start (or join) Ray, start Serve's HTTP and gRPC proxies, deploy the application, wait."""
from __future__ import annotations

import logging
import signal
import threading

import ray
from ray import serve

from cluster.serve_app import GRPC_SERVICERS, build

log = logging.getLogger(__name__)
APP = "hire"


def start(args: dict, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 50051,
          address: str | None = None, num_cpus: int | None = None) -> None:
    """Deploy the application with EngineServer keyword arguments `args` (plus `replicas`) and return when it
    answers. `address` joins a running Ray cluster ("auto" finds a local one); by default a local Ray starts
    inside this process and ends with it.
    """
    if not ray.is_initialized():
        # "local": a Ray of its own, even where another runs on this machine (None would join the latest one)
        ray.init(address=address or "local", num_cpus=num_cpus if address is None else None, include_dashboard=False,
                 namespace="hire")
    serve.start(http_options={"host": host, "port": http_port},
                grpc_options={"port": grpc_port, "grpc_servicer_functions": list(GRPC_SERVICERS)})
    serve.run(build(args), name=APP, route_prefix="/")


def stop() -> None:
    serve.shutdown()
    ray.shutdown()


def serve_until_signal(args: dict, **where) -> None:
    """`start`, then serve until SIGINT or SIGTERM, then shut Serve (and a Ray started here) down."""
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    start(args, **where)
    log.info("serving: HTTP http://%s:%d/v1, gRPC %s:%d; Ctrl-C stops", where.get("host", "127.0.0.1"),
             where.get("http_port", 8000), where.get("host", "127.0.0.1"), where.get("grpc_port", 50051))
    done.wait()
    log.info("stopping")
    stop()
