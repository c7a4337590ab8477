"""Generation on top of the engine, in this process: batch `generate` and token-by-token `stream`, and the work of
`hire generate` (`generate_text`) and `hire chat` (`chat_session`), which stream a model's text to stdout.

Both drive the server's loop (hire.scheduler) on the caller's thread: prompts wait in a queue, enter free
slots after prefill, and leave when they hit a stop token, a stop string, max_tokens or the end of the
context (hire.request.Request's rules); a hire.batch.PlainBatch decodes all slots `chunk` steps at a time.
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from hire.batch import PlainBatch
from hire.checkpoint import load, load_with_adapters, model_folder
from hire.config import OptionError
from hire.engine_api import Engine
from hire.predictor_files import serving_settings
from hire.request import Completion, Event, make_requests
from hire.sampling import SamplingParams
from hire.scheduler import run


def generate(engine: Engine, prompts: Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
             adapters: Sequence[int] | None = None, chunk: int = 16) -> list[Completion]:
    """Complete every prompt (text or token ids, one params or one per prompt); results in order."""
    requests = make_requests(engine, prompts, params, adapters)
    for _ in run(engine, requests, lambda: PlainBatch(engine, chunk)):
        pass
    return [r.out for r in requests]


def stream(engine: Engine, prompt: str | Sequence[int], params: SamplingParams, adapter: int = -1,
           chunk: int = 1) -> Iterator[Event]:
    """Yield one prompt's tokens and text deltas as they are decoded (`hire generate`, `hire chat`), attention
    over the `whole` span from the first step (see hire.batch.PlainBatch)."""
    requests = make_requests(engine, [prompt], params, [adapter])
    return run(engine, requests, lambda: PlainBatch(engine, chunk, whole=True))


def _print_stream(events: Iterable[Event], interruptible: bool = False) -> tuple[list[Event], float]:
    """Write each event's text to stdout as it comes; the events, and the seconds they took. `interruptible`:
    Ctrl-C ends the stream early (the events so far are returned) instead of the program."""
    start, seen = time.perf_counter(), []
    try:
        for event in events:
            sys.stdout.write(event.text)
            sys.stdout.flush()
            seen.append(event)
    except KeyboardInterrupt:
        if not interruptible:
            raise
    return seen, time.perf_counter() - start


def served(model: str, hire: dict[str, Any] | None, dtype: str | None, quantize: str | None) -> dict[str, Any]:
    """The HiRE overrides `hire generate` and `hire chat` run `model` with: its folder's serving default at this
    precision (hire.predictor_files.serving_settings), `hire` on top."""
    return serving_settings(model_folder(model), hire, dtype, quantize)


def _say(text: str = "") -> None:
    print(text, file=sys.stderr, flush=True)


def generate_text(model: str, prompt: str, params: SamplingParams, as_chat: bool = False, dtype: str | None = None,
                  quantize: str | None = None, loras: tuple[str, ...] = (), adapter: str | None = None,
                  hire: dict[str, Any] | None = None, draft: str | None = None, gamma: int = 4,
                  tandem_only: bool = False, weights_on_disk: bool = False, memory_budget: int | None = None,
                  window: int | None = None) -> None:
    """`hire generate`: continue `prompt` (with `as_chat`, a user's message through the model's chat template) with
    `model`, streaming the text to stdout and the speed (and with `draft`, the drafts' statistics) to stderr; with
    `params.logprobs` each token's id and log-probability too. `loras` are NAME=PATH adapters, `adapter` the one
    generating; `draft` decodes speculatively `gamma` tokens a block (hire.tandem.speculator), `weights_on_disk`
    reads the FFN from disk (hire.flash.engine_on_disk). A bad value is an OptionError naming its option."""
    from hire.chat import ChatTemplate, chat_prompt
    from hire.engine import Engine
    from hire.flash import engine_on_disk
    from hire.speculative import SpecStats
    from hire.speculative import run as speculate
    from hire.tandem import drafter, speculator

    if tandem_only and draft is None:
        raise OptionError("--tandem-only needs --draft (a tandem model, e.g. stdlib-9m-tandem)")
    if weights_on_disk:
        if loras or draft or dtype or quantize:
            raise OptionError("--weights-on-disk takes no --lora, --draft, --dtype or --quantize")
        engine, names = engine_on_disk(model, memory_budget, window, hire), {}
    else:
        loaded, names = load_with_adapters(model, dtype, loras, served(model, hire, dtype, quantize), quantize)
        engine = Engine(loaded, slots=1)
    if adapter is not None and adapter not in names:
        raise OptionError(f"no adapter {adapter!r} loaded; loaded: {sorted(names) or 'none'}", "--adapter")
    stats = SpecStats()
    try:
        text = chat_prompt(ChatTemplate.of(engine.tokenizer), [{"role": "user", "content": prompt}]) if as_chat \
            else prompt
        if draft is None:
            events = stream(engine, text, params, names.get(adapter, -1))
        else:
            spec = speculator(engine, drafter(draft, loaded, dtype), gamma, tandem_only)
            events = speculate(spec, make_requests(engine, [text], params, [names.get(adapter, -1)]), stats,
                               whole=True)
    except ValueError as e:
        raise OptionError(str(e), "--prompt") from None
    sys.stdout.write("" if as_chat else prompt)
    seen, seconds = _print_stream(events)
    count, finish = sum(not e.stop_token for e in seen), seen[-1].finish_reason
    sys.stdout.write("\n")
    sys.stdout.flush()
    _say(f"[{count} tokens in {seconds:.2f}s, {count / seconds:.1f} tokens/s, finish: {finish}, seed: {params.seed}]")
    if engine.cfg.sparse:
        _say(f"[HiRE: softmax {engine.cfg.softmax}, ffn {engine.cfg.ffn}]")
    if tandem_only:
        _say(f"[tandem {draft} alone, gamma {gamma}: {stats.calls_per_token:.3f} model calls per token]")
    elif draft is not None:
        _say(f"[draft {draft}, gamma {gamma}: acceptance rate {stats.acceptance_rate:.3f}, "
             f"{stats.mean_accepted:.2f} drafts accepted per block, {stats.calls_per_token:.3f} model calls per token]")
    if params.logprobs:
        _say(json.dumps({"tokens_logprobs": [(e.token, round(e.logprob, 4)) for e in seen]}))


def _read_message(interactive: bool) -> str | None:
    """The next line of input without its line end (with line editing on a terminal); None at its end."""
    if interactive:
        try:
            return input(">>> ")
        except (EOFError, KeyboardInterrupt):
            _say()
            return None
    line = sys.stdin.readline()
    return line.rstrip("\r\n") if line else None


def chat_session(model: str, params: SamplingParams, system: str | None = None, dtype: str | None = None,
                 quantize: str | None = None, hire: dict[str, Any] | None = None) -> None:
    """`hire chat`: a conversation with `model` (hire.chat's prompts, from the `system` prompt on): each line of
    stdin is the user's message and the answer streams to stdout, its speed to stderr. /reset forgets the
    conversation but `system`, /exit or the end of input ends it; on a terminal, Ctrl-C stops an answer."""
    from hire.chat import ChatTemplate, chat_prompt
    from hire.engine import Engine

    loaded = load(model, dtype, served(model, hire, dtype, quantize), quantize)
    engine, template = Engine(loaded, slots=1), ChatTemplate.of(loaded.tokenizer)
    start = [{"role": "system", "content": system}] if system else []
    history, interactive = list(start), sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401 - line editing and history for input()

        _say(f"[{loaded.cfg.name}: {'its chat template' if template else 'no chat template, plain format'}; "
             "/reset, /exit, Ctrl-C stops an answer]")
    while (line := _read_message(interactive)) is not None and line.strip() != "/exit":
        if line.strip() == "/reset":
            history = list(start)
            _say("[conversation reset]")
        if line.strip() in ("", "/reset"):
            continue
        turn = [*history, {"role": "user", "content": line}]
        try:
            events = stream(engine, chat_prompt(template, turn), params)
        except ValueError as e:  # the template refuses the conversation, or it outgrew the context
            _say(f"error: {e} (/reset starts over)")
            continue
        seen, seconds = _print_stream(events, interruptible=interactive)
        sys.stdout.write("\n")
        sys.stdout.flush()
        count, finish = sum(not e.stop_token for e in seen), seen[-1].finish_reason if seen else None
        _say(f"[{count} tokens, {count / seconds:.1f} tokens/s, finish: {finish or 'interrupted'}]")
        history = [*turn, {"role": "assistant", "content": "".join(e.text for e in seen)}]
