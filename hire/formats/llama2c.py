"""llama2.c checkpoints: a model .bin (the legacy format or the version-1 fp32 export) and a tokenizer .bin
(with a chat_template.jinja beside them, if the model has a chat template).

Weights are stored as float32 in torch's [out, in] layout, layer-stacked per tensor kind.
llama2.c rotates interleaved pairs (2i, 2i+1) of each head for RoPE while hire rotates halves
(i, i + head_dim/2), so q and k rows are permuted per head, as Hugging Face's Llama converter does.
"""
from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

from hire.config import ModelConfig
from hire.formats import CheckpointError, half_split, prepare_variables, unflatten, with_dtype
from hire.loaded import LoadedModel
from hire.tokenizer import Llama2cTokenizer, chat_template_in

MAGIC = 0x616B3432  # "ak42" in the version-1+ exports
MAX_TOKENIZER_BYTES = 64 << 20
LINEARS = {"attn/q": "wq", "attn/k": "wk", "attn/v": "wv", "attn/o": "wo",
           "ffn/gate": "w1", "ffn/up": "w3", "ffn/down": "w2"}


class Header(NamedTuple):
    version: int  # 0: legacy, 1: fp32 export
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool
    size: int  # bytes before the weights


def layout(h: Header) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every float32 tensor in file order."""
    L, D, F, V = h.n_layers, h.dim, h.hidden_dim, h.vocab_size
    hd = D // h.n_heads
    kv = h.n_kv_heads * hd
    attn = [("wq", (L, D, D)), ("wk", (L, kv, D)), ("wv", (L, kv, D)), ("wo", (L, D, D))]
    ffn = [("w1", (L, F, D)), ("w2", (L, D, F)), ("w3", (L, F, D))]
    cls = [] if h.shared_classifier else [("wcls", (V, D))]
    if h.version == 0:
        freqs = [("freq_cis_real", (h.seq_len, hd // 2)), ("freq_cis_imag", (h.seq_len, hd // 2))]
        return [("embed", (V, D)), ("rms_att", (L, D)), *attn, ("rms_ffn", (L, D)), *ffn,
                ("rms_final", (D,)), *freqs, *cls]
    return [("rms_att", (L, D)), ("rms_ffn", (L, D)), ("rms_final", (D,)), ("embed", (V, D)), *attn, *ffn, *cls]


def _file_size(h: Header) -> int:
    return h.size + 4 * sum(math.prod(shape) for _, shape in layout(h))


def read_header(path: Path) -> Header | None:
    """The header of a llama2.c model file, or None if `path` is not one."""
    with open(path, "rb") as f:
        head = f.read(256)
    if len(head) < 28:
        return None
    if struct.unpack_from("<I", head)[0] == MAGIC:
        version = struct.unpack_from("<i", head, 4)[0]
        if version != 1:
            raise CheckpointError(f"{path}: llama2.c export version {version} is not supported "
                                  "(supported: the legacy format and version 1, fp32)")
        *dims, shared = struct.unpack_from("<7iB", head, 8)
        h = Header(1, *dims, bool(shared), 256)
    else:
        dims = struct.unpack_from("<7i", head)
        h = Header(0, *dims[:5], abs(dims[5]), dims[6], dims[5] > 0, 28)
    plausible = (min(h[1:8]) > 0 and h.dim % h.n_heads == 0 and h.n_heads % h.n_kv_heads == 0
                 and h.dim // h.n_heads % 2 == 0)
    if not plausible or path.stat().st_size != _file_size(h):
        if h.version:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes, but its header {tuple(h[1:8])} "
                                  f"implies {_file_size(h) if plausible else 'an invalid model'}")
        return None
    return h


def find_files(path: Path) -> tuple[Path, Header, Llama2cTokenizer]:
    """The model file, its header and its tokenizer, for a model .bin or a folder holding one."""
    if path.is_file():
        model, folder = path, path.parent
        if (header := read_header(path)) is None:
            raise CheckpointError(f"{path} is not a llama2.c model file (its size does not match its header)")
    else:
        folder = path
        models = [(p, h) for p in sorted(folder.glob("*.bin")) if (h := read_header(p))]
        if len(models) != 1:
            found = ", ".join(p.name for p, _ in models)
            raise CheckpointError(f"{folder}: expected one llama2.c model .bin, found {len(models)}"
                                  + (f" ({found}); name the file instead" if found else ""))
        (model, header), = models
    template = chat_template_in(folder)
    for p in sorted(folder.glob("*.bin"), key=lambda p: p.name != "tokenizer.bin"):
        if p != model and p.stat().st_size <= MAX_TOKENIZER_BYTES:
            try:
                tokenizer = Llama2cTokenizer(p, template)
            except CheckpointError:
                continue
            if tokenizer.vocab_size == header.vocab_size:
                return model, header, tokenizer
    raise CheckpointError(f"{folder}: no llama2.c tokenizer .bin with {header.vocab_size} tokens for {model.name}")


def load_llama2c(path: Path, dtype: str | None = None) -> LoadedModel:
    """Load a llama2.c model .bin, or the folder holding it, with the tokenizer .bin beside it."""
    path = Path(path)
    model, h, tokenizer = find_files(path)
    data = np.memmap(model, np.float32, mode="r", offset=h.size)
    t, at = {}, 0
    for name, shape in layout(h):
        n = math.prod(shape)
        t[name] = data[at:at + n].reshape(shape)
        at += n
    t["wq"], t["wk"] = half_split(t["wq"], h.n_heads, 1), half_split(t["wk"], h.n_kv_heads, 1)
    flat = {"embed": t["embed"], "norm/weight": t["rms_final"]}
    if not h.shared_classifier:
        flat["lm_head"] = t["wcls"].T
    for i in range(h.n_layers):
        flat[f"layers_{i}/attn_norm/weight"] = t["rms_att"][i]
        flat[f"layers_{i}/ffn_norm/weight"] = t["rms_ffn"][i]
        flat.update({f"layers_{i}/{module}/kernel": t[src][i].T for module, src in LINEARS.items()})
    cfg = ModelConfig(vocab_size=h.vocab_size, dim=h.dim, n_layers=h.n_layers, n_heads=h.n_heads,
                      n_kv_heads=h.n_kv_heads, ffn_dim=h.hidden_dim, activation="silu", gated=True,
                      norm_eps=1e-5, rope_theta=10000.0, max_seq_len=h.seq_len,
                      tie_embeddings=h.shared_classifier, bos_id=1, eos_id=2,
                      name=(path.stem if path.is_file() else path.resolve().name))
    cfg = with_dtype(cfg, dtype)
    return LoadedModel(cfg, prepare_variables(cfg, {"params": unflatten(flat)}), tokenizer)
