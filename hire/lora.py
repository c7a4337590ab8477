"""Hugging Face PEFT LoRA adapters, loaded side by side so that each batch row can pick one.

An adapter folder holds adapter_config.json and adapter_model.safetensors, with per adapted
projection lora_A [r, in] and lora_B [out, r]. Adapters of smaller rank are zero-padded to the
largest (exact: the padding adds nothing) and projections an adapter leaves alone get zeros.
`fan_in_fan_out` is ignored: it only concerns GPT-2 style Conv1D base layers, never lora_A/B.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from safetensors import SafetensorError, safe_open

from hire.config import LORA_TARGETS, ModelConfig
from hire.formats import CheckpointError, flatten, prepare_variables, read_json, unflatten
from hire.loaded import LoadedModel

PEFT_BLOCKS = {"q": "self_attn", "k": "self_attn", "v": "self_attn", "o": "self_attn",
          "gate": "mlp", "up": "mlp", "down": "mlp"}
HIRE_BLOCKS = {"self_attn": "attn", "mlp": "ffn"}
MODULES = {f"{t}_proj": t for t in LORA_TARGETS}  # PEFT's module names -> hire's targets
# base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight, optionally with an adapter name before
# "weight" or without "weight" at all.
KEY = re.compile(r"(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])"
                 r"(?:\.\w+)?(?:\.weight)?")
# adapter_config.json fields that, when set, change the forward pass in ways hire does not implement.
UNSUPPORTED = ("use_dora", "lora_bias", "use_qalora", "use_bdlora", "kasa_config", "monteclora_config",
               "arrow_config", "alora_invocation_tokens", "modules_to_save", "trainable_token_indices",
               "target_parameters", "layer_replication", "rank_pattern", "alpha_pattern")


@dataclass
class Adapter:
    rank: int
    scale: float
    weights: dict[str, tuple[np.ndarray, np.ndarray]]  # "layers_0/attn/q" -> (A [in, r], B [r, out])


def load_adapters(model: LoadedModel, adapters: dict[str, str | Path]) -> tuple[LoadedModel, dict[str, int]]:
    """`model` serving the PEFT adapter folders `adapters` (name -> folder), replacing any it had.

    Returns the model and each name's adapter index, the id a batch row passes to select it.
    """
    if not adapters:
        raise ValueError("no adapters to load")
    kernels = {k.removesuffix("/kernel"): tuple(v.shape) for k, v in flatten(model.variables["params"]).items()
               if k.endswith("/kernel")}
    read = [read_adapter(Path(folder), model.cfg, kernels) for folder in adapters.values()]
    rank = max(a.rank for a in read)
    targets = tuple(t for t in LORA_TARGETS if any(p.endswith(f"/{t}") for a in read for p in a.weights))
    cfg = model.cfg.replace(lora_adapters=len(read), lora_rank=rank, lora_targets=targets)
    lora = {"scale": np.array([a.scale for a in read], np.float32)}
    for path in (p for p in kernels if p.rsplit("/", 1)[-1] in targets):
        n_in, n_out = kernels[path]
        a, b = np.zeros((len(read), n_in, rank), np.float32), np.zeros((len(read), rank, n_out), np.float32)
        for i, adapter in enumerate(read):
            if path in adapter.weights:
                a[i, :, :adapter.rank], b[i, :adapter.rank] = adapter.weights[path]
        lora[f"{path}/a"], lora[f"{path}/b"] = a, b
    variables = prepare_variables(cfg, {"params": model.variables["params"], "lora": unflatten(lora)})
    return LoadedModel(cfg, variables, model.tokenizer), {name: i for i, name in enumerate(adapters)}


def read_adapter(folder: Path, cfg: ModelConfig, kernels: dict[str, tuple[int, ...]]) -> Adapter:
    """One PEFT adapter folder, checked against the base model's kernel shapes ("layers_0/attn/q" -> [in, out])."""
    config = read_json(folder / "adapter_config.json")
    rank = _check_config(folder, config)
    scale = config.get("lora_alpha", 8) / (math.sqrt(rank) if config.get("use_rslora") else rank)
    halves: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in _read_tensors(folder).items():
        m = KEY.fullmatch(key)
        if m is None or PEFT_BLOCKS.get(MODULES.get(m[3])) != m[2]:
            raise CheckpointError(f"{folder}: unexpected tensor {key}; hire reads LoRA on the "
                                  f"{', '.join(MODULES)} projections only")
        layer, block, target, half = int(m[1]), HIRE_BLOCKS[m[2]], MODULES[m[3]], m[4]
        path = f"layers_{layer}/{block}/{target}"
        if path not in kernels:
            moe = " (its FFN is a mixture of experts, which takes no LoRA)" if cfg.n_experts and block == "ffn" else ""
            raise CheckpointError(f"{folder}: tensor {key} adapts a projection that {cfg.name} does not have{moe}")
        n_in, n_out = kernels[path]
        want = (rank, n_in) if half == "A" else (n_out, rank)
        if tensor.shape != want:
            raise CheckpointError(f"{folder}: tensor {key} has shape {tensor.shape}, expected {want}")
        if half in halves.setdefault(path, {}):
            raise CheckpointError(f"{folder}: two lora_{half} tensors for layer {layer} {target}_proj")
        halves[path][half] = tensor.T
    if unpaired := sorted(p for p, h in halves.items() if len(h) == 1):
        raise CheckpointError(f"{folder}: lora_A without lora_B or the reverse for {unpaired}")
    if not halves:
        raise CheckpointError(f"{folder}: adapter_model.safetensors holds no LoRA tensors")
    return Adapter(rank, scale, {p: (h["A"], h["B"]) for p, h in halves.items()})


def _check_config(folder: Path, config: dict) -> int:
    """The rank `r`, after rejecting what hire cannot run."""
    if (kind := config.get("peft_type", "LORA")) != "LORA":
        raise CheckpointError(f"{folder}: peft_type {kind!r} is not supported; hire reads LORA adapters only")
    if (bias := config.get("bias", "none")) != "none":
        raise CheckpointError(f"{folder}: bias {bias!r} (trained biases) is not supported; only \"none\"")
    if used := [f for f in UNSUPPORTED if config.get(f)]:
        raise CheckpointError(f"{folder}: adapter uses features hire does not support: {', '.join(used)}")
    targets = config.get("target_modules")
    if isinstance(targets, list) and (bad := sorted(t for t in targets if t.rsplit(".", 1)[-1] not in MODULES)):
        raise CheckpointError(f"{folder}: target_modules {bad} are not supported; supported: {', '.join(MODULES)}")
    rank = config.get("r")
    if not isinstance(rank, int) or rank <= 0:
        raise CheckpointError(f"{folder}: adapter_config.json needs a positive integer r, got {rank!r}")
    return rank


def _read_tensors(folder: Path) -> dict[str, np.ndarray]:
    file = folder / "adapter_model.safetensors"
    if not file.is_file():
        raise CheckpointError(f"{folder}: no adapter_model.safetensors")
    # The "flax" framework reads bfloat16, which the numpy one cannot; keep its arrays on the host.
    try:
        with jax.default_device(jax.devices("cpu")[0]), safe_open(file, "flax") as f:
            return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}
    except SafetensorError as e:
        raise CheckpointError(f"{file}: cannot read safetensors: {e}") from None
