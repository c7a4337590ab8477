"""A model sharded over several Ray hosts that run one JAX program, behind hire.engine.Engine's interface.

`ShardGroup` places one `workers.shard.ShardWorker` per host (a placement group, each bundle pinned to a node:
one host per node while there are enough, else several on a node with room), starts jax.distributed among them
(rank 0 is the coordinator) and broadcasts each call to all of them, one call at a time, so every process runs the same
jitted functions in the same order. `ShardedEngine` gives the group the engine's interface: hire.scheduler
and hire.generate drive it unchanged. Decode states and prefilled prompts stay on the hosts; the driver
holds keys, and rank 0's copy of the (replicated) tokens comes back.

Health: `ping` answers from a thread of its own while a call runs, and a call that lasts pings every host each
`heartbeat` s: a host that died, failed or missed a heartbeat (`heartbeat_timeout`), or a call that outlasts
`call_timeout`, raises ShardGroupError (a hire.engine_api.EngineUnavailable, one line for clients) within seconds and
marks the group broken. `ShardedEngine.recover()` rebuilds the whole group (a JAX program cannot lose a member) on
the hosts that can be placed now, leaving out a node that died or does not answer, so the model is re-sharded onto
the hosts left (two to one, four to three) when they hold it, and fails at once when they do not; between requests
`recover(grow=True)` grows it back to the configured count once a node returns. hire.scheduler calls it, retries
the requests that had no token yet and ends the streams cut mid-way. A rebuilt group warms up its smallest prompt
bucket only, so that it serves sooner; a larger bucket's programs are loaded (from the compilation cache) by the first
call that needs them. `ShardGroup.start` logs the seconds each step of a (re)start took.
`python -m cluster.bench_shards bench` measures decode over the hosts against one process,
`python -m cluster.bench_shards restart` the time a rebuild takes (docs/cluster.md).
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError, RayError, RayTaskError
from ray.util.placement_group import get_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from hire.checkpoint import detect_format, model_folder, resolve_model, with_hire
from hire.engine import Engine, buckets, compilation_cache_folder
from hire.engine_api import EngineUnavailable, StepOutput
from hire.formats.native import read_config
from hire.predictor_files import PREDICTORS, serving_settings
from hire.sampling import SamplingParams
from hire.tokenizer import load_tokenizer
from workers.shard import Laps, ShardWorker

log = logging.getLogger(__name__)

STRATEGIES = ("STRICT_SPREAD", "SPREAD", "PACK", "STRICT_PACK")


class ShardGroupError(EngineUnavailable):
    """A host died, failed or did not answer in time, or the group is shut down; `restart()` rebuilds it. Its message
    is one line for clients (what was lost, how many hosts are left, what happens next); Ray's details are logged."""


@dataclass(eq=False)
class ShardedState:
    """The driver's handle on a decode state that lives on the hosts of the group's `generation`-th start."""

    key: int
    generation: int


@dataclass(eq=False)
class ShardedPrefix:
    """A prefilled prompt on the hosts: its key and generation, its first token and logprob ([1] each) from rank 0."""

    key: int
    generation: int
    token: np.ndarray
    logprob: np.ndarray


RETRY_S = 5.0  # a failed rebuild is tried again after this long (a request or a health check asks), the clients' hint
PLACE_TIMEOUT = 15.0  # seconds a rebuild waits for its placement group on nodes that have room


def reachable(node: dict[str, Any], timeout: float = 0.5) -> bool:
    """Whether a Ray node's raylet takes a TCP connection within `timeout` s (one cut off the network does not)."""
    try:
        socket.create_connection((node["NodeManagerAddress"], node["NodeManagerPort"]), timeout).close()
    except OSError:
        return False
    return True


class ShardGroup:
    """`hosts` ShardWorker actors, `devices_per_host` CPU devices each, jointly holding one model.

    Each bundle asks for one CPU and, when the cluster has it at the first start, one `resource`, and is pinned to a
    node chosen among the alive ones (one host per node first, more where a node has room for more); `strategy` (one
    of STRATEGIES) instead leaves the placement to Ray. A lost host (its process died, or it missed a heartbeat:
    `heartbeat_timeout` s without answering a ping, sent every `heartbeat` s while a call runs) fails the call within
    seconds. Its node, when dead or unreachable, is left out until it answers again, so a rebuild re-shards onto the
    hosts left (at least `min_hosts`, and enough that each host's share fits its node's memory) and a later one grows
    back to `hosts`.
    `compilation_cache`, a folder every host can reach, keeps compiled programs across (re)starts. `hire` overrides
    the model's HiRE fields (hire.sharding.load_sharded); `gather_logits` samples from the gathered logits instead of
    through DA-TOP-k (hire.engine.Engine's: the baseline). `name` names the placement group, so that whoever kills the
    group's driver can free it (`remove_named_group`): the hosts die with the actor that made them, their placement
    group does not.
    """

    def __init__(self, model: str, hosts: int, devices_per_host: int = 1, slots: int = 8, max_len: int | None = None,
                 dtype: str | None = None, strategy: str | None = None, resource: str = "hire_host",
                 call_timeout: float = 120.0, start_timeout: float = 120.0, compilation_cache: str | None = None,
                 hire: dict[str, Any] | None = None, name: str = "", min_hosts: int = 1, heartbeat: float = 0.5,
                 heartbeat_timeout: float = 2.0, gather_logits: bool = False):
        if strategy is not None and strategy not in STRATEGIES:
            raise ValueError(f"strategy: {strategy!r} is not one of {STRATEGIES}")
        if hosts < 1 or devices_per_host < 1 or not 1 <= min_hosts <= hosts:
            raise ValueError("hosts and devices_per_host must be >= 1, min_hosts in [1, hosts]")
        self.model, self.want, self.devices_per_host = str(resolve_model(model)), hosts, devices_per_host
        self.hosts = hosts  # in the group now: fewer than `want` while re-sharded onto the hosts left
        self.slots, self.max_len, self.dtype, self.hire = slots, max_len, dtype, dict(hire or {})
        self.strategy, self.resource, self.name, self.min_hosts = strategy, resource, name, min_hosts
        self.call_timeout, self.start_timeout, self.compilation_cache = call_timeout, start_timeout, compilation_cache
        self.heartbeat, self.heartbeat_timeout, self.gather_logits = heartbeat, heartbeat_timeout, gather_logits
        self.workers: list[Any] = []
        self.info: list[dict[str, Any]] = []  # what each host's `start` returned, by rank
        self.generation = 0  # starts so far: handles made before the last start name nothing
        self.broken = False  # a call failed: the hosts may have diverged, only a restart helps
        self.reason: str | None = None  # why the group cannot serve now (a line for clients), None while it can
        self.lost: dict[str, str] = {}  # node id -> address of the nodes whose host was lost and which do not answer
        self.last_loss: str | None = None  # "shard host on node ADDRESS" of the host lost last, until a start succeeds
        self.bundle: dict[str, float] | None = None  # what each host asks for, fixed at the first start
        self._held = 0  # bytes the model takes over all hosts (from the last start): what the hosts left must hold
        self._pg = None
        self._lock = threading.Lock()
        self.start()

    def _bundle(self) -> dict[str, float]:
        """One CPU, and one `resource` if the cluster had it at the first start (rebuilds keep to those nodes)."""
        if self.bundle is None:
            self.bundle = {"CPU": 1.0} | ({self.resource: 1.0} if self.resource in ray.cluster_resources() else {})
        return self.bundle

    def _nodes(self, bundle: dict[str, float]) -> list[tuple[dict[str, Any], int]]:
        """The alive nodes with room for a host, each with how many it has room for, but lost ones (a lost node
        counts again once its raylet answers)."""
        found = []
        for node in ray.nodes():
            room = min(int(node["Resources"].get(k, 0) // v) for k, v in bundle.items())
            if not node["Alive"]:
                self.lost.pop(node["NodeID"], None)  # a dead node's id never comes back
            if not node["Alive"] or room < 1:
                continue
            if node["NodeID"] in self.lost:
                if not reachable(node):
                    continue
                log.warning("node %s answers again", self.lost.pop(node["NodeID"]))
            found.append((node, room))
        return found

    def placement(self) -> tuple[str, dict[str, float], list[dict[str, Any]]]:
        """The strategy, the bundle each host asks for, and the node of each host that can be placed now (up to
        `hosts`: one per node first, then more where a node has room; none with a `strategy`: Ray places them)."""
        bundle = self._bundle()
        if self.strategy:
            return self.strategy, bundle, []
        nodes = self._nodes(bundle)
        chosen = [node for turn in range(max((room for _, room in nodes), default=0))
                  for node, room in nodes if room > turn]
        return "PACK", bundle, chosen[: self.want]

    def _least(self, nodes: list[dict[str, Any]]) -> int:
        """The fewest hosts on `nodes` that hold the model: `min_hosts`, or more where an even share of the model
        would not fit a node's memory (as Ray counts it)."""
        memory = min((n["Resources"].get("memory", 0) for n in nodes), default=0)
        return max(self.min_hosts, -(-self._held // int(memory)) if memory and self._held else 1)

    def start(self) -> None:
        """Place and start the hosts, join them into one JAX program and load the model's slices; the seconds
        each step took are logged."""
        laps = Laps()
        strategy, bundle, nodes = self.placement()
        hosts = self.want if self.strategy else len(nodes)
        if hosts < (least := self._least(nodes)):
            raise ShardGroupError(f"{self._lost_line()}{hosts} of {self.want} hosts can be placed and the model needs "
                                  f"{least}; rebuilding when a node returns; retry in {RETRY_S:.0f} s", RETRY_S)
        if hosts < self.want:
            log.warning("%sre-sharding the model onto %d of %d hosts", self._lost_line(), hosts, self.want)
        self.hosts, self.generation = hosts, self.generation + 1
        selectors = [{"ray.io/node-id": n["NodeID"]} for n in nodes] or None
        self._pg = placement_group([bundle] * hosts, strategy=strategy, name=self.name,
                                   bundle_label_selector=selectors)
        laps.done("place")
        try:
            wait = min(self.start_timeout, PLACE_TIMEOUT) if selectors and self.generation > 1 else self.start_timeout
            if not self._pg.wait(int(wait)):
                log.warning("no room for %d hosts of %s (%s) within %.0f s; cluster resources: %s", hosts, bundle,
                            strategy, wait, ray.cluster_resources())
                raise ShardGroupError(f"{self._lost_line()}no room for {hosts} shard hosts within {wait:.0f} s; "
                                      f"rebuilding; retry in {RETRY_S:.0f} s", RETRY_S)
            laps.done("placement group")
            env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={self.devices_per_host}",
                   "JAX_PLATFORMS": "cpu"}
            self.workers = [ShardWorker.options(
                num_cpus=bundle["CPU"], resources={k: v for k, v in bundle.items() if k != "CPU"},
                runtime_env={"env_vars": env},
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=rank),
            ).remote(rank, hosts, self.devices_per_host) for rank in range(hosts)]
            coordinator = self._get([self.workers[0].address.remote()], self.start_timeout)[0]
            laps.done("processes")
            self.info = self._get([w.start.remote(coordinator, self.model, self.slots, self.max_len, self.dtype,
                                                  int(self.start_timeout), self.compilation_cache, self.hire,
                                                  self.gather_logits)
                                  for w in self.workers], self.start_timeout)
            self._held = sum(i["held_bytes"] for i in self.info)
            laps.done("start")
            log.warning("the shard group started on %d hosts in %.1f s: %s; slowest host: %s", hosts,
                        sum(laps.values()), Laps.line(laps),
                        Laps.line(max((i["seconds"] for i in self.info), key=lambda t: sum(t.values()))))
            self.broken, self.reason, self.last_loss = False, None, None
        except BaseException:
            self.shutdown()
            raise

    def _lost_line(self) -> str:
        return f"{self.last_loss} lost; " if self.last_loss else ""

    def _lose(self, rank: int, why: str, error: BaseException | None = None) -> ShardGroupError:
        """The error for host `rank` lost (`why`: what happened to it); its node is left out of rebuilds while it is
        dead or unreachable. Ray's own account (`error`) goes to the log."""
        info = self.info[rank] if rank < len(self.info) else {}
        who = f"shard host on node {info['ip']}" if "ip" in info else f"shard host {rank}"
        log.warning("%s (rank %d) lost: %s%s", who, rank, why, f" ({error})" if error else "")
        self.last_loss = who
        node = next((n for n in ray.nodes() if n["NodeID"] == info.get("node")), None)
        if node is not None and not (node["Alive"] and reachable(node)):
            self.lost[node["NodeID"]] = info["ip"]
        return ShardGroupError(f"{who} lost ({why}); {self.hosts - 1} of {self.hosts} hosts left; rebuilding; "
                               f"retry in {RETRY_S:.0f} s", RETRY_S)

    def _check(self, rank: int, ref: Any) -> Any:
        """The result of host `rank`'s finished call `ref`, or the ShardGroupError its failure means."""
        try:
            return ray.get(ref)
        except RayActorError as e:
            raise self._lose(rank, "its process died or its node left", e) from None
        except RayTaskError as e:
            log.warning("shard host %d failed: %s", rank, e)
            if self.workers:
                self._beat()  # a collective fails on the hosts left when one is lost: name the lost one
            raise ShardGroupError(f"shard host {rank} failed ({type(e.cause).__name__}, logged); rebuilding; retry "
                                  f"in {RETRY_S:.0f} s", RETRY_S) from None
        except RayError as e:
            raise self._lose(rank, "it cannot be reached", e) from None

    def _get(self, refs: list[Any], timeout: float, watch: bool = False) -> list[Any]:
        """The results of `refs`, one call per host by rank; ShardGroupError if one fails, after `timeout` s, or,
        with `watch`, as soon as a host misses a heartbeat."""
        deadline, pending = time.monotonic() + timeout, list(refs)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ShardGroupError(f"the {len(refs)} shard hosts did not all answer within {timeout:.0f} s; "
                                      f"rebuilding; retry in {RETRY_S:.0f} s", RETRY_S)
            ready, pending = ray.wait(pending, num_returns=len(pending),
                                      timeout=min(left, self.heartbeat) if watch else left)
            for ref in ready:
                self._check(refs.index(ref), ref)
            if pending and watch:
                self._beat()
        return [ray.get(ref) for ref in refs]

    def _beat(self) -> None:
        """Ping every host; ShardGroupError naming the first that died or did not answer within heartbeat_timeout."""
        pings = [w.ping.remote() for w in self.workers]
        ready, late = ray.wait(pings, num_returns=len(pings), timeout=self.heartbeat_timeout)
        for ref in ready:
            self._check(pings.index(ref), ref)
        if late:
            raise self._lose(pings.index(late[0]), f"no heartbeat for {self.heartbeat_timeout:.0f} s")

    def call(self, method: str, *args: Any, timeout: float | None = None) -> list[Any]:
        """Run ShardWorker.`method` on every host; their results, by rank. One call runs at a time; it fails with
        ShardGroupError, and marks the group broken, when a host is lost or after `timeout` (default `call_timeout`)
        seconds."""
        with self._lock:
            if not self.workers:
                raise ShardGroupError(self.reason or "the shard group is shut down", RETRY_S)
            try:
                return self._get([getattr(w, method).remote(*args) for w in self.workers],
                                 timeout or self.call_timeout, watch=True)
            except ShardGroupError as e:
                self.broken, self.reason = True, str(e)  # the others may be stuck in a collective with the lost one
                raise

    def drop(self, table: str, key: int) -> None:
        """Tell every host to forget a state or prefix (no answer awaited; safe from a finalizer)."""
        if ray.is_initialized():
            for w in self.workers:
                w.drop.remote(table, key)

    def ping(self, timeout: float = 10.0) -> bool:
        """Whether every host's process answers within `timeout` seconds."""
        if not (workers := self.workers):
            return False
        try:
            ray.get([w.ping.remote() for w in workers], timeout=timeout)
        except RayError:
            return False
        return True

    def restart(self) -> None:
        """Tear the whole group down and start it again, on the hosts that can be placed now (decode states and
        prefixes are lost); the reason it is down stays until it serves again."""
        with self._lock:
            reason = self.reason or "the shard group is rebuilding"
            self.shutdown()
            self.reason = reason
            try:
                self.start()
            except ShardGroupError as e:
                self.reason = str(e)
                raise
            except BaseException as e:
                log.exception("the shard group could not be started")
                self.reason = f"{self._lost_line()}the shard group could not be started ({type(e).__name__}); " \
                              f"rebuilding; retry in {RETRY_S:.0f} s"
                raise ShardGroupError(self.reason, RETRY_S) from e

    def check(self) -> bool:
        """Whether every host answers a heartbeat; one that does not marks the group broken, named in `reason`."""
        with self._lock:
            if self.broken or not self.workers:
                return False
            try:
                self._beat()
            except ShardGroupError as e:
                self.broken, self.reason = True, str(e)
                return False
        return True

    def shutdown(self) -> None:
        """Kill the hosts and free their placement group."""
        workers, pg, self.workers, self.info, self._pg = self.workers, self._pg, [], [], None
        self.reason = "the shard group is shut down"
        if not ray.is_initialized():
            return
        for w in workers:
            ray.kill(w)
        if pg is not None:
            remove_placement_group(pg)


def remove_named_group(name: str) -> None:
    """Free the placement group of the ShardGroup called `name`, if it is still there, and with it its hosts."""
    with contextlib.suppress(ValueError):  # not there: shut down already
        remove_placement_group(get_placement_group(name))


class ShardedEngine:
    """hire.engine.Engine's interface (cfg, slots, max_len, buckets, tokenizer, init_state, prefill, insert,
    generate_steps, check_request, warm_up) over a ShardGroup, plus `ping`, `recover` and `shutdown`;
    `group` keyword arguments go to ShardGroup."""

    check_request = Engine.check_request
    generate = Engine.generate

    def __init__(self, model: str, hosts: int, devices_per_host: int = 1, slots: int = 8, max_len: int | None = None,
                 dtype: str | None = None, **group: Any):
        self.tokenizer = load_tokenizer(resolve_model(model))
        self.group = ShardGroup(model, hosts, devices_per_host, slots, max_len, dtype, **group)
        self.cfg, self.max_len, self.slots = self.group.info[0]["cfg"], self.group.info[0]["max_len"], slots
        self.buckets = buckets(self.max_len)
        self.recoveries: list[dict[str, float]] = []  # seconds each rebuild took: restart, then warm_up
        self._keys = itertools.count()
        self._warm: int | None = None  # the chunk warm_up compiled for, compiled again after a rebuild
        self._retry_at = 0.0  # time.monotonic() before which a failed rebuild is not tried again

    def _track(self, handle: ShardedState | ShardedPrefix, table: str) -> Any:
        """The hosts forget `handle`'s state or prefix once the driver drops it."""
        weakref.finalize(handle, self.group.drop, table, handle.key).atexit = False
        return handle

    def _current(self, handle: ShardedState | ShardedPrefix) -> int:
        """`handle`'s key; ShardGroupError if it was made before the group's last restart."""
        if handle.generation != self.group.generation:
            raise ShardGroupError(f"{type(handle).__name__} {handle.key} was lost when the shard group restarted")
        return handle.key

    def init_state(self) -> ShardedState:
        key = next(self._keys)
        self.group.call("init_state", key)
        return self._track(ShardedState(key, self.group.generation), "states")

    def prefill(self, tokens: list[int], params: SamplingParams, adapter: int = -1) -> ShardedPrefix:
        self.check_request(tokens, adapter)
        key = next(self._keys)
        token, logprob = self.group.call("prefill", key, list(tokens), params, adapter)[0]
        return self._track(ShardedPrefix(key, self.group.generation, token, logprob), "prefixes")

    def insert(self, prefix: ShardedPrefix, state: ShardedState, slot: int) -> ShardedState:
        self.group.call("insert", self._current(prefix), self._current(state), slot)
        return state

    def generate_steps(self, state: ShardedState, n: int, reach: int | None = None
                       ) -> tuple[ShardedState, StepOutput]:
        """n decode steps on every host; outputs are numpy [n, slots]."""
        tokens, logprobs = self.group.call("generate_steps", self._current(state), n, reach)[0]
        return state, StepOutput(tokens, logprobs)

    def warm_up(self, chunk: int, buckets: list[int] | None = None) -> None:
        """Engine.warm_up on every host (within the group's start_timeout: compiling takes long). A rebuild warms
        up the smallest bucket only, so as to serve at once: the first request that needs a larger one waits for
        its programs alone (read from the compilation cache on every host)."""
        self.group.call("warm_up", chunk, buckets, timeout=max(self.group.start_timeout, self.group.call_timeout))
        self._warm = chunk

    def programs(self) -> list[dict[str, int]]:
        """How many programs each host (by rank) has compiled or loaded, by kind (ShardWorker.programs)."""
        return self.group.call("programs")

    def ping(self, timeout: float = 10.0) -> bool:
        return self.group.ping(timeout)

    @property
    def unavailable(self) -> str | None:
        """Why the engine cannot serve now (one line for clients), or None while it can."""
        return self.group.reason

    @property
    def degraded(self) -> bool:
        """Down, or serving on fewer hosts than configured: `recover(grow=True)` may bring it back."""
        return self.group.reason is not None or self.group.hosts < self.group.want

    def recover(self, grow: bool = False) -> bool:
        """Rebuild the group if a call failed or a host misses a heartbeat, or, with `grow` (between requests), if it
        has fewer hosts than configured and more can be placed now; warm up its smallest bucket (`warm_up`) if it was
        warmed up before. Whether it was rebuilt.
        Raises ShardGroupError (at once within RETRY_S of a failed rebuild) if it cannot be."""
        group = self.group
        growing = grow and not group.broken and group.hosts < group.want and len(group.placement()[2]) > group.hosts
        if not growing and group.check():
            return False
        if time.monotonic() < self._retry_at:
            raise ShardGroupError(group.reason or "the shard group is rebuilding", RETRY_S)
        start = time.perf_counter()
        try:
            group.restart()
            restarted = time.perf_counter()
            if self._warm is not None:
                self.warm_up(self._warm, self.buckets[:1])
        except ShardGroupError:
            self._retry_at = time.monotonic() + RETRY_S
            raise
        self.recoveries.append({"hosts": group.hosts, "restart_s": restarted - start,
                                "warm_up_s": time.perf_counter() - restarted})
        log.warning("the shard group is serving on %d of %d hosts (restart %.1f s, warm-up %.1f s)",
                    group.hosts, group.want, self.recoveries[-1]["restart_s"], self.recoveries[-1]["warm_up_s"])
        return True

    def restart(self) -> None:
        self.group.restart()

    def shutdown(self) -> None:
        self.group.shutdown()


def check_servable(model: str, lora: dict[str, str] | None = None, hire: dict[str, Any] | None = None,
                   dtype: str | None = None) -> None:
    """ValueError, its message starting with the option's name, for what a sharded engine cannot serve: LoRA
    adapters, a checkpoint not in hire's format, a HiRE setting (`hire`: the command line's HiRE overrides, on
    the folder's recommended one at `dtype`) that is not valid or has no predictors."""
    if lora:
        raise ValueError("lora: LoRA adapters are not served over several hosts; serve them with --hosts 1")
    folder = model_folder(model)
    if detect_format(folder) != "hire":
        raise ValueError(f"model: {folder} is not in hire's format, which a sharded engine reads (write one with "
                         "`hire convert`)")
    settings = serving_settings(folder, hire, dtype)
    try:
        cfg = with_hire(read_config(folder), settings)
    except ValueError as e:
        raise ValueError(f"hire: {e}") from None
    if cfg.sparse and not (folder / PREDICTORS).is_file():
        raise ValueError(f"hire: HiRE ({settings}) needs the predictors {folder / PREDICTORS}; build them with "
                         f"`hire calibrate --model {folder} --text FILE`")


def serving_engine(model: str, hosts: int, devices_per_host: int = 1, placement: str | None = None, slots: int = 8,
                   max_len: int | None = None, dtype: str | None = None, lora: dict[str, str] | None = None,
                   hire: dict[str, Any] | None = None, **group: Any) -> ShardedEngine:
    """The ShardedEngine of `hire serve --hosts N` (cluster.serve_app.EngineServer), after `check_servable`, with
    the model's serving HiRE setting under `hire` (hire.predictor_files.serving_settings) and its compiled programs kept
    in hire's compilation cache."""
    check_servable(model, lora, hire, dtype)
    return ShardedEngine(model, hosts, devices_per_host, slots, max_len, dtype, strategy=placement,
                         compilation_cache=compilation_cache_folder(),
                         hire=serving_settings(model_folder(model), hire, dtype), **group)
