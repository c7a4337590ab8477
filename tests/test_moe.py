"""hire.moe: the sparse dispatch paths against the all-experts path (logits within 1e-5 in float32, greedy tokens
identical) at batch 1, 8 and 32 in prefill and decode; the mixture sharded over 4 devices of one process (this file
runs itself as a script with XLA_FLAGS) against one device; and `hire bench decode`'s fields for a mixture."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner
from jax.sharding import PartitionSpec as P
from test_topk import finish

from hire import moe, sharding
from hire.bench import decode_prompts
from hire.checkpoint import load_model
from hire.cli import main
from hire.config import ModelConfig
from hire.engine import Engine
from hire.formats.native import save_native
from hire.generate import generate
from hire.loaded import LoadedModel
from hire.model import Transformer, init_cache, init_params
from hire.sampling import SamplingParams

# 8 experts of 96 neurons, top 2; stories260K's tokenizer (512 tokens) so that prompts are text
CFG = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, n_experts=8,
                  max_seq_len=64, name="moe-tiny")
PATHS = ("per-token", "grouped", "auto")
PROMPTS = ["Once upon a time", "The cat sat", "Lily was", "One day, a big", "Tom", "The sun", "She said", "A dog"]


def tiny_moe() -> LoadedModel:
    """CFG with random weights 3x the init's scale (logits of order 1, experts' outputs far apart)."""
    variables = jax.tree.map(lambda a: a * 3, init_params(CFG, seed=1))
    return LoadedModel(CFG, variables, load_model("stories260K").tokenizer)


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return tiny_moe()


def forward(model: LoadedModel, dispatch: str, tokens, positions, cache):
    return jax.jit(Transformer(model.cfg.replace(moe_dispatch=dispatch)).apply)(model.variables, tokens, positions,
                                                                              cache)


@pytest.mark.parametrize("batch", [1, 8, 32])
def test_paths_match_all_experts(model, batch):
    """Prefill (16 tokens a row) and a decode step through the cache: every path's logits are the all-experts
    path's within 1e-5, and "auto" reads only the chosen experts per token at batch 1, grouped above."""
    tokens = jax.random.randint(jax.random.key(batch), (batch, 17), 0, CFG.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(17), tokens.shape)
    cache = init_cache(CFG, batch, 32)
    want_prefill, want_cache = forward(model, "all", tokens[:, :16], positions[:, :16], cache)
    want_decode, _ = forward(model, "all", tokens[:, 16:], positions[:, 16:], want_cache)
    assert float(jnp.abs(want_decode).max()) > 1  # logits of order 1: a wrong expert would show
    for dispatch in PATHS:
        prefill, new_cache = forward(model, dispatch, tokens[:, :16], positions[:, :16], cache)
        decode, _ = forward(model, dispatch, tokens[:, 16:], positions[:, 16:], new_cache)
        np.testing.assert_allclose(prefill, want_prefill, atol=1e-5, rtol=0, err_msg=f"{dispatch} prefill")
        np.testing.assert_allclose(decode, want_decode, atol=1e-5, rtol=0, err_msg=f"{dispatch} decode")
    assert moe.pick("auto", batch, CFG.n_experts_per_token) == ("per-token" if batch == 1 else "grouped")


def test_grouped_tiles_keep_every_token():
    """Grouped with 3-row tiles (several tiles an expert, a partial last one, experts nobody chose) equals the
    all-experts path: no token is dropped."""
    keys = jax.random.split(jax.random.key(0), 5)
    experts = tuple((jax.random.normal(jax.random.fold_in(keys[0], e), (16, 24)),
                     jax.random.normal(jax.random.fold_in(keys[1], e), (16, 24)),
                     jax.random.normal(jax.random.fold_in(keys[2], e), (24, 16)) / 4) for e in range(6))
    x = jax.random.normal(keys[3], (40, 16))
    idx = jax.random.choice(keys[4], 4, (40, 2), replace=True)  # experts 0-3 only, some tokens twice the same
    idx = jnp.where(idx[:, :1] == idx[:, 1:], jnp.concatenate([idx[:, :1], (idx[:, 1:] + 1) % 4], 1), idx)
    weights = jax.nn.softmax(x[:, :2], -1)
    want = moe.all_experts(x, experts, weights, idx, jax.nn.silu)
    for tile in (3, 16):
        np.testing.assert_allclose(moe.grouped(x, experts, weights, idx, jax.nn.silu, tile), want, atol=1e-4,
                                   rtol=1e-5)
    np.testing.assert_allclose(moe.per_token(x, experts, weights, idx, jax.nn.silu), want, atol=1e-4, rtol=1e-5)
    # 80 pairs over 6 experts in tiles of 16 (twice 14, at most TILE): the 6 experts' first reads, then one a tile
    assert moe.tile_rows(40, 2, 6) == 16 and moe.experts_read("grouped", 40, 2, 6) == 6 + 74 // 16
    assert [moe.tile_rows(n, 2, 8) for n in (1, 4, 8, 32, 64)] == [1, 2, 4, 16, 16]
    assert moe.experts_read("per-token", 1, 2, 8) == 2 and moe.experts_read("all", 1, 2, 8) == 8


@pytest.mark.parametrize("slots", [1, 8, 32])
def test_greedy_tokens_identical(model, slots):
    """The engine generates the all-experts path's tokens, greedy, with `slots` rows decoding together."""
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(slots)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    sparse, dense = (Engine(LoadedModel(CFG.replace(moe_dispatch=d), model.variables, model.tokenizer),
                            slots=slots, max_len=32) for d in ("auto", "all"))
    got, want = generate(sparse, prompts, params), generate(dense, prompts, params)
    assert [g.tokens for g in got] == [w.tokens for w in want]
    assert all(len(g.tokens) == 12 for g in got)


def test_bad_dispatch_is_named():
    with pytest.raises(ValueError, match="moe_dispatch must be one of"):
        CFG.replace(moe_dispatch="sparse")


def test_bench_decode_reports_bytes_and_the_all_experts_path(model, tmp_path):
    """hire bench decode on a mixture: the all-experts path timed in the same run, and the bytes each reads."""
    save_native(tmp_path / "moe", CFG, model.variables, model.tokenizer)
    result = CliRunner().invoke(main, ["bench", "decode", "--model", str(tmp_path / "moe"), "--batch", "1", "--batch",
                                       "8", "--steps", "2", "--chunk", "2", "--prompt-len", "4", "--repeats", "1"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    expert = 3 * CFG.dim * CFG.ffn_dim * 4
    assert [(r["batch"], r["moe_path"]) for r in rows] == [(1, "per-token"), (8, "grouped")]
    for r in rows:
        assert r["dense_tokens_per_s"] > 0 and r["speedup"] > 0 and r["n_experts"] == 8
        reads = 8 + 8 // 4 if r["batch"] == 8 else 2  # batch 8: 16 pairs in tiles of 4; batch 1: its 2 experts
        saved = CFG.n_layers * (CFG.n_experts - reads) * expert
        assert r["bytes_per_token"] == (r["weight_bytes"] - saved) // r["batch"]
        assert r["dense_bytes_per_token"] == r["weight_bytes"] // r["batch"]


def test_bench_decode_slots_route_apart(model):
    """hire bench decode gives each slot its own prompt (the same every call), so a batch's rows choose different
    experts: here the first layer's router on the 8 prompts' last tokens picks more than one row's 2 experts."""
    prompts = decode_prompts(CFG.vocab_size, 8, 4)
    assert len({tuple(p) for p in prompts}) == 8 and prompts == decode_prompts(CFG.vocab_size, 8, 4)
    params = model.variables["params"]
    x = params["embed"][jnp.array([p[-1] for p in prompts])]
    assert len(set(np.asarray(moe.route(x, params["layers_0"]["moe"]["router"], 2)[1]).ravel())) > 2


def test_sharded_over_four_devices(model, tmp_path):
    """A hire checkpoint of the mixture loaded over 4 devices: every expert's arrays split over them (neurons), and
    the engine generates the single-device tokens (greedy and seeded; logprobs within 1e-4) per token (1 slot) and
    grouped (8 slots); a decode step's only collectives in the mixture are one all-reduce of its output [slots, dim]
    a layer: no expert weight moves."""
    save_native(tmp_path / "moe", CFG, model.variables, model.tokenizer)
    out = finish(subprocess.Popen([sys.executable, __file__, str(tmp_path / "moe")], env=os.environ | {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), timeout=480)
    assert out["devices"] == 4 and out["split"] == {"gate": True, "up": True, "down": True}
    for slots, got in out["slots"].items():
        assert got["same_tokens"] and got["logprob_error"] < 1e-4, (slots, got)
        assert got["moe_collectives"] == [["all-reduce", [int(slots), CFG.dim]]] * CFG.n_layers, (slots, got)


def sharded(folder: str) -> dict:
    """What test_sharded_over_four_devices checks, run here with this process's devices."""
    mesh = sharding.make_mesh()
    loaded = sharding.load_sharded(folder, mesh)
    layer = loaded.variables["params"]["layers_1"]["moe"]
    out = {"devices": jax.device_count(), "slots": {},
           "split": {part: layer[f"{part}_5"].sharding.spec != P() for part in ("gate", "up", "down")}}
    params = [SamplingParams(temperature=0.0, max_tokens=8, logprobs=True, ignore_eos=True),
              SamplingParams(temperature=0.9, top_k=5, max_tokens=8, seed=1, logprobs=True, ignore_eos=True)]
    for slots in (1, 8):
        one, split = Engine(load_model(folder), slots=slots, max_len=32), Engine(loaded, slots=slots, max_len=32,
                                                                                 mesh=mesh)
        prompts, rows = PROMPTS[:max(2, slots)], [params[i % 2] for i in range(max(2, slots))]
        want, got = (generate(e, prompts, rows, chunk=8) for e in (one, split))
        text = split._generate_steps.lower(split.variables, split.init_state(), 8, 16).compile().as_text()
        moe_collectives = [(op, [int(d) for d in dims.split(",")])  # each collective of the mixture and its shape
                           for dims, op in re.findall(r"= \w+\[([\d,]*)\]\S* (all-reduce|all-gather|collective-permute|"
                                                      r"all-to-all)\(.*op_name=\"[^\"]*/moe/", text)]
        out["slots"][slots] = {"same_tokens": all(g.tokens == w.tokens for g, w in zip(got, want)),
                               "logprob_error": max(float(np.max(np.abs(np.subtract(g.logprobs, w.logprobs))))
                                                    for g, w in zip(got, want)),
                               "moe_collectives": moe_collectives}
    return out


if __name__ == "__main__":
    print(json.dumps(sharded(sys.argv[1])))
