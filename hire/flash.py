"""Weights on disk ("LLM in a flash"): a group-sparse model served under a memory budget smaller than the model.

The embeddings, attention, norms and HiRE predictors stay in memory (the resident part). The FFN's neuron groups
stay on disk in `ffn_groups.bin`, a file of hire's own layout that `hire convert --weights-on-disk` writes beside
the checkpoint: a 4096-byte header (magic, then the layout as JSON), then every group's bundle (its gate columns,
up columns and down rows: hire.sparse's row-column bundling, [parts, group, dim]), layer after layer, each bundle
starting on a 4096-byte boundary. A group is one aligned read, and neighbouring groups one read together.

Per decode step, each layer predicts its candidate groups with its resident predictor, as the in-memory model
does, and asks `DiskFFN` for their bundles. The groups the last W steps used (the window) are held in memory,
at most as many a layer as the budget leaves room for (the least recently used go first). Only the others are
read: with O_DIRECT into aligned buffers, so the page cache holds nothing and the reads come from the storage,
in parallel (a pool of threads calling os.preadv). The FFN is then computed on the fetched bundles by
hire.sparse's own code in the same order, so the logits are bit for bit those of the in-memory group-sparse
model, and so are the tokens, greedy or seeded. Prefill (many tokens) takes the in-memory model's masked path,
which computes every group of a layer, so it reads the whole layer.

`OnDiskNet` is the Transformer with every GroupSparseFFN intercepted (flax's intercept_methods) to run that way,
the reads made from inside the compiled step by io_callback, so hire.engine.Engine runs it unchanged. `MappedFFN`
serves the same bundles from the float checkpoint memory-mapped, the OS paging it in: the naive way, which
`hire bench flash` times beside (hire.flash_bench).

Memory (`plan`): the resident part (weights and KV cache), the window's groups and two layers of buffers (a layer
read for prefill and the copy of it handed to XLA) must fit in the budget; a budget the resident part does not
fit in, or that leaves no room for one step's groups, is a BudgetError (one line).
"""
from __future__ import annotations

import functools
import json
import mmap
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback
from safetensors import SafetensorError, safe_open

from hire import predictors, sparse
from hire.checkpoint import detect_format, resolve_model, with_hire
from hire.config import ModelConfig, OptionError
from hire.formats import CheckpointError, prepare_variables, unflatten
from hire.formats.native import WEIGHTS, read_config
from hire.loaded import LoadedModel
from hire.model import GroupSparseFFN, Transformer, activation
from hire.predictor_files import PREDICTORS
from hire.tokenizer import load_tokenizer

GROUPS = "ffn_groups.bin"
MAGIC = b"HIREFFN\x00"
ALIGN = 4096
FORMAT_VERSION = 1
UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


class BudgetError(ValueError):
    """A memory budget too small for the resident part or one step's groups; the message is one line."""


def parse_bytes(text: str) -> int:
    """"2600000000", "2.6GB", "64MiB", "512k" -> bytes (k/M/G/T powers of 1000, Ki/Mi/Gi/Ti of 1024)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([kmgt]i?)?b?\s*", text.lower())
    if not match:
        raise ValueError(f"expected a number of bytes such as 2600000000, 2.6GB or 64MiB, got {text!r}")
    return int(float(match[1]) * UNITS[match[2] or ""])


@dataclass(frozen=True)
class Layout:
    """Where each group's bundle lies in ffn_groups.bin: layer l's group j at data_offset + (l * groups + j) *
    stride, `group_bytes` of a C-ordered [parts, group, dim] array of `dtype`, zero-padded to `stride`."""

    n_layers: int
    groups: int
    parts: int
    group: int
    dim: int
    dtype: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.parts, self.group, self.dim

    @property
    def group_bytes(self) -> int:
        return self.parts * self.group * self.dim * jnp.dtype(self.dtype).itemsize

    @property
    def stride(self) -> int:
        return -(-self.group_bytes // ALIGN) * ALIGN

    @property
    def data_offset(self) -> int:
        return ALIGN

    def offset(self, layer: int, group: int) -> int:
        return self.data_offset + (layer * self.groups + group) * self.stride

    @property
    def file_size(self) -> int:
        return self.offset(self.n_layers, 0)

    @classmethod
    def of(cls, cfg: ModelConfig) -> "Layout":
        cfg = cfg if cfg.ffn != "dense" else cfg.replace(ffn="group-sparse")  # resolves ffn_group
        return cls(cfg.n_layers, cfg.ffn_groups, 3 if cfg.gated else 2, cfg.ffn_group, cfg.dim,
                   np.dtype(jnp.dtype(cfg.dtype)).name)


def write_groups(path: str | Path, layout: Layout, params: dict) -> None:
    """Write ffn_groups.bin from a dense model's params (the FFN kernels of every layer), then drop its pages from
    the page cache (written pages would otherwise serve the first reads from memory)."""
    header = json.dumps({"format_version": FORMAT_VERSION, **asdict(layout)}).encode()
    if len(MAGIC) + 4 + len(header) > layout.data_offset:
        raise ValueError("the ffn_groups.bin header does not fit in its first 4096 bytes")
    pad = np.zeros(layout.stride - layout.group_bytes, np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write((MAGIC + len(header).to_bytes(4, "little") + header).ljust(layout.data_offset, b"\0"))
        for i in range(layout.n_layers):
            ffn = params[f"layers_{i}"]["ffn"]
            bundle = np.asarray(sparse.bundle_ffn(ffn["up"]["kernel"], ffn["down"]["kernel"],
                                                  ffn["gate"]["kernel"] if "gate" in ffn else None, layout.group),
                                jnp.dtype(layout.dtype))
            for group in bundle:
                f.write(group.tobytes() + pad)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def read_layout(path: str | Path) -> Layout:
    """The layout in ffn_groups.bin's header, checked against the file's size."""
    try:
        with open(path, "rb") as f:
            head = f.read(ALIGN)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if head[:len(MAGIC)] != MAGIC:
        raise CheckpointError(f"{path} is not a hire ffn_groups.bin (no {MAGIC!r} at its start)")
    size = int.from_bytes(head[len(MAGIC):len(MAGIC) + 4], "little")
    try:
        fields = json.loads(head[len(MAGIC) + 4:len(MAGIC) + 4 + size])
        if (version := fields.pop("format_version")) != FORMAT_VERSION:
            raise CheckpointError(f"{path}: format_version {version!r} is not supported ({FORMAT_VERSION} is)")
        layout = Layout(**fields)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: bad header: {e}") from None
    if (actual := os.path.getsize(path)) != layout.file_size:
        raise CheckpointError(f"{path} holds {actual} bytes; its header describes {layout.file_size}")
    return layout


def check_layout(path: Path, layout: Layout, cfg: ModelConfig) -> None:
    """CheckpointError naming the first field in which the file's layout differs from what `cfg` computes."""
    want = Layout.of(cfg)
    for field, value in asdict(want).items():
        if getattr(layout, field) != value:
            raise CheckpointError(f"{path}: {field} is {getattr(layout, field)!r}, the model's config needs "
                                  f"{value!r} (write it again with `hire convert --weights-on-disk`)")


@dataclass(frozen=True)
class MemoryPlan:
    """How a budget is spent: `resident` (weights and KV cache kept in memory), `buffers` (a layer read for prefill
    and its copy handed to XLA) and `slots` groups a layer held for the window, `stride` bytes each."""

    budget: int
    resident: int
    buffers: int
    slots: int
    layers: int
    stride: int

    @property
    def window_bytes(self) -> int:
        return self.layers * self.slots * self.stride


def plan(cfg: ModelConfig, layout: Layout, resident: int, budget: int, rows: int = 1) -> MemoryPlan:
    """The MemoryPlan of `budget` bytes for `rows` sequences decoding together, or BudgetError."""
    if resident > budget:
        raise BudgetError(f"memory budget {budget:,} bytes does not hold the resident part: {resident:,} bytes "
                          "(embeddings, attention, norms, predictors and KV cache)")
    buffers = layout.groups * (layout.stride + layout.group_bytes)
    step = min(layout.groups, rows * cfg.ffn_candidates)
    slots = min(layout.groups, (budget - resident - buffers) // (layout.n_layers * layout.stride))
    if slots < step:
        least = resident + buffers + layout.n_layers * step * layout.stride
        raise BudgetError(f"memory budget {budget:,} bytes: the resident part ({resident:,} bytes) and the FFN "
                          f"buffers ({buffers:,}) leave room for {max(slots, 0)} groups a layer, fewer than the {step} "
                          f"a decode step reads; the least budget is {least:,} bytes")
    return MemoryPlan(budget, resident, buffers, slots, layout.n_layers, layout.stride)


class GroupSource(Protocol):
    """What OnDiskNet reads bundles from. `fetch(layer, idx [N, k'], x)` -> (bundles [rows(N), parts, group, dim],
    where [N, k'] int32: the row of bundles holding each group of idx); `read_layer(layer, x)` -> the layer's
    bundles [groups, parts, group, dim]. `x` is unused: it orders the calls after the layer's input is computed."""

    def rows(self, n: int) -> int: ...

    def fetch(self, layer: int, idx: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def read_layer(self, layer: int, x: np.ndarray) -> np.ndarray: ...


def _aligned(size: int) -> np.ndarray:
    """A zeroed, page-aligned byte buffer (anonymous memory: O_DIRECT reads land in it)."""
    return np.frombuffer(mmap.mmap(-1, max(size, 1)), np.uint8)[:size]


class DiskFFN:
    """The FFN bundles of ffn_groups.bin, read on demand through a per-layer window cache of `slots` groups.

    `window` W: a group stays held while one of the last W steps of its layer used it (None: while there is room);
    `threads` reads run at once. Counters: `bytes_read` (decode reads), `prefill_bytes`, `needed` and `found`
    (groups a decode step needed, and found held). `reset` empties the windows (a new sequence)."""

    def __init__(self, path: str | Path, layout: Layout, slots: int, window: int | None = None, threads: int = 16):
        self.path, self.layout, self.slots, self.window = Path(path), layout, slots, window
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd, self.direct = os.open(self.path, flags | os.O_DIRECT), True
        except OSError:  # a filesystem without O_DIRECT (tmpfs): read, then drop the pages read
            self.fd, self.direct = os.open(self.path, flags), False
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="hire-flash")
        self.threads, self.lock = threads, threading.Lock()
        self.cache = _aligned(layout.n_layers * slots * layout.stride).reshape(layout.n_layers, slots, layout.stride)
        self.layer = _aligned(layout.groups * layout.stride).reshape(layout.groups, layout.stride)
        self.run = max(1, (1 << 20) // layout.stride)  # groups per read call at most
        self.reset()

    def reset(self) -> None:
        """Forget every held group and zero the counters."""
        n, g = self.layout.n_layers, self.layout.groups
        self.slot_of = np.full((n, g), -1, np.int64)  # the slot holding each group, -1 for none
        self.last = np.full((n, g), -(2**62), np.int64)  # the step of each layer that last used each group
        self.steps = np.zeros(n, np.int64)
        self.free = [list(range(self.slots)) for _ in range(n)]
        self.bytes_read = self.prefill_bytes = self.needed = self.found = 0

    def close(self) -> None:
        self.pool.shutdown()
        os.close(self.fd)

    def _groups(self, raw: np.ndarray) -> np.ndarray:
        """Byte rows [M, stride] -> bundles [M, parts, group, dim]."""
        lay = self.layout
        return np.ascontiguousarray(raw[:, :lay.group_bytes]).view(jnp.dtype(lay.dtype)).reshape(len(raw), *lay.shape)

    def _read(self, layer: int, groups: np.ndarray, rows: list[np.ndarray]) -> int:
        """Read the sorted `groups` of `layer` into the byte rows `rows`, runs of neighbours in one call each, the
        calls spread over the pool; returns the bytes read."""
        stride, calls = self.layout.stride, []
        for i, g in enumerate(groups):
            if calls and g == calls[-1][1] + len(calls[-1][2]) and len(calls[-1][2]) < self.run:
                calls[-1][2].append(rows[i])
            else:
                calls.append((self.layout.offset(layer, int(g)), int(g), [rows[i]]))

        def read(call: tuple[int, int, list[np.ndarray]]) -> None:
            offset, _, buffers = call
            done = os.preadv(self.fd, buffers, offset)
            if done != stride * len(buffers):
                raise OSError(f"{self.path}: short read at byte {offset} ({done} of {stride * len(buffers)})")
            if not self.direct:
                os.posix_fadvise(self.fd, offset, done, os.POSIX_FADV_DONTNEED)

        list(self.pool.map(read, calls))
        return stride * len(groups)

    def rows(self, n: int) -> int:
        return self.slots

    def fetch(self, layer: int, idx: np.ndarray, x: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The layer's window (every slot: handed over as it is, no gather) after reading the groups of idx it
        lacks, and where they are."""
        layer = int(layer)
        with self.lock:
            step, slot_of, last, free = self.steps[layer], self.slot_of[layer], self.last[layer], self.free[layer]
            self.steps[layer] += 1
            if self.window is not None:  # groups no step of the window used leave
                self._evict(layer, np.flatnonzero((slot_of >= 0) & (last < step - self.window)))
            need = np.unique(idx)
            missing = need[slot_of[need] < 0]
            if len(missing) > len(free):  # the least recently used held groups not needed now make room
                spare = np.setdiff1d(np.flatnonzero(slot_of >= 0), need)
                self._evict(layer, spare[np.argsort(last[spare], kind="stable")][:len(missing) - len(free)])
            slots = [free.pop() for _ in missing]
            slot_of[missing] = slots
            self.bytes_read += self._read(layer, missing, [self.cache[layer, s] for s in slots])
            last[need] = step
            self.needed, self.found = self.needed + len(need), self.found + len(need) - len(missing)
            return self._groups(self.cache[layer]), slot_of[idx].astype(np.int32)

    def _evict(self, layer: int, groups: np.ndarray) -> None:
        self.free[layer] += self.slot_of[layer, groups].tolist()
        self.slot_of[layer, groups] = -1

    def read_layer(self, layer: int, x: np.ndarray | None = None) -> np.ndarray:
        with self.lock:
            groups = np.arange(self.layout.groups)
            self.prefill_bytes += self._read(int(layer), groups, list(self.layer))
            return self._groups(self.layer)

    @property
    def reuse(self) -> float:
        """The share of the groups decode steps needed that the window held."""
        return self.found / max(self.needed, 1)


def _safetensors_index(path: Path) -> tuple[int, dict[str, Any]]:
    """A safetensors file's data offset and header (name -> dtype, shape, data_offsets)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return 8 + size, json.loads(f.read(size))


SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class MappedFFN:
    """The naive way: the same bundles gathered from the FFN kernels of the float checkpoint (model.safetensors)
    memory-mapped, the OS paging them in and out. `drop_each_token`: the file's pages are dropped from the page
    cache before each decode step's first layer (hire.flash_bench, when no memory cgroup can hold the budget)."""

    def __init__(self, folder: str | Path, cfg: ModelConfig, drop_each_token: bool = False):
        self.path, self.cfg, self.drop_each_token = Path(folder) / WEIGHTS, cfg, drop_each_token
        start, header = _safetensors_index(self.path)
        self.file = open(self.path, "rb")
        self.map = mmap.mmap(self.file.fileno(), 0, prot=mmap.PROT_READ)
        self.kernels = []
        for i in range(cfg.n_layers):
            names = ["gate", "up", "down"] if cfg.gated else ["up", "down"]
            self.kernels.append([self._array(start, header[f"params/layers_{i}/ffn/{n}/kernel"]) for n in names])

    def _array(self, start: int, entry: dict[str, Any]) -> np.ndarray:
        dtype = np.dtype(jnp.dtype(SAFETENSORS_DTYPES[entry["dtype"]]))
        begin, end = entry["data_offsets"]
        return np.frombuffer(self.map, dtype, (end - begin) // dtype.itemsize, start + begin).reshape(entry["shape"])

    def drop_pages(self) -> None:
        """Unmap the file's pages from this process and drop them from the page cache."""
        self.map.madvise(mmap.MADV_DONTNEED)
        os.posix_fadvise(self.file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

    def rows(self, n: int) -> int:
        return n * self.cfg.ffn_candidates

    def fetch(self, layer: int, idx: np.ndarray, x: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The groups of idx gathered in its order."""
        if self.drop_each_token and int(layer) == 0:
            self.drop_pages()
        g, dim, kernels = self.cfg.ffn_group, self.cfg.dim, self.kernels[int(layer)]
        cols = (np.ravel(idx)[:, None] * g + np.arange(g)).ravel()
        out = np.empty((np.size(idx), len(kernels), g, dim), kernels[0].dtype)
        for i, kernel in enumerate(kernels):  # gate and up columns, down rows
            out[:, i] = (kernel[:, cols].T if i < len(kernels) - 1 else kernel[cols]).reshape(-1, g, dim)
        return out, np.arange(np.size(idx), dtype=np.int32).reshape(np.shape(idx))

    def read_layer(self, layer: int, x: np.ndarray | None = None) -> np.ndarray:
        g, dim, kernels = self.cfg.ffn_group, self.cfg.dim, self.kernels[int(layer)]
        out = np.empty((self.cfg.ffn_groups, len(kernels), g, dim), kernels[0].dtype)
        for i, kernel in enumerate(kernels):  # straight from the mapping, no copy on the way
            out[:, i] = (kernel.T if i < len(kernels) - 1 else kernel).reshape(-1, g, dim)
        return out


def ffn_on_disk(cfg: ModelConfig, x: jax.Array, approx: jax.Array, layer: int, source: GroupSource) -> jax.Array:
    """hire.sparse.group_sparse_ffn (per token, not `union`) with the bundles read from `source`: the same
    computation on the same values, so the same result bit for bit."""
    act = lambda h: activation(cfg, h)  # noqa: E731
    groups, candidates, keep = cfg.ffn_groups, cfg.ffn_candidates, cfg.ffn_k if cfg.ffn_keep_k else 0
    bundles = lambda n: jax.ShapeDtypeStruct((n, 3 if cfg.gated else 2, cfg.ffn_group, cfg.dim),  # noqa: E731
                                             jnp.dtype(cfg.dtype))
    n = x.size // cfg.dim
    if not sparse.use_gather(n, candidates, groups):  # the masked path: every group
        bundle = io_callback(functools.partial(source.read_layer, layer), bundles(groups), x)
        return sparse.group_sparse_ffn(x, bundle, approx, act, candidates, keep=keep)
    _, idx = jax.lax.top_k(sparse.approx_group_scores(approx.reshape(n, -1), act, groups, cfg.ffn_group), candidates)
    fetched, where = io_callback(functools.partial(source.fetch, layer),
                                 (bundles(source.rows(n)), jax.ShapeDtypeStruct(idx.shape, jnp.int32)), idx, x)
    out = sparse.per_token_groups(x.reshape(n, cfg.dim), fetched, where, act, keep)
    return out.astype(x.dtype).reshape(x.shape)


class OnDiskNet:
    """Transformer(cfg) whose group-sparse FFNs read their bundles from `source` (DiskFFN or MappedFFN): an
    Engine's `net`. The variables hold no FFN bundles."""

    def __init__(self, cfg: ModelConfig, source: GroupSource):
        self.cfg, self.source, self.net = cfg, source, Transformer(cfg)

    def apply(self, variables: dict, *args: Any, **kwargs: Any) -> Any:
        with nn.intercept_methods(self._intercept):
            return self.net.apply(variables, *args, **kwargs)

    def _intercept(self, call, args, kwargs, context):
        module = context.module
        if not (isinstance(module, GroupSparseFFN) and context.method_name == "__call__"):
            return call(*args, **kwargs)
        (x,) = args
        layer = int(module.scope.path[0].removeprefix("layers_"))
        return ffn_on_disk(module.cfg, x, predictors.scores(module.variables["hire"]["predictor"], x), layer,
                           self.source)


def load_resident(folder: str | Path, dtype: str | None = None, **hire: Any) -> LoadedModel:
    """The resident part of the hire checkpoint in `folder` run as `hire` asks (a group-sparse FFN, per token):
    every variable but the FFN bundles, read without reading the FFN kernels."""
    from hire.sharding import predictor_sources

    folder = resolve_model(folder)
    if detect_format(folder) != "hire":
        raise CheckpointError(f"{folder} is not in hire's format; write it with `hire convert {folder} DST "
                              "--weights-on-disk`")
    cfg = with_hire(read_config(folder, dtype), hire)
    if cfg.ffn != "group-sparse" or cfg.ffn_union:
        raise ValueError("weights on disk need the group-sparse FFN, per token (--ffn group-sparse, ffn_union false)")
    if not (folder / PREDICTORS).is_file():
        raise CheckpointError(f"no HiRE predictors in {folder} ({PREDICTORS}); build them with "
                              f"`hire calibrate --model {folder} --text FILE`")
    try:
        with safe_open(folder / WEIGHTS, framework="numpy") as f, \
                safe_open(folder / PREDICTORS, framework="numpy") as pred:
            cfg, sources = predictor_sources(cfg, pred, folder / PREDICTORS)
            tensors = {k: f.get_tensor(k) for k in f.keys() if "/ffn/" not in k}
            tensors |= {k: pred.get_tensor(name) for k, name in sources.items()}
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot read the weights in {folder}: {e}") from None
    variables = prepare_variables(cfg, unflatten(tensors), held_elsewhere="/ffn/bundle")
    tokenizer = load_tokenizer(folder) if any(folder.glob("tokenizer.*")) else None
    return LoadedModel(cfg, variables, tokenizer)


def resident_bytes(model: LoadedModel, slots: int, max_len: int) -> int:
    """Bytes the resident part keeps in memory: its weights and the KV cache of `slots` x `max_len` tokens."""
    cfg = model.cfg
    kv = slots * max_len * cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
    return sum(a.nbytes for a in jax.tree.leaves(model.variables)) + kv


def load_on_disk(path: str | Path, budget: int, window: int | None = None, slots: int = 1,
                 max_len: int | None = None, threads: int = 16, **hire: Any) -> tuple[LoadedModel, DiskFFN, MemoryPlan]:
    """The resident part of the model at `path`, its DiskFFN, and the MemoryPlan of `budget` bytes for an Engine of
    `slots` x `max_len` (default: the model's context); `hire` as in load_resident."""
    folder = resolve_model(path)
    file = folder / GROUPS
    if not file.is_file():
        raise CheckpointError(f"no {GROUPS} in {folder}; write it with `hire convert {folder} DST --weights-on-disk`")
    model = load_resident(folder, **hire)
    layout = read_layout(file)
    check_layout(file, layout, model.cfg)
    memory = plan(model.cfg, layout, resident_bytes(model, slots, min(max_len or model.cfg.max_seq_len,
                                                                      model.cfg.max_seq_len)), budget, slots)
    return model, DiskFFN(file, layout, memory.slots, window, threads), memory


def engine_on_disk(model: str | Path, budget: int | None, window: int | None, hire: dict[str, Any]):
    """An Engine of one slot for `model` with its FFN on disk (`hire generate --weights-on-disk`), run with its
    serving HiRE settings and `hire` on top; a bad `budget` or setting is an OptionError naming its option."""
    from hire.checkpoint import model_folder
    from hire.engine import Engine
    from hire.predictor_files import serving_settings

    if budget is None:
        raise OptionError("--weights-on-disk needs --memory-budget")
    try:
        loaded, store, _ = load_on_disk(model, budget, window, slots=1,
                                        **serving_settings(model_folder(model), {"ffn": "group-sparse", **hire}))
    except BudgetError as e:
        raise OptionError(str(e), "--memory-budget") from None
    except CheckpointError:
        raise
    except ValueError as e:
        raise OptionError(str(e), "--softmax/--ffn/--hire") from None
    return Engine(loaded, slots=1, net=OnDiskNet(loaded.cfg, store))


def convert_on_disk(src: str | Path, dst: str | Path, dtype: str | None = None) -> LoadedModel:
    """`hire convert SRC DST --weights-on-disk`: the hire checkpoint (hire.checkpoint.convert), SRC's HiRE
    predictors copied beside it, and ffn_groups.bin."""
    from hire.checkpoint import convert, model_folder
    from hire.predictor_files import META

    kept = {name: (model_folder(src) / name).read_bytes() for name in (PREDICTORS, META)
            if (model_folder(src) / name).is_file()}  # read first: DST may be SRC, which convert replaces
    model = convert(src, dst, dtype)
    for name, data in kept.items():
        (Path(dst) / name).write_bytes(data)
    write_groups(Path(dst) / GROUPS, Layout.of(model.cfg), model.variables["params"])
    return model


def convert_model(src: str | Path, dst: str | Path, dtype: str | None = None, quantize: str | None = None,
                  on_disk: bool = False) -> LoadedModel:
    """`hire convert`: hire.checkpoint.convert, or with `on_disk` convert_on_disk (which takes no `quantize`)."""
    from hire.checkpoint import convert

    if on_disk and quantize:
        raise OptionError("--weights-on-disk takes no --quantize")
    try:
        return convert_on_disk(src, dst, dtype) if on_disk else convert(src, dst, dtype, quantize)
    except CheckpointError:
        raise
    except ValueError as e:
        raise OptionError(str(e), "--quantize") from None
