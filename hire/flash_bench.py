"""`hire bench flash`: decoding with the FFN on disk (hire.flash) against the naive way, under one memory budget.

Both decode the same prompt greedily with the same resident part and compute the same thing (their tokens are
compared): hire.flash's DiskFFN (the window cache, O_DIRECT reads of bundled groups in parallel) in this process,
and MappedFFN (the float checkpoint memory-mapped, the OS paging) in a child process, timed one after the other
in each repeat. The budget is what each may keep in memory: DiskFFN keeps to it by construction (hire.flash.plan).
The child runs in a memory cgroup made under this process's own (v2 memory.max, or v1 memory.limit_in_bytes),
whose limit is the child's memory once it has loaded the resident part, decoded three times (compiling, and
letting its allocators reach their steady size; its C library keeps what it frees: KEEP_FREED) and dropped the
checkpoint's pages (its baseline: runtime, resident part, KV cache, buffers), plus what the budget leaves beyond
the resident part (and IN_FLIGHT, 4 MiB for pages being read in): its page cache holds at most that much of the
checkpoint, and the kernel evicts the rest.
Where no cgroup can be made, the child drops the
checkpoint's pages from the page cache before every decode step instead (every step reads what it touches from
storage), and `naive_budget` says which was done. Every decode starts cold: after the prefill, the window is
emptied and the checkpoint's pages dropped.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from hire.calibrate import random_predictors
from hire.config import SHAPES, ModelConfig, OptionError
from hire.engine import Engine
from hire.flash import (
    GROUPS,
    BudgetError,
    Layout,
    MappedFFN,
    OnDiskNet,
    convert_on_disk,
    load_on_disk,
    load_resident,
    write_groups,
)
from hire.formats import expected_variables, unflatten
from hire.formats.native import save_native
from hire.predictor_files import save_predictors
from hire.sampling import SamplingParams


def read_bytes() -> int:
    """Bytes this process has had read from storage (/proc/self/io), 0 where the kernel does not say."""
    try:
        return int(next(line.split()[1] for line in open("/proc/self/io") if line.startswith("read_bytes")))
    except (OSError, StopIteration):
        return 0


def decode_timed(engine: Engine, prompt: list[int], steps: int, temperature: float,
                 cold: Callable[[], None]) -> tuple[float, list[int], int]:
    """Prefill `prompt`, call `cold` (what the FFN's source held is forgotten), then time `steps` decode steps (greedy,
    or sampled at `temperature` with seed 0) in one compiled loop: seconds, the tokens, and the bytes read from
    storage while decoding."""
    prefix = engine.prefill(prompt, SamplingParams(temperature=temperature, seed=0))
    state = jax.block_until_ready(engine.insert(prefix, engine.init_state(), 0))
    cold()
    before, start = read_bytes(), time.perf_counter()
    _, out = engine.generate_steps(state, steps, len(prompt) + steps)
    tokens = np.asarray(out.tokens[:, 0]).tolist()
    return time.perf_counter() - start, tokens, read_bytes() - before


def random_model(folder: str | Path, cfg: ModelConfig, hired: ModelConfig, seed: int = 0) -> None:
    """Write a model of random weights with `cfg`'s shape into `folder`, as `hire convert --weights-on-disk` would:
    config, float checkpoint, random predictors of the kinds `hired` uses, and ffn_groups.bin (no tokenizer)."""
    rng, folder = np.random.default_rng(seed), Path(folder)
    cfg = cfg.dense()
    params = {}
    for key, shape in expected_variables(cfg).items():
        value = np.ones(shape.shape, np.float32) if key.endswith("weight") else \
            rng.standard_normal(shape.shape, np.float32) * np.float32(0.02)
        params[key] = value.astype(shape.dtype)
    variables = unflatten(params)
    save_native(folder, cfg, variables, None)
    save_predictors(folder, random_predictors(hired, seed), {"random": True})
    write_groups(folder / GROUPS, Layout.of(cfg), variables["params"])


# The naive child's C library keeps the memory it frees (allocations up to 32 MiB come from its heap, which is never
# trimmed; two arenas): what its decode steps allocate then stays in its baseline instead of being charged to its
# cgroup afresh each step, where it would squeeze the page cache below the budget's share, or hit the limit.
KEEP_FREED = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1099511627776:glibc.malloc.arena_max=2"

# Beyond the budget's share, the naive child's limit leaves room for pages being read in: a small memory cgroup whose
# page cache is all locked under readahead cannot reclaim any, and the kernel kills its process.
IN_FLIGHT = 4 << 20


class MemoryCgroup:
    """A memory cgroup made under this process's own: cgroup v2 (memory.max) or v1 (memory.limit_in_bytes)."""

    def __init__(self, folder: Path, v2: bool):
        self.folder, self.v2 = folder, v2
        self.method = "cgroup v2 memory.max" if v2 else "cgroup v1 memory.limit_in_bytes"

    @classmethod
    def make(cls, name: str) -> MemoryCgroup | None:
        """A new cgroup `name` with a memory limit, or None where none can be made (no permission, no controller)."""
        try:
            lines = Path("/proc/self/cgroup").read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                base, v2 = Path("/sys/fs/cgroup"), True
                if "memory" not in _read(base / "cgroup.controllers").split():
                    continue
            elif "memory" in controllers.split(","):
                base, v2 = Path("/sys/fs/cgroup/memory"), False
            else:
                continue
            folder = base / path.lstrip("/") / name
            try:
                folder.mkdir()
            except OSError:
                continue
            if (folder / ("memory.max" if v2 else "memory.limit_in_bytes")).exists():
                return cls(folder, v2)
            folder.rmdir()
        return None

    def add(self, pid: int) -> None:
        (self.folder / "cgroup.procs").write_text(str(pid))

    def usage(self) -> int:
        return int(_read(self.folder / ("memory.current" if self.v2 else "memory.usage_in_bytes")))

    def peak(self) -> int | None:
        text = _read(self.folder / ("memory.peak" if self.v2 else "memory.max_usage_in_bytes"))
        return int(text) if text else None

    def limit(self, n: int) -> None:
        (self.folder / ("memory.max" if self.v2 else "memory.limit_in_bytes")).write_text(str(n))
        if not self.v2:  # the peak from here on
            (self.folder / "memory.max_usage_in_bytes").write_text("0")

    def remove(self) -> None:
        if not self.v2:  # hand its page cache back to the parent first
            _write(self.folder / "memory.force_empty", "0")
        for _ in range(50):
            try:
                self.folder.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError:
        pass


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _naive_worker(conn, folder: str, settings: dict, max_len: int, prompt: list[int], steps: int,
                  temperature: float, drop_each_token: bool) -> None:
    """The child process: MappedFFN decoding, timed on each "run" it is sent (decode_timed's result back)."""
    try:
        conn.recv()  # in its cgroup now
        model = load_resident(folder, **settings)
        source = MappedFFN(folder, model.cfg, drop_each_token)
        engine = Engine(model, slots=1, max_len=max_len, net=OnDiskNet(model.cfg, source))
        for _ in range(3):  # compile, and let the allocators reach their steady size: the baseline
            decode_timed(engine, prompt, steps, temperature, source.drop_pages)
        source.drop_pages()
        conn.send("ready")
        while conn.recv() == "run":
            conn.send(decode_timed(engine, prompt, steps, temperature, source.drop_pages))
    except Exception as e:  # noqa: BLE001 (reported by the parent, which raises it)
        conn.send(f"{type(e).__name__}: {e}")


class NaiveProcess:
    """The naive way in a child process held to `page_cache` bytes beyond its baseline (module docstring)."""

    def __init__(self, folder: Path, settings: dict, max_len: int, prompt: list[int], steps: int, temperature: float,
                 page_cache: int):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.cgroup = MemoryCgroup.make(f"hire-naive-{os.getpid()}")
        self.proc = ctx.Process(target=_naive_worker, daemon=True, args=(
            child, str(folder), settings, max_len, prompt, steps, temperature, self.cgroup is None))
        tunables = os.environ.get("GLIBC_TUNABLES")
        os.environ["GLIBC_TUNABLES"] = KEEP_FREED  # read by the child's C library as it starts
        try:
            self.proc.start()
        finally:
            os.environ.pop("GLIBC_TUNABLES") if tunables is None else os.environ.update(GLIBC_TUNABLES=tunables)
        child.close()
        try:
            if self.cgroup:
                self.cgroup.add(self.proc.pid)
            self.conn.send("go")
            self.page_cache = page_cache
            self._receive()
            self.baseline = self.cgroup.usage() if self.cgroup else None
            if self.cgroup:
                self.cgroup.limit(self.baseline + page_cache + IN_FLIGHT)
        except BaseException:
            self.close()
            raise

    def _receive(self) -> Any:
        try:
            message = self.conn.recv()
        except EOFError:
            self.proc.join(5)
            raise RuntimeError(f"the naive decoding process died (exit code {self.proc.exitcode}"
                               + (f"; killed at its memory limit? Its share of the budget was {self.page_cache:,} "
                                  "bytes: a larger --memory-budget leaves it more)" if self.cgroup else ")")) from None
        if isinstance(message, str) and message != "ready":
            raise RuntimeError(f"the naive decoding process failed: {message}")
        return message

    def run(self) -> tuple[float, list[int], int]:
        self.conn.send("run")
        return self._receive()

    def budget(self) -> dict[str, Any]:
        """What held the naive way to the budget."""
        if not self.cgroup:
            return {"method": "page cache dropped before every decode step (no memory cgroup could be made)"}
        return {"method": self.cgroup.method, "baseline_bytes": self.baseline, "page_cache_bytes": self.page_cache,
                "in_flight_bytes": IN_FLIGHT, "limit_bytes": self.baseline + self.page_cache + IN_FLIGHT,
                "peak_bytes": self.cgroup.peak()}

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send("stop")
            except OSError:
                pass
            self.proc.join(30)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
        if self.cgroup:
            self.cgroup.remove()


def bench_flash(folder: str | Path, budget: int, window: int | None, prompt: list[int], steps: int = 64,
                repeats: int = 3, threads: int = 16, settings: dict | None = None,
                temperature: float = 0.0) -> dict[str, Any]:
    """Decode `steps` tokens after `prompt` with the model at `folder` (with ffn_groups.bin) under `budget` bytes,
    the FFN on disk against the naive way, greedy or sampled at `temperature` (seed 0); medians of `repeats`,
    `speedup` the median of the paired ratios."""
    settings = settings or {}
    load = os.getloadavg()
    max_len = len(prompt) + steps + 1
    model, store, memory = load_on_disk(folder, budget, window, 1, max_len, threads, **settings)
    cfg, layout = model.cfg, store.layout
    engine = Engine(model, slots=1, max_len=max_len, net=OnDiskNet(cfg, store))
    naive = NaiveProcess(Path(folder), settings, max_len, prompt, steps, temperature, budget - memory.resident)
    try:
        decode_timed(engine, prompt, steps, temperature, store.reset)  # compile
        runs = []
        for _ in range(repeats):
            flash = decode_timed(engine, prompt, steps, temperature, store.reset)
            runs.append((flash, store.bytes_read, store.reuse, naive.run()))
        naive_budget = naive.budget()
    finally:
        naive.close()
        store.close()
    seconds = [flash[0] for flash, *_ in runs]
    naive_seconds = [n[0] for *_, n in runs]
    ffn_bytes = layout.n_layers * layout.groups * layout.group_bytes
    (_, tokens, _), counted, reuse, (_, naive_tokens, _) = runs[-1]  # the same in every repeat
    storage = statistics.median(flash[2] for flash, *_ in runs)
    naive_storage = statistics.median(n[2] for *_, n in runs)
    return {
        "model": cfg.name, "dtype": cfg.dtype, "memory_budget": budget, "window": window, "steps": steps,
        "temperature": temperature,
        "repeats": repeats, "prompt_len": len(prompt), "read_threads": threads, "direct": store.direct,
        "ffn_groups": layout.groups, "ffn_candidates": cfg.ffn_candidates, "group_bytes": layout.group_bytes,
        "resident_bytes": memory.resident, "ffn_bytes": ffn_bytes, "buffer_bytes": memory.buffers,
        "window_bytes": memory.window_bytes, "window_groups_per_layer": memory.slots,
        "ffn_over_budget_left": round(ffn_bytes / (budget - memory.resident), 2),
        "bytes_read_per_token": round(counted / steps), "storage_read_per_token": round(storage / steps),
        "reuse": round(reuse, 4),
        "tokens_per_s": round(steps / statistics.median(seconds), 2),
        "naive_tokens_per_s": round(steps / statistics.median(naive_seconds), 2),
        "speedup": round(statistics.median(n / s for s, n in zip(seconds, naive_seconds)), 3),
        "naive_storage_read_per_token": round(naive_storage / steps),
        "naive_budget": naive_budget, "identical": tokens == naive_tokens,
        "load_average_start": [round(x, 2) for x in load], "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "device": jax.devices()[0].device_kind, "jax": jax.__version__,
    }


def bench_flash_model(model: str | None, shape: str | None, budget: int | None, window: int | None, steps: int = 64,
                      repeats: int = 3, prompt: str | None = None, temperature: float = 0.0, threads: int = 16,
                      folder: str | Path | None = None, hire: dict[str, Any] | None = None) -> dict[str, Any]:
    """`hire bench flash`: bench_flash on `model` (its ffn_groups.bin, or the model converted into `folder` first) or
    on a random model of `shape` written into `folder` (default: a temporary folder, deleted after), run group-sparse
    with `hire` on top; `prompt` (default: 'def parse_args(argv):', or 16 random token ids without a tokenizer)."""
    from hire.checkpoint import model_folder
    from hire.formats.native import read_config
    from hire.predictor_files import serving_settings
    from hire.tokenizer import load_tokenizer

    if (model is None) == (shape is None):
        raise OptionError("give exactly one of --model and --shape")
    if budget is None:
        raise OptionError("--memory-budget is required")
    if shape is not None and shape not in SHAPES:
        raise OptionError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}", "--shape")
    hire = {"ffn": "group-sparse", **(hire or {})}
    temporary = None if folder else Path(tempfile.mkdtemp(prefix="hire-flash-"))
    work = Path(folder) if folder else temporary
    try:
        if model is not None:
            hire = serving_settings(model_folder(model), hire)
            if (model_folder(model) / GROUPS).is_file():
                work = model_folder(model)
            elif not (work / GROUPS).is_file():
                convert_on_disk(model, work)
        elif not (work / GROUPS).is_file():
            try:
                random_model(work, SHAPES[shape], SHAPES[shape].replace(**hire))
            except ValueError as e:
                raise OptionError(str(e), "--softmax/--ffn/--hire") from None
        if any(work.glob("tokenizer.*")):
            ids = load_tokenizer(work).encode(prompt or "def parse_args(argv):")
        elif prompt:
            raise OptionError("this model has no tokenizer", "--prompt")
        else:
            ids = np.random.default_rng(0).integers(0, read_config(work).vocab_size, 16).tolist()
        return bench_flash(work, budget, window, ids, steps, repeats, threads, hire, temperature)
    except BudgetError as e:
        raise OptionError(str(e), "--memory-budget") from None
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
