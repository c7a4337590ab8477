"""The tokenizer a GGUF file describes (tokenizer.ggml.*), built as a Hugging Face `tokenizers` tokenizer, with
the special ids, the chat template (tokenizer.chat_template) and the end-of-turn ids (eot/eom_token_id).

"gpt2" vocabularies are byte-level BPE with the merges in the file; text is first split the way the
vocabulary was trained, which tokenizer.ggml.pre names (llama.cpp's regular expressions: PRE_SPLITS).
"llama" vocabularies are SentencePiece BPE with "▁" for spaces and byte fallback to <0xXX>: the merges
are derived from the pieces, each split of a piece into two pieces ranked by the piece's score (Gemma: by
its position, which its scores follow except for user-defined pieces, scored -1000 though SentencePiece
matches them first), as transformers' converters do. Control tokens become special tokens and
user-defined ones added tokens, so both match whole in text.

The tokenizer.json is cached beside the GGUF file (<stem>.tokenizer.json, rebuilt when older than the
file or than this module), or under ~/.cache/hire/tokenizers when that folder is read-only: Gemma's
262,144 pieces take seconds to build.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Protocol

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from hire.chat import check_template
from hire.formats import CheckpointError
from hire.tokenizer import HFTokenizer


class GGUFFile(Protocol):
    """What the tokenizer reads of a hire.formats.gguf.GGUFFile: its path, architecture and metadata fields."""

    path: Path
    arch: str

    def get(self, key: str, kind: type, default: Any = ...) -> Any: ...


NORMAL, CONTROL, USER_DEFINED = 1, 3, 4  # tokenizer.ggml.token_type values
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
# tokenizer.ggml.pre -> the regular expressions that split text in turn, as llama.cpp's llama-vocab.cpp has them
PRE_SPLITS = {
    **dict.fromkeys(("default", "gpt2", "mpt", "olmo"), (GPT2,)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell", "command-r"), (r"\p{N}", GPT2)),
    **dict.fromkeys(("llama3", "llama-bpe", "llama-v3", "smaug-bpe", "dbrx"), (LLAMA3,)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), (QWEN2,)),
}
IGNORE_MERGES = ("llama3", "llama-bpe", "llama-v3", "smaug-bpe", "dbrx")  # a whole piece in the vocabulary is kept
SPECIAL_IDS = ("bos", "eos", "unknown", "padding", "eot", "eom")


def gguf_tokenizer(f: GGUFFile, vocab_size: int) -> HFTokenizer:
    """The tokenizer of `f` for a model of `vocab_size` rows, with its special ids and chat template."""
    kind = f.get("tokenizer.ggml.model", str, None)
    if kind is None:
        raise CheckpointError(f"{f.path}: no tokenizer in the file (metadata field tokenizer.ggml.model is missing)")
    if kind not in ("gpt2", "llama"):
        raise CheckpointError(f"{f.path}: tokenizer.ggml.model {kind!r} is not supported; supported: gpt2, llama")
    tokens = f.get("tokenizer.ggml.tokens", list)
    if not 0 < len(tokens) <= vocab_size:
        raise CheckpointError(f"{f.path}: tokenizer.ggml.tokens has {len(tokens)} tokens for a model of "
                              f"{vocab_size} (token_embd.weight)")
    ids = {k: f.get(f"tokenizer.ggml.{k}_token_id", int, None) for k in SPECIAL_IDS}
    for k, i in ids.items():
        if i is not None and not 0 <= i < len(tokens):
            raise CheckpointError(f"{f.path}: tokenizer.ggml.{k}_token_id {i} is not one of the {len(tokens)} tokens")
    path = _cache(f.path)
    if not path.is_file() or path.stat().st_mtime < max(f.path.stat().st_mtime, Path(__file__).stat().st_mtime):
        tok = (_byte_level if kind == "gpt2" else _sentencepiece)(f, tokens, ids)
        _add_special(f, tok, tokens, ids)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tok.save(str(tmp))
        tmp.replace(path)
    return HFTokenizer(path, ids["bos"], ids["eos"], f.get("tokenizer.ggml.add_bos_token", bool, kind == "llama"),
                       chat_template=check_template(f.get("tokenizer.chat_template", str, None),
                                                    f"{f.path}: tokenizer.chat_template"),
                       end_ids=[i for i in (ids["eot"], ids["eom"]) if i is not None])


def _cache(gguf_path: Path) -> Path:
    """Where the tokenizer.json of `gguf_path` is kept: beside it if that folder is writable."""
    if os.access(gguf_path.parent, os.W_OK):
        return gguf_path.with_name(gguf_path.stem + ".tokenizer.json")
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:24]
    folder = Path.home() / ".cache" / "hire" / "tokenizers"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{key}.json"


def _byte_level(f: GGUFFile, tokens: list[str], ids: dict) -> Tokenizer:
    """Byte-level BPE from the tokens and merges, split first as tokenizer.ggml.pre says."""
    pre = f.get("tokenizer.ggml.pre", str, "default")
    if pre not in PRE_SPLITS:
        raise CheckpointError(f"{f.path}: tokenizer.ggml.pre {pre!r} is not supported; supported: "
                              + ", ".join(PRE_SPLITS))
    merges = [tuple(m.split(" ")) for m in f.get("tokenizer.ggml.merges", list)]
    if bad := next((m for m in merges if len(m) != 2), None):
        raise CheckpointError(f"{f.path}: tokenizer.ggml.merges has {' '.join(bad)!r}, not two tokens")
    vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre in IGNORE_MERGES))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), "isolated") for r in PRE_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(f: GGUFFile, tokens: list[str], ids: dict) -> Tokenizer:
    """SentencePiece BPE: merges derived from the pieces, "▁" for spaces (one prepended with
    tokenizer.ggml.add_space_prefix), unknown bytes as <0xXX> pieces."""
    tokens = [t.replace(" ", "▁") for t in tokens]  # Gemma's files spell pieces of spaces with spaces
    if f.arch.startswith("gemma"):
        rank = [-float(i) for i in range(len(tokens))]
    else:
        rank = f.get("tokenizer.ggml.scores", list)
        if len(rank) != len(tokens):
            raise CheckpointError(f"{f.path}: tokenizer.ggml.scores has {len(rank)} scores for {len(tokens)} tokens")
    vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}
    unk = None if ids["unknown"] is None else tokens[ids["unknown"]]
    tok = Tokenizer(models.BPE(vocab, _merges(tokens, rank, vocab), unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = f.get("tokenizer.ggml.add_space_prefix", bool, True)
    tok.pre_tokenizer = pre_tokenizers.Metaspace("▁", "first" if prefix else "never", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def _merges(tokens: list[str], rank: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a piece into two pieces, best first: by the piece's rank, then the longer left part,
    then the piece's id (transformers' order, so both tokenize alike)."""
    found = sorted((-rank[i], -k, k - len(piece), i, k) for i, piece in enumerate(tokens)
                   for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab)
    return [(tokens[i][:k], tokens[i][k:]) for *_, i, k in found]


def _add_special(f: GGUFFile, tok: Tokenizer, tokens: list[str], ids: dict) -> None:
    """Control tokens and the bos/eos/unknown/padding ids as special tokens, user-defined tokens as added
    tokens (each only where the vocabulary spells it as the file does, so no id is added)."""
    types = f.get("tokenizer.ggml.token_type", list, [NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise CheckpointError(f"{f.path}: tokenizer.ggml.token_type has {len(types)} types for {len(tokens)} tokens")
    vocab = tok.get_vocab()
    named = {i for k, i in ids.items() if i is not None and k in ("bos", "eos", "unknown", "padding")}
    kept = [i for i, t in enumerate(tokens) if vocab.get(t) == i]
    tok.add_special_tokens([AddedToken(tokens[i], normalized=False, special=True) for i in kept
                            if types[i] == CONTROL or i in named])
    tok.add_tokens([AddedToken(tokens[i], normalized=False, special=False) for i in kept
                    if types[i] == USER_DEFINED and i not in named])
