"""hire's native format, conversion, model lookup and checkpoint errors."""
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from hire.checkpoint import convert, load_model, resolve_model
from hire.config import SHAPES, ModelConfig
from hire.formats import CheckpointError, expected_variables, flatten, unflatten
from hire.formats.native import save_native
from hire.model import Transformer
from hire.tokenizer import HFTokenizer, Llama2cTokenizer, StreamDecoder, load_tokenizer

STORIES = Path(__file__).resolve().parent / "data" / "stories260K"
TOKENS = jnp.array([[1, 403, 407, 261, 378], [1, 5, 6, 7, 8]])
POSITIONS = jnp.broadcast_to(jnp.arange(5), (2, 5))


@functools.cache
def forward(cfg: ModelConfig):
    return jax.jit(Transformer(cfg).apply)


def logits(m, adapter=None) -> np.ndarray:
    return np.asarray(forward(m.cfg)(m.variables, TOKENS, POSITIONS, adapter=adapter)[0])


@pytest.fixture
def tiny(tmp_path):
    """A random tiny model with two LoRA adapters (all non-zero, so they change the logits), saved natively."""
    cfg = SHAPES["tiny"].replace(lora_adapters=2, name="tiny")
    rng = np.random.default_rng(0)
    variables = unflatten({k: jnp.asarray(rng.normal(0, 0.1, s.shape), s.dtype)
                           for k, s in expected_variables(cfg).items()})
    save_native(tmp_path / "tiny", cfg, variables, Llama2cTokenizer(STORIES / "tok512.bin"))
    return tmp_path / "tiny", cfg, variables


def test_native_round_trip(tiny):
    folder, cfg, variables = tiny
    m = load_model(folder)
    assert m.cfg == cfg and m.cfg.name == "tiny"
    assert sorted(flatten(m.variables)) == sorted(flatten(variables))
    for k, v in flatten(variables).items():
        np.testing.assert_array_equal(flatten(m.variables)[k], v)
    adapter = jnp.array([1, -1])
    expected = logits(m, adapter)
    np.testing.assert_array_equal(expected, forward(cfg)(variables, TOKENS, POSITIONS, adapter=adapter)[0])
    assert not np.allclose(logits(m, adapter), logits(m, jnp.array([0, 0])))
    assert m.tokenizer.encode("Once upon a time") == [1, 403, 407, 261, 378]
    save_native(folder, m.cfg, m.variables, m.tokenizer)  # overwriting in place keeps it loadable
    assert sorted(p.name for p in folder.parent.iterdir()) == ["tiny"]
    np.testing.assert_array_equal(logits(load_model(folder), adapter), expected)


def test_convert_stories(tmp_path):
    original = load_model(STORIES)
    convert(STORIES, tmp_path / "native")
    assert json.loads((tmp_path / "native" / "config.json").read_text())["format"] == "hire"
    native = load_model(tmp_path / "native")
    assert native.cfg == original.cfg and native.cfg.name == "stories260K"
    np.testing.assert_array_equal(logits(native), logits(original))
    convert(STORIES, tmp_path / "half", dtype="bfloat16")
    half = load_model(tmp_path / "half")
    assert half.cfg.dtype == "bfloat16" and half.variables["params"]["embed"].dtype == jnp.bfloat16
    np.testing.assert_allclose(logits(half), logits(original), atol=0.25)


def test_resolve_model(tmp_path, monkeypatch):
    (tmp_path / "mine").mkdir()
    monkeypatch.setenv("HIRE_MODELS", f"{tmp_path / 'nowhere'}:{tmp_path}")
    assert resolve_model("mine") == (tmp_path / "mine").resolve()
    assert resolve_model(STORIES) == STORIES.resolve()
    with pytest.raises(CheckpointError, match="no model 'absent': not a path, nor a name in .*nowhere"):
        resolve_model("absent")


def test_errors(tmp_path, tiny):
    with pytest.raises(CheckpointError, match="no such model path: .*missing"):
        load_model(tmp_path / "missing" / "model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="cannot tell what model this is"):
        load_model(tmp_path / "empty")
    (tmp_path / "neox").mkdir()
    (tmp_path / "neox" / "config.json").write_text('{"model_type": "gpt_neox"}')
    with pytest.raises(CheckpointError, match="'gpt_neox'.*llama"):
        load_model(tmp_path / "neox")

    folder = tiny[0]
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dim": 32}))
    with pytest.raises(CheckpointError, match=r"params/embed: expected shape \(512, 32\), got \(512, 64\)"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps({**config, "n_layers": 3}))
    with pytest.raises(CheckpointError, match="missing params/layers_2/attn/k/kernel"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps({**config, "hidden": 3}))
    with pytest.raises(CheckpointError, match=r"config.json: unknown ModelConfig fields: \['hidden'\]"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="dtype 'fp8' is not supported"):
        load_model(folder, dtype="fp8")
    m = load_model(folder)
    with pytest.raises(CheckpointError, match="is not a hire checkpoint; refusing to overwrite it"):
        save_native(tmp_path / "neox", m.cfg, m.variables, m.tokenizer)


def test_hf_tokenizer(tmp_path):
    """A byte-level BPE whose post-processor adds BOS itself: no double BOS, exact text, save/load."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world, naïve café"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = HFTokenizer(tmp_path / "tokenizer.json", bos_id=0, eos_id=1)
    ids = hf.encode("hello 😀 world")
    assert ids.count(0) == 1 and ids[0] == 0 and hf.decode(ids + [1]) == "hello 😀 world"
    assert hf.encode("hello 😀 world", bos=False) == ids[1:]
    assert HFTokenizer(tmp_path / "tokenizer.json", bos_id=0, add_bos=False).encode("hello 😀 world") == ids[1:]
    stream = StreamDecoder(hf, ids[:2])
    assert "".join(stream.push(t) for t in ids[2:]) == hf.decode(ids)[len(hf.decode(ids[:2])):]
    (tmp_path / "saved").mkdir()
    hf.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert (again.bos_id, again.eos_id, again.encode("hello 😀 world")) == (0, 1, ids)
