"""Windowing for the group-sparse FFN: the figures against plain Python loops, and `hire bench window`."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner

from hire.calibrate import build_predictors
from hire.checkpoint import load_model
from hire.cli import main
from hire.predictor_files import save_predictors
from hire.window import figures, recall_figures, reuse_figures, top_mask, window_union

# Jitted once per window length: op by op, each small operation would compile on its own.
union = jax.jit(window_union, static_argnums=1)
reuse_of = jax.jit(reuse_figures, static_argnums=1)
recall_of = jax.jit(recall_figures, static_argnums=2)

STORIES = Path(__file__).resolve().parent / "data" / "stories260K"
STORY = ("Once upon a time, there was a little dog named Max. Max liked to run in the big green park with his friend "
         "Sue. One day, Sue found a red ball under a tree. She threw the ball and Max ran very fast to get it. ")


def random_masks(seed: int, *shape: int, share: float = 0.3) -> np.ndarray:
    return np.random.default_rng(seed).random(shape) < share


def loop_union(masks: np.ndarray, window: int) -> np.ndarray:
    """window_union for one sequence [T, G], token by token."""
    out = np.zeros_like(masks)
    for t in range(len(masks)):
        for s in range(max(0, t - window), t):
            out[t] |= masks[s]
    return out


@pytest.mark.parametrize("window", [0, 1, 2, 5, 40])
def test_window_union_equals_a_loop(window):
    masks = random_masks(0, 3, 17, 11)  # 3 sequences of 17 tokens, 11 groups; window 40 spans whole sequences
    got = np.asarray(union(jnp.asarray(masks), window))
    for b in range(3):
        np.testing.assert_array_equal(got[b], loop_union(masks[b], window))


@pytest.mark.parametrize("window", [0, 1, 3, 8])
def test_figures_equal_a_loop(window):
    exact, cand = random_masks(1, 2, 13, 9), random_masks(2, 2, 13, 9, share=0.5)
    exact[0, 4] = False  # a token with no groups: reuse and recall count it as 0, not NaN
    reuse = {k: np.asarray(v) for k, v in reuse_of(jnp.asarray(exact), window).items()}
    recall = {k: np.asarray(v) for k, v in recall_of(jnp.asarray(exact), jnp.asarray(cand), window).items()}
    for b in range(2):
        for t in range(13):
            used, cache = set(), set()
            for s in range(max(0, t - window), t):
                used |= set(np.flatnonzero(exact[b, s]))
                cache |= set(np.flatnonzero(cand[b, s]))
            need, have = set(np.flatnonzero(exact[b, t])), set(np.flatnonzero(cand[b, t]))
            k = max(len(need), 1)
            assert reuse["reuse"][b, t] == pytest.approx(len(need & used) / k)
            assert reuse["loads"][b, t] == len(need - used)
            assert reuse["held"][b, t] == len(need | used)
            assert recall["recall"][b, t] == pytest.approx(len(need & have) / k)
            assert recall["recall_used"][b, t] == pytest.approx(len(need & (have | used)) / k)
            assert recall["extra_used"][b, t] == len(used - have)
            assert recall["recall_cache"][b, t] == pytest.approx(len(need & (have | cache)) / k)
            assert recall["extra_cache"][b, t] == len(cache - have)
            assert recall["loads"][b, t] == len(have - cache)
            assert recall["held"][b, t] == len(have | cache)
    if window == 0:
        assert (reuse["loads"] == exact.sum(-1)).all() and (recall["recall_cache"] == recall["recall"]).all()


def test_figures_sum_valid_tokens_per_layer():
    scores = np.random.default_rng(3).standard_normal((2, 3, 10, 12)).astype(np.float32)  # [L, B, T, G]
    approx = scores + 0.5 * np.random.default_rng(4).standard_normal(scores.shape).astype(np.float32)
    valid = np.ones((3, 10), np.float32)
    valid[2, 6:] = 0  # padding at the end of the last sequence
    run = jax.jit(lambda s, a, v: figures(s, {"q": a}, 3, {"qx2": ("q", 6)}, (0, 2), v))
    out = run(jnp.asarray(scores), jnp.asarray(approx), jnp.asarray(valid))
    exact, cand = np.asarray(top_mask(jnp.asarray(scores), 3)), np.asarray(top_mask(jnp.asarray(approx), 6))
    assert (exact.sum(-1) == 3).all() and (cand.sum(-1) == 6).all()
    np.testing.assert_array_equal(exact, (np.argsort(-scores, -1)[..., :3, None] == np.arange(12)).any(-2))
    before = np.stack([np.stack([loop_union(seq, 2) for seq in layer]) for layer in exact])
    want_loads = (exact & ~before).sum(-1)  # [L, B, T]: the figures batch over layers
    want_recall = (exact & cand).sum(-1) / 3
    np.testing.assert_allclose(np.asarray(out[2]["exact"]["loads"]), (want_loads * valid).sum((1, 2)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out[0]["qx2"]["recall"]), (want_recall * valid).sum((1, 2)), rtol=1e-6)
    assert float(out[0]["exact"]["loads"][0]) == 3 * valid.sum()


def test_bench_window_on_stories260k(tmp_path):
    model = load_model(STORIES)
    save_predictors(tmp_path, build_predictors(model, ["lr", "int8"], rank=16), {})
    text = tmp_path / "story.txt"
    text.write_text(STORY * 4)
    args = ["bench", "window", "--model", str(STORIES), "--predictors", str(tmp_path), "--text", str(text),
            "--window", "0", "--window", "4", "--oversample", "1", "--oversample", "2", "--context", "64",
            "--batch", "2", "--hire", "ffn_k=8"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["window"] for r in lines] == [0, 4]
    for r in lines:
        assert (r["groups"], r["k"], r["layers"], r["group_bytes"]) == (43, 8, 5, 3 * 4 * 64 * 4)
        assert set(r) >= {"exact", "lrx1", "lrx2", "int8x1", "int8x2", "tokens", "context"}
        assert len(r["exact"]["per_layer"]["reuse"]) == 5
        assert r["int8x2"]["groups_per_token"] == 16
    none, four = lines
    assert none["exact"]["reuse"] == 0 and none["exact"]["loads"] == 8 and none["int8x2"]["loads"] == 16
    assert 0 < four["exact"]["reuse"] < 1 and four["exact"]["loads"] < 8 < four["exact"]["held"]
    assert four["exact"]["loads_bytes"] < four["exact"]["no_window_bytes"] < four["exact"]["held_bytes"]
    for name in ("lrx1", "int8x1"):  # the window only adds candidates: recall cannot fall
        assert four[name]["recall"] == none[name]["recall"]
        assert four[name]["recall_cache"] >= four[name]["recall"] and four[name]["extra_cache"] > 0
    bad = CliRunner().invoke(main, args[:-1] + ["ffn_oversample=2"])
    assert bad.exit_code == 2 and "only ffn_group and ffn_k" in bad.output
    missing = CliRunner().invoke(main, args + ["--kind", "int4"])
    assert missing.exit_code == 1 and "no int4 predictor" in missing.output
