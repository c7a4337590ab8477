"""Chat: messages turned into the prompt text a model was tuned on, by the model's own Jinja chat template.

The template comes with the model (Hugging Face's tokenizer_config.json "chat_template" or
chat_template.jinja, GGUF's tokenizer.chat_template, or chat_template.jinja beside a hire checkpoint's
tokenizer) and is rendered as transformers renders it: jinja2's immutable sandbox, trim_blocks and
lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII, and
`bos_token`/`eos_token`. A model without a template is prompted in hire's plain format, one
"role: content" line per message, then "assistant:".

A bad message, or one the template refuses (its `raise_exception`), is a `ChatError` (a ValueError whose
message starts with "messages:", the request field it names).
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from hire.formats import CheckpointError, read_json

TEMPLATE_FILE = "chat_template.jinja"
ROLES = ("system", "developer", "user", "assistant", "tool")
# Tokens that close a turn in the chat formats in use (ChatML, Gemma, Llama 3, Phi-3): generation stops at
# those a template writes when the vocabulary has them as special tokens.
END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|end|>")


class ChatError(ValueError):
    """Messages that are malformed or that the chat template refuses; the message names the field."""


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template; jinja2.TemplateSyntaxError if it does not parse."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(source)


def check_template(source: Any, where: str) -> str | None:
    """`source` (None: no template) if it is a template that parses, else a CheckpointError naming `where`
    (the file or field it came from)."""
    if source is None:
        return None
    if not isinstance(source, str):
        raise CheckpointError(f"{where}: the chat template is not a string")
    try:
        compile_template(source)
    except jinja2.TemplateSyntaxError as e:
        raise CheckpointError(f"{where}: the chat template does not parse: {e.message} (line {e.lineno})") from None
    return source


def hf_template(value: Any, where: str) -> str | None:
    """tokenizer_config.json's "chat_template": a string, or a list of {"name", "template"} (the "default" one)."""
    if isinstance(value, list):
        value = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}.get("default")
    return check_template(value, where)


def template_in(folder: Path) -> str | None:
    """The chat template stored in a model folder: chat_template.jinja, else tokenizer_config.json's, else None."""
    file, config = Path(folder) / TEMPLATE_FILE, Path(folder) / "tokenizer_config.json"
    if file.is_file():
        return check_template(file.read_text(), str(file))
    if config.is_file():
        return hf_template(read_json(config).get("chat_template"), f"{config}: chat_template")
    return None


def end_ids(eos_id: int | None, declared: Iterable[int | None], template: str | None,
            specials: Mapping[str, int], vocab_size: int) -> tuple[int, ...]:
    """Every id that ends generation: EOS, the ids the model declares (e.g. generation_config's eos_token_id
    list), and the end-of-turn tokens (END_OF_TURN) its template writes that are special tokens of its
    vocabulary (`specials`: text -> id). Ids outside the vocabulary are left out."""
    turn = [specials[t] for t in END_OF_TURN if template and t in template and t in specials]
    ids = [eos_id, *declared, *turn]
    return tuple(dict.fromkeys(i for i in ids if isinstance(i, int) and 0 <= i < vocab_size))


def text_of(content: Any, i: int) -> str:
    """A message's content as text: a string, None (empty), or OpenAI's list of {"type": "text", "text"} parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ChatError(f"messages: messages[{i}].content[{j}] is not a text part ({{\"type\": \"text\", "
                                "\"text\": ...}); only text is supported")
            parts.append(part["text"])
        return "".join(parts)
    raise ChatError(f"messages: messages[{i}].content must be a string or a list of text parts")


def plain_messages(messages: Sequence[Any]) -> list[dict[str, str]]:
    """Messages as [{"role", "content"}] with text content, checked; ChatError naming the bad one."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ChatError("messages: at least one message is needed")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatError(f"messages: messages[{i}] is not an object with a role and content")
        if m.get("role") not in ROLES:
            raise ChatError(f"messages: messages[{i}].role is {m.get('role')!r}; expected one of {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": text_of(m.get("content"), i)})
    return out


@dataclass(frozen=True)
class ChatTemplate:
    """A model's chat template with the texts of its BOS and EOS tokens (picklable: strings only)."""

    source: str
    bos_token: str = ""
    eos_token: str = ""

    @classmethod
    def of(cls, tokenizer) -> ChatTemplate | None:
        """The template of a tokenizer (hire.tokenizer.Tokenizer), or None when the model has none."""
        if tokenizer.chat_template is None:
            return None
        text = lambda i: "" if i is None else tokenizer.token_text(i)  # noqa: E731
        return cls(tokenizer.chat_template, text(tokenizer.bos_id), text(tokenizer.eos_id))

    def render(self, messages: Sequence[Any], add_generation_prompt: bool = True) -> str:
        """The prompt text of `messages`; ChatError if they are malformed or the template refuses them."""
        chat = plain_messages(messages)
        try:
            return compile_template(self.source).render(
                messages=chat, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token,
                eos_token=self.eos_token)
        except (jinja2.TemplateError, TypeError, ValueError, LookupError) as e:
            raise ChatError(f"messages: the model's chat template refuses them: {e}") from None


def chat_prompt(template: ChatTemplate | None, messages: Sequence[Any]) -> str:
    """The prompt for `messages`: rendered by the model's template, or in hire's plain format without one."""
    if template is not None:
        return template.render(messages)
    return "".join(f"{m['role']}: {m['content']}\n" for m in plain_messages(messages)) + "assistant:"
