"""HiRE: predictors, the candidate softmax, the group-sparse FFN, the model switch, calibration and the CLI."""
from __future__ import annotations

import asyncio
import json
import platform
import shutil
import sysconfig
from pathlib import Path

import grpc
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner

from hire import predictors, sparse
from hire.calibrate import build_predictors, calibrate
from hire.checkpoint import load_model
from hire.cli import main
from hire.config import SHAPES, ModelConfig
from hire.engine import Engine
from hire.formats import CheckpointError
from hire.generate import generate
from hire.loaded import LoadedModel
from hire.model import Transformer, init_params
from hire.predictor_files import sparsify
from hire.recall import recalls
from hire.sampling import SamplingParams

STORIES = Path(__file__).resolve().parent / "data" / "stories260K"
LILY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
STORY = ("Once upon a time, there was a little dog named Max. Max liked to run in the big green park with his friend "
         "Sue. One day, Sue found a red ball under a tree. She threw the ball and Max ran very fast to get it. "
         "They played all day until the sun went down. Then they went home, ate some soup and went to sleep. ")
# Exact fallback on stories260K (vocabulary 512, ffn_dim 172 -> 43 groups of 4): every row is a candidate.
EVERY_ROW = {"softmax_k": 32, "softmax_oversample": 16, "ffn_k": 43, "ffn_oversample": 1}


def rng_normal(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def stories() -> LoadedModel:
    return load_model(STORIES)


@pytest.fixture(scope="module")
def stories_predictors(stories) -> dict:
    return build_predictors(stories, ["lr", "int8"], rank=16)


def test_int4_packing_round_trips():
    values = np.random.default_rng(0).integers(-8, 8, (5, 3, 32)).astype(np.int8)
    packed = predictors.pack_int4(values)
    assert packed.dtype == np.uint8 and packed.shape == (5, 3, 16)
    np.testing.assert_array_equal(np.asarray(predictors.unpack_int4(jnp.asarray(packed))), values)
    pairs = np.stack(np.meshgrid(np.arange(-8, 8), np.arange(-8, 8)), -1).reshape(-1).astype(np.int8)
    assert len(np.unique(predictors.pack_int4(pairs))) == 256  # every byte: each value in both nibbles
    np.testing.assert_array_equal(predictors.unpack_int4(predictors.pack_int4(pairs)), pairs)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_scores_error_is_bounded(quant):
    kernel, x = rng_normal(1, 48, 200), rng_normal(2, 7, 48)
    pred = predictors.quantize(kernel, quant)
    error = np.abs(np.asarray(predictors.scores(jax.tree.map(jnp.asarray, pred), jnp.asarray(x))) - x @ kernel)
    q = np.asarray(predictors.unpack_int4(pred["q"]) if quant == "int4" else pred["q"], np.float64)
    high_scale = np.abs(x).max(-1, keepdims=True) / 127  # the hidden state's int8 rounding, then its residual's
    low_scale = np.abs(x - np.round(x / high_scale) * high_scale).max(-1, keepdims=True) / 127
    bound = (np.abs(x).sum(-1, keepdims=True) + low_scale * np.abs(q).sum(-1)) * pred["scale"] / 2
    assert np.all(error <= bound * (1 + 1e-4) + 1e-5)
    assert np.mean(error) < 0.2 * np.mean(bound)  # typically far under the worst case
    relative = np.linalg.norm(error) / np.linalg.norm(x @ kernel)
    assert relative < (0.01 if quant == "int8" else 0.15)
    batched = np.asarray(predictors.scores(jax.tree.map(jnp.asarray, pred), jnp.asarray(x)))
    for one in (x[0], x[:1], x[None, :1]):  # a lone token takes the padded path: the same scores, its shape
        alone = np.asarray(predictors.scores(jax.tree.map(jnp.asarray, pred), jnp.asarray(one)))
        assert alone.shape == one.shape[:-1] + (200,)
        np.testing.assert_allclose(alone.reshape(-1), batched[0], rtol=1e-6)


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 9, 17, predictors.KERNEL_ROWS + 2])
def test_int8_score_product_is_exact_in_hire_kernel(rows):
    """HiRE-Q's int8 product x @ q.T runs in hire's kernel (hire/csrc/scores.cc) up to KERNEL_ROWS rows, XLA's past
    them: both exact in int32, at the extremes (127 x -127 pairs) and over rows that are not whole tiles of 8 or
    chunks of 64 weight rows."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert predictors.KERNEL, "hire._scores is missing: pip install -e . (or python setup.py build_ext --inplace)"
    rng = np.random.default_rng(rows)
    x = rng.integers(-127, 128, (rows, 96), dtype=np.int8)
    q = rng.integers(-127, 128, (200, 96), dtype=np.int8)
    x[0], q[0], q[1] = 127, -127, 127
    product = jax.jit(predictors._int8_product)
    np.testing.assert_array_equal(np.asarray(product(x, q)), x.astype(np.int64) @ q.T.astype(np.int64))
    assert ("hire_scores_int8" in product.lower(x, q).as_text()) == (rows <= predictors.KERNEL_ROWS)


@pytest.mark.parametrize("rows, n, k", [(1, 1, 32), (2, 200, 96), (9, 130, 640), (16, 64, 640), (17, 70, 1536)])
def test_int8_score_product_is_exact_on_avx2_and_vnni(avx2_then_vnni, rows, n, k):
    """hire/csrc/scores.cc's AVX2 loops (|q| times x with q's sign) and AVX-512 VNNI ones (x + 128 times q, less 128
    times q's row sums): both exactly x @ q.T, at the extremes and over ragged tiles of 8 rows and chunks of 64."""
    rng = np.random.default_rng(rows * k)
    x = rng.integers(-127, 128, (rows, k), dtype=np.int8)
    q = rng.integers(-127, 128, (n, k), dtype=np.int8)
    x[0], q[0] = 127, -127
    product = jax.jit(predictors._int8_product)
    avx2, vnni = avx2_then_vnni(predictors.KERNEL, lambda: np.asarray(product(x, q)))
    exact = x.astype(np.int64) @ q.T.astype(np.int64)
    np.testing.assert_array_equal(avx2, exact)
    np.testing.assert_array_equal(vnni, exact)


def test_low_rank_full_rank_is_exact_and_calibration_fits_the_hidden_states():
    kernel = rng_normal(3, 32, 100)
    mixing = rng_normal(4, 32, 32) * np.linspace(0.05, 3, 32)  # hidden states with a skewed covariance
    x = rng_normal(5, 2000, 32) @ mixing
    moment = x.T @ x / len(x)
    for m in (None, moment):
        pred = predictors.low_rank(kernel, 32, m)
        np.testing.assert_allclose(np.asarray(predictors.scores(pred, x)), x @ kernel, rtol=1e-3, atol=1e-3)
    err = {name: np.mean((np.asarray(predictors.scores(predictors.low_rank(kernel, 8, m), x)) - x @ kernel) ** 2)
           for name, m in (("svd", None), ("calibrated", moment))}
    assert err["calibrated"] < 0.7 * err["svd"]


@pytest.mark.parametrize("rows_axis", [0, 1])
def test_hire_logits_exact_fallback_and_candidates(rows_axis):
    vocab, dim = 64, 16
    weight, x = rng_normal(6, vocab, dim), jnp.asarray(rng_normal(7, 3, dim))
    weight = jnp.asarray(weight if rows_axis == 0 else weight.T)
    dense = x @ (weight.T if rows_axis == 0 else weight)
    approx = dense + jnp.asarray(rng_normal(8, 3, vocab))
    for gather in (True, False):
        np.testing.assert_allclose(sparse.hire_logits(x, weight, approx, vocab, rows_axis, gather), dense, rtol=1e-5,
                                   atol=1e-5)
    got = [sparse.hire_logits(x, weight, approx, 8, rows_axis, gather) for gather in (True, False)]
    np.testing.assert_allclose(got[0], got[1], rtol=1e-5, atol=1e-5)
    candidates = np.asarray(jax.lax.top_k(approx, 8)[1])
    logits, dense, approx = np.asarray(got[0]), np.asarray(dense), np.asarray(approx)
    for row, chosen in enumerate(candidates):
        others = np.setdiff1d(np.arange(vocab), chosen)
        np.testing.assert_allclose(logits[row, chosen], dense[row, chosen], rtol=1e-5, atol=1e-5)
        assert logits[row, others].max() < logits[row, chosen].min()  # greedy and top-k <= k' pick candidates
        floor = logits[row, chosen].min()
        np.testing.assert_array_equal(logits[row, others] == approx[row, others], approx[row, others] < floor)
        assert np.argmax(logits[row]) == chosen[np.argmax(dense[row, chosen])]


@pytest.mark.parametrize("gated", [True, False])
def test_group_sparse_ffn_paths_and_exact_fallback(gated):
    dim, ffn, group, n = 16, 48, 4, 3
    groups = ffn // group
    gate, up, down = (jnp.asarray(rng_normal(s, *shape)) for s, shape in ((9, (dim, ffn)), (10, (dim, ffn)),
                                                                          (11, (ffn, dim))))
    x = jnp.asarray(rng_normal(12, n, dim))
    h = jax.nn.silu(x @ gate) * (x @ up) if gated else jax.nn.silu(x @ up)
    dense = h @ down
    bundle = sparse.bundle_ffn(up, down, gate if gated else None, group)
    assert bundle.shape == (groups, 3 if gated else 2, group, dim)
    approx = (jnp.concatenate([x @ gate, x @ up], -1) if gated else x @ up) + jnp.asarray(
        rng_normal(13, n, (2 if gated else 1) * ffn))
    sparse_ffn = jax.jit(sparse.group_sparse_ffn, static_argnums=(3, 4, 5, 6))
    run = lambda k, union, gather: sparse_ffn(x, bundle, approx, jax.nn.silu, k, union, gather)  # noqa: E731
    for union in (False, True):
        for gather in (True, False):
            np.testing.assert_allclose(run(groups, union, gather), dense, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(run(2, union, True), run(2, union, False), rtol=1e-4, atol=1e-4)
    chosen = jax.lax.top_k(sparse.approx_group_scores(approx, jax.nn.silu, groups, group), 2)[1]
    keep = jnp.zeros((n, groups)).at[jnp.arange(n)[:, None], chosen].set(1)
    own = (h.reshape(n, groups, group) * keep[..., None]).reshape(n, ffn) @ down
    np.testing.assert_allclose(run(2, False, True), own, rtol=1e-4, atol=1e-4)
    union = (h.reshape(n, groups, group) * keep.max(0)[:, None]).reshape(n, ffn) @ down
    np.testing.assert_allclose(run(2, True, True), union, rtol=1e-4, atol=1e-4)
    exact = jnp.concatenate([x @ gate, x @ up], -1) if gated else x @ up  # a perfect predictor: the training mask
    np.testing.assert_allclose(sparse.group_sparse_ffn(x, bundle, exact, jax.nn.silu, 2),
                               sparse.keep_top_groups(h, groups, 2) @ down, rtol=1e-4, atol=1e-4)
    assert (np.abs(np.asarray(sparse.keep_top_groups(h, groups, 2))).reshape(n, groups, group).sum(-1) > 0).sum(-1) \
        .tolist() == [2] * n


@pytest.mark.parametrize("gated", [True, False])
def test_group_sparse_ffn_keeps_the_trained_top_k_of_its_candidates(gated):
    """keep=k: of the k' groups computed, only the exact top k count; every path agrees, and with every group a
    candidate (or a perfect predictor) it is the group-topk training mask."""
    dim, ffn, group, n, k = 16, 48, 4, 3, 2
    groups = ffn // group
    gate, up, down = (jnp.asarray(rng_normal(s, *shape)) for s, shape in ((19, (dim, ffn)), (20, (dim, ffn)),
                                                                          (21, (ffn, dim))))
    x = jnp.asarray(rng_normal(22, n, dim))
    h = jax.nn.silu(x @ gate) * (x @ up) if gated else jax.nn.silu(x @ up)
    bundle = sparse.bundle_ffn(up, down, gate if gated else None, group)
    exact = jnp.concatenate([x @ gate, x @ up], -1) if gated else x @ up
    approx = exact + jnp.asarray(rng_normal(23, *exact.shape))
    sparse_ffn = jax.jit(sparse.group_sparse_ffn, static_argnums=(3, 4, 5, 6, 7))
    run = lambda a, kk, union, gather: sparse_ffn(x, bundle, a, jax.nn.silu, kk, union, gather, k)  # noqa: E731
    trained = sparse.keep_top_groups(h, groups, k) @ down
    for union in (False, True):
        for gather in (True, False):
            np.testing.assert_allclose(run(approx, groups, union, gather), trained, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(run(exact, k, union, gather), trained, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(run(approx, 6, union, gather), run(approx, 6, union, not gather),
                                       rtol=1e-4, atol=1e-4)
    chosen = jax.lax.top_k(sparse.approx_group_scores(approx, jax.nn.silu, groups, group), 6)[1]
    candidates = jnp.zeros((n, groups)).at[jnp.arange(n)[:, None], chosen].set(1)
    among = (h.reshape(n, groups, group) * candidates[..., None]).reshape(n, ffn)
    np.testing.assert_allclose(run(approx, 6, False, True), sparse.keep_top_groups(among, groups, k) @ down,
                               rtol=1e-4, atol=1e-4)
    noisy = exact + 10 * jnp.asarray(rng_normal(24, *exact.shape))  # misses some of the top k at k' = k
    assert np.abs(np.asarray(run(noisy, k, False, True) - trained)).max() > 1e-3


def test_group_topk_training_mask_in_the_model():
    """The mask is wired into the dense FFN (its arithmetic: the group-sparse test above)."""
    cfg = SHAPES["tiny"]
    variables = init_params(cfg)
    tokens = jnp.arange(12).reshape(2, 6)
    positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
    apply = lambda c: jax.jit(Transformer(c).apply)(variables, tokens, positions)[0]  # noqa: E731
    masked = cfg.replace(ffn="group-topk", ffn_k=1)
    assert not masked.sparse  # dense weights, no predictors: it trains and loads like the dense model
    assert np.abs(np.asarray(apply(masked) - apply(cfg))).max() > 1e-3


def test_config_defaults_are_dense_and_settings_are_checked():
    cfg = SHAPES["tiny"]
    assert not cfg.sparse and ModelConfig.from_dict({k: v for k, v in cfg.to_dict().items()
                                                     if k not in ("softmax", "ffn")}) == cfg
    sparse_cfg = cfg.replace(ffn="group-sparse")
    assert sparse_cfg.ffn_group == 16 and sparse_cfg.ffn_groups == 8 and sparse_cfg.ffn_k == 1
    assert hash(sparse_cfg) != hash(cfg) and sparse_cfg.dense() == cfg.replace(ffn_group=16, ffn_k=1)
    for bad in ({"ffn": "group-sparse", "ffn_group": 5}, {"softmax": "hire-x"}, {"ffn": "group-sparse", "ffn_k": 9}):
        with pytest.raises(ValueError):
            cfg.replace(**bad)


def test_engine_decodes_with_hire_as_one_forward_pass_does(stories, stories_predictors):
    """Cached decoding (one token a step: candidates gathered) picks the argmax a single forward pass over the
    whole output computes at every position (many tokens: every row computed, the others masked)."""
    hired = sparsify(stories, stories.cfg.replace(softmax="hire-lr", softmax_oversample=2, ffn="group-sparse",
                                                  ffn_k=8, ffn_oversample=2), stories_predictors)
    prompt = stories.tokenizer.encode("Once upon a time")
    [out] = generate(Engine(hired, slots=2, max_len=64), [prompt], SamplingParams(temperature=0, max_tokens=16,
                                                                                   ignore_eos=True))
    tokens = jnp.array([prompt + out.tokens])
    logits, _ = jax.jit(Transformer(hired.cfg).apply)(hired.variables, tokens, jnp.arange(tokens.shape[1])[None])
    assert np.argmax(logits[0, len(prompt) - 1:-1], -1).tolist() == out.tokens


def test_a_quantized_softmax_predictor_is_built_at_load_and_cached(stories, tmp_path):
    """A folder with no predictors runs --softmax hire-q at once: the int4 copy of the output embedding is built at
    load, saved beside the model and read from there next time; with every row a candidate the logits are exact."""
    folder = Path(shutil.copytree(STORIES, tmp_path / "stories"))
    settings = {"softmax": "hire-q", "hire_quant": "int4", "softmax_k": 32, "softmax_oversample": 16}
    hired = load_model(folder, **settings)
    cached = folder / "hire_predictors.safetensors"
    built = predictors.quantize(np.asarray(stories.variables["params"]["embed"]).T, "int4")
    for name, value in built.items():
        np.testing.assert_array_equal(np.asarray(hired.variables["hire"]["softmax"][name]), value)
    stamp = cached.stat().st_mtime_ns
    again = load_model(folder, **settings)
    assert cached.stat().st_mtime_ns == stamp
    tokens = jnp.array([stories.tokenizer.encode(LILY)])
    positions = jnp.arange(tokens.shape[1])[None]
    exact, _ = Transformer(stories.cfg).apply(stories.variables, tokens, positions)
    logits, _ = Transformer(again.cfg).apply(again.variables, tokens, positions)
    np.testing.assert_allclose(logits, exact, atol=1e-4)
    with pytest.raises(CheckpointError, match="hire calibrate"):
        load_model(folder, ffn="group-sparse", softmax="dense")


def test_recall_on_the_trained_dense_default_model():
    """Predictors fitted on a little of the standard library's source, measured on other held-out code."""
    model = load_model("stdlib-9m-dense")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tokens = model.tokenizer.encode((stdlib / "functools.py").read_text() + (stdlib / "textwrap.py").read_text())
    settings = {"softmax_k": 32, "ffn_k": 4}
    found, meta = calibrate(model, tokens[:9 * 256], 256, 32, ["int4"], holdout=1 / 9, settings=settings,
                            oversamples=(8,), progress=False)
    lr, int4 = meta["recall"]["lr"][0], meta["recall"]["int4"][0]
    assert lr["softmax_candidates"] == 256 and lr["ffn_candidates"] == 32
    assert lr["softmax_recall"] > 0.98 and int4["softmax_recall"] > 0.99
    assert lr["ffn_recall"] > 0.97 and int4["ffn_recall"] > 0.97
    assert 0.5 < lr["ffn_mass"] < 1  # a dense-trained FFN spreads its activation over many groups
    cfg = model.cfg.replace(softmax="hire-lr", ffn="group-sparse", **settings)
    hired = sparsify(model, cfg, found)
    x = jnp.asarray(rng_normal(14, 4, model.cfg.dim))  # not hidden states: recall drops far below
    assert float(recalls(hired.cfg, hired.variables, x, [x] * 6)["softmax_recall"].mean()) < 0.9


@pytest.fixture
def run():
    def invoke(*args: str):
        result = CliRunner().invoke(main, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result
    return invoke


def test_cli_calibrate_generate_eval_bench(run, tmp_path):
    """Calibrate a copy of stories260K, then the exact fallback (every row a candidate) generates and scores as
    the dense model does; bench decode times HiRE against dense."""
    model, text = tmp_path / "stories", tmp_path / "story.txt"
    shutil.copytree(STORIES, model)
    text.write_text(STORY * 4)
    with pytest.raises(CheckpointError, match="hire calibrate"):
        load_model(model, softmax="hire-lr")
    meta = json.loads(run("calibrate", "--model", str(model), "--text", str(text), "--context", "64", "--rank", "16",
                          "--quant", "int4").stdout)
    assert meta["kinds"] == ["lr", "int4"] and (model / "hire_predictors.safetensors").is_file()
    assert json.loads((model / "hire_predictors.json").read_text()) == meta
    exact = [f"--hire={k}={v}" for k, v in EVERY_ROW.items()]
    greedy = run("generate", "--model", str(model), "--prompt", "Once upon a time", "--max-tokens", "12",
                 "--temperature", "0", "--softmax", "hire-lr", "--ffn", "group-sparse", *exact)
    assert greedy.stdout.startswith(LILY[:LILY.index(" named")])
    # the exact fallback scores as dense does (logits within 1e-4), here with quantized predictors
    scores = json.loads(run("eval", "--model", str(model), "--text", str(text), "--context", "64", "--softmax",
                            "hire-q", "--ffn", "group-sparse", "--hire", "ffn_predictor=q", "--hire", "hire_quant=int4",
                            *exact).stdout)
    assert scores["top1_agreement"] == 1 and scores["softmax_recall"] == 1 and scores["ffn_recall"] == 1
    assert scores["loss"] == pytest.approx(scores["dense_loss"], abs=1e-5)
    row = json.loads(run("bench", "decode", "--shape", "tiny", "--softmax", "hire-lr", "--ffn", "group-sparse",
                         "--hire", "hire_rank=8", "--hire", "softmax_oversample=2", "--steps", "2", "--chunk", "2",
                         "--prompt-len", "4", "--repeats", "1").stdout)
    assert row["dense_tokens_per_s"] > 0 and row["speedup"] > 0
    assert row["bytes_per_token"] < row["dense_bytes_per_token"]


def test_a_serving_default_written_before_precision_keys_is_the_as_stored_one():
    """stdlib-9m's hire_predictors.json has one unkeyed "serving" entry: it serves the model as stored only."""
    from hire.checkpoint import model_folder
    from hire.predictor_files import serving_settings

    folder = model_folder("stdlib-9m")
    assert "settings" in json.loads((folder / "hire_predictors.json").read_text())["serving"]
    assert serving_settings(folder)["ffn"] == "group-sparse"
    assert serving_settings(folder, {"softmax": "dense"}, quantize="int8") == {"softmax": "dense"}


def test_a_group_topk_model_recommends_hire_and_serves_with_it(run, tmp_path):
    """A model whose config says it was trained with the group-topk mask (stories260K's weights, 43 groups of 4,
    k = 8): calibrate measures recall at its k and eval compares HiRE with its exact-mask forward; --recommend
    times decoding against the exact model at batch 1 and 8 and records a setting that keeps quality and is fast
    enough (--min-speedup 0: any speed; the default 1.0: as its measured ratios say), under the precision it ran
    at, and refuses one that does not keep quality or is too slow; the Serve app's engine, the gRPC server and hire
    generate then run that setting by default at that precision only, generating what the exact-mask model
    generates."""
    from cluster.config import ServeConfig
    from cluster.grpc_server import GrpcServer
    from cluster.requests import Served
    from cluster.serve_app import EngineServer
    from hire.evaluate import SPEED_BATCHES
    from hire.formats.native import save_native
    from hire.predictor_files import serving_settings
    from protos import inference_pb2 as pb
    from protos import inference_pb2_grpc

    stories, model, text = load_model(STORIES), tmp_path / "topk", tmp_path / "story.txt"
    save_native(model, stories.cfg.replace(ffn="group-topk", ffn_group=4, ffn_k=8, name="topk"), stories.variables,
                stories.tokenizer)
    text.write_text(STORY * 4)
    meta = json.loads(run("calibrate", "--model", str(model), "--text", str(text), "--context", "64", "--rank", "16",
                          "--quant", "int8").stdout)
    assert {(r["ffn_group"], r["ffn_k"]) for r in meta["recall"]["int8"]} == {(4, 8)}
    every = ["--softmax", "hire-q", "--ffn", "group-sparse", "--hire", "ffn_predictor=q", "--hire", "ffn_oversample=6",
             "--hire", "softmax_oversample=16"]  # all 512 rows and 43 groups computed, the top 8 groups kept
    evaluate = ["eval", "--model", str(model), "--text", str(text), "--context", "64"]
    scores = json.loads(run(*evaluate, *every, "--recommend", "--min-speedup", "0").stdout)
    masked = json.loads(run(*evaluate).stdout)
    dense = json.loads(run(*evaluate, "--ffn", "dense").stdout)
    assert scores["loss"] == pytest.approx(scores["dense_loss"], abs=1e-5)  # the reference: the exact mask
    assert scores["dense_loss"] == pytest.approx(masked["loss"], abs=1e-6)
    assert abs(masked["loss"] - dense["loss"]) > 1e-3
    assert ServeConfig().slots in SPEED_BATCHES and SPEED_BATCHES == tuple(r["batch"] for r in scores["speed"])
    assert all(r["tokens_per_s"] > 0 and r["dense_tokens_per_s"] > 0 and r["speedup"] > 0 for r in scores["speed"])
    served = json.loads((model / "hire_predictors.json").read_text())["serving"]
    assert list(served) == ["as stored"] and served["as stored"]["targets"]["min_speedup"] == 0
    assert served["as stored"]["weights"] == {"dtype": "float32", "quantize": "none"}
    settings = served["as stored"]["settings"]
    assert settings["ffn"] == "group-sparse" and settings["ffn_keep_k"] is True
    assert served["as stored"]["eval"]["top1_agreement"] == 1 and served["as stored"]["eval"]["speed"]

    # at the default threshold the decision is the measured ratios'; one out of reach names each batch it missed
    timed = CliRunner().invoke(main, [*evaluate, *every, "--recommend"])
    ratios = {r["batch"]: r["speedup"] for r in json.loads(timed.stdout)["speed"]}
    assert timed.exit_code == (0 if min(ratios.values()) >= 1 else 1), timed.output
    for b, ratio in ratios.items():
        assert (f"batch {b}: {ratio}x the exact model" in timed.output) == (ratio < 1)
    served = json.loads((model / "hire_predictors.json").read_text())["serving"]
    slow = CliRunner().invoke(main, [*evaluate, *every, "--recommend", "--min-speedup", "1000"])
    assert slow.exit_code == 1 and all(f"batch {b}: " in slow.output for b in SPEED_BATCHES), slow.output
    bad = CliRunner().invoke(main, [*evaluate, "--softmax", "hire-lr", "--hire", "softmax_oversample=1",
                                    "--recommend"])
    assert bad.exit_code == 1 and "not made the serving default" in bad.output, bad.output
    assert "softmax_recall" in bad.output.splitlines()[-1] and "speed" not in json.loads(bad.stdout)  # not timed
    assert json.loads((model / "hire_predictors.json").read_text())["serving"] == served  # unchanged
    assert not load_model(model, **serving_settings(model, {"softmax": "dense", "ffn": "group-topk"})).cfg.sparse

    # the as-stored default is not another precision's: --dtype float32 (stored so) or --quantize int8 run exactly
    assert serving_settings(model, dtype="float32") == serving_settings(model, quantize="int8") == {}
    assert not ServeConfig(model=str(model), dtype="float32").load()[0].cfg.sparse
    assert "[HiRE: softmax hire-q, ffn group-sparse]" in run("generate", "--model", str(model), "--prompt", "a",
                                                              "--max-tokens", "2").stderr
    assert "[HiRE" not in run("generate", "--model", str(model), "--prompt", "a", "--max-tokens", "2",
                              "--dtype", "float32").stderr
    for command in ("serve-grpc", "serve"):  # a bad setting is refused before anything starts
        result = CliRunner().invoke(main, [command, "--model", str(model), "--hire", "ffn_k=99"])
        assert result.exit_code == 2 and "ffn_k must be in [1, 43]" in result.output, result.output

    prompt = "Once upon a time"
    want = generate(Engine(load_model(model), slots=1, max_len=32), [prompt],
                    SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].tokens
    request = pb.GenerateRequest(text=prompt, temperature=0, max_tokens=16, ignore_eos=True, hire=True)
    app = EngineServer(ServeConfig(model=str(model), slots=2, max_len=32, chunk=2))  # the Serve deployment, no Ray
    try:
        cfg = app.served.engine.cfg
        assert cfg.sparse and cfg.ffn == "group-sparse" and cfg.ffn_keep_k and app.info().hire

        async def through_serve_app() -> list[int]:
            return [t async for response in app.generate(request) for t in response.token_ids]
        assert asyncio.run(through_serve_app()) == want
    finally:
        app.scheduler.stop()

    def call(port: int) -> tuple[bool, list[int]]:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
            return info.hire, list(stub.Generate(request, timeout=60).token_ids)

    async def through_grpc_server() -> tuple[bool, list[int]]:
        server = GrpcServer(Served(app.served.engine, "topk"), ServeConfig(grpc_port=0, chunk=2))
        port = await server.start()
        try:
            return await asyncio.to_thread(call, port)
        finally:
            await server.stop(0)
    assert asyncio.run(through_grpc_server()) == (True, want)
