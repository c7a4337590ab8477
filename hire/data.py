"""Training corpora, split by document, and batches that are a pure function of (seed, step).

The default corpus is the source of the running interpreter's standard library (no download, PSF
licence); any text file or folder of text files works too. A document is a file, or a piece of
one when `separator` cuts files up (one file of Shakespeare into speeches); the train/validation
split never cuts a document, and training documents are concatenated in a seeded shuffled order.
"""
from __future__ import annotations

import sysconfig
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from hire.tokenizer import Tokenizer

STDLIB = "stdlib"
# Folders left out of the stdlib corpus: tests (repetitive, huge), third-party packages, and
# generated data modules (codec tables, pydoc's topic texts).
STDLIB_SKIP = frozenset({"site-packages", "test", "tests", "idle_test", "__pycache__", "encodings", "pydoc_data"})
# Held out for validation: ordinary library code of varied kinds, about 4% of the corpus.
STDLIB_VALID = ("argparse.py", "csv.py", "difflib.py", "fractions.py", "heapq.py", "json", "statistics.py",
                "string.py", "textwrap.py")


@dataclass(frozen=True)
class CorpusConfig:
    """Where the text comes from and which documents are held out for validation.

    `source` is "stdlib" or a text file or folder (files matching `pattern`, recursively).
    `valid` names held-out documents or folders (relative to the source; None: the stdlib's
    STDLIB_VALID, or nothing for other sources); `valid_fraction` also holds out that share of
    the remaining documents, chosen by a hash of their names.
    """

    source: str = STDLIB
    pattern: str = "*.txt"
    separator: str = ""
    valid: tuple[str, ...] | None = None
    valid_fraction: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.valid_fraction < 1:
            raise ValueError(f"valid_fraction must be in [0, 1), got {self.valid_fraction}")
        if self.valid is not None:
            object.__setattr__(self, "valid", tuple(self.valid))


class Document(NamedTuple):
    name: str
    text: str


class Split(NamedTuple):
    train: list[Document]
    valid: list[Document]


def read_documents(cfg: CorpusConfig) -> list[Document]:
    """Every document of the corpus, sorted by name."""
    if cfg.source == STDLIB:
        root, files = Path(sysconfig.get_paths()["stdlib"]), stdlib_files()
    else:
        root = Path(cfg.source).expanduser()
        if root.is_file():
            root, files = root.parent, [root]
        elif root.is_dir():
            files = sorted(p for p in root.rglob(cfg.pattern) if p.is_file())
        else:
            raise FileNotFoundError(f"corpus source {cfg.source!r} is neither {STDLIB!r} nor a file or folder")
    docs = []
    for path in files:
        name, text = path.relative_to(root).as_posix(), path.read_text(encoding="utf-8", errors="replace")
        if cfg.separator:
            pieces = enumerate(text.split(cfg.separator))
            docs += [Document(f"{name}#{i}", piece) for i, piece in pieces if piece.strip()]
        elif text.strip():
            docs.append(Document(name, text))
    if not docs:
        raise ValueError(f"corpus source {cfg.source!r} holds no text (pattern {cfg.pattern!r})")
    return sorted(docs)


def stdlib_files() -> list[Path]:
    """The standard library's .py files, without the folders in STDLIB_SKIP."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if not STDLIB_SKIP.intersection(p.relative_to(root).parts[:-1]))


def _held_out(name: str, cfg: CorpusConfig) -> bool:
    file = name.split("#")[0]
    names = STDLIB_VALID if cfg.valid is None and cfg.source == STDLIB else cfg.valid or ()
    if any(file == v or file.startswith(v.rstrip("/") + "/") for v in names):
        return True
    return zlib.crc32(name.encode()) < cfg.valid_fraction * 2**32


def split_corpus(cfg: CorpusConfig, seed: int) -> Split:
    """Train documents in a seeded shuffled order, validation documents by name."""
    docs = read_documents(cfg)
    valid = [d for d in docs if _held_out(d.name, cfg)]
    train = [d for d in docs if not _held_out(d.name, cfg)]
    if not train or not valid:
        raise ValueError(f"corpus split of {cfg.source!r} leaves {len(train)} training and {len(valid)} validation "
                         "documents; both need at least one (see valid, valid_fraction)")
    order = np.random.default_rng(seed).permutation(len(train))
    return Split([train[i] for i in order], valid)


def encode_documents(docs: Sequence[Document], tokenizer: Tokenizer) -> np.ndarray:
    """One token stream: each document as BOS, its tokens, EOS."""
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    return np.concatenate([np.asarray(tokenizer.encode(d.text) + eos, np.int32) for d in docs])


class Batches:
    """Batch `step` of windows of `seq_len + 1` tokens from `tokens`, a pure function of (seed, step).

    Each epoch cuts the stream into windows at a seeded offset (below seq_len) and visits them in a
    seeded order, so each window is seen once per epoch and resuming at any step gives the same data.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int):
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        self.windows = (len(tokens) - 1) // seq_len - 1  # room left for any offset below seq_len
        if self.windows < 1:
            raise ValueError(f"{len(tokens)} training tokens are too few for windows of seq_len {seq_len}")
        self._epochs: dict[int, tuple[int, np.ndarray]] = {}

    def _epoch(self, epoch: int) -> tuple[int, np.ndarray]:
        """The window offset and order of `epoch` (the last two are kept)."""
        if epoch not in self._epochs:
            rng = np.random.default_rng([self.seed, epoch])
            self._epochs = {e: v for e, v in self._epochs.items() if e == epoch - 1}
            self._epochs[epoch] = int(rng.integers(self.seq_len)), rng.permutation(self.windows)
        return self._epochs[epoch]

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        rows = []
        for sample in range(step * self.batch_size, (step + 1) * self.batch_size):
            offset, order = self._epoch(sample // self.windows)
            start = offset + int(order[sample % self.windows]) * self.seq_len
            rows.append(self.tokens[start:start + self.seq_len + 1])
        return {"tokens": np.stack(rows)}


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, count: int) -> list[dict[str, np.ndarray]]:
    """`count` batches of windows spread evenly over `tokens` (fewer if the stream is short)."""
    n = min(count * batch_size, (len(tokens) - 1) // seq_len) // batch_size * batch_size
    if n == 0:
        raise ValueError(f"{len(tokens)} validation tokens are too few for {batch_size} windows of {seq_len}")
    starts = np.linspace(0, len(tokens) - seq_len - 1, n).astype(int)
    rows = np.stack([tokens[s:s + seq_len + 1] for s in starts])
    return [{"tokens": rows[i:i + batch_size]} for i in range(0, n, batch_size)]
