"""Faults to inject into a running hire cluster, and what to watch while they happen.

- `under_load`: drive a load with cluster.loadtest's driver, inject a fault part way, and report the run with
  `recovery`: what failed (by status), when the last failure ended, when the service answered again, and the
  longest time without a completed request.
- `nodes`: Ray's view of its nodes (from the GCS, no driver needed).
- `running`: how many replicas of a Serve deployment serve; `actors`, `replicas`: the live actors of a class
  or of a Serve deployment, with process id and node address (these need a driver: `ray.init` on a node of
  the cluster).
- `kill`: SIGKILL a process, as a crash would; `rss`: a process's resident memory; `cpu_share`: how busy it is.
- `wait_for`: poll a condition with a deadline, so no test or script waits forever.

`python -m cluster.faults under-load|nodes|replicas|kill-replica|rss` does the same from a shell
(deploy/local-cluster.sh uses it; docs/loadtest.md's fault measurements are its output).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TypeVar

import psutil
import ray

from cluster import loadtest as lt

T = TypeVar("T")


@dataclass(frozen=True)
class Actor:
    """A Ray actor (a Serve replica, a shard host, ...): its name, process, the node it runs on, its state."""

    name: str
    pid: int
    ip: str
    state: str


def recovery(records: list[lt.Record], fault_at: float) -> dict:
    """What a fault at `fault_at` (seconds on the records' clock) cost: failures by status, when the last one
    ended (`last_error_s`) and when a request next succeeded after it (`back_s`), both from the fault, the
    longest time after the fault without a successful completion (`longest_gap_s`), and successful answers
    with fewer tokens than asked for (`short`: a loss no status reported; hire.v1 and HTTP targets ignore EOS,
    so a full answer has them all)."""
    ok_ends = sorted(r.start + r.end for r in records if r.status == "OK" and r.arrivals)
    failed = [r for r in records if r.status != "OK" or not r.arrivals]
    last_error = max((r.start + r.end for r in failed if r.start + r.end >= fault_at), default=None)
    after = max(fault_at, last_error or fault_at)
    back = next((t for t in ok_ends if t >= after), None)
    short = sum(r.tokens < r.wanted for r in records if r.status == "OK")
    return {"fault_at_s": round(fault_at, 3), "failed": len(failed),
            "last_error_s": None if last_error is None else round(last_error - fault_at, 3),
            "back_s": None if back is None else round(back - fault_at, 3),
            "longest_gap_s": round(lt.longest_gap(records, fault_at), 3),
            "short": short}


async def under_load(url: str, inject: Callable[[], object], at: float, duration: float, load: lt.Load,
                     workload: lt.Workload, timeout: float, window: float | None = None
                     ) -> tuple[dict, list[lt.Record]]:
    """Drive `load` against `url` for `duration` s (each request with a `timeout` s deadline), run `inject` in
    a thread `at` s in; the run's report with `recovery` (times from when `inject` was called; `fault_took_s`
    says how long it ran) and per-`window` figures if set, and the records."""
    target = lt.connect(url, timeout=timeout)
    try:
        if workload.prompts is None and (vocab := await target.model_vocab()):
            workload.vocab = vocab
        t0 = time.perf_counter()

        async def fault() -> tuple[float, float]:
            await asyncio.sleep(at)
            start = time.perf_counter()
            await asyncio.to_thread(inject)
            return start - t0, time.perf_counter() - start

        task = asyncio.create_task(fault())
        records, seconds = await lt.drive(target, workload.items(), load, None, duration, workload.seed, False, t0)
        fault_at, took = await task
    finally:
        await target.close()
    outcome = {**recovery(records, fault_at), "fault_took_s": round(took, 3)}
    return {**lt.summarize(records, seconds, load, lt.Slo(), window), "recovery": outcome}, records


def nodes(address: str, timeout: float = 10.0) -> list[tuple[str, str]]:
    """(node IP, "ALIVE" or "DEAD") for every node the GCS at `address` knows, as it knows them."""
    from ray._raylet import GcsClient

    infos = GcsClient(address=address).get_all_node_info(timeout=timeout).values()
    return sorted((info.node_manager_address, "ALIVE" if info.state == 0 else "DEAD") for info in infos)


def actors(class_name: str, alive: bool = True) -> list[Actor]:
    """The actors of class `class_name` (Serve names a replica's class ServeReplica:APP:DEPLOYMENT) on the
    connected Ray cluster, the live ones only if `alive`, by node address."""
    from ray._private import state

    found = state.actors().values()
    return sorted((Actor(a["Name"], a["Pid"], a["Address"]["IPAddress"], a["State"]) for a in found
                   if a["ActorClassName"] == class_name and (a["State"] == "ALIVE" or not alive)),
                  key=lambda a: (a.ip, a.name))


def replicas(deployment: str = "engine", app: str = "hire", alive: bool = True) -> list[Actor]:
    """The actors of Serve deployment `deployment` of application `app`."""
    return actors(f"ServeReplica:{app}:{deployment}", alive)


def running(deployment: str = "engine", app: str = "hire") -> int:
    """How many replicas of the Serve deployment are up and serving (RUNNING), per Serve's controller."""
    from ray import serve

    application = serve.status().applications.get(app)
    found = application and application.deployments.get(deployment)
    return found.replica_states.get("RUNNING", 0) if found else 0


def kill(pid: int) -> None:
    """SIGKILL `pid`: the process ends at once, with no chance to clean up, as in a crash."""
    os.kill(pid, signal.SIGKILL)


def rss(pid: int) -> int:
    """Resident memory of `pid` in bytes."""
    return psutil.Process(pid).memory_info().rss


def cpu_share(pid: int, seconds: float = 0.5) -> float:
    """The share of one core `pid` uses over the next `seconds`: high for a replica that is decoding, about 0
    for an idle one."""
    process = psutil.Process(pid)
    before = sum(process.cpu_times()[:2])
    time.sleep(seconds)
    return (sum(process.cpu_times()[:2]) - before) / seconds


def descendant(pid: int, match: str) -> int | None:
    """The first process under `pid` whose command line contains `match` (Ray titles an actor's process
    `ray::CLASS`, e.g. ray::ServeReplica:hire:engine), or None."""
    return next((c.pid for c in psutil.Process(pid).children(recursive=True)
                 if match in " ".join(c.cmdline())), None)


def wait_for(condition: Callable[[], T], timeout: float, what: str, every: float = 0.5) -> T:
    """Poll `condition` until it returns something true and return that; TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        if value := condition():
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cluster.faults", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("under-load", help="drive a load, run a fault command part way, print the report as JSON")
    p.add_argument("--target", required=True, help="grpc://HOST:PORT, jetstream://HOST:PORT or http://HOST:PORT")
    p.add_argument("--fault", required=True, help="the command that injects the fault, e.g. "
                   "'deploy/local-cluster.sh cut w1'")
    p.add_argument("--at", type=float, default=10.0, help="seconds into the load")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--concurrency", type=int, default=8, help="closed-loop clients")
    p.add_argument("--input-len", default="16")
    p.add_argument("--output-len", default="64")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request deadline (s): a hang shows as TIMEOUT")
    p.add_argument("--window", type=float, default=5.0, help="seconds per window of the report's `windows`")
    p = sub.add_parser("nodes", help="each node's IP and ALIVE/DEAD, one per line")
    p.add_argument("--address", required=True, help="the GCS, HOST:PORT")
    for name, text in (("replicas", "a deployment's live replicas (or --class's actors) as JSON"),
                       ("running", "how many replicas of the deployment are RUNNING"),
                       ("kill-replica", "SIGKILL one replica (or --class actor), on node --ip if given; print it")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--address", default="auto", help="the Ray cluster to join as a driver")
        p.add_argument("--deployment", default="engine")
        p.add_argument("--app", default="hire")
        p.add_argument("--class", dest="class_name", help="actors of this class instead, e.g. ShardWorker")
        p.add_argument("--ip", help="only those on the node with this address")
    p = sub.add_parser("rss", help="resident memory in bytes of PID, or of its descendant matching --match")
    p.add_argument("pid", type=int)
    p.add_argument("--match", help="e.g. ServeReplica:hire:engine")
    args = parser.parse_args(argv)
    if args.command == "under-load":
        workload = lt.Workload(lt.Dist(args.input_len), lt.Dist(args.output_len))
        fault = shlex.split(args.fault)  # its output goes to stderr: stdout is the report's
        report, _ = asyncio.run(under_load(args.target, lambda: subprocess.run(fault, check=True, stdout=sys.stderr),
                                           args.at, args.duration, lt.Load(concurrency=args.concurrency), workload,
                                           args.timeout, args.window))
        print(json.dumps({"target": args.target, "fault": args.fault, **report}, indent=1))
    elif args.command == "nodes":
        for ip, node_state in nodes(args.address):
            print(ip, node_state)
    elif args.command == "rss":
        pid = descendant(args.pid, args.match) if args.match else args.pid
        if pid is None:
            raise SystemExit(f"no process under {args.pid} matches {args.match!r}")
        print(pid, rss(pid))
    else:
        ray.init(address=args.address, logging_level="ERROR", log_to_driver=False)
        if args.command == "running":
            print(running(args.deployment, args.app))
            return
        what = args.class_name or f"ServeReplica:{args.app}:{args.deployment}"
        found = [a for a in actors(what) if args.ip in (None, a.ip)]
        if args.command == "kill-replica":
            if not found:
                raise SystemExit(f"no live {what} {args.ip or ''}")
            kill(found[0].pid)
            found = found[:1]
        print(json.dumps([asdict(r) for r in found]))


if __name__ == "__main__":
    main()
