"""Small random GGUF files for tests, written with gguf.GGUFWriter the way llama.cpp's converter writes them."""
from __future__ import annotations

import itertools
from pathlib import Path

import gguf
import numpy as np
import torch
import transformers as hf
from tokenizers import pre_tokenizers

Q = gguf.GGMLQuantizationType
# every type gguf.quants can write; the loader also reads K-quants (the real Gemma 3 file has them)
# (a type it cannot write is written as zero bytes)
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "Ġ s", "o n", "1 2"]
SPM_PIECES = ["▁", "t", "h", "e", "▁t", "he", "▁the", "a", "c", "▁c", "at", "▁cat", "s", "▁s"]


def byte_level_vocab() -> tuple[list[str], list[int]]:
    """A small byte-level BPE vocabulary (gpt2 tokenizer model): a control token, the 256 bytes, MERGES."""
    tokens = ["<|endoftext|>", *sorted(pre_tokenizers.ByteLevel.alphabet())]
    tokens += ["".join(m.split()) for m in MERGES] + ["<|im_start|>", "<|im_end|>"]
    return tokens, [3] + [1] * (len(tokens) - 3) + [3, 3]


def sentencepiece_vocab() -> tuple[list[str], list[float], list[int]]:
    """A small SentencePiece vocabulary (llama tokenizer model): <unk>, <s>, </s>, byte pieces, SPM_PIECES."""
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *SPM_PIECES]
    scores = [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))]
    return tokens, scores, [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)


def interleave(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's permutation of a llama q or k weight's rows into interleaved RoPE pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_llama(seed: int = 0, tie: bool = False, vocab: int = 300, arch: str = "llama") -> hf.PreTrainedModel:
    """A random transformers model of `arch` ("llama" or "qwen2": q/k/v biases)."""
    torch.manual_seed(seed)
    config, model = (hf.LlamaConfig, hf.LlamaForCausalLM) if arch == "llama" else (hf.Qwen2Config, hf.Qwen2ForCausalLM)
    cfg = config(vocab_size=vocab, tie_word_embeddings=tie, rms_norm_eps=1e-5, rope_theta=10000.0,
                 attn_implementation="eager", **SHAPE)
    model = model(cfg).eval()
    with torch.no_grad():  # norms away from 1 and biases away from 0, so that a wrong offset shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    return model


def write_llama(path: Path, model: hf.PreTrainedModel, types=TYPES, arch: str = "", tokenizer: str = "gpt2",
                drop: tuple[str, ...] = (), fields: dict | None = None, tensors: dict | None = None) -> Path:
    """`model` as llama.cpp would write it to `path` (as general.architecture `arch`, default the model's), weight
    matrices cycling through `types` (norms and biases F32); llama's q and k rows interleaved.

    `drop` leaves out these metadata keys or tensors; `fields` adds or replaces metadata (key: (value, type));
    `tensors` adds float32 tensors (name: array).
    """
    cfg = model.config
    H, K = cfg.num_attention_heads, cfg.num_key_value_heads
    names = {"embed_tokens": "token_embd", "norm": "output_norm", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm", "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
             "o_proj": "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    arch = arch or cfg.model_type
    extra, tensors = tensors or {}, {}
    for name, p in model.state_dict().items():
        *parts, kind = name.removeprefix("model.").replace("layers.", "blk.").split(".")
        w = p.float().numpy()
        if cfg.model_type == "llama" and parts[-1] in ("q_proj", "k_proj"):
            w = interleave(w, H if parts[-1] == "q_proj" else K)
        gname = "output" if name == "lm_head.weight" else ".".join(
            [*(p for p in parts[:-1] if p not in ("self_attn", "mlp")), names[parts[-1]]])
        if not (cfg.tie_word_embeddings and gname == "output"):
            tensors[f"{gname}.{kind}"] = w
    meta: dict[str, tuple] = {
        f"{arch}.block_count": (cfg.num_hidden_layers, "uint32"), f"{arch}.context_length": (256, "uint32"),
        f"{arch}.embedding_length": (cfg.hidden_size, "uint32"),
        f"{arch}.feed_forward_length": (cfg.intermediate_size, "uint32"),
        f"{arch}.attention.head_count": (H, "uint32"), f"{arch}.attention.head_count_kv": (K, "uint32"),
        f"{arch}.rope.freq_base": (cfg.rope_parameters["rope_theta"], "float32"),
        f"{arch}.attention.layer_norm_rms_epsilon": (cfg.rms_norm_eps, "float32"),
        f"{arch}.rope.dimension_count": (cfg.hidden_size // H, "uint32"),
        f"{arch}.vocab_size": (cfg.vocab_size, "uint32"),
        "general.name": ("tiny", "string"),
    }
    if tokenizer == "gpt2":
        tokens, types_ = byte_level_vocab()
        meta |= {"tokenizer.ggml.model": ("gpt2", "string"), "tokenizer.ggml.pre": ("smollm", "string"),
                 "tokenizer.ggml.merges": (MERGES, "array"), "tokenizer.ggml.bos_token_id": (len(tokens) - 2, "uint32"),
                 "tokenizer.ggml.eos_token_id": (len(tokens) - 1, "uint32"),
                 "tokenizer.ggml.eot_token_id": (0, "uint32"), "tokenizer.ggml.add_bos_token": (False, "bool"),
                 "tokenizer.chat_template": ("{% for m in messages %}{{ m.content }}{% endfor %}", "string")}
    else:
        tokens, scores, types_ = sentencepiece_vocab()
        meta |= {"tokenizer.ggml.model": ("llama", "string"), "tokenizer.ggml.scores": (scores, "array"),
                 "tokenizer.ggml.bos_token_id": (1, "uint32"), "tokenizer.ggml.eos_token_id": (2, "uint32"),
                 "tokenizer.ggml.unknown_token_id": (0, "uint32"), "tokenizer.ggml.add_space_prefix": (True, "bool")}
    meta |= {"tokenizer.ggml.tokens": (tokens, "array"), "tokenizer.ggml.token_type": (types_, "array")}
    meta |= fields or {}
    writer = gguf.GGUFWriter(str(path), arch)
    for key, (value, kind) in meta.items():
        if key not in drop:
            getattr(writer, f"add_{kind}")(key, value)
    cycle = itertools.cycle(types)
    tensors |= extra
    for name, w in tensors.items():
        if name in drop:
            continue
        kind = Q.F32 if w.ndim == 1 else Q[next(cycle)]
        try:
            data = w if kind == Q.F32 else gguf.quants.quantize(w, kind)
        except NotImplementedError:  # a type gguf.quants cannot write: zero bytes of its size
            data = np.zeros(gguf.quants.quant_shape_to_byte_shape(w.shape, kind), np.uint8)
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
