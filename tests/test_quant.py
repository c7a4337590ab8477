"""Weights kept quantized (hire.quant): the block formats, the CPU kernels against the dequantized product, a quantized
model against its float model, the checkpoint round trip and the --quantize flag."""
import platform
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner

from hire import quant
from hire.checkpoint import load_model, quantized
from hire.cli import main
from hire.config import SHAPES
from hire.engine import Engine
from hire.formats import flatten
from hire.generate import generate
from hire.model import Transformer, init_params
from hire.sampling import SamplingParams

DENSE = "stdlib-9m-dense"  # a trained model whose widths are multiples of 32


def weights(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Rows of normal weights with an outlier block per row, so block scales differ."""
    w = np.random.default_rng(seed).normal(0, 0.02, (rows, cols)).astype(np.float32)
    w[:, :32] *= 10
    return w


@pytest.mark.parametrize("kind, qmax", [("int8", 127), ("int4", 15)])
def test_rows_round_to_half_a_step(kind, qmax):
    w = weights(48, 96)
    q = quant.quantize_rows(w, kind)
    back = np.asarray(quant.dequantize_rows(q))
    step = np.repeat(np.asarray(q["scale"], np.float32), 32, axis=1)
    assert np.all(np.abs(back - w) <= step / 2 * (1 + 1e-3) + 1e-7)
    assert float(np.abs(back - w).max()) > 0  # it did round
    if kind == "int4":  # Q4_1's layout: byte j of a block holds element j (low nibble) and j + 16 (high nibble)
        codes = np.rint((w[0, :32] - np.float32(q["min"][0, 0])) / np.float32(q["scale"][0, 0])).clip(0, 15)
        packed = np.asarray(q["q"][0, :16])
        np.testing.assert_array_equal(packed & 15, codes[:16])
        np.testing.assert_array_equal(packed >> 4, codes[16:])


def test_kernels_are_built():
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert quant.KERNELS, "hire._qmatmul is missing: pip install -e . (or python setup.py build_ext --inplace)"


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("m", [1, 3, 8, 11, quant.KERNEL_ROWS + 5])
def test_matmul_within_the_activation_rounding(kind, m):
    """The kernels quantize x per block of 32 (scale max|x| / 127): each output is off from x @ dequantized W by at
    most sum over blocks of (scale_x / 2) |w_block|_1; past KERNEL_ROWS rows the product is exact float32."""
    w = quant.quantize_rows(weights(40, 96), kind)  # 40 outputs: not a whole number of the kernel's chunks
    x = np.random.default_rng(1).normal(0, 1, (m, 96)).astype(np.float32)
    x[:, 40] = 30.0  # an outlier in the second block only
    dense = np.asarray(quant.dequantize_rows(w))
    exact = x.astype(np.float64) @ dense.T.astype(np.float64)
    got = np.asarray(jax.jit(quant.matmul_rows)(jnp.asarray(x), w))
    x_step = np.abs(x.reshape(m, -1, 32)).max(-1) / 127  # [m, blocks]
    w_mass = np.abs(dense.reshape(40, -1, 32)).sum(-1)  # [n, blocks]
    bound = x_step @ w_mass.T / 2 + 1e-4 * np.abs(x) @ np.abs(dense).T
    assert np.all(np.abs(got - exact) <= bound)
    if m <= quant.KERNEL_ROWS and quant.KERNELS:
        assert np.abs(got - exact).max() > 1e-5  # the activations were quantized: the kernel ran
    np.testing.assert_allclose(np.asarray(quant.matmul(jnp.asarray(x), quant.quantize(dense.T, kind))), got,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("m", [1, 2, 5, 9])
def test_matmuls_in_one_call_equal_each_alone(kind, m):
    """Weights sharing an input multiplied in one kernel call (q, k, v): each output bitwise what its own call gives,
    for row counts that are not whole chunks (32) nor whole groups of rows taken together (4 at batch 1)."""
    ws = [quant.quantize_rows(weights(n, 96, seed=n), kind) for n in (70, 33, 7)]
    x = jnp.asarray(np.random.default_rng(2).normal(0, 1, (m, 96)).astype(np.float32))
    assert quant.fusable(ws) and not quant.fusable(ws[:1]) and not quant.fusable([ws[0], weights(96, 8)])
    together = jax.jit(quant.matmuls)(x, ws)
    for w, y in zip(ws, together):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(jax.jit(quant.matmul)(x, w)))
        np.testing.assert_allclose(np.asarray(y), np.asarray(x) @ np.asarray(quant.dequantize_rows(w)).T,
                                   rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("m, k", [(1, 32), (3, 96), (8, 640), (11, 96), (17, 1536)])
def test_vnni_and_avx2_loops_give_the_same_floats(avx2_then_vnni, kind, m, k):
    """The kernels' AVX-512 VNNI loops (vpdpbusd) fill the same int32 lanes as their AVX2 ones (maddubs + madd), scaled
    and summed in the same order: bitwise the same outputs, alone and three matrices to a call, for rows past tiles of
    8, outputs past whole chunks of 32, and extreme blocks (x's and w's int8 codes at +-127)."""
    ws = [quant.quantize_rows(weights(n, k, seed=n), kind) for n in (70, 33, 7)]
    x = np.random.default_rng(m).normal(0, 1, (m, k)).astype(np.float32)
    x[:, :32] = np.where(np.arange(32) % 2, 5.0, -5.0)  # a block of x at +-127, against w's outlier block
    x = jnp.asarray(x)

    def products():
        return [np.asarray(y) for y in [*jax.jit(quant.matmuls)(x, ws), jax.jit(quant.matmul)(x, ws[0])]]

    avx2, vnni = avx2_then_vnni(quant.KERNELS, products)
    for a, b in zip(avx2, vnni):
        np.testing.assert_array_equal(a, b)
    dense = np.asarray(x) @ np.asarray(quant.dequantize_rows(ws[0])).T
    np.testing.assert_allclose(vnni[0], dense, rtol=0.05, atol=0.05)


def test_take_dequantizes_the_gathered_rows():
    table = quant.quantize_rows(weights(64, 64), "int4")
    ids = jnp.array([[3, 0], [63, 3]])
    np.testing.assert_array_equal(quant.take(table, ids), np.asarray(quant.dequantize_rows(table))[np.asarray(ids)])


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("gather", [True, False])
def test_hire_softmax_on_a_quantized_head(kind, gather):
    """HiRE's exact logits for the candidates of a quantized output embedding (a tied [V, dim] table or an lm_head,
    both stored by row) on both paths: from the gathered rows dequantized, or from every row's product."""
    from hire import sparse

    table = quant.quantize_rows(weights(96, 64), kind)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(3, 64)), jnp.float32)
    # the gathered rows are dequantized; all rows go through the model's own product (its kernel may round x)
    full = np.asarray(x @ quant.dequantize_rows(table).T if gather else quant.matmul_rows(x, table))
    idx = jnp.asarray(np.random.default_rng(4).permutation(96)[:24].reshape(1, 24).repeat(3, 0))
    for rows_axis in (0, 1):
        got = sparse.exact_logits(x, table, idx, rows_axis, gather)
        np.testing.assert_allclose(got, np.take_along_axis(full, np.asarray(idx), -1), rtol=1e-5, atol=1e-5)


def test_hire_q_predictor_of_a_quantized_embedding(tmp_path, dense_model):
    """--softmax hire-q on weights kept quantized: the predictor built at load is the per-row int8 copy of the rows the
    quantized embedding holds, and with every row a candidate the logits are the quantized model's own."""
    from hire import predictors

    folder = Path(shutil.copytree(Path(__file__).resolve().parents[1] / "models" / DENSE, tmp_path / "model"))
    settings = {"softmax": "hire-q", "hire_quant": "int8", "softmax_k": 32, "softmax_oversample": 512}
    hired, exact_model = load_model(folder, quantize="int8", **settings), load_model(folder, quantize="int8")
    rows = quant.dequantize_rows(exact_model.variables["params"]["embed"])
    for name, value in predictors.quantize(np.asarray(rows).T, "int8").items():
        np.testing.assert_array_equal(np.asarray(hired.variables["hire"]["softmax"][name]), value)
    tokens = jnp.asarray([dense_model.tokenizer.encode("import os\nimport sys\n")])
    np.testing.assert_allclose(logits(hired, tokens), logits(exact_model, tokens), atol=1e-4)


@pytest.fixture(scope="module")
def dense_model():
    return load_model(DENSE)


def logits(model, tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return np.asarray(jax.jit(Transformer(model.cfg).apply)(model.variables, tokens, positions)[0])


@pytest.mark.parametrize("kind, tolerance", [("int8", 0.05), ("int4", 0.5)])
def test_quantized_model_logits_near_float(dense_model, kind, tolerance):
    q = quantized(dense_model, kind)
    assert q.cfg.quantize == kind and dense_model.cfg.quantize == "none"
    params = flatten(q.variables["params"])
    assert params["embed/q"].dtype == jnp.int8  # beside int4 kernels too (quant.EMBED_BESIDE)
    assert params["layers_0/ffn/down/kernel/q"].dtype == (jnp.int8 if kind == "int8" else jnp.uint8)
    assert params["layers_0/ffn/down/kernel/scale"].shape == (256, 768 // 32)
    tokens = jnp.asarray([dense_model.tokenizer.encode("import os\nimport sys\n\ndef main(argv):\n")])
    ref, got = logits(dense_model, tokens), logits(q, tokens)  # prefill-sized: one row per token, the kernel path
    assert np.abs(got - ref).max() < tolerance * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= (1.0 if kind == "int8" else 0.8)


def test_int8_greedy_continuation_matches_float(dense_model):
    prompts = ["import os\n", "def parse_args(argv):\n", "class Config:\n    def __init__(self"]
    params = SamplingParams(temperature=0, max_tokens=24)
    float_out = generate(Engine(dense_model, slots=3, max_len=128), prompts, params)
    int8_out = generate(Engine(quantized(dense_model, "int8"), slots=3, max_len=128), prompts, params)
    assert [o.tokens for o in int8_out] == [o.tokens for o in float_out]


def test_random_init_and_shape():
    cfg = SHAPES["smollm2-135m"].replace(quantize="int4", n_layers=1)
    shapes = jax.eval_shape(lambda: init_params(cfg))["params"]
    assert shapes["layers_0"]["ffn"]["down"]["kernel"]["q"].shape == (576, 1536 // 2)
    assert shapes["embed"]["min"].shape == (49152, 576 // 32)
    with pytest.raises(ValueError, match="quantize needs the dense FFN"):
        cfg.replace(ffn="group-sparse")
    assert cfg.replace(softmax="hire-q").sparse  # the HiRE softmax runs on the quantized embedding
    with pytest.raises(ValueError, match="multiple of 32"):
        SHAPES["tiny"].replace(dim=48, quantize="int8")


def test_convert_round_trip_and_cli(tmp_path, dense_model):
    runner = CliRunner()
    out = runner.invoke(main, ["convert", DENSE, str(tmp_path / "q8"), "--quantize", "int8"])
    assert out.exit_code == 0, out.output
    assert "int8 weights" in out.output
    loaded = load_model(tmp_path / "q8")
    assert loaded.cfg.quantize == "int8"
    expected = quantized(dense_model, "int8")
    for k, v in flatten(expected.variables).items():
        np.testing.assert_array_equal(flatten(loaded.variables)[k], v)
    tokens = jnp.asarray([[1, 5, 9, 200]])
    np.testing.assert_array_equal(logits(loaded, tokens), logits(expected, tokens))
    # back to float: the dequantized weights, in the model's dtype
    back = load_model(tmp_path / "q8", quantize="none")
    assert back.cfg.quantize == "none" and back.variables["params"]["embed"].dtype == jnp.float32
    np.testing.assert_array_equal(back.variables["params"]["embed"], quant.dequantize_rows(expected.variables[
        "params"]["embed"]))
    out = runner.invoke(main, ["generate", "--model", str(tmp_path / "q8"), "--quantize", "int4", "--prompt",
                               "import os", "--max-tokens", "4", "--temperature", "0"])
    assert out.exit_code == 0, out.output
    assert out.output.startswith("import os")
    out = runner.invoke(main, ["generate", "--model", DENSE, "--quantize", "int8", "--ffn", "group-sparse", "--prompt",
                               "x", "--max-tokens", "2"])
    assert out.exit_code == 2 and "--quantize" in out.output and "dense FFN" in out.output


@pytest.mark.parametrize("types, kernels, exact", [(("Q8_0",), "int8", True), (("Q4_0", "Q4_1"), "int4", True),
                                                   (("Q4_1", "Q5_0"), "int8", False)])
def test_gguf_blocks_kept_quantized(tmp_path, types, kernels, exact):
    """Q8_0 and Q4_0 / Q4_1 blocks are hire's int8 / int4 blocks as they are (so they dequantize to exactly what
    the float load reads); a finer type among the kernels makes them all int8, quantized again. --quantize none
    (or a dtype) dequantizes."""
    from tiny_gguf import random_llama, write_llama

    path = write_llama(tmp_path / "q.gguf", random_llama(seed=3), types=types)
    kept, float32 = load_model(path), load_model(path, dtype="float32")
    assert (kept.cfg.quantize, kept.cfg.embed_quantize) == (kernels, kernels)
    assert float32.cfg.quantize == "none" and load_model(path, quantize="none").cfg == float32.cfg
    params = flatten(kept.variables["params"]) | flatten(float32.variables["params"])
    for name in ("layers_0/attn/q/kernel", "layers_1/ffn/down/kernel"):  # q: llama.cpp's RoPE row order undone
        got = np.asarray(quant.dequantize_rows({k.rsplit("/", 1)[1]: v for k, v in params.items()
                                                if k.startswith(name + "/")}))
        if exact:
            np.testing.assert_array_equal(got, np.asarray(params[name]).T)
        else:
            np.testing.assert_allclose(got, np.asarray(params[name]).T, atol=float(np.abs(got).max()) / 100)
    ids = jnp.arange(24)[None] % kept.cfg.vocab_size
    assert np.abs(logits(kept, ids) - logits(float32, ids)).max() < 0.1 * np.abs(logits(float32, ids)).max()
    four = load_model(path, quantize="int4")  # the table in int8 beside int4 kernels, as llama.cpp keeps it
    assert (four.cfg.quantize, four.cfg.embed_quantize) == ("int4", "int8")
    assert four.variables["params"]["embed"]["q"].dtype == jnp.int8


def test_gguf_q8_embedding_beside_q4_layers():
    """SmolLM2's file as shipped: layers Q4_1, the tied embedding Q8_0; kept as int4 kernels and an int8 table."""
    from hire.checkpoint import resolve_model

    path = next(resolve_model("smollm2-135m-instruct").glob("*.gguf"))
    kept = load_model(path)
    assert (kept.cfg.quantize, kept.cfg.quantize_embed) == ("int4", "int8")
    params = kept.variables["params"]
    assert params["embed"]["q"].dtype == jnp.int8 and params["layers_0"]["ffn"]["up"]["kernel"]["q"].dtype == jnp.uint8
    assert sum(a.nbytes for a in jax.tree.leaves(params)) < 100e6  # 135M weights in int4 / int8 blocks


def test_gguf_q4_k_kept_exactly_as_int4():
    """Q4_K's sub-blocks of 32 are int4 blocks (scale d x sc, min -dmin x m): --quantize int4 keeps their values,
    but for float16 rounding of the scales, where a Q6_K tensor is rounded again (Gemma 3 270M's file)."""
    from hire.checkpoint import resolve_model
    from hire.formats.gguf import GGUFFile, _blocks, read_tensor

    f = GGUFFile(next(resolve_model("gemma3-270m").glob("*.gguf")))
    for name, bound in (("blk.0.attn_output.weight", 2e-3), ("blk.1.ffn_down.weight", 0.2)):
        t = f.tensors[name]
        got = np.asarray(quant.dequantize_rows({k: jnp.asarray(v) for k, v in _blocks(t, "int4").items()}))
        ref = read_tensor(t)
        assert got.shape == ref.shape
        error = np.abs(got - ref).max() / np.abs(ref).max()
        assert (error < bound) and (error > 1e-2) == (t.tensor_type.name == "Q6_K"), (name, error)
