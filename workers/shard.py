"""ShardWorker: the Ray actor on one host of a sharded engine, one JAX process of a multi-controller program.

Every worker of a group runs the same jitted calls in the same order (workers.shards.ShardGroup broadcasts
each call and waits for all before the next), so together they run one program over the global mesh.
Decode states and prefilled prompts stay here, under keys the driver chose; only rank 0 sends tokens back.
A tandem coordinator's verifier runs its programs here too (`verifier`, on a decode state of its own).

The process must see its devices when jax is first imported, so this module imports no jax at the top:
the driver starts the actor with XLA_FLAGS (--xla_force_host_platform_device_count, CPU) and
JAX_PLATFORMS in its runtime_env, and `start` checks that the device count came out right.
"""
from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING, Any

import ray

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from hire.engine import Engine
    from hire.sampling import SamplingParams
    from workers.verify_programs import VerifierPrograms


class Laps(dict):
    """Seconds each named step took, each from the end of the step before (the first from creation)."""

    def __init__(self) -> None:
        super().__init__()
        self._last = time.perf_counter()

    def done(self, step: str) -> None:
        now = time.perf_counter()
        self[step], self._last = now - self._last, now

    @staticmethod
    def line(steps: dict[str, float]) -> str:
        return ", ".join(f"{k} {v:.1f} s" for k, v in steps.items())


@ray.remote(concurrency_groups={"health": 1})
class ShardWorker:
    """Rank `rank` of `hosts` processes, each with `devices_per_host` CPU devices."""

    def __init__(self, rank: int, hosts: int, devices_per_host: int):
        self.rank, self.hosts, self.devices_per_host = rank, hosts, devices_per_host
        self.engine: Engine | None = None
        self.mesh: Mesh | None = None
        self.verifier_programs: VerifierPrograms | None = None  # a tandem verifier's state, made at its first call
        self.states: dict[int, Any] = {}  # decode states by key
        self.prefixes: dict[int, Any] = {}  # prefilled prompts by key, until inserted or dropped

    def address(self) -> str:
        """host:port for jax.distributed's coordinator (rank 0): this node's IP and a port free right now."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"{ray.util.get_node_ip_address()}:{port}"

    def start(self, coordinator: str, model: str, slots: int, max_len: int | None, dtype: str | None,
              timeout: int, compilation_cache: str | None, hire: dict[str, Any], gather_logits: bool = False
              ) -> dict[str, Any]:
        """Join the JAX program, load this host's slice of `model` (with the HiRE overrides `hire`) and build the
        engine over the global mesh (`gather_logits`: hire.engine.Engine's); compiled programs are kept in
        `compilation_cache`, when given, for the next start. `seconds`: how long each step took (importing jax,
        joining the program, loading the slice)."""
        laps = Laps()
        import jax

        from hire import sharding
        from hire.engine import Engine, use_compilation_cache

        if compilation_cache:
            use_compilation_cache(compilation_cache)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        laps.done("import")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=self.hosts, process_id=self.rank,
                                   initialization_timeout=timeout)
        if jax.local_device_count() != self.devices_per_host:
            raise RuntimeError(f"host {self.rank} sees {jax.local_device_count()} devices, not the "
                               f"{self.devices_per_host} asked for: jax was imported before XLA_FLAGS was set")
        self.mesh = sharding.make_mesh()
        laps.done("join")
        loaded = sharding.load_sharded(model, self.mesh, dtype, **hire)
        self.engine = Engine(loaded, slots, max_len, mesh=self.mesh, gather_logits=gather_logits)
        laps.done("load")
        return {"rank": self.rank, "node": ray.get_runtime_context().get_node_id(),
                "ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "devices": jax.device_count(),
                "held_bytes": sharding.held_bytes(loaded.variables), "cfg": loaded.cfg, "max_len": self.engine.max_len,
                "seconds": dict(laps)}

    @ray.method(concurrency_group="health")
    def ping(self) -> int:
        """Answers even while a call runs (its own thread): the process is alive."""
        return self.rank

    def init_state(self, key: int) -> None:
        self.states[key] = self.engine.init_state()

    def prefill(self, key: int, tokens: list[int], params: SamplingParams, adapter: int):
        prefix = self.engine.prefill(tokens, params, adapter)
        self.prefixes[key] = prefix
        return self._result(prefix.token, prefix.logprob)

    def insert(self, prefix: int, state: int, slot: int) -> None:
        self.states[state] = self.engine.insert(self._take(self.prefixes, prefix, "prefix"),
                                                self._take(self.states, state, "decode state"), slot)

    def generate_steps(self, state: int, n: int, reach: int | None):
        self.states[state], out = self.engine.generate_steps(self._take(self.states, state, "decode state"), n, reach)
        return self._result(out.tokens, out.logprobs)

    def verifier(self, method: str, *args: Any):
        """workers.verify_programs.VerifierPrograms.`method` ("prefill" or "verify") on this host's shard of a
        Verifier's decode state (workers.verify_programs.GroupPrograms broadcasts it)."""
        from workers.verify_programs import VerifierPrograms

        if self.verifier_programs is None:
            self.verifier_programs = VerifierPrograms(self.engine, self.mesh)
        return self._result(*getattr(self.verifier_programs, method)(*args))

    def warm_up(self, chunk: int, buckets: list[int] | None = None) -> None:
        self.engine.warm_up(chunk, buckets)

    def programs(self) -> dict[str, int]:
        """How many programs this host has compiled (or read from the cache) of each kind: one per bucket used."""
        return {kind: getattr(self.engine, f"_{kind}")._cache_size() for kind in ("prefill", "insert",
                                                                                "generate_steps")}

    def drop(self, table: str, key: int) -> None:
        """Forget a decode state ("states") or prefix ("prefixes") the driver no longer holds."""
        getattr(self, table).pop(key, None)

    def _take(self, table: dict[int, Any], key: int, what: str) -> Any:
        if key not in table:
            raise KeyError(f"host {self.rank} holds no {what} {key} (dropped, or made before a restart)")
        return table.pop(key)

    def _result(self, *arrays):
        """Rank 0 returns the (replicated) arrays as numpy (None stays None); the others wait for them and return
        None."""
        import jax
        import numpy as np

        jax.block_until_ready(arrays)
        return tuple(None if a is None else np.asarray(a) for a in arrays) if self.rank == 0 else None
