"""Tandem transformers: the block mask, training forward == inference with block refreshes, cache rollback,
greedy tandem + verification == the large model, tandem alone, saving and loading, the CLI, the recipe."""
import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner

from hire.bpe import train_bpe
from hire.checkpoint import load_model
from hire.cli import main
from hire.config import ModelConfig
from hire.engine import Engine
from hire.evaluate import token_nll, windows
from hire.formats import CheckpointError, flatten
from hire.formats.native import save_native
from hire.generate import generate
from hire.loaded import LoadedModel
from hire.model import Transformer, init_cache, init_params
from hire.request import Request
from hire.sampling import SamplingParams
from hire.speculative import run, speculative_generate
from hire.tandem import (
    TandemAlone,
    TandemConfig,
    TandemDrafter,
    TandemModel,
    TandemTransformer,
    block_mask,
    depth_matched_layers,
    init_tandem,
    large_hidden,
    load_tandem,
    save_tandem,
)
from hire.train import train
from hire.train_config import ConfigError, config_from_dict

SHAKESPEARE = Path(__file__).resolve().parent / "data" / "tinyshakespeare.txt"
VOCAB = 300
LARGE = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
SMALL = ModelConfig(vocab_size=VOCAB, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=32, max_seq_len=64,
                    tie_embeddings=True)
TANDEM = TandemConfig(large_dim=32, large_layers=((1, 2), (2,)), block=3)  # layer 0 reads a concatenation
T = 24  # sequence length of every full-sequence forward here (one compilation each)
PROMPTS = [[1, 5, 9, 200, 17, 33], [1, 44, 2, 98, 120, 7, 250, 61, 3]]  # 2 and 3 blocks of TANDEM.block

NET = TandemTransformer(SMALL, TANDEM)
step = jax.jit(NET.apply)  # (variables, tokens, positions, cache) -> logits, cache
absorb = jax.jit(partial(NET.apply, method="absorb"))  # (variables, hidden, positions, cache) -> cache
forward = jax.jit(partial(NET.apply, method="forward"), static_argnames="block")  # (variables, tokens, hidden)


@jax.jit
def large_states(variables: dict, tokens: jax.Array) -> jax.Array:
    """The large model's states that the tandem reads, over tokens [B, L] at positions 0..L-1."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return large_hidden(Transformer(LARGE).apply(variables, tokens, positions, mutable=["intermediates"])[1], TANDEM)


def at(start: int, stop: int) -> jax.Array:
    """Positions start..stop-1 for both rows."""
    return jnp.broadcast_to(jnp.arange(start, stop), (2, stop - start))


def spread(variables: dict, scale: float = 8.0) -> dict:
    """Random weights with std 0.16 instead of 0.02, so attention patterns are far from uniform."""
    return jax.tree.map(lambda x: x * scale if x.ndim >= 2 else x, variables)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A byte-level BPE of VOCAB tokens trained on a little Shakespeare."""
    tokenizer = train_bpe([SHAKESPEARE.read_text()[:20_000]], VOCAB, tmp_path_factory.mktemp("tok") / "tok.json")
    assert tokenizer.vocab_size == VOCAB
    return tokenizer


@pytest.fixture(scope="module")
def pair():
    """Tiny random large and tandem models, tokens [2, T], and the large model's states over them."""
    large, small = spread(init_params(LARGE, 1)), spread(init_tandem(SMALL, TANDEM, 2))
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, T), 0, VOCAB)
    return large, small, tokens, large_states(large, tokens)


def test_block_mask_pattern():
    mask = np.asarray(block_mask(5, 2)).astype(int)
    # columns 0..4: large-model keys, 5..9: own keys; blocks {0, 1}, {2, 3}, {4}
    assert mask.tolist() == [[0, 0, 0, 0, 0, 1, 0, 0, 0, 0],
                             [0, 0, 0, 0, 0, 1, 1, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0, 0, 1, 0, 0],
                             [1, 1, 0, 0, 0, 0, 0, 1, 1, 0],
                             [1, 1, 1, 1, 0, 0, 0, 0, 0, 1]]
    assert depth_matched_layers(4, 6) == ((2,), (3,), (5,), (6,))


def run_blocks(small, tokens, hidden, stop: int):
    """Inference from position 0 to `stop`, one token per step; at every block boundary the large model's
    states of the block just finished are absorbed first. Logits [B, stop, V] and the cache."""
    out, block, cache = [], TANDEM.block, init_cache(SMALL, 2, 32)
    for t in range(stop):
        if t % block == 0 and t:
            cache = absorb(small, hidden[:, t - block:t], at(t - block, t), cache)
        logits, cache = step(small, tokens[:, t:t + 1], at(t, t + 1), cache)
        out.append(logits)
    return jnp.concatenate(out, axis=1), cache


def test_training_forward_equals_inference_with_block_refreshes(pair):
    _, small, tokens, hidden = pair
    trained = forward(small, tokens, hidden)  # block = TANDEM.block = 3
    stepped, _ = run_blocks(small, tokens, hidden, T)
    np.testing.assert_allclose(stepped, trained, rtol=0, atol=2e-5)
    # the mask matters: the same tokens without the large model's states (one block) predict otherwise
    alone = forward(small, tokens, hidden, block=T)
    assert np.abs(np.asarray(alone - trained))[:, TANDEM.block:].max() > 1e-2
    np.testing.assert_allclose(alone[:, :TANDEM.block], trained[:, :TANDEM.block], rtol=0, atol=1e-6)


def test_cache_rollback_after_rejected_drafts(pair):
    """Run 4 draft tokens at positions 6..9, of which the large model verifies positions 6 and 7: absorbing
    those leaves a cache on which decoding goes on exactly as if the drafts had never been run."""
    _, small, tokens, hidden = pair
    _, clean = run_blocks(small, tokens, hidden, 6)
    drafts = tokens[:, 6:10].at[:, 1:].add(1) % VOCAB  # the block's input, then 3 wrong drafts
    cache = clean
    for i in range(4):
        _, cache = step(small, drafts[:, i:i + 1], at(6 + i, 7 + i), cache)
    cache = absorb(small, hidden[:, 6:8], at(6, 8), cache)
    clean = absorb(small, hidden[:, 6:8], at(6, 8), clean)
    for (k, v), (ck, cv) in zip(cache, clean):
        np.testing.assert_array_equal(k[..., :8], ck[..., :8])
        np.testing.assert_array_equal(v[:, :, :8], cv[:, :, :8])
        assert np.abs(np.asarray(k[..., 9] - ck[..., 9])).max() > 0  # a stale draft key is still there ...
    got, _ = step(small, tokens[:, 8:9], at(8, 9), cache)  # ... and invisible to the next step
    want, _ = step(small, tokens[:, 8:9], at(8, 9), clean)
    np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def engine_and_drafter(pair, tok):
    large, small, _, _ = pair
    engine = Engine(LoadedModel(LARGE, large, tok), slots=2, max_len=32)
    return engine, TandemDrafter(TandemModel(SMALL, TANDEM, small, tok))


@pytest.fixture(scope="module")
def greedy_large(engine_and_drafter) -> list[list[int]]:
    """The large model's own greedy continuations of PROMPTS, 12 tokens each."""
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    return [c.tokens for c in generate(engine_and_drafter[0], PROMPTS, params)]


@pytest.mark.parametrize("gamma,slots", [(TANDEM.block, 2), (1, 1), (5, 2)])  # γ equal to, below, above the block
def test_greedy_tandem_verification_equals_the_large_model(engine_and_drafter, greedy_large, gamma, slots):
    engine, drafter = engine_and_drafter
    if slots != engine.slots:
        engine = Engine(LoadedModel(engine.cfg, engine.variables, engine.tokenizer), slots=slots, max_len=32)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    got, stats = speculative_generate(engine, drafter, PROMPTS, params, gamma=gamma)
    assert [c.tokens for c in got] == greedy_large
    assert stats.proposed == gamma * stats.blocks and stats.blocks < 2 * 12


def test_tandem_alone_follows_the_training_pattern(engine_and_drafter, greedy_large, pair):
    """Greedy tandem-only output, with prompts a whole number of blocks long: the first token is the large
    model's, and every later one the argmax of the training forward over the finished sequence."""
    engine, drafter = engine_and_drafter
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    requests = [Request(i, p, params, -1, engine) for i, p in enumerate(PROMPTS)]
    assert len(list(run(TandemAlone(engine, drafter, TANDEM.block), requests))) == 24
    seqs = np.zeros((2, T), np.int32)  # both finished sequences, padded at the end (causal: nothing changes)
    for row, (prompt, req) in enumerate(zip(PROMPTS, requests)):
        seqs[row, :len(prompt) + 12] = prompt + req.out.tokens
    logits = forward(drafter.variables, jnp.asarray(seqs), large_states(pair[0], jnp.asarray(seqs)))
    for row, (prompt, req, large) in enumerate(zip(PROMPTS, requests, greedy_large)):
        assert req.out.tokens[0] == large[0] and req.out.tokens != large
        predicted = np.asarray(jnp.argmax(logits[row, len(prompt):len(prompt) + 11], axis=-1)).tolist()
        assert predicted == req.out.tokens[1:]


@pytest.fixture(scope="module")
def saved(pair, tok, tmp_path_factory) -> Path:
    """The pair saved: folder/large (hire) and folder/tandem (hire-tandem, reading folder/large)."""
    folder = tmp_path_factory.mktemp("saved")
    save_native(folder / "large", LARGE, pair[0], tok)
    save_tandem(folder / "tandem", TandemModel(SMALL.replace(name="tiny-tandem"),
                                               TandemConfig(32, TANDEM.large_layers, 3, str(folder / "large")),
                                               pair[1], tok))
    return folder


def test_save_and_load(saved, pair):
    loaded = load_tandem(saved / "tandem")
    assert loaded.cfg == SMALL and loaded.cfg.name == "tiny-tandem" and loaded.tandem.large == str(saved / "large")
    assert loaded.tokenizer.encode("to be") == load_model(saved / "large").tokenizer.encode("to be")
    for k, v in flatten(pair[1]).items():
        np.testing.assert_array_equal(flatten(loaded.variables)[k], v)
    with pytest.raises(CheckpointError, match="tandem model.*load_tandem"):
        load_model(saved / "tandem")
    with pytest.raises(CheckpointError, match="not a tandem model"):
        load_tandem(saved / "large")


def test_cli_eval_scores_the_tandem_beside_its_large_model(saved, tok, pair, tmp_path):
    text = SHAKESPEARE.read_text()[:400]
    (tmp_path / "text.txt").write_text(text)
    result = CliRunner().invoke(main, ["eval", "--model", str(saved / "tandem"), "--text", str(tmp_path / "text.txt"),
                                       "--context", str(T), "--batch", "2"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    inputs, targets, mask = (np.concatenate([a, np.zeros((len(a) % 2, T), a.dtype)])  # pairs of windows
                             for a in windows(np.asarray(tok.encode(text), np.int32), T))
    nll = [token_nll(forward(pair[1], x, large_states(pair[0], x)), y)[0]
           for x, y in zip(np.split(inputs, len(inputs) // 2), np.split(targets, len(inputs) // 2))]
    assert got["tokens"] == mask.sum() > 2 * T
    np.testing.assert_allclose(got["loss"], np.sum(np.concatenate(nll) * mask) / mask.sum(), rtol=1e-5)


def test_cli_bench_decode_and_eval_with_drafters(saved, tmp_path):
    """`hire bench decode --draft` times speculative decoding (and --tandem-only) against the model alone in the
    same run, over --prompts prompts --batch at a time; `hire eval --draft` adds the drafter's accuracy."""
    text = tmp_path / "text.txt"
    text.write_text(SHAKESPEARE.read_text()[:3000])
    bench = ["bench", "decode", "--model", str(saved / "large"), "--draft", str(saved / "tandem"), "--text", str(text),
             "--prompts", "2", "--gamma", "2", "--steps", "8", "--prompt-len", "6", "--repeats", "1"]
    result = CliRunner().invoke(main, [*bench, "--batch", "1", "--batch", "2"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["batch"], r["prompts"], r["speculator"]) for r in rows] == [(1, 2, "Speculator"), (2, 2, "Speculator")]
    for r in rows:
        assert r["identical"] and r["tokens"] == 16 and r["baseline_tokens_per_s"] > 0 and r["speedup"] > 0
        assert r["calls_per_token"] == pytest.approx((2 + r["blocks"]) / 16, abs=1e-4)
        assert r["mean_accepted"] == pytest.approx(2 * r["acceptance_rate"], abs=1e-3)
    assert rows[0]["blocks"] == rows[1]["blocks"]  # greedy rows decode alike whatever shares their batch
    result = CliRunner().invoke(main, [*bench, "--batch", "2", "--tandem-only"])
    assert result.exit_code == 0, result.output
    alone = json.loads(result.stdout)
    assert alone["speculator"] == "TandemAlone" and alone["calls_per_token"] == pytest.approx((2 + 8) / 16)
    result = CliRunner().invoke(main, [*bench, "--batch", "3"])
    assert result.exit_code == 2 and "2 prompts do not split into batches of 3" in result.output

    args = ["eval", "--model", str(saved / "large"), "--text", str(text), "--context", str(T), "--batch", "2"]
    for draft, agreement in ((saved / "tandem", None), (saved / "large", 1.0)):  # the model drafting for itself
        result = CliRunner().invoke(main, [*args, "--draft", str(draft), "--gamma", "3"])
        assert result.exit_code == 0, result.output
        got = json.loads(result.stdout)
        assert got["draft_gamma"] == 3 and got["draft_predictions"] > 3 * T
        assert 0 <= got["draft_next_token_accuracy"] <= 1 and 0 <= got["draft_agreement"] <= 1
        if agreement is not None:
            assert got["draft_agreement"] == agreement


def test_cli_tandem_only_needs_a_tandem_draft(saved):
    args = ["generate", "--model", str(saved / "large"), "--prompt", "to be", "--tandem-only"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "--tandem-only needs --draft" in result.output
    result = CliRunner().invoke(main, [*args, "--draft", "ngram"])
    assert result.exit_code == 2 and "needs --draft to name a tandem model" in result.output


def test_recipe_trains_and_saves(tmp_path):
    """The tandem recipe beside a random large model with the recipe's tokenizer: the loss falls, the model loads."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:60_000])
    tok = train_bpe([corpus.read_text()], VOCAB, tmp_path / "tok.json")
    save_native(tmp_path / "large", LARGE, init_params(LARGE, 4), tok)
    raw = {"out": str(tmp_path / "run"), "steps": 30, "batch_size": 8, "seq_len": 32, "eval_every": 30,
           "eval_batches": 1, "checkpoint_every": 0,
           "tokenizer": {"path": str(tmp_path / "tok.json"), "vocab_size": VOCAB},
           "data": {"source": str(corpus), "separator": "\n\n", "valid_fraction": 0.1},
           "optimizer": {"lr": 1e-2, "warmup_steps": 3},
           "model": {"dim": 16, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 32, "tie_embeddings": True},
           "tandem": {"large": str(tmp_path / "large"), "large_layers": [[1, 2], [2]], "block": 3, "distill": 0.3}}
    summary = train(config_from_dict(raw), progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 30 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    assert 0 <= summary["valid_agreement"] <= 1
    model = load_tandem(tmp_path / "run" / "model")
    assert model.tandem == TandemConfig(32, ((1, 2), (2,)), 3, str(tmp_path / "large"))
    with pytest.raises(ConfigError, match="tandem.large_layers"):
        train(config_from_dict({**raw, "out": str(tmp_path / "bad"), "tandem": {**raw["tandem"],
                                                                                "large_layers": [[1], [3]]}}))
