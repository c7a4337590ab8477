"""Weights on disk (hire.flash): the file layout, the window cache's reads, exactness against the in-memory
group-sparse model, the memory budget, and `hire bench flash`."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner

from hire import sparse
from hire.checkpoint import load_model, model_folder
from hire.cli import main
from hire.config import ModelConfig
from hire.engine import Engine
from hire.flash import (
    GROUPS,
    BudgetError,
    DiskFFN,
    Layout,
    OnDiskNet,
    load_on_disk,
    parse_bytes,
    read_layout,
    write_groups,
)
from hire.formats import CheckpointError
from hire.generate import generate
from hire.model import init_params
from hire.predictor_files import serving_settings
from hire.sampling import SamplingParams
from hire.window import reuse_figures

# dim 40: a bundle of 3 x 16 x 40 float32 is 7,680 bytes, padded to 8,192 in the file
SMALL = ModelConfig(vocab_size=64, dim=40, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64,
                    ffn="group-sparse", ffn_group=16, ffn_k=2)


def fetched(store: DiskFFN, layer: int, idx: np.ndarray) -> np.ndarray:
    """The bundles of the groups idx [N, k'] as store.fetch hands them over: [N, k', parts, group, dim]."""
    rows, where = store.fetch(layer, idx)
    assert rows.shape[0] == store.rows(len(idx)) and where.shape == idx.shape
    return rows[where]


def bundles(cfg: ModelConfig, params: dict) -> list[np.ndarray]:
    return [np.asarray(sparse.bundle_ffn(f["up"]["kernel"], f["down"]["kernel"], f["gate"]["kernel"], cfg.ffn_group))
            for f in (params[f"layers_{i}"]["ffn"] for i in range(cfg.n_layers))]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layout_round_trip(tmp_path, dtype):
    cfg = SMALL.replace(dtype=dtype)
    params = init_params(cfg.dense(), seed=1)["params"]
    layout = Layout.of(cfg)
    assert (layout.groups, layout.group_bytes % 4096 != 0, layout.stride % 4096) == (6, True, 0)
    write_groups(tmp_path / GROUPS, layout, params)
    assert read_layout(tmp_path / GROUPS) == layout
    store = DiskFFN(tmp_path / GROUPS, layout, slots=3)
    for i, want in enumerate(bundles(cfg, params)):
        assert store.read_layer(i).dtype == jnp.dtype(dtype)
        np.testing.assert_array_equal(store.read_layer(i), want)
        idx = np.array([[5, 0, 3], [3, 1, 2]])  # more groups than the 3 slots hold: read in two steps
        np.testing.assert_array_equal(fetched(store, i, idx[:1]), want[idx[:1]])
        np.testing.assert_array_equal(fetched(store, i, idx[1:]), want[idx[1:]])
    store.close()


def test_layout_errors_name_the_file(tmp_path):
    layout = Layout.of(SMALL)
    write_groups(tmp_path / GROUPS, layout, init_params(SMALL.dense())["params"])
    data = (tmp_path / GROUPS).read_bytes()
    for name, bad in (("magic", b"NOTHIRE!" + data[8:]), ("short", data[:-100])):
        (tmp_path / name).write_bytes(bad)
        with pytest.raises(CheckpointError, match=name) as error:
            read_layout(tmp_path / name)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("window", [0, 1, 3, None])
def test_window_reads_only_the_groups_it_does_not_hold(tmp_path, window):
    """Loads per step equal hire.window's figures for the same candidate sets (a window cache with room for all)."""
    layout = Layout.of(SMALL)
    params = init_params(SMALL.dense())["params"]
    write_groups(tmp_path / GROUPS, layout, params)
    store = DiskFFN(tmp_path / GROUPS, layout, slots=layout.groups, window=window)
    rng, want = np.random.default_rng(0), bundles(SMALL, params)[1]
    idx = np.stack([rng.choice(layout.groups, 2, replace=False) for _ in range(12)])  # 12 steps of 2 groups
    loads = []
    for step in idx:
        before = store.bytes_read
        np.testing.assert_array_equal(fetched(store, 1, step[None]), want[step[None]])
        loads.append((store.bytes_read - before) // layout.stride)
    masks = np.zeros((12, layout.groups), bool)
    masks[np.arange(12)[:, None], idx] = True
    expected = reuse_figures(jnp.asarray(masks), 12 if window is None else window)
    np.testing.assert_array_equal(loads, np.asarray(expected["loads"]))
    assert store.reuse == pytest.approx(1 - sum(loads) / idx.size)
    store.close()


def test_parse_bytes():
    assert [parse_bytes(t) for t in ("1000", "2.5GB", "64MiB", "3k", "1 Gi")] == [1000, 2_500_000_000, 64 << 20,
                                                                                 3000, 1 << 30]
    with pytest.raises(ValueError, match="bytes"):
        parse_bytes("lots")


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory):
    """stdlib-9m converted with `hire convert --weights-on-disk`."""
    folder = tmp_path_factory.mktemp("flash") / "stdlib-9m"
    result = CliRunner().invoke(main, ["convert", "stdlib-9m", str(folder), "--weights-on-disk"])
    assert result.exit_code == 0, result.output
    assert {p.name for p in folder.iterdir()} >= {GROUPS, "model.safetensors", "hire_predictors.safetensors"}
    return folder


def test_exact_against_the_in_memory_model(on_disk):
    """The same tokens as the in-memory group-sparse model, greedy and seeded, under a budget whose window holds
    fewer groups than the FFN (groups are evicted and read again)."""
    settings = serving_settings(model_folder("stdlib-9m"))
    memory = Engine(load_model("stdlib-9m", **settings), slots=2, max_len=64)
    model, store, plan = load_on_disk(on_disk, 45_000_000, slots=2, max_len=64, **settings)
    assert plan.slots < store.layout.groups
    disk = Engine(model, slots=2, max_len=64, net=OnDiskNet(model.cfg, store))
    prompts = ["import os\n\ndef main(", "class Parser:\n    def __init__(self"]
    for params in (SamplingParams(temperature=0, max_tokens=24), SamplingParams(temperature=0.9, seed=5,
                                                                                 max_tokens=24)):
        want = [c.tokens for c in generate(memory, prompts, params, chunk=8)]
        assert [c.tokens for c in generate(disk, prompts, params, chunk=8)] == want
    assert store.bytes_read > 0 and 0 < store.reuse < 1 and store.prefill_bytes > 0
    args = ["generate", "--model", str(on_disk), "--prompt", "import os", "--max-tokens", "12", "--temperature", "0"]
    on = CliRunner().invoke(main, [*args, "--weights-on-disk", "--memory-budget", "40MB", "--window", "2"])
    text = generate(memory, ["import os"], SamplingParams(temperature=0, max_tokens=12))[0].text
    assert on.exit_code == 0, on.output
    assert on.stdout.startswith("import os" + text)


def test_a_budget_too_small_is_a_one_line_error(on_disk):
    settings = serving_settings(model_folder("stdlib-9m"))
    with pytest.raises(BudgetError, match="does not hold the resident part") as error:
        load_on_disk(on_disk, 10_000_000, max_len=64, **settings)
    assert "\n" not in str(error.value)
    with pytest.raises(BudgetError, match="the least budget is"):
        load_on_disk(on_disk, 34_000_000, max_len=64, **settings)
    result = CliRunner().invoke(main, ["generate", "--model", str(on_disk), "--prompt", "x", "--weights-on-disk",
                                       "--memory-budget", "10MB"])
    assert result.exit_code == 2 and "--memory-budget" in result.output and "resident part" in result.output
    result = CliRunner().invoke(main, ["generate", "--model", "stdlib-9m", "--prompt", "x", "--weights-on-disk",
                                       "--memory-budget", "1GB"])
    assert result.exit_code == 1 and "hire convert" in result.output


def test_bench_flash_prints_its_json(tmp_path):
    result = CliRunner().invoke(main, ["bench", "flash", "--shape", "tiny", "--memory-budget", "1.2MB", "--steps", "4",
                                       "--repeats", "1", "--window", "2", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    for field in ("bytes_read_per_token", "reuse", "tokens_per_s", "naive_tokens_per_s", "speedup", "naive_budget",
                  "resident_bytes", "load_average_start"):
        assert field in out
    assert out["identical"] and out["window"] == 2 and out["bytes_read_per_token"] > 0
    assert out["memory_budget"] == 1_200_000 and (tmp_path / GROUPS).is_file()
