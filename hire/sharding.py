"""Tensor parallelism over one mesh axis, "model": where each variable and the KV cache live, and loading
each process's own slice of a hire checkpoint.

Megatron-style splits, so that a layer needs one all-reduce after attention and one after the FFN:
q, k, v and the FFN's up and gate split their output features (attention heads, FFN neurons), o and down
split their input features; the cache splits its KV heads; embed and lm_head split the vocabulary. With HiRE
(hire.sparse) the group-sparse FFN's bundle splits its neuron groups, and each predictor splits the rows it
predicts (vocabulary rows, FFN gate and up neurons: a quantized copy's rows and scales, a low-rank predictor's
second factor b), its first factor a replicated. Norms, a MoE router, LoRA adapters and anything not named here
are replicated, and so is any tensor whose split dimension the device count does not divide (correct, only not
split). The engine's jitted functions take these shardings from their inputs and GSPMD inserts the collectives;
traced under `on_mesh`, the HiRE operators run their own sharded code (hire.sharded_sparse).

Sampling reads the logits that lm_head leaves vocabulary-sharded: `sample_sharded` takes greedy and top-k
rows through DA-TOP-k (hire.topk.da_top_k: each device's own top-k, one all_gather of the candidates and of
each device's softmax sums) instead of gathering the logits; top-p and full-distribution sampling fall back to
hire.sampling.sample, which XLA feeds by gathering them.

With several processes (jax.distributed, one per host) every process runs this same code: `load_sharded`
reads only the slices of model.safetensors (and of the HiRE predictors) that this process's devices hold.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors import SafetensorError, safe_open

from hire.checkpoint import detect_format, resolve_model, with_hire
from hire.config import ModelConfig
from hire.formats import CheckpointError, check_variables, expected_variables, unflatten
from hire.formats.native import WEIGHTS, read_config
from hire.loaded import LoadedModel
from hire.predictor_files import PREDICTORS
from hire.sampling import RowSampling, gumbel_noise, sample, scale
from hire.sharded_sparse import AXIS
from hire.sparse import bundle_ffn
from hire.tokenizer import load_tokenizer
from hire.topk import da_top_k

TOP_K_CAP = 64  # the largest top_k that sample_sharded serves through DA-TOP-k (candidates per device)

_OUT = P(None, AXIS)  # output features split
_IN = P(AXIS, None)  # input features split
RULES: dict[str, P] = {
    "embed": _IN, "lm_head": _OUT,
    "attn/q/kernel": _OUT, "attn/k/kernel": _OUT, "attn/v/kernel": _OUT, "attn/o/kernel": _IN,
    "attn/q/bias": P(AXIS), "attn/k/bias": P(AXIS), "attn/v/bias": P(AXIS),
    "ffn/up/kernel": _OUT, "ffn/gate/kernel": _OUT, "ffn/down/kernel": _IN,
    "moe/up": _OUT, "moe/gate": _OUT, "moe/down": _IN,  # each expert's arrays (moe/up_0, ...): its neurons
    # HiRE: the bundle [groups, parts, g, dim] splits its groups; predictors the rows they predict
    "ffn/bundle": _IN, "softmax/b": _OUT, "softmax/q": _IN, "softmax/scale": P(AXIS),
    "ffn/predictor/b": _OUT, "ffn/predictor/q": _IN, "ffn/predictor/scale": P(AXIS),
}


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh named "model" over `devices` (default: every device of every process)."""
    return Mesh(np.array(devices if devices is not None else jax.devices()), (AXIS,))


def _fit(spec: P, shape: tuple[int, ...], n: int) -> P:
    """`spec`, or replicated when `n` does not divide a dimension it splits."""
    return spec if all(s is None or d % n == 0 for s, d in zip(spec, shape)) else P()


def variable_spec(name: str, shape: tuple[int, ...], n: int) -> P:
    """The PartitionSpec of the flattened variable `name` ("params/layers_0/attn/q/kernel", "hire/softmax/q") over
    `n` devices."""
    match = re.fullmatch(r"(?:params|hire)/(?:layers_\d+/)?(.+?)(?:_\d+)?", name)  # moe/up_3: expert 3's moe/up
    return _fit(RULES.get(match.group(1), P()) if match else P(), shape, n)


def cache_spec(cfg: ModelConfig, n: int) -> P:
    """Both cache tensors (k [B, Kv, D, S], v [B, Kv, S, D]) split their KV heads."""
    return P(None, AXIS) if cfg.n_kv_heads % n == 0 else P()


def cache_sharding(cfg: ModelConfig, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, cache_spec(cfg, mesh.size))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def load_sharded(path: str | Path, mesh: Mesh, dtype: str | None = None, **hire: Any) -> LoadedModel:
    """Load a hire-format checkpoint as arrays sharded over `mesh`, reading only this process's slices.

    `hire` overrides the config's HiRE fields as in hire.checkpoint.load_model. A config that asks for HiRE gets
    what hire.predictor_files.sparsify builds: each device bundles its own FFN groups from its slices of the kernels,
    and the predictors come from the slices of hire_predictors.safetensors it holds.
    """
    folder = resolve_model(path)
    if detect_format(folder) != "hire":
        raise CheckpointError(f"{folder} is not in hire's format; a sharded load reads hire checkpoints only "
                              "(write one with `hire convert`)")
    cfg = with_hire(read_config(folder, dtype), hire)
    bundled = cfg.ffn == "group-sparse"
    try:
        with contextlib.ExitStack() as files:
            f = files.enter_context(safe_open(folder / WEIGHTS, framework="numpy"))
            stored = {k: jax.ShapeDtypeStruct(tuple(f.get_slice(k).get_shape()), np.float32) for k in f.keys()}
            check_variables(cfg.dense(), unflatten(stored))  # names and shapes only
            sources: dict[str, str] = {}
            if cfg.sparse:
                if not (folder / PREDICTORS).is_file():
                    raise CheckpointError(f"no HiRE predictors in {folder} ({PREDICTORS}); build them with "
                                          f"`hire calibrate --model {folder} --text FILE`")
                pred = files.enter_context(safe_open(folder / PREDICTORS, framework="numpy"))
                cfg, sources = predictor_sources(cfg, pred, folder / PREDICTORS)
            want = expected_variables(cfg)
            have = {k: v for k, v in stored.items() if not (bundled and "/ffn/" in k)}
            have |= {k: w for k, w in want.items() if k.endswith("/ffn/bundle")}
            have |= {k: jax.ShapeDtypeStruct(tuple(pred.get_slice(key).get_shape()), np.float32)
                     for k, key in sources.items()}
            check_variables(cfg, unflatten(have))
            arrays = {}
            for k, w in want.items():
                sharding = NamedSharding(mesh, variable_spec(k, w.shape, mesh.size))
                arrays[k] = (_load(pred, sources[k], w, sharding) if k in sources
                             else _load_bundle(f, k.rsplit("/", 1)[0], cfg, w, sharding) if k.endswith("/ffn/bundle")
                             else _load(f, k, w, sharding))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot read the weights in {folder}: {e}") from None
    return LoadedModel(cfg, unflatten(arrays), load_tokenizer(folder))


def predictor_sources(cfg: ModelConfig, f, file: Path) -> tuple[ModelConfig, dict[str, str]]:
    """For each "hire" variable `cfg` asks for, its name in the open predictor file `f` (KIND/PATH/NAME), and `cfg`
    with `hire_rank` set to a low-rank predictor's own rank (as hire.predictor_files.sparsify does)."""
    places = [("softmax", "softmax")] if cfg.softmax != "dense" else []
    if cfg.ffn == "group-sparse":
        places += [("ffn", f"layers_{i}/ffn/predictor") for i in range(cfg.n_layers)]
    sources = {}
    for part, place in places:
        kind = cfg.predictor_kind(part)
        names = [k for k in f.keys() if k.rsplit("/", 1)[0] == f"{kind}/{place}"]
        if not names:
            raise CheckpointError(f"no {kind} predictor for {place} in {file}")
        if kind == "lr" and f"lr/{place}/a" in names:
            cfg = cfg.replace(hire_rank=f.get_slice(f"lr/{place}/a").get_shape()[1])
        sources |= {f"hire/{place}/{k.rsplit('/', 1)[1]}": k for k in names}
    return cfg, sources


def _load(f, name: str, want: jax.ShapeDtypeStruct, sharding: NamedSharding) -> jax.Array:
    """One variable, each local device's piece read from the open safetensors file `f` alone."""
    return jax.make_array_from_callback(want.shape, sharding,
                                        lambda index: np.asarray(f.get_slice(name)[index], want.dtype))


def _load_bundle(f, ffn: str, cfg: ModelConfig, want: jax.ShapeDtypeStruct, sharding: NamedSharding) -> jax.Array:
    """The bundle of the FFN `ffn` ("params/layers_0/ffn"; hire.sparse.bundle_ffn): each local device's piece
    bundled from its groups' columns of up and gate and rows of down, read from the open file `f` alone."""
    size = cfg.ffn_group

    def piece(index: tuple[slice, ...]) -> np.ndarray:
        groups = range(cfg.ffn_groups)[index[0]]
        neurons = slice(groups.start * size, groups.stop * size)
        columns = lambda name: f.get_slice(f"{ffn}/{name}/kernel")[:, neurons]  # noqa: E731
        bundle = bundle_ffn(columns("up"), f.get_slice(f"{ffn}/down/kernel")[neurons],
                            columns("gate") if cfg.gated else None, size)
        return np.asarray(bundle, want.dtype)[(slice(None), *index[1:])]

    return jax.make_array_from_callback(want.shape, sharding, piece)


def on_mesh(fn: Callable, mesh: Mesh | None) -> Callable:
    """`fn`, traced with `mesh` as the context mesh: the model's HiRE operators then run sharded over it
    (hire.sharded_sparse). The engine's jitted functions are built so. Without a mesh, `fn` itself."""
    if mesh is None:
        return fn

    def traced(*args: Any, **kwargs: Any) -> Any:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)
    return traced


def held_bytes(tree) -> int:
    """Bytes of distinct data this process holds of `tree`'s arrays: a piece on several local devices counts once."""
    return sum(sum({str(s.index): s.data.nbytes for s in a.addressable_shards}.values())
               for a in jax.tree.leaves(tree))


PATHS = ("greedy", "top_k", "gather")  # sample_sharded's branches


def sample_sharded(logits: jax.Array, rows: RowSampling, positions: jax.Array, mesh: Mesh,
                   cap: int = TOP_K_CAP, path: str | None = None) -> tuple[jax.Array, jax.Array]:
    """hire.sampling.sample for logits [B, V] split over `mesh`'s vocabulary axis, without gathering them when
    every row is greedy or samples with 1 <= top_k <= `cap` and top_p 1: DA-TOP-k with k_local = k (exact) brings
    each row's k best (logit, index) pairs and the log-sum-exp of its logits in one all_gather; the draw is the
    Gumbel-max over those candidates with the noise `sample` would add at their indices, so the tokens and
    logprobs are `sample`'s (up to exact ties and float rounding). Other batches (top-p < 1, top_k 0 or above
    `cap` with a temperature) run `sample` on the gathered logits. A vocabulary the mesh does not divide: `sample`.
    `path`, one of PATHS, compiles that branch alone (for every batch: tests and collective counts).
    """
    vocab, shards = logits.shape[-1], mesh.shape[AXIS]
    if vocab % shards:
        return sample(logits, rows, positions)
    logits, cap = logits.astype(jnp.float32), min(cap, vocab // shards)

    def candidates(k: int) -> tuple[jax.Array, ...]:
        """Each row's k largest logits, their indices and the log-sum-exp; the vocabulary is DA-TOP-k's rows."""
        return da_top_k(lambda _, by_vocab: by_vocab.T, None, logits.T, mesh=mesh, axis=AXIS, k=k, k_local=k,
                        logsumexp=True)

    def greedy() -> tuple[jax.Array, jax.Array]:
        values, indices, lse = candidates(1)
        return indices[:, 0], values[:, 0] - lse

    def top_k() -> tuple[jax.Array, jax.Array]:
        values, indices, lse = candidates(cap)  # [B, cap], best first
        scaled = scale(values, rows)
        k = jnp.clip(rows.top_k, 1, cap)
        keep = scaled >= jnp.take_along_axis(scaled, (k - 1)[:, None], -1)  # as hire.sampling.filter_logits
        noise = jax.lax.with_sharding_constraint(gumbel_noise(rows, positions, vocab), replicated(mesh))
        noisy = jnp.where(keep, scaled + jnp.take_along_axis(noise, indices, -1), -jnp.inf)
        pick = jnp.where(rows.temperature > 0, jnp.argmax(noisy, -1), 0)[:, None]
        return jnp.take_along_axis(indices, pick, -1)[:, 0], jnp.take_along_axis(values, pick, -1)[:, 0] - lse

    branches = (greedy, top_k, lambda: sample(logits, rows, positions))
    if path is not None:
        return branches[PATHS.index(path)]()
    greedy_rows = rows.temperature <= 0
    fits = greedy_rows | ((rows.top_k >= 1) & (rows.top_k <= cap) & (rows.top_p >= 1))
    return jax.lax.switch(jnp.where(jnp.all(greedy_rows), 0, jnp.where(jnp.all(fits), 1, 2)), branches)
