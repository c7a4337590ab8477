"""Hugging Face checkpoint folders: config.json, model.safetensors (or indexed shards), tokenizer.json.

Supports the Llama family as transformers writes it: `llama`, `mistral`, `qwen2` and `mixtral`
(with experts either per-expert `block_sparse_moe.experts.{e}.w1/w2/w3` or fused
`mlp.experts.gate_up_proj`/`down_proj`). Tensors are read one at a time, checked by name and
shape, and transposed from torch's [out, in] to hire's [in, out].
"""
from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import jax
import numpy as np
import tokenizers
from safetensors import SafetensorError, safe_open

from hire.checkpoint import LoadedModel
from hire.config import ModelConfig, RopeScaling
from hire.formats import CheckpointError, build_config, prepare_variables, read_json, unflatten, with_dtype
from hire.tokenizer import HFTokenizer

SUPPORTED = ("llama", "mistral", "qwen2", "mixtral")
ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def load_hf(folder: Path, dtype: str | None = None) -> LoadedModel:
    """Load a Hugging Face folder, computing in `dtype` (default: the checkpoint's, else float32)."""
    folder = Path(folder)
    raw = read_json(folder / "config.json")
    cfg = hf_config(raw, dtype, folder)
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise CheckpointError(f"{folder}: no tokenizer.json (hire reads Hugging Face fast tokenizers only)")
    ids = _special_ids(raw)
    tokenizer = HFTokenizer(tokenizer_file, ids.get("bos_id"), ids.get("eos_id"))
    tokenizer.add_bos = _adds_bos(tokenizer_file, ids.get("bos_id"))
    return LoadedModel(cfg, prepare_variables(cfg, {"params": unflatten(_read_weights(folder, cfg))}), tokenizer)


def hf_config(raw: dict[str, Any], dtype: str | None = None, folder: Path = Path("model")) -> ModelConfig:
    """The ModelConfig of a config.json dict; `dtype` overrides the checkpoint's own."""
    kind = raw.get("model_type")
    if kind not in SUPPORTED:
        raise CheckpointError(f"model_type {kind!r} is not supported; supported: {', '.join(SUPPORTED)}")
    act = raw.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise CheckpointError(f"hidden_act {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    theta, scaling = _rope(raw)
    heads = raw["num_attention_heads"]
    cfg = build_config(folder / "config.json", dict(
        vocab_size=raw["vocab_size"], dim=raw["hidden_size"], n_layers=raw["num_hidden_layers"],
        n_heads=heads, n_kv_heads=raw.get("num_key_value_heads") or heads, ffn_dim=raw["intermediate_size"],
        head_dim=raw.get("head_dim") or 0, activation=ACTIVATIONS[act], norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=theta, rope_scaling=scaling, max_seq_len=raw.get("max_position_embeddings", 2048),
        sliding_window=_sliding_window(raw), tie_embeddings=raw.get("tie_word_embeddings", False),
        attention_bias=kind == "qwen2" or raw.get("attention_bias", False),
        n_experts=raw.get("num_local_experts", 0) if kind == "mixtral" else 0,
        n_experts_per_token=raw.get("num_experts_per_tok", 2), name=folder.name, **_special_ids(raw)))
    return with_dtype(cfg, dtype or raw.get("dtype") or raw.get("torch_dtype"))


def _special_ids(raw: dict[str, Any]) -> dict[str, int]:
    """The bos_id/eos_id config.json sets (the first EOS when it lists several)."""
    eos = raw.get("eos_token_id")
    ids = {"bos_id": raw.get("bos_token_id"), "eos_id": eos[0] if isinstance(eos, list) else eos}
    return {k: v for k, v in ids.items() if v is not None}


def _adds_bos(tokenizer_file: Path, bos_id: int | None) -> bool:
    """Whether tokenizer.json's post-processor prepends BOS, as transformers' tokenizer would."""
    return bos_id is not None and tokenizers.Tokenizer.from_file(str(tokenizer_file)).encode("x").ids[:1] == [bos_id]


def _rope(raw: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from transformers 5's `rope_parameters` or the older `rope_theta`/`rope_scaling`."""
    params = {**(raw.get("rope_scaling") or {}), **(raw.get("rope_parameters") or {})}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 1e6 if raw["model_type"] == "mixtral" else 1e4)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise CheckpointError(f"rope_type {kind!r} is not supported; supported: default, llama3")
    return theta, RopeScaling(factor=params["factor"], low_freq_factor=params["low_freq_factor"],
                              high_freq_factor=params["high_freq_factor"],
                              original_max_position=params["original_max_position_embeddings"])


def _sliding_window(raw: dict[str, Any]) -> int:
    """The window when every layer slides, 0 when none does; hire has no per-layer mix."""
    window = raw.get("sliding_window") or 0
    kind = raw["model_type"]
    if not window or kind == "llama" or (kind == "qwen2" and not raw.get("use_sliding_window")):
        return 0
    first = raw.get("max_window_layers", 28) if kind == "qwen2" else 0  # qwen2 slides from this layer on
    layers = raw.get("layer_types") or ["sliding_attention" if i >= first else "full_attention"
                                        for i in range(raw["num_hidden_layers"])]
    if set(layers) == {"full_attention"}:
        return 0
    if set(layers) == {"sliding_attention"}:
        return window
    raise CheckpointError("checkpoint mixes full and sliding-window attention layers, which hire does not support")


def _shards(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, from the shard index or model.safetensors."""
    index, single = folder / "model.safetensors.index.json", folder / "model.safetensors"
    if index.is_file():
        where = {k: folder / f for k, f in read_json(index)["weight_map"].items()}
    elif single.is_file():
        with safe_open(single, "flax") as f:
            where = dict.fromkeys(f.keys(), single)
    else:
        raise CheckpointError(f"{folder}: no model.safetensors or {index.name}")
    if missing := sorted({p.name for p in where.values() if not p.is_file()}):
        raise CheckpointError(f"{folder}: {index.name} lists missing files {missing}")
    return where


class _Tensors:
    """The tensors of a folder's safetensors files, read one at a time; remembers which were never taken."""

    def __init__(self, folder: Path, stack: ExitStack):
        self.folder, self.where = folder, _shards(folder)
        self.left = set(self.where)
        self.files = {p: stack.enter_context(safe_open(p, "flax")) for p in set(self.where.values())}

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def take(self, key: str, *shape: int) -> np.ndarray:
        """Tensor `key`, checked to have `shape`."""
        if key not in self.where:
            raise CheckpointError(f"{self.folder}: missing tensor {key}")
        f = self.files[self.where[key]]
        if (found := tuple(f.get_slice(key).get_shape())) != shape:
            raise CheckpointError(f"{self.folder}: tensor {key} has shape {found}, expected {shape}")
        self.left.discard(key)
        return np.asarray(f.get_tensor(key))

    def linear(self, key: str, n_out: int, n_in: int) -> np.ndarray:
        """A torch Linear weight [out, in] as a hire kernel [in, out]."""
        return self.take(key, n_out, n_in).T


def _read_weights(folder: Path, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Flat {"layers_0/attn/q/kernel": array}, after checking every tensor's name and shape."""
    # The "flax" framework reads bfloat16, which the numpy one cannot; keep its arrays on the host.
    try:
        with ExitStack() as stack, jax.default_device(jax.devices("cpu")[0]):
            tensors = _Tensors(folder, stack)
            flat = _map_weights(cfg, tensors)
    except SafetensorError as e:
        raise CheckpointError(f"{folder}: cannot read safetensors: {e}") from None
    if cfg.tie_embeddings:
        tensors.left.discard("lm_head.weight")
    if tensors.left:
        raise CheckpointError(f"{folder}: unexpected tensors {sorted(tensors.left)}")
    return flat


def _map_weights(cfg: ModelConfig, t: _Tensors) -> dict[str, np.ndarray]:
    """hire's flat variable names, each filled from its Hugging Face tensor(s)."""
    take, linear = t.take, t.linear
    D, F, V, E = cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.n_experts
    q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    flat = {"embed": take("model.embed_tokens.weight", V, D), "norm/weight": take("model.norm.weight", D)}
    if not cfg.tie_embeddings:
        flat["lm_head"] = linear("lm_head.weight", V, D)
    for i in range(cfg.n_layers):
        p, h = f"layers_{i}/", f"model.layers.{i}."
        flat[p + "attn_norm/weight"] = take(h + "input_layernorm.weight", D)
        flat[p + "ffn_norm/weight"] = take(h + "post_attention_layernorm.weight", D)
        for n, n_out, n_in in (("q", q_dim, D), ("k", kv_dim, D), ("v", kv_dim, D), ("o", D, q_dim)):
            flat[f"{p}attn/{n}/kernel"] = linear(f"{h}self_attn.{n}_proj.weight", n_out, n_in)
            if cfg.attention_bias and n != "o":
                flat[f"{p}attn/{n}/bias"] = take(f"{h}self_attn.{n}_proj.bias", n_out)
        if not E:
            for n, n_out, n_in in (("gate", F, D), ("up", F, D), ("down", D, F)):
                flat[f"{p}ffn/{n}/kernel"] = linear(f"{h}mlp.{n}_proj.weight", n_out, n_in)
            continue
        fused = h + "mlp.experts."
        if fused + "gate_up_proj" in t:  # transformers 5's in-memory layout: [E, 2F, D] gate then up, [E, D, F]
            gate_up = take(fused + "gate_up_proj", E, 2 * F, D).transpose(0, 2, 1)
            flat[p + "moe/router"] = linear(h + "mlp.gate.weight", E, D)
            flat[p + "moe/gate"], flat[p + "moe/up"] = gate_up[..., :F], gate_up[..., F:]
            flat[p + "moe/down"] = take(fused + "down_proj", E, D, F).transpose(0, 2, 1)
            continue
        x = h + "block_sparse_moe."  # the per-expert layout save_pretrained writes
        flat[p + "moe/router"] = linear(x + "gate.weight", E, D)
        for n, w, n_out, n_in in (("gate", "w1", F, D), ("up", "w3", F, D), ("down", "w2", D, F)):
            flat[f"{p}moe/{n}"] = np.stack([linear(f"{x}experts.{e}.{w}.weight", n_out, n_in) for e in range(E)])
    return flat
