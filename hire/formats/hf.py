"""Hugging Face checkpoint folders: config.json, model.safetensors (or indexed shards), tokenizer.json.

Supports the Llama family as transformers writes it: `llama`, `mistral`, `qwen2` and `mixtral`
(with experts either per-expert `block_sparse_moe.experts.{e}.w1/w2/w3` or fused
`mlp.experts.gate_up_proj`/`down_proj`), and Gemma 3's text model: `gemma3_text`, or the text half of a
`gemma3` folder (its vision tower left unread). Tensors are read one at a time, checked by name and
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

from hire.config import ModelConfig, RopeScaling
from hire.formats import CheckpointError, build_config, prepare_variables, read_json, unflatten, with_dtype
from hire.loaded import LoadedModel
from hire.tokenizer import HFTokenizer, chat_template_in

SUPPORTED = ("llama", "mistral", "qwen2", "mixtral", "gemma3_text", "gemma3")
ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
# hire's layer norms <- Hugging Face's: Llama's pre-norms, and Gemma's four (its post_attention_layernorm is
# the attention output's norm)
NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
NORMS_SANDWICH = {"attn_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
                  "ffn_norm": "pre_feedforward_layernorm", "post_ffn_norm": "post_feedforward_layernorm"}
# Where the text decoder's tensors live: a CausalLM's, and a gemma3 folder's as transformers 5 and 4 save it
TEXT_BASES = ("model.", "model.language_model.", "language_model.model.")
OTHER_MODALITIES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
# Gemma3TextConfig's defaults: hub configs written by transformers 4 leave out the fields that equal them
GEMMA3_DEFAULTS = dict(
    vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072,
    rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=1, tie_word_embeddings=True, query_pre_attn_scalar=256,
    sliding_window=4096, rope_theta=1e6, rope_local_base_freq=1e4)


def load_hf(folder: Path, dtype: str | None = None) -> LoadedModel:
    """Load a Hugging Face folder, computing in `dtype` (default: the checkpoint's, else float32)."""
    folder = Path(folder)
    raw = _text_config(read_json(folder / "config.json"))
    cfg = hf_config(raw, dtype, folder)
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise CheckpointError(f"{folder}: no tokenizer.json (hire reads Hugging Face fast tokenizers only)")
    ids = _special_ids(raw)
    tokenizer = HFTokenizer(tokenizer_file, ids.get("bos_id"), ids.get("eos_id"),
                            chat_template=chat_template_in(folder), end_ids=_declared_ends(folder, raw))
    tokenizer.add_bos = _adds_bos(tokenizer_file, ids.get("bos_id"))
    return LoadedModel(cfg, prepare_variables(cfg, {"params": unflatten(_read_weights(folder, cfg))}), tokenizer)


def hf_config(raw: dict[str, Any], dtype: str | None = None, folder: Path = Path("model")) -> ModelConfig:
    """The ModelConfig of a config.json dict; `dtype` overrides the checkpoint's own."""
    if (kind := raw.get("model_type")) not in SUPPORTED:
        raise CheckpointError(f"model_type {kind!r} is not supported; supported: {', '.join(SUPPORTED)}")
    raw = _text_config(raw)
    kind = raw["model_type"]
    gemma = kind == "gemma3_text"
    act_field = "hidden_activation" if gemma else "hidden_act"
    act = raw.get(act_field, "silu")
    if act not in ACTIVATIONS:
        raise CheckpointError(f"{act_field} {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    theta, scaling, local_theta = _rope(raw)
    window, global_every = _attention_layers(raw)
    heads = raw["num_attention_heads"]
    cfg = build_config(folder / "config.json", dict(
        vocab_size=raw["vocab_size"], dim=raw["hidden_size"], n_layers=raw["num_hidden_layers"],
        n_heads=heads, n_kv_heads=raw.get("num_key_value_heads") or heads, ffn_dim=raw["intermediate_size"],
        head_dim=raw.get("head_dim") or 0, activation=ACTIVATIONS[act], norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=theta, rope_scaling=scaling, max_seq_len=raw.get("max_position_embeddings", 2048),
        sliding_window=window, global_every=global_every, rope_local_theta=local_theta,
        tie_embeddings=raw.get("tie_word_embeddings", False),
        attention_bias=kind == "qwen2" or raw.get("attention_bias", False),
        n_experts=raw.get("num_local_experts", 0) if kind == "mixtral" else 0,
        n_experts_per_token=raw.get("num_experts_per_tok", 2), name=folder.name, **_special_ids(raw),
        **(_gemma3(raw) if gemma else {})))
    return with_dtype(cfg, dtype or raw.get("dtype") or raw.get("torch_dtype"))


def _text_config(raw: dict[str, Any]) -> dict[str, Any]:
    """A gemma3 config's text_config (the outer ids and dtype where it lacks them), with Gemma 3's defaults
    filled in; other configs as they are."""
    if raw.get("model_type") == "gemma3":
        outer = {k: raw[k] for k in ("bos_token_id", "eos_token_id", "dtype", "torch_dtype", "tie_word_embeddings")
                 if k in raw}
        raw = {**outer, **(raw.get("text_config") or {}), "model_type": "gemma3_text"}
    return {**GEMMA3_DEFAULTS, **raw} if raw.get("model_type") == "gemma3_text" else raw


def _special_ids(raw: dict[str, Any]) -> dict[str, int]:
    """The bos_id/eos_id config.json sets (the first EOS when it lists several)."""
    eos = raw.get("eos_token_id")
    ids = {"bos_id": raw.get("bos_token_id"), "eos_id": eos[0] if isinstance(eos, list) else eos}
    return {k: v for k, v in ids.items() if v is not None}


def _declared_ends(folder: Path, raw: dict[str, Any]) -> list[int | str]:
    """The ids (or token texts) that end generation, as the folder declares them: config.json's and
    generation_config.json's eos_token_id (an id or a list), tokenizer_config.json's eos_token."""
    listed = lambda v: v if isinstance(v, list) else [v]  # noqa: E731
    ends = listed(raw.get("eos_token_id"))
    if (generation := folder / "generation_config.json").is_file():
        ends += listed(read_json(generation).get("eos_token_id"))
    if (config := folder / "tokenizer_config.json").is_file():
        eos = read_json(config).get("eos_token")
        ends.append(eos.get("content") if isinstance(eos, dict) else eos)
    return [e for e in ends if isinstance(e, int | str)]


def _adds_bos(tokenizer_file: Path, bos_id: int | None) -> bool:
    """Whether tokenizer.json's post-processor prepends BOS, as transformers' tokenizer would."""
    return bos_id is not None and tokenizers.Tokenizer.from_file(str(tokenizer_file)).encode("x").ids[:1] == [bos_id]


def _gemma3(raw: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields that make a decoder Gemma 3's; refuses the options hire lacks."""
    for f in ("final_logit_softcapping", "attn_logit_softcapping"):
        if raw.get(f) is not None:
            raise CheckpointError(f"{f} {raw[f]} is not supported (hire has no softcapping; it must be null)")
    if raw.get("use_bidirectional_attention"):
        raise CheckpointError("use_bidirectional_attention true is not supported (hire decodes causally)")
    return dict(norm_offset=1.0, qk_norm=True, post_norms=True, embed_scale=True,
                query_scale=float(raw["query_pre_attn_scalar"]))


def _rope(raw: dict[str, Any]) -> tuple[float, RopeScaling | None, float]:
    """(theta, scaling, local theta) from transformers 5's `rope_parameters` (Gemma 3: one per layer type) or the
    older `rope_theta`/`rope_scaling`/`rope_local_base_freq`; the local theta is 0 but for Gemma 3."""
    kind = raw["model_type"]
    params = {**(raw.get("rope_scaling") or {}), **(raw.get("rope_parameters") or {})}
    local: dict[str, Any] = {}
    if "full_attention" in params or "sliding_attention" in params:
        params, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 1e6 if kind == "mixtral" else 1e4)))
    local_theta = float(local.get("rope_theta", raw["rope_local_base_freq"])) if kind == "gemma3_text" else 0.0
    if (local_kind := local.get("rope_type", "default")) != "default":
        raise CheckpointError(f"rope_type {local_kind!r} of the sliding layers is not supported; supported: default")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None, local_theta
    if rope_type == "linear":
        return theta, RopeScaling(factor=params["factor"], kind="linear"), local_theta
    if rope_type != "llama3":
        raise CheckpointError(f"rope_type {rope_type!r} is not supported; supported: default, linear, llama3")
    return theta, RopeScaling(factor=params["factor"], low_freq_factor=params["low_freq_factor"],
                              high_freq_factor=params["high_freq_factor"],
                              original_max_position=params["original_max_position_embeddings"]), local_theta


def _attention_layers(raw: dict[str, Any]) -> tuple[int, int]:
    """(sliding_window, global_every): (0, 0) when every layer attends globally, (window, 0) when every layer
    slides, (window, n) when every n-th layer is global and the others slide (Gemma 3); other mixes are refused."""
    window, kind, n = raw.get("sliding_window") or 0, raw["model_type"], raw["num_hidden_layers"]
    if not window or kind == "llama" or (kind == "qwen2" and not raw.get("use_sliding_window")):
        return 0, 0
    if kind == "gemma3_text":
        every = raw.get("sliding_window_pattern", 6)
        default = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)]
    else:
        first = raw.get("max_window_layers", 28) if kind == "qwen2" else 0  # qwen2 slides from this layer on
        default = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    layers = list(raw.get("layer_types") or default)
    full = [i for i, t in enumerate(layers) if t == "full_attention"]
    if len(layers) != n or set(layers) - {"full_attention", "sliding_attention"}:
        raise CheckpointError(f"layer_types must list {n} of full_attention and sliding_attention, got {layers}")
    if not full:
        return window, 0
    if len(full) == n:
        return 0, 0
    every = full[0] + 1
    if layers != ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)]:
        raise CheckpointError("layer_types mixes full and sliding-window attention other than every n-th layer "
                              f"global, which hire does not support: {layers}")
    return window, every


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
        tensors.left -= {"lm_head.weight", "language_model.lm_head.weight"}
    tensors.left = {k for k in tensors.left if not k.startswith(OTHER_MODALITIES)}
    if tensors.left:
        raise CheckpointError(f"{folder}: unexpected tensors {sorted(tensors.left)}")
    return flat


def _map_weights(cfg: ModelConfig, t: _Tensors) -> dict[str, np.ndarray]:
    """hire's flat variable names, each filled from its Hugging Face tensor(s)."""
    take, linear = t.take, t.linear
    D, F, V, E = cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.n_experts
    q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    base = next((b for b in TEXT_BASES if b + "embed_tokens.weight" in t), "model.")
    flat = {"embed": take(base + "embed_tokens.weight", V, D), "norm/weight": take(base + "norm.weight", D)}
    if not cfg.tie_embeddings:
        flat["lm_head"] = linear("lm_head.weight", V, D)
    for i in range(cfg.n_layers):
        p, h = f"layers_{i}/", f"{base}layers.{i}."
        norms = NORMS_SANDWICH if cfg.post_norms else NORMS
        flat |= {f"{p}{n}/weight": take(f"{h}{hf_name}.weight", D) for n, hf_name in norms.items()}
        if cfg.qk_norm:
            for n in ("q_norm", "k_norm"):
                flat[f"{p}attn/{n}/weight"] = take(f"{h}self_attn.{n}.weight", cfg.head_dim)
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
            down = take(fused + "down_proj", E, D, F).transpose(0, 2, 1)
            flat[p + "moe/router"] = linear(h + "mlp.gate.weight", E, D)
            for e in range(E):  # hire keeps one array per expert (hire.moe)
                flat[f"{p}moe/gate_{e}"], flat[f"{p}moe/up_{e}"] = gate_up[e, :, :F], gate_up[e, :, F:]
                flat[f"{p}moe/down_{e}"] = down[e]
            continue
        x = h + "block_sparse_moe."  # the per-expert layout save_pretrained writes
        flat[p + "moe/router"] = linear(x + "gate.weight", E, D)
        for n, w, n_out, n_in in (("gate", "w1", F, D), ("up", "w3", F, D), ("down", "w2", D, F)):
            for e in range(E):
                flat[f"{p}moe/{n}_{e}"] = linear(f"{x}experts.{e}.{w}.weight", n_out, n_in)
    return flat
