"""One config object for a Llama-family decoder."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
SOFTMAX_MODES = ("dense", "hire-lr", "hire-q")
FFN_MODES = ("dense", "group-sparse", "group-topk")
HIRE_QUANTS = ("int8", "int4")
QUANTIZE = ("none", "int8", "int4")
MOE_DISPATCH = ("auto", "all", "per-token", "grouped")  # hire.moe's paths
HIRE_FIELDS = ("softmax", "softmax_k", "softmax_oversample", "ffn", "ffn_predictor", "ffn_group", "ffn_k",
               "ffn_oversample", "ffn_union", "ffn_keep_k", "hire_rank", "hire_quant")


ROPE_SCALINGS = ("llama3", "linear")


class OptionError(Exception):
    """A bad value given on the command line: `option` names the option(s) that gave it (e.g. "--text"); None
    for a bad combination of options. Not a ValueError, so that it passes through code catching those."""

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, Hugging Face's "rope_type": "llama3" (Llama 3's smoothed bands) or "linear"
    (every frequency divided by `factor`: Gemma 3's global layers beyond 270M)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    kind: str = "llama3"

    def __post_init__(self) -> None:
        if self.kind not in ROPE_SCALINGS:
            raise ValueError(f"invalid RopeScaling: kind must be one of {ROPE_SCALINGS}, got {self.kind!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and options of a decoder; hashable, so it can be a static jit argument.

    MHA, GQA and MQA differ only in `n_kv_heads`. `gated=True` with `activation="silu"`
    is SwiGLU; `n_experts > 0` turns every FFN into a Mixtral-style mixture of experts (hire.moe; `moe_dispatch`
    "auto" reads only the chosen experts, "all" runs every expert); `lora_adapters > 0` reserves room for that
    many LoRA adapters of rank `lora_rank`.

    Gemma 3 is `norm_offset=1` ((1 + w) RMSNorm, weights as Hugging Face stores them), `qk_norm`, `post_norms`
    (sandwich norms), `embed_scale`, `query_scale` (query_pre_attn_scalar), tanh-GELU GeGLU, and local layers
    sliding over `sliding_window` tokens with RoPE base `rope_local_theta`, every `global_every`-th one global.

    HiRE (hire.sparse, docs/hire.md): `softmax` "hire-lr" / "hire-q" computes exact logits only for the
    softmax_k * softmax_oversample candidates a low-rank / quantized predictor ranks highest; `ffn`
    "group-sparse" computes only the ffn_k * ffn_oversample best-predicted groups of `ffn_group` neurons
    (0: the largest divisor of ffn_dim up to 16; ffn_k 0: a tenth of the groups), each token its own or,
    with `ffn_union`, the union over the batch. Predictors have rank `hire_rank` or are `hire_quant` copies.
    `ffn` "group-topk" is the dense FFN keeping only each token's exact top ffn_k groups: a training mask;
    a model trained with it runs group-sparse with `ffn_keep_k` (hire.checkpoint.load_model sets it): of the
    groups computed, only the exact top ffn_k count, as in training.
    The defaults are dense, and a dense config computes exactly what it did without these fields.

    `quantize` "int8" / "int4" keeps every Linear kernel quantized in blocks of 32 inputs (hire.quant, llama.cpp's
    Q8_0 / Q4_1), and the embedding table (and an untied LM head) too, or as `quantize_embed` says when set (a GGUF
    file's Q8_0 embedding beside Q4_1 layers; --quantize int4 sets it to int8); `dtype` stays the type the activations
    are computed in.
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int = 0  # 0 means dim // n_heads
    activation: str = "silu"
    gated: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    sliding_window: int = 0  # 0 means full attention
    global_every: int = 0  # with sliding_window: layer i is global when (i + 1) % global_every == 0
    rope_local_theta: float = 0.0  # RoPE base of the sliding layers; 0 means rope_theta
    query_scale: float = 0.0  # attention scores scaled by query_scale ** -0.5; 0 means head_dim
    norm_offset: float = 0.0  # RMSNorm multiplies by (norm_offset + weight); Gemma: 1
    qk_norm: bool = False  # per-head RMSNorm of q and k over head_dim before RoPE
    post_norms: bool = False  # RMSNorm of the attention and FFN outputs before each residual add
    embed_scale: bool = False  # embeddings multiplied by sqrt(dim)
    tie_embeddings: bool = False
    attention_bias: bool = False
    n_experts: int = 0
    n_experts_per_token: int = 2
    moe_dispatch: str = "auto"
    lora_adapters: int = 0
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = ("q", "v")
    bos_id: int = 1
    eos_id: int = 2
    dtype: str = "float32"
    quantize: str = "none"
    quantize_embed: str = ""  # the embedding table's and an untied LM head's; "" means as `quantize`
    softmax: str = "dense"
    softmax_k: int = 32
    softmax_oversample: int = 8
    ffn: str = "dense"
    ffn_predictor: str = "lr"
    ffn_group: int = 0
    ffn_k: int = 0
    ffn_oversample: int = 2
    ffn_union: bool = False
    ffn_keep_k: bool = False
    hire_rank: int = 64
    hire_quant: str = "int8"
    name: str = field(default="model", compare=False)

    def __post_init__(self) -> None:
        problems = []
        for f in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, f) <= 0:
                problems.append(f"{f} must be positive, got {getattr(self, f)}")
        for f in ("sliding_window", "global_every", "rope_local_theta", "query_scale"):
            if getattr(self, f) < 0:
                problems.append(f"{f} must not be negative, got {getattr(self, f)}")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            problems.append(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.n_experts and not 0 < self.n_experts_per_token <= self.n_experts:
            problems.append("n_experts_per_token must be in [1, n_experts]")
        if self.moe_dispatch not in MOE_DISPATCH:
            problems.append(f"moe_dispatch must be one of {MOE_DISPATCH}, got {self.moe_dispatch!r}")
        if bad := set(self.lora_targets) - set(LORA_TARGETS):
            problems.append(f"unknown lora_targets {sorted(bad)}; known: {LORA_TARGETS}")
        problems += self._hire_problems() + self._quantize_problems()
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))

    def _hire_problems(self) -> list[str]:
        """Check the HiRE fields, resolving ffn_group and ffn_k 0 for a group-sparse FFN."""
        problems = [f"{f} must be one of {choices}, got {getattr(self, f)!r}" for f, choices in (
            ("softmax", SOFTMAX_MODES), ("ffn", FFN_MODES), ("ffn_predictor", ("lr", "q")), ("hire_quant", HIRE_QUANTS))
            if getattr(self, f) not in choices]
        problems += [f"{f} must be positive, got {getattr(self, f)}" for f in (
            "softmax_k", "softmax_oversample", "ffn_oversample", "hire_rank") if getattr(self, f) <= 0]
        if self.hire_quant == "int4" and self.dim % 2:
            problems.append("int4 predictors need an even dim")
        if self.ffn == "dense":
            return problems
        if self.ffn_group == 0:
            object.__setattr__(self, "ffn_group", max(g for g in range(1, 17) if self.ffn_dim % g == 0))
        if self.ffn_group <= 0 or self.ffn_dim % self.ffn_group:
            return problems + [f"ffn_group ({self.ffn_group}) must divide ffn_dim ({self.ffn_dim})"]
        if self.ffn_k == 0:
            object.__setattr__(self, "ffn_k", max(1, self.ffn_groups // 10))
        if not 0 < self.ffn_k <= self.ffn_groups:
            problems.append(f"ffn_k must be in [1, {self.ffn_groups}] (the number of groups), got {self.ffn_k}")
        if self.n_experts:
            problems.append(f"a {self.ffn} FFN needs a plain FFN (n_experts 0)")
        if self.ffn == "group-sparse" and self.lora_adapters and {"gate", "up", "down"} & set(self.lora_targets):
            problems.append("a group-sparse FFN takes no LoRA adapters on gate, up or down")
        return problems

    def _quantize_problems(self) -> list[str]:
        problems = [f"{f} must be one of {choices}, got {getattr(self, f)!r}" for f, choices in (
            ("quantize", QUANTIZE), ("quantize_embed", ("", *QUANTIZE))) if getattr(self, f) not in choices]
        if problems or self.quantize == self.embed_quantize == "none":
            return problems
        widths = {"dim": self.dim} if self.quantize == "none" else {
            "dim": self.dim, "ffn_dim": self.ffn_dim, "n_heads * head_dim": self.n_heads * self.head_dim}
        problems = [f"quantize needs {f} to be a multiple of 32, got {n}" for f, n in widths.items() if n % 32]
        if self.ffn == "group-sparse" and self.quantize != "none":
            problems.append("quantize needs the dense FFN (HiRE's group-sparse FFN reads float weights; its softmax "
                            "runs on a quantized embedding)")
        return problems

    def layer_window(self, i: int) -> int:
        """The sliding window of layer i: 0 when it attends globally."""
        return 0 if self.global_every and (i + 1) % self.global_every == 0 else self.sliding_window

    @property
    def embed_quantize(self) -> str:
        """The embedding table's (and an untied LM head's) quantization: quantize_embed, else quantize."""
        return self.quantize_embed or self.quantize

    @property
    def sparse(self) -> bool:
        """Whether HiRE replaces the dense softmax or FFN (with predictors)."""
        return self.softmax != "dense" or self.ffn == "group-sparse"

    def dense(self) -> "ModelConfig":
        """This config with the dense softmax and FFN."""
        return self.replace(softmax="dense", ffn="dense")

    @property
    def softmax_candidates(self) -> int:
        """k': the vocabulary rows whose logits are computed exactly."""
        return min(self.vocab_size, self.softmax_k * self.softmax_oversample)

    @property
    def ffn_groups(self) -> int:
        return self.ffn_dim // self.ffn_group

    @property
    def ffn_candidates(self) -> int:
        """k': the neuron groups computed per token."""
        return min(self.ffn_groups, self.ffn_k * self.ffn_oversample)

    def predictor_kind(self, part: str) -> str:
        """The predictor kind ("lr", "int8", "int4") that `part` ("softmax" or "ffn") uses."""
        lr = self.softmax == "hire-lr" if part == "softmax" else self.ffn_predictor == "lr"
        return "lr" if lr else self.hire_quant

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


SHAPES: dict[str, ModelConfig] = {
    # Llama-3.2-1B: the shape used to time decode against the memory-bandwidth floor.
    "1b": ModelConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                      rope_theta=500000.0, rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192),
                      tie_embeddings=True, max_seq_len=4096, name="synthetic-1b"),
    # SmolLM2-135M: the small real model hire is compared with llama.cpp on (docs/benchmarks.md)
    "smollm2-135m": ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                                rope_theta=100000.0, tie_embeddings=True, max_seq_len=8192,
                                name="synthetic-smollm2-135m"),
    # Gemma 3 270M: a 262,144-token vocabulary (63% of the weights), MQA over head_dim 256, 5 local layers a global one
    "gemma3-270m": ModelConfig(vocab_size=262144, dim=640, n_layers=18, n_heads=4, n_kv_heads=1, head_dim=256,
                               ffn_dim=2048, activation="gelu_tanh", norm_eps=1e-6, rope_theta=1e6, max_seq_len=32768,
                               sliding_window=512, global_every=6, rope_local_theta=1e4, query_scale=256.0,
                               norm_offset=1.0, qk_norm=True, post_norms=True, embed_scale=True, tie_embeddings=True,
                               bos_id=2, eos_id=1, name="synthetic-gemma3-270m"),
    # Mixtral-shaped (8 experts, top 2, ffn 3.5 x dim, 4 query heads per KV head of 128): 1.71 GB in float32,
    # 1.41 GB of it experts. Decode reads 2 of a layer's 8 experts (hire.moe).
    "moe-1g": ModelConfig(vocab_size=32000, dim=1024, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=3584, n_experts=8,
                          n_experts_per_token=2, rope_theta=1e6, max_seq_len=4096, name="synthetic-moe-1g"),
    "tiny": ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                        max_seq_len=256, name="synthetic-tiny"),
}


def hire_overrides(softmax: str | None, ffn: str | None, settings: tuple[str, ...] = ()) -> dict[str, Any]:
    """ModelConfig overrides from --softmax, --ffn and --hire KEY=VALUE (`settings`)."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    out = {k: v for k, v in (("softmax", softmax), ("ffn", ffn)) if v is not None}
    for spec in settings:
        key, _, value = spec.partition("=")
        if key not in HIRE_FIELDS or not value:
            raise OptionError(f"expected KEY=VALUE with KEY one of {', '.join(HIRE_FIELDS)}, got {spec!r}", "--hire")
        kind = type(defaults[key])
        try:
            out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
        except ValueError:
            raise OptionError(f"{key} takes a {kind.__name__}, got {value!r}", "--hire") from None
    return out
