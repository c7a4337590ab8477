"""A model ready to run, whatever it was loaded from (hire.checkpoint loads one; hire.formats reads each format)."""
from __future__ import annotations

from dataclasses import dataclass

from hire.config import ModelConfig
from hire.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    """A model ready to run: config, variables {"params": ..., ["lora": ...]} and tokenizer."""

    cfg: ModelConfig
    variables: dict
    tokenizer: Tokenizer
