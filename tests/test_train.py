"""Training: corpus split, BPE tokenizer, the loop (loss, resume, kill, data parallel, frozen weights), eval."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from click.testing import CliRunner

from hire.bpe import BOS_ID, EOS_ID, train_bpe
from hire.checkpoint import load_model
from hire.cli import main
from hire.data import STDLIB_VALID, Batches, CorpusConfig, encode_documents, split_corpus
from hire.formats import flatten
from hire.formats.native import save_native
from hire.model import Transformer, init_params
from hire.tokenizer import load_tokenizer
from hire.train import fit, lm_loss, partition, train
from hire.train_config import ConfigError, TrainConfig, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "tests" / "data" / "tinyshakespeare.txt"
STEPS = 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The first 150 kB of Tiny Shakespeare; its speeches are the documents."""
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text(SHAKESPEARE.read_text()[:150_000])
    return path


def recipe(corpus: Path, out: Path, **changes) -> dict:
    """A tiny recipe: seconds to train."""
    raw = {"out": str(out), "steps": STEPS, "batch_size": 8, "seq_len": 32, "eval_every": 20, "eval_batches": 2,
           "checkpoint_every": 10, "tokenizer": {"path": str(corpus.parent / "tok.json"), "vocab_size": 400},
           "data": {"source": str(corpus), "separator": "\n\n", "valid_fraction": 0.1},
           "optimizer": {"lr": 1e-2, "warmup_steps": 4},
           "model": {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 64, "tie_embeddings": True}}
    return raw | changes


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted run of the tiny recipe: its out folder and summary."""
    out = tmp_path_factory.mktemp("reference")
    return out, train(config_from_dict(recipe(corpus, out)), progress=False)


def test_stdlib_split_is_by_file_and_deterministic():
    split = split_corpus(CorpusConfig(), seed=0)
    train_files = {d.name for d in split.train}
    assert len(train_files) == len(split.train) > 100
    assert {d.name.split("/")[0] for d in split.valid} == set(STDLIB_VALID)  # every held-out module, nothing else
    assert not train_files & {d.name for d in split.valid}
    assert not any("site-packages" in n or "/test/" in f"/{n}" for n in train_files)
    again, other = split_corpus(CorpusConfig(), seed=0), split_corpus(CorpusConfig(), seed=1)
    assert again == split
    assert [d.name for d in other.train] != [d.name for d in split.train]
    assert sorted(other.train) == sorted(split.train) and other.valid == split.valid


def test_folder_split_keeps_documents_whole(tmp_path):
    for i in range(40):
        (tmp_path / f"doc{i}.txt").write_text(f"text of document {i}\n" * 3)
    cfg = CorpusConfig(source=str(tmp_path), valid_fraction=0.25)
    split = split_corpus(cfg, seed=3)
    assert split == split_corpus(cfg, seed=3)
    assert len(split.train) + len(split.valid) == 40 and 3 <= len(split.valid) <= 20
    assert {d.text for d in split.train + split.valid} == {(tmp_path / f"doc{i}.txt").read_text() for i in range(40)}
    with pytest.raises(ValueError, match="validation"):
        split_corpus(dataclasses.replace(cfg, valid_fraction=0.0), seed=0)


def test_batches_are_a_function_of_step():
    tokens = np.arange(16 * 61 + 1, dtype=np.int32)  # 60 windows of 16 once an offset is left room
    a, b = Batches(tokens, 4, 16, seed=1), Batches(tokens, 4, 16, seed=1)
    assert a.windows == 60
    later = a(70)["tokens"]  # in epoch 4: a fresh instance agrees, whatever was asked before
    assert np.array_equal(b(70)["tokens"], later) and np.array_equal(a(3)["tokens"], b(3)["tokens"])
    epoch = np.concatenate([a(s)["tokens"] for s in range(15)])  # 60 windows: one epoch
    assert epoch.shape == (60, 17) and np.all(np.diff(epoch, axis=1) == 1)  # contiguous slices of the stream
    assert np.all(np.diff(np.sort(epoch[:, 0])) == 16)  # that tile it: each window once


def test_tokenizer_round_trips(corpus, tmp_path):
    tok = train_bpe([corpus.read_text()], 400, tmp_path / "tokenizer.json")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (400, BOS_ID, EOS_ID)
    text = "ROMEO:\n  def f(x):\n\treturn x  # café, 東京, 🙂\r\n"
    ids = tok.encode(text)
    assert ids[0] == BOS_ID and tok.decode(ids) == text
    assert len(tok.encode("KING RICHARD", bos=False)) < len("KING RICHARD")  # merges learned
    (tmp_path / "model").mkdir()
    tok.save(tmp_path / "model")
    reloaded = load_tokenizer(tmp_path / "model")
    assert reloaded.encode(text) == ids and (reloaded.bos_id, reloaded.eos_id) == (BOS_ID, EOS_ID)


def test_loss_goes_down_and_model_loads(reference):
    out, summary = reference
    losses = [r["loss"] for r in records(out) if "loss" in r]
    assert len(losses) == STEPS
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    valid = [r["valid_loss"] for r in records(out) if "valid_loss" in r]
    assert len(valid) == 2 and valid[1] < valid[0] and summary["valid_loss"] == valid[1]
    model = load_model(out / "model")
    assert model.cfg.vocab_size == model.tokenizer.vocab_size and model.cfg.max_seq_len == 32
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000030", "step_00000040"]


def test_resume_reproduces_uninterrupted_run(reference, corpus, tmp_path):
    out, _ = reference
    cfg = config_from_dict(recipe(corpus, tmp_path))
    half = train(cfg, until=STEPS // 2, progress=False)
    assert half["step"] == STEPS // 2 and not (tmp_path / "model").exists()
    train(cfg, progress=False)
    np.testing.assert_allclose([r.get("loss", r.get("valid_loss")) for r in records(tmp_path)],
                               [r.get("loss", r.get("valid_loss")) for r in records(out)], rtol=0, atol=1e-5)
    for k, v in flatten(load_model(out / "model").variables).items():
        np.testing.assert_array_equal(flatten(load_model(tmp_path / "model").variables)[k], v)
    with pytest.raises(ConfigError, match="changed: steps"):
        train(dataclasses.replace(cfg, steps=STEPS + 10), progress=False)


def test_init_fine_tunes_a_saved_model(reference, corpus, tmp_path):
    """init = a saved model: the first step's loss is that model's loss on the first batch, not a fresh init's."""
    saved = reference[0] / "model"
    cfg = config_from_dict(recipe(corpus, tmp_path / "tuned", steps=2, eval_every=0, checkpoint_every=0,
                                  optimizer={"lr": 1e-3, "warmup_steps": 1}, init=str(saved)))
    train(cfg, progress=False)
    first, second = (r["loss"] for r in records(tmp_path / "tuned")[:2])
    model = load_model(saved)
    batch = {"tokens": Batches(encode_documents(split_corpus(cfg.data, cfg.seed).train, model.tokenizer),
                               cfg.batch_size, cfg.seq_len, cfg.seed)(0)["tokens"]}
    loss = jax.jit(lm_loss(model.cfg))
    assert first == pytest.approx(float(loss(model.variables, {}, batch, None)[0]), abs=1e-5)
    fresh = float(loss(init_params(model.cfg, cfg.seed), {}, batch, None)[0])
    assert first < fresh - 1.0 and abs(second - first) < 0.5
    tuned = flatten(load_model(tmp_path / "tuned" / "model").variables)
    assert all(v.shape == tuned[k].shape for k, v in flatten(model.variables).items())
    assert any(not np.array_equal(v, tuned[k]) for k, v in flatten(model.variables).items())  # it trained


def test_init_of_another_shape_is_a_config_error(reference, corpus, tmp_path):
    saved = str(reference[0] / "model")
    wider = recipe(corpus, tmp_path / "a", init=saved)
    wider["model"] = {**wider["model"], "dim": 48}
    with pytest.raises(ConfigError, match=r"init: .*model's params/embed has shape \(400, 32\), "
                                          r"the \[model\] table gives \(400, 48\)"):
        train(config_from_dict(wider), progress=False)
    with pytest.raises(ConfigError, match="init: no model 'no-such-model'"):
        train(config_from_dict(recipe(corpus, tmp_path / "b", init="no-such-model")), progress=False)
    with pytest.raises(ConfigError, match="init: a tandem small model starts from a random init"):
        config_from_dict(recipe(corpus, tmp_path / "c", init=saved, tandem={"large": saved}))
    config = tmp_path / "deeper.toml"
    deeper = recipe(corpus, tmp_path / "d")
    config.write_text(_toml({**deeper, "model": {**deeper["model"], "n_layers": 3}}))
    result = CliRunner().invoke(main, ["train", str(config), "--init", saved, "--quiet"])
    assert result.exit_code == 1 and "init: " in result.output and "has no params/layers_2/" in result.output, \
        result.output


def cli_train(config: Path, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hire.cli", "train", str(config), "--quiet"], cwd=REPO,
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(proc: subprocess.Popen, out: Path, after: int) -> None:
    """Wait until `out` holds a checkpoint past step `after` (the process must still be running)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if max((int(p.name[5:]) for p in out.glob("checkpoints/step_*")), default=0) > after:
            return
        time.sleep(0.005)
    pytest.fail(f"no checkpoint past step {after} while running: {proc.communicate()}")


def test_killed_run_resumes_on_the_same_curve(corpus, tmp_path):
    """SIGKILL after a checkpoint, SIGTERM (which checkpoints and exits), then a run to the end."""
    steps = 200  # long enough to be killed mid-run
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(recipe(corpus, tmp_path / "run", steps=steps, checkpoint_every=20)))
    first = cli_train(config)
    wait_for_checkpoint(first, tmp_path / "run", 0)
    first.kill()
    assert first.wait() == -signal.SIGKILL
    second = cli_train(config)
    wait_for_checkpoint(second, tmp_path / "run", 20)
    second.send_signal(signal.SIGTERM)
    stdout, stderr = second.communicate()
    assert second.returncode == 1 and "SIGTERM" in stderr, stderr
    stopped_at = json.loads(stdout)["step"]
    assert 20 < stopped_at < steps and (tmp_path / "run" / "checkpoints" / f"step_{stopped_at:08d}").is_dir()
    third = cli_train(config)
    stdout, stderr = third.communicate()
    assert third.returncode == 0, stderr
    got = [r["loss"] for r in records(tmp_path / "run") if "loss" in r]
    assert len(got) == steps and load_model(tmp_path / "run" / "model").cfg.name == "tiny"
    train(dataclasses.replace(load_config(config), out=str(tmp_path / "straight")), progress=False)
    want = [r["loss"] for r in records(tmp_path / "straight") if "loss" in r]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_data_parallel_over_8_devices(reference, corpus, tmp_path):
    out, _ = reference
    config = tmp_path / "tiny.toml"
    config.write_text(_toml(recipe(corpus, tmp_path / "run")))
    proc = cli_train(config, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr
    assert json.loads(stdout)["devices"] == 8
    np.testing.assert_allclose([r["loss"] for r in records(tmp_path / "run") if "loss" in r],
                               [r["loss"] for r in records(out) if "loss" in r], rtol=0, atol=2e-3)


def _toml(raw: dict) -> str:
    """Enough TOML for a recipe: scalars at the top, then one table per dict."""
    def line(k, v):
        return f"{k} = {json.dumps(v)}"
    top = [line(k, v) for k, v in raw.items() if not isinstance(v, dict)]
    tables = [f"[{k}]\n" + "\n".join(line(*kv) for kv in v.items()) for k, v in raw.items() if isinstance(v, dict)]
    return "\n".join(top) + "\n\n" + "\n\n".join(tables) + "\n"


def test_lora_training_leaves_frozen_weights_untouched(reference, corpus, tmp_path):
    cfg = config_from_dict(recipe(corpus, tmp_path, model={**recipe(corpus, tmp_path)["model"], "lora_adapters": 2}))
    trained = load_model(reference[0] / "model")
    tokenizer, model_cfg = trained.tokenizer, cfg.model.replace(vocab_size=trained.cfg.vocab_size)
    base = {**jax.device_get(init_params(model_cfg, seed=5)), "params": jax.device_get(trained.variables["params"])}
    trainable, frozen = partition(base, lambda k: k.startswith("lora/") and not k.endswith("/scale"))
    assert sorted(trainable["lora"]["layers_0"]["attn"]) == ["q", "v"] and "params" in frozen
    split = split_corpus(cfg.data, cfg.seed)
    batches = Batches(encode_documents(split.train, tokenizer), cfg.batch_size, cfg.seq_len, cfg.seed)
    adapter = np.arange(cfg.batch_size, dtype=np.int32) % 2  # rows alternate between the two adapters
    valid = {**batches(10_000), "adapter": adapter}
    loss_fn = lm_loss(model_cfg)
    before = float(loss_fn(trainable, frozen, valid, None)[0])  # b = 0: the base model's loss
    result = fit(cfg, loss_fn, trainable, frozen, lambda step: {**batches(step), "adapter": adapter}, [valid],
                 progress=False)
    for k, v in flatten(frozen).items():
        assert np.array_equal(v, flatten(base)[k]), k
    changed = [k for k, v in flatten(result.trainable).items() if not np.array_equal(v, flatten(base)[k])]
    assert len(changed) == len(flatten(trainable))
    assert result.summary["valid_loss"] < before - 0.02


def test_eval_matches_direct_log_softmax(reference, tmp_path):
    tokenizer = load_tokenizer(reference[0] / "model")
    cfg = load_model(reference[0] / "model").cfg.replace(max_seq_len=24)
    variables, ref_variables = (jax.device_get(init_params(cfg, seed=s)) for s in (2, 3))
    save_native(tmp_path / "m", cfg, variables, tokenizer)
    save_native(tmp_path / "r", cfg, ref_variables, tokenizer)
    text = SHAKESPEARE.read_text()[:2000]
    (tmp_path / "t.txt").write_text(text)
    result = CliRunner().invoke(main, ["eval", "--model", str(tmp_path / "m"), "--text", str(tmp_path / "t.txt"),
                                       "--batch", "3", "--reference", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)

    ids = np.asarray(tokenizer.encode(text))
    forward = jax.jit(Transformer(cfg).apply)
    nll, hits, agree = [], [], []
    for start in range(0, len(ids) - 1, 24):  # windows of 24 targets, each starting afresh at position 0
        y = ids[start + 1:start + 25]
        x = (ids[None, start:start + len(y)], np.arange(len(y))[None])
        logits = np.asarray(forward(variables, *x)[0][0], np.float64)
        agree += list(logits.argmax(-1) == np.asarray(forward(ref_variables, *x)[0][0]).argmax(-1))
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll += list(-logp[np.arange(len(y)), y])
        hits += list(logits.argmax(-1) == y)
    assert got["tokens"] == len(ids) - 1 == len(nll) and (len(ids) - 1) % 24  # a partial last window
    assert got["loss"] == pytest.approx(np.mean(nll), rel=1e-5)
    assert got["perplexity"] == pytest.approx(np.exp(np.mean(nll)), rel=1e-4)
    assert got["next_token_accuracy"] == pytest.approx(np.mean(hits))
    assert got["agreement"] == pytest.approx(np.mean(agree)) and 0 < got["agreement"] < 1


@pytest.mark.parametrize("change, message", [
    ({"steps": "many"}, "steps: expected int"),
    ({"batchsize": 4}, "unknown field batchsize"),
    ({"optimizer": {"lr": -1.0}}, "optimizer: lr must be positive"),
    ({"optimizer": {"warmup_steps": 100}}, r"optimizer.warmup_steps \(100\) must be below steps"),
    ({"model": {"dim": "wide"}}, "model.dim: expected int"),
    ({"model": {"vocab_size": 99}}, "model.vocab_size: set by the tokenizer"),
    ({"data": {"valid_fraction": 1.5}}, "data: valid_fraction must be in"),
    ({"tokenizer": {"vocab_size": 100}}, "missing field tokenizer.path"),
    ({"compute_dtype": "fp8"}, "compute_dtype must be one of"),
])
def test_bad_config_names_the_field(corpus, tmp_path, change, message):
    raw = recipe(corpus, tmp_path)
    for key, value in change.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and key != "tokenizer" else value
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_recipes_parse():
    for path in sorted((REPO / "configs").glob("*.toml")):
        cfg = load_config(path)
        assert isinstance(cfg, TrainConfig) and cfg.model.name == path.stem
    default, draft = (load_config(REPO / "configs" / f"{name}.toml") for name in ("stdlib-9m", "stdlib-9m-draft"))
    assert default.tokenizer == draft.tokenizer and default.tokenizer.vocab_size >= 8192
    sizes = [sum(np.prod(s.shape) for s in jax.tree.leaves(jax.eval_shape(lambda c=c: init_params(c.model))))
             for c in (default, draft)]
    assert 5e6 <= sizes[0] <= 20e6 and 10 <= sizes[0] / sizes[1] <= 20


def test_bfloat16_compute_keeps_float32_weights(reference):
    model = load_model(reference[0] / "model")
    batch = {"tokens": np.asarray(model.tokenizer.encode(SHAKESPEARE.read_text()[:4000])[:4 * 33]).reshape(4, 33)}
    loss = {dtype: float(jax.jit(lm_loss(model.cfg, dtype))(model.variables, {}, batch, None)[0])
            for dtype in ("float32", "bfloat16")}
    assert abs(loss["bfloat16"] - loss["float32"]) < 0.05
    grads = jax.eval_shape(jax.grad(lambda v: lm_loss(model.cfg, "bfloat16")(v, {}, batch, None)[0]), model.variables)
    assert {g.dtype for g in jax.tree.leaves(grads)} == {np.dtype("float32")}
