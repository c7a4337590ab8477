"""Tokenizers: Hugging Face tokenizer.json, llama2.c's tokenizer .bin, and streaming detokenization.

Each carries the model's chat template (hire.chat), if it has one, and `end_ids`: every id that ends
generation (EOS and the end-of-turn ids the model declares).
"""
from __future__ import annotations

import heapq
import json
import re
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import tokenizers

from hire import chat
from hire.formats import CheckpointError, read_json

META = "tokenizer_meta.json"


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    chat_template: str | None  # Jinja source (hire.chat), None when the model has none
    end_ids: tuple[int, ...]  # generation stops at each: EOS and the model's end-of-turn ids

    def encode(self, text: str, bos: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_text(self, token_id: int) -> str:
        """One token's text as its vocabulary writes it, special tokens included (e.g. "<|im_end|>")."""

    def save(self, folder: Path) -> None:
        """Write the tokenizer's file(s) into a hire model folder."""


class HFTokenizer:
    """A Hugging Face fast tokenizer (tokenizer.json); BOS/EOS ids come from the model's config.

    `end_ids` are the ids (or token texts) the model declares as ends besides EOS; the end-of-turn special
    tokens the chat template writes are added (hire.chat.end_ids).
    """

    def __init__(self, path: str | Path, bos_id: int | None = None, eos_id: int | None = None,
                 add_bos: bool = True, chat_template: str | None = None, end_ids: Sequence[int | str] = ()):
        self.path = Path(path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a bare Exception for unreadable files
            raise CheckpointError(f"cannot read tokenizer {self.path}: {e}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self.chat_template = chat_template
        declared = [self._tok.token_to_id(e) if isinstance(e, str) else e for e in end_ids]
        self.end_ids = chat.end_ids(eos_id, declared, chat_template, self.specials(), self.vocab_size)

    def specials(self) -> dict[str, int]:
        """The special tokens' texts and ids."""
        return {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def token_text(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id) or ""

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Token ids of `text`; BOS is prepended here, never by the tokenizer's post-processor."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos and self.add_bos and self.bos_id is not None else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def save(self, folder: Path) -> None:
        shutil.copyfile(self.path, Path(folder) / "tokenizer.json")
        meta = {"bos_id": self.bos_id, "eos_id": self.eos_id, "add_bos": self.add_bos, "end_ids": list(self.end_ids)}
        (Path(folder) / META).write_text(json.dumps(meta) + "\n")
        save_template(folder, self.chat_template)


_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")


class Llama2cTokenizer:
    """llama2.c's tokenizer .bin: int32 max_token_length, then per token float32 score, int32 length, bytes.

    Encoding and decoding follow llama2.c's run.c: SentencePiece-style BPE by piece scores with a
    dummy-prefix space and UTF-8 byte fallback to the <0xXX> tokens at ids 3..258.
    """

    bos_id = 1
    eos_id = 2

    def __init__(self, path: str | Path, chat_template: str | None = None):
        self.path = Path(path)
        self.pieces, self.scores = read_llama2c_vocab(self.path)
        self.vocab_size = len(self.pieces)
        self.chat_template, self.end_ids = chat_template, (self.eos_id,)
        self._ids = {piece: i for i, piece in enumerate(self.pieces)}
        self._text = [bytes([int(m[1], 16)]) if (m := _BYTE_PIECE.fullmatch(p)) else p for p in self.pieces]

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = []
        for ch in (" " + text if text else ""):  # run.c's dummy-prefix space
            raw = ch.encode()
            ids += [self._ids[raw]] if raw in self._ids else [b + 3 for b in raw]
        ids = self._merge(ids)
        return [self.bos_id, *ids] if bos else ids

    def _pair(self, left: int, right: int) -> float:
        merged = self._ids.get(self.pieces[left] + self.pieces[right])
        return float("-inf") if merged is None else self.scores[merged]

    def _merge(self, ids: list[int]) -> list[int]:
        """Repeatedly merge the adjacent pair whose merged piece scores highest, leftmost first.

        run.c rescans the whole sequence per merge; this keeps candidates in a heap keyed by
        (-score, position) over a linked list, which picks the same pair each time.
        """
        n, heap = len(ids), []
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))

        def push(a: int) -> None:  # the pair starting at node a, if it merges
            if a >= 0 and nxt[a] < n and (s := self._pair(ids[a], ids[nxt[a]])) > -1e10:
                heapq.heappush(heap, (-s, a, ids[a], ids[nxt[a]]))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, left, right = heapq.heappop(heap)
            j = nxt[i]
            if ids[i] != left or j >= n or ids[j] != right:
                continue  # stale: one side has merged since
            ids[i], ids[j], nxt[i] = self._ids[self.pieces[left] + self.pieces[right]], -1, nxt[j]
            if nxt[i] < n:
                prv[nxt[i]] = i
            push(prv[i])
            push(i)
        return [t for t in ids if t >= 0]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, skipping BOS/EOS and dropping the space that starts a piece right after BOS."""
        out, prev = bytearray(), None
        for i in ids:
            if i not in (self.bos_id, self.eos_id):
                piece = self._text[i]
                out += piece[1:] if prev == self.bos_id and piece.startswith(b" ") else piece
            prev = i
        return out.decode(errors="replace")

    def token_text(self, token_id: int) -> str:
        """A piece's text; BOS and EOS, stored as "\\n<s>\\n" and "\\n</s>\\n", are "<s>" and "</s>"."""
        return {self.bos_id: "<s>", self.eos_id: "</s>"}.get(token_id) or self.pieces[token_id].decode(errors="replace")

    def save(self, folder: Path) -> None:
        shutil.copyfile(self.path, Path(folder) / "tokenizer.bin")
        save_template(folder, self.chat_template)


def save_template(folder: Path, template: str | None) -> None:
    """Write the chat template, if any, to chat_template.jinja in `folder`."""
    if template is not None:
        (Path(folder) / chat.TEMPLATE_FILE).write_text(template)


def read_llama2c_vocab(path: Path) -> tuple[list[bytes], list[float]]:
    """Pieces and scores of a llama2.c tokenizer file; CheckpointError if it is not one."""
    data = Path(path).read_bytes()
    pieces, scores, at = [], [], 4
    max_len = struct.unpack_from("<i", data)[0] if len(data) >= 4 else -1
    while 0 < max_len and at + 8 <= len(data):
        score, n = struct.unpack_from("<fi", data, at)
        if not 0 <= n <= max_len or at + 8 + n > len(data):
            break
        scores.append(score)
        pieces.append(data[at + 8:at + 8 + n])
        at += 8 + n
    if at != len(data) or len(pieces) < 259:
        raise CheckpointError(f"{path} is not a llama2.c tokenizer file")
    return pieces, scores


class StreamDecoder:
    """Turns generated token ids into text as they arrive.

    Each push decodes a short window of recent ids and emits what it adds to the text, holding
    back while the text ends in U+FFFD (a character whose UTF-8 bytes are still incomplete).
    `context` (e.g. the prompt) is decoded along but not emitted, so spacing at the join is right.
    """

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.ids = list(context)
        self._start = 0  # the window decoded each step starts here
        self._done = len(self.ids)  # text of ids before this has been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is held back, incomplete characters included (call once the stream ends)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        before = self.tokenizer.decode(self.ids[self._start:self._done])
        text = self.tokenizer.decode(self.ids[self._start:])
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self._start, self._done = self._done, len(self.ids)
        return text[len(before):]


def load_tokenizer(folder: Path, name: str | None = None) -> Tokenizer:
    """The tokenizer in a model folder: `name` if given, else tokenizer.json or tokenizer.bin, with the chat
    template in chat_template.jinja (or tokenizer_meta.json's "chat_template"), if any."""
    folder = Path(folder)
    names = [name] if name else ["tokenizer.json", "tokenizer.bin"]
    meta = read_json(folder / META) if (folder / META).is_file() else {}
    template = chat_template_in(folder, meta.pop("chat_template", None))
    for n in names:
        path = folder / n
        if path.suffix == ".json" and path.is_file():
            return HFTokenizer(path, chat_template=template, **meta)
        if path.is_file():
            return Llama2cTokenizer(path, template)
    raise CheckpointError(f"no tokenizer in {folder}: expected {' or '.join(names)}")


def chat_template_in(folder: Path, meta_template: str | None = None) -> str | None:
    """The chat template in a model folder (hire.chat.template_in), else `meta_template` (tokenizer_meta.json's);
    a bad one is a CheckpointError naming where it is."""
    found = chat.template_in(folder)
    return found if found is not None else chat.check_template(meta_template, f"{folder / META}: chat_template")
