"""Byte-level BPE tokenizers trained with Hugging Face `tokenizers`, saved as tokenizer.json."""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from hire.tokenizer import HFTokenizer

SPECIAL = ("<pad>", "<bos>", "<eos>")  # ids 0, 1, 2: ModelConfig's default bos_id and eos_id
PAD_ID, BOS_ID, EOS_ID = range(3)


@dataclass(frozen=True)
class TokenizerConfig:
    """`path` is reused when it exists, else trained on the training split and saved there."""

    path: str
    vocab_size: int = 16384

    def __post_init__(self) -> None:
        if self.vocab_size < 256 + len(SPECIAL):
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL)} (every byte and {len(SPECIAL)} "
                             f"special tokens), got {self.vocab_size}")


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | Path) -> HFTokenizer:
    """Train a byte-level BPE on `texts` and write it atomically to `path`.

    Every byte is in the vocabulary, so any text round-trips; <bos> and <eos> are special.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)
    return open_bpe(path)


def open_bpe(path: str | Path) -> HFTokenizer:
    """A tokenizer written by train_bpe."""
    return HFTokenizer(path, bos_id=BOS_ID, eos_id=EOS_ID)


def load_or_train(cfg: TokenizerConfig, texts: Iterable[str]) -> HFTokenizer:
    """The tokenizer at cfg.path, trained on `texts` first if the file does not exist."""
    return open_bpe(cfg.path) if Path(cfg.path).exists() else train_bpe(texts, cfg.vocab_size, cfg.path)
