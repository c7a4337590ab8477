"""GGUF files (llama.cpp's format), read with ggml's own `gguf` package.

A GGUF file holds metadata (architecture, shape, tokenizer: hire.formats.gguf_tokenizer) and tensors,
quantized or not. Architectures: llama, qwen2 and gemma3. Every tensor is checked by name, type and shape
against what the metadata implies before any is read. Quantized weights stay quantized (hire.quant): Q8_0
blocks are hire's int8 blocks and Q4_0 / Q4_1 blocks (and Q4_K's sub-blocks, scales rounded to float16) its
int4 ones, as they are; other types (Q5_0, Q5_1, Q2_K, Q3_K, Q5_K, Q6_K) are dequantized and quantized again to
the nearest hire format (int4 from Q2_K and Q3_K, int8 from the 5- and 6-bit ones). One format serves all the
layers' kernels (int8 if any of them is finer than 4 bits) and one the embedding and output (`quantize_embed`);
`--quantize` sets both (the table int8 beside int4 kernels). Float tensors, and every tensor when a dtype is
asked for, are dequantized to float32 (read_tensor) and cast to the model's dtype.

Layouts: GGUF lists a tensor's dims innermost first, so numpy reads a weight as torch's [out, in], which
is transposed to hire's [in, out]; embeddings are [vocab, dim] as in hire. llama.cpp's converter permutes
a llama model's q and k rows into interleaved RoPE pairs (undone by hire.formats.half_split; qwen2 and
gemma3 rotate halves already) and stores Gemma's norm weights plus 1 (hire keeps Hugging Face's w and
adds norm_offset 1 when it runs).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from hire.config import ModelConfig, RopeScaling
from hire.formats import (
    CheckpointError,
    build_config,
    expected_variables,
    half_split,
    prepare_variables,
    unflatten,
    with_dtype,
)
from hire.loaded import LoadedModel

ARCHITECTURES = ("llama", "qwen2", "gemma3")
Q = gguf.GGMLQuantizationType
TYPES = tuple(Q[n] for n in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                             "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"))
# hire's variable names -> GGUF's tensor names (per layer: "layers_{i}/" -> "blk.{i}.")
GLOBAL = {"embed": "token_embd.weight", "norm/weight": "output_norm.weight", "lm_head": "output.weight"}
LAYER = {"attn_norm/weight": "attn_norm.weight", "ffn_norm/weight": "ffn_norm.weight",
         "post_attn_norm/weight": "post_attention_norm.weight", "post_ffn_norm/weight": "post_ffw_norm.weight",
         "attn/q_norm/weight": "attn_q_norm.weight", "attn/k_norm/weight": "attn_k_norm.weight",
         **{f"attn/{n}/kernel": f"attn_{n}.weight" for n in "qkv"}, "attn/o/kernel": "attn_output.weight",
         **{f"attn/{n}/bias": f"attn_{n}.bias" for n in "qkv"},
         **{f"ffn/{n}/kernel": f"ffn_{n}.weight" for n in ("gate", "up", "down")}}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1's RoPE frequency factors
FLOATS = (Q.F32, Q.F16, Q.BF16)
AS_INT4 = (Q.Q4_0, Q.Q4_1, Q.Q2_K, Q.Q3_K, Q.Q4_K)  # the rest of TYPES become int8
TABLES = ("params/embed", "params/lm_head")
_MISSING = object()


class _Reader(gguf.GGUFReader):
    """gguf.GGUFReader that names the tensor whose type is unknown or whose data runs past the end of the
    file (the reader's own errors do not), and opens a file
    with a large vocabulary many times faster: it slices the mapped file as a plain ndarray (a numpy.memmap
    slice costs a Python call), reads an array of numbers (Gemma's 262,144 token scores and types) as one
    part, not one each, and an array of strings as memoryview slices. Fields and tensors read the same
    (tests/test_gguf.py checks it against gguf.GGUFReader)."""

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, mapped: np.memmap) -> None:
        self._data = mapped.view(np.ndarray)

    def _get_field_parts(self, offs: int, raw_type: int) -> tuple[int, list[Any], list[int], list[Any]]:
        if raw_type != gguf.GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(offs, raw_type)
        item, count = self._get(offs, np.uint32), self._get(offs + 4, np.uint64)
        kind, n, at = gguf.GGUFValueType(int(item[0])), int(count[0]), offs + 12
        if kind == gguf.GGUFValueType.STRING:  # each string a memoryview slice: [length, bytes]
            data, parts, idxs = memoryview(self._data), [item, count], []
            for _ in range(n):
                size = int.from_bytes(data[at:at + 8], sys.byteorder)
                if at + 8 + size > len(data):
                    raise ValueError(f"an array of {n} strings runs past the end of the file")
                parts += [data[at:at + 8], data[at + 8:at + 8 + size]]
                idxs.append(len(parts) - 1)
                at += 8 + size
            return at - offs, parts, idxs, [gguf.GGUFValueType.ARRAY, kind]
        if (np_kind := self.gguf_scalar_to_np.get(kind)) is None:
            return super()._get_field_parts(offs, raw_type)
        values = self._get(at, np_kind, n)
        if len(values) != n:
            raise ValueError(f"an array of {n} values runs past the end of the file")
        return 12 + values.nbytes, [item, count, values], [2], [gguf.GGUFValueType.ARRAY, kind]

    def _build_tensors(self, start_offs: int, fields: list[gguf.ReaderField]) -> None:
        for field in fields:
            _, name, _, dims, raw_type, offset = field.parts
            name = bytes(name).decode(errors="replace")
            try:
                kind = Q(int(raw_type[0]))
                block, size = gguf.GGML_QUANT_SIZES[kind]
            except (ValueError, KeyError):
                raise CheckpointError(f"tensor {name}: unknown tensor type {int(raw_type[0])}") from None
            if int(dims[0]) % block:
                raise CheckpointError(f"tensor {name}: rows of {int(dims[0])} are not whole {kind.name} blocks")
            end = start_offs + int(offset[0]) + int(np.prod(dims)) * size // block
            if end > len(self.data):
                raise CheckpointError(f"tensor {name}: its data ends at byte {end}, past the end of the file "
                                      f"({len(self.data)} bytes): the file is truncated")
        super()._build_tensors(start_offs, fields)


class GGUFFile:
    """An open GGUF file (memory-mapped): typed metadata fields, and tensors by name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        reader = _Reader.__new__(_Reader)
        try:
            reader.__init__(self.path)
        except CheckpointError as e:
            raise CheckpointError(f"{self.path}: {e}") from None
        except (ValueError, IndexError, OSError, UnicodeDecodeError, OverflowError) as e:
            read = list(getattr(reader, "fields", ()))  # filled one field at a time
            where = f" after metadata field {read[-1]}" if read else ""
            raise CheckpointError(f"{self.path}: not a readable GGUF file (corrupt or truncated{where}: {e})") from None
        self.reader = reader
        self.tensors = {t.name: t for t in reader.tensors}
        self.arch = self.get("general.architecture", str)

    def get(self, key: str, kind: type, default: Any = _MISSING) -> Any:
        """Metadata field `key` as `kind` (int, float, str, bool or list), else `default` when it is absent."""
        field = self.reader.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise CheckpointError(f"{self.path}: missing metadata field {key}")
            return default
        try:
            value = field.contents()
        except (UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: metadata field {key} cannot be read: {e}") from None
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            shown = f"{len(value)} values" if isinstance(value, list) else repr(value)
            raise CheckpointError(f"{self.path}: metadata field {key} should be a {kind.__name__}, got {shown}")
        return value

    def shape(self, name: str) -> tuple[int, ...]:
        """Tensor `name`'s shape as numpy reads it (a weight [out, in])."""
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: missing tensor {name}")
        return tuple(int(d) for d in reversed(self.tensors[name].shape))


def read_tensor(t: gguf.ReaderTensor) -> np.ndarray:
    """Tensor `t` dequantized to float32, shaped as numpy reads GGUF dims (a weight [out, in])."""
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(
        tuple(int(d) for d in reversed(t.shape)))


def find_gguf(path: Path) -> Path:
    """The GGUF file at `path`, or the one GGUF file in the folder `path`."""
    if path.is_file():
        return path
    files = sorted(path.glob("*.gguf"))
    if len(files) != 1:
        raise CheckpointError(f"{path}: expected one .gguf file, found {len(files)}"
                              + (f" ({', '.join(p.name for p in files)}); name the file instead" if files else ""))
    return files[0]


def gguf_config(f: GGUFFile, dtype: str | None = None) -> ModelConfig:
    """The ModelConfig the metadata of `f` describes; `dtype` (default float32) is the compute dtype."""
    arch = f.arch
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{f.path}: general.architecture {arch!r} is not supported; "
                              f"supported: {', '.join(ARCHITECTURES)}")

    def get(key: str, kind: type, default: Any = _MISSING) -> Any:
        return f.get(f"{arch}.{key}", kind, default)

    if get("expert_count", int, 0):
        raise CheckpointError(f"{f.path}: {arch}.expert_count: mixture-of-experts GGUF files are not supported")
    dim, n_heads = get("embedding_length", int), get("attention.head_count", int)
    head_dim = get("attention.key_length", int, 0) or (dim // n_heads if n_heads else 0)
    if (value_dim := get("attention.value_length", int, head_dim)) != head_dim:
        raise CheckpointError(f"{f.path}: {arch}.attention.value_length {value_dim} differs from the key length "
                              f"{head_dim}, which hire does not support")
    if (rotated := get("rope.dimension_count", int, head_dim)) != head_dim:
        raise CheckpointError(f"{f.path}: {arch}.rope.dimension_count {rotated}: RoPE on part of a head "
                              f"(head dim {head_dim}) is not supported")
    scaling = get("rope.scaling.type", str, "none")
    if scaling not in ("none", "linear"):
        raise CheckpointError(f"{f.path}: {arch}.rope.scaling.type {scaling!r} is not supported; supported: linear")
    vocab = f.shape(GLOBAL["embed"])[0]
    fields = dict(
        vocab_size=vocab, dim=dim, n_layers=get("block_count", int), n_heads=n_heads,
        n_kv_heads=get("attention.head_count_kv", int, n_heads), ffn_dim=get("feed_forward_length", int),
        head_dim=head_dim, norm_eps=get("attention.layer_norm_rms_epsilon", float),
        rope_theta=get("rope.freq_base", float, 10000.0), max_seq_len=get("context_length", int, 2048),
        rope_scaling=RopeScaling(get("rope.scaling.factor", float), kind="linear") if scaling == "linear" else None,
        tie_embeddings=GLOBAL["lm_head"] not in f.tensors, attention_bias="blk.0.attn_q.bias" in f.tensors,
        name=f.path.parent.name if f.path.name == "model.gguf" else f.path.stem)
    for field, key in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id")):
        if (value := f.get(f"tokenizer.ggml.{key}", int, None)) is not None:
            fields[field] = value
    if arch == "gemma3":
        # llama.cpp's own Gemma 3 settings, which its files do not store: a global layer every 6th,
        # local RoPE base 10000, queries scaled by head_dim (27B, 62 layers: by dim / n_heads)
        fields.update(activation="gelu_tanh", norm_offset=1.0, qk_norm=True, post_norms=True, embed_scale=True,
                      sliding_window=get("attention.sliding_window", int), global_every=6,
                      rope_local_theta=get("rope.freq_base_swa", float, 10000.0),
                      query_scale=dim / n_heads if fields["n_layers"] == 62 else 0.0)
    cfg = build_config(f.path, fields)
    if ROPE_FREQS in f.tensors:
        cfg = cfg.replace(rope_scaling=_llama3_scaling(f, cfg))
    return with_dtype(cfg, dtype)


def _llama3_scaling(f: GGUFFile, cfg: ModelConfig) -> RopeScaling:
    """The Llama 3 RoPE scaling whose frequency factors rope_freqs.weight holds (llama.cpp stores the factors,
    not the parameters): Llama 3.1's low/high frequency factors 1 and 4 over 8192 positions, the largest
    factor as the scale; anything else is an error."""
    from hire.model import rope_frequencies

    factors = read_tensor(f.tensors[ROPE_FREQS])
    if factors.shape != (cfg.head_dim // 2,):
        raise CheckpointError(f"{f.path}: tensor {ROPE_FREQS} has shape {factors.shape}, "
                              f"expected ({cfg.head_dim // 2},)")
    scaling = RopeScaling(float(factors.max()), 1.0, 4.0, 8192)
    implied = np.asarray(rope_frequencies(cfg) / rope_frequencies(cfg.replace(rope_scaling=scaling)))
    if not np.allclose(implied, factors, rtol=1e-3):
        raise CheckpointError(f"{f.path}: tensor {ROPE_FREQS} holds RoPE frequency factors that are not "
                              "Llama 3.1's scaling, which is the only one hire reads from GGUF")
    return scaling


def _source(name: str) -> str:
    """The GGUF tensor that fills hire variable `name` ("params/layers_3/attn/q/kernel")."""
    name = name.removeprefix("params/")
    if m := re.fullmatch(r"layers_(\d+)/(.+)", name):
        return f"blk.{m[1]}.{LAYER[m[2]]}" if m[2] in LAYER else name
    return GLOBAL.get(name, name)


def _plan(f: GGUFFile, cfg: ModelConfig) -> dict[str, str]:
    """hire variable -> GGUF tensor, after checking that every tensor is there, of a supported type and of
    the shape the config implies, and that no tensor is left over."""
    plan = {}
    for name, want in expected_variables(cfg).items():
        src = _source(name)
        shape = tuple(want.shape)
        if name.endswith("kernel") or name.endswith("lm_head"):
            shape = shape[::-1]  # stored [out, in]
        if (found := f.shape(src)) != shape:
            raise CheckpointError(f"{f.path}: tensor {src} has shape {found}, but the metadata implies {shape}")
        if (kind := f.tensors[src].tensor_type) not in TYPES:
            raise CheckpointError(f"{f.path}: tensor {src} has type {kind.name}, which is not supported; "
                                  f"supported: {', '.join(t.name for t in TYPES)}")
        plan[name] = src
    if extra := sorted(set(f.tensors) - set(plan.values()) - {ROPE_FREQS}):
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise CheckpointError(f"{f.path}: unexpected tensors {', '.join(extra[:3])}{more} for a {f.arch} model")
    return plan


def _convert(name: str, w: np.ndarray, cfg: ModelConfig, arch: str) -> np.ndarray:
    """A GGUF tensor as hire variable `name`."""
    if arch == "llama" and (m := re.search(r"attn/([qk])/", name)):
        w = half_split(w, cfg.n_heads if m[1] == "q" else cfg.n_kv_heads)
    if name.endswith("norm/weight") and arch == "gemma3":
        w = w - 1.0
    return w.T if name.endswith("kernel") or name.endswith("lm_head") else w


def hire_kind(types: set[Q]) -> str:
    """The hire format ("none", "int8", "int4") that tensors of these GGUF types are kept in."""
    if types <= set(FLOATS):
        return "none"
    return "int4" if types <= set(AS_INT4) else "int8"


def _kinds(f: GGUFFile, plan: dict[str, str], dtype: str | None, quantize: str | None) -> tuple[str, str]:
    """The quantization of the kernels and of the embedding and output: `quantize` when given (the table int8 beside
    int4 kernels: quant.EMBED_BESIDE); with only a dtype, none; else the file's own (hire_kind)."""
    from hire.quant import EMBED_BESIDE

    if quantize is not None or dtype is not None:
        kind = quantize or "none"
        return kind, EMBED_BESIDE.get(kind, kind)
    kernels = {f.tensors[src].tensor_type for name, src in plan.items() if name.endswith("kernel")}
    tables = {f.tensors[src].tensor_type for name, src in plan.items() if name in TABLES}
    return hire_kind(kernels), hire_kind(tables)


def _blocks(t: gguf.ReaderTensor, kind: str) -> dict[str, np.ndarray]:
    """Tensor `t` as hire.quant's rows of `kind`: Q8_0 as int8 and Q4_0 / Q4_1 / Q4_K as int4 block for block
    (Q4_0's min is -8 scale; _q4k_blocks), any other type dequantized and quantized again."""
    from hire import quant

    raw, kinds = t.data, {Q.Q8_0: "int8", Q.Q4_0: "int4", Q.Q4_1: "int4", Q.Q4_K: "int4"}
    if t.tensor_type == Q.Q4_K and kind == "int4":
        return _q4k_blocks(raw)
    if kinds.get(t.tensor_type) != kind:
        return {k: np.asarray(v) for k, v in quant.quantize_rows(read_tensor(t), kind).items()}
    head = {Q.Q8_0: 2, Q.Q4_0: 2, Q.Q4_1: 4}[t.tensor_type]  # bytes of float16 scale (and min) before each block
    blocks = raw.reshape(raw.shape[0], -1, raw.shape[1] * quant.BLOCK // int(t.shape[0]))
    half = lambda i: np.ascontiguousarray(blocks[..., i:i + 2]).view(np.float16)[..., 0]  # noqa: E731
    q = np.ascontiguousarray(blocks[..., head:]).reshape(raw.shape[0], -1)
    if kind == "int8":
        return {"q": q.view(np.int8), "scale": half(0)}
    return {"q": q, "scale": half(0), "min": half(2) if t.tensor_type == Q.Q4_1 else -8 * half(0)}


def _q4k_blocks(raw: np.ndarray) -> dict[str, np.ndarray]:
    """Q4_K rows as hire's int4 rows, exactly but for float16 rounding of the scales: each of a Q4_K super-block's
    eight sub-blocks of 32 is a Q4_1-like block (scale d x sc, min -dmin x m, 4-bit values), its nibbles reordered."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, 144)  # per 256 values: d, dmin (float16), 12 bytes of 6-bit sc / m, 128 of nibbles
    d, dmin = (np.ascontiguousarray(blocks[..., i:i + 2]).view(np.float16).astype(np.float32) for i in (0, 2))
    sc, m = gguf.quants.Q4_K.get_scale_min(np.ascontiguousarray(blocks[..., 4:16]).reshape(-1, 12))
    scale = (d * sc.reshape(rows, -1, 8)).astype(np.float16).reshape(rows, -1)
    low = (-dmin * m.reshape(rows, -1, 8)).astype(np.float16).reshape(rows, -1)
    packed = blocks[..., 16:].reshape(rows, -1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(2, 1)
    q = (packed & 15).reshape(rows, -1, 32)  # sub-block j: the low (j even) or high nibbles of 32 bytes
    q = (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8).reshape(rows, -1)  # byte i: values i and i + 16
    return {"q": q, "scale": scale, "min": low}


def _quantized(name: str, rows: dict[str, np.ndarray], cfg: ModelConfig, arch: str) -> dict[str, np.ndarray]:
    """Quantized rows from GGUF as hire variable `name` (hire.quant keeps rows [out, in], as GGUF does)."""
    if arch == "llama" and (m := re.search(r"attn/([qk])/", name)):
        return {k: half_split(v, cfg.n_heads if m[1] == "q" else cfg.n_kv_heads) for k, v in rows.items()}
    return rows


def check_gguf(path: str | Path) -> ModelConfig:
    """Check a GGUF file as load_gguf would, without reading its tensors: metadata, tokenizer, tensor names,
    types and shapes. Returns its config."""
    from hire.formats.gguf_tokenizer import gguf_tokenizer

    f = GGUFFile(find_gguf(Path(path)))
    cfg = gguf_config(f)
    gguf_tokenizer(f, cfg.vocab_size)
    _plan(f, cfg)
    return cfg


def load_gguf(path: str | Path, dtype: str | None = None, quantize: str | None = None) -> LoadedModel:
    """Load a GGUF file, or the folder holding one, computing in `dtype` (default float32), its weights kept as
    the file quantizes them (the module's docstring), or all as `quantize` says ("none": float); a `dtype`
    alone dequantizes them all."""
    from hire.formats.gguf_tokenizer import gguf_tokenizer

    f = GGUFFile(find_gguf(Path(path)))
    cfg = gguf_config(f, dtype)
    tokenizer = gguf_tokenizer(f, cfg.vocab_size)
    plan = _plan(f, cfg)
    kernels, tables = _kinds(f, plan, dtype, quantize)
    cfg = cfg.replace(quantize=kernels, quantize_embed="" if tables == kernels else tables)
    flat = {}
    for name, src in plan.items():
        kind = tables if name in TABLES else kernels if name.endswith("kernel") else "none"
        t = f.tensors[src]
        flat[name] = (_convert(name, read_tensor(t), cfg, f.arch) if kind == "none"
                      else _quantized(name, _blocks(t, kind), cfg, f.arch))
    return LoadedModel(cfg, prepare_variables(cfg, unflatten(flat)), tokenizer)
