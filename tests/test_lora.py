"""PEFT LoRA adapters loaded by hire.lora against the peft library itself, on a tiny random float32 Llama.

Two adapters of different rank, alpha, scaling rule and targets are made and saved with peft, then
served together: per-row logits and greedy generation must match peft's, row by row.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers as hf
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from hire.checkpoint import load_model
from hire.cli import main
from hire.config import ModelConfig
from hire.engine import Engine
from hire.formats import CheckpointError
from hire.generate import generate
from hire.loaded import LoadedModel
from hire.lora import load_adapters
from hire.model import Transformer, init_params
from hire.sampling import SamplingParams

TOL = 1e-4
VOCAB, PROMPT_LEN, NEW_TOKENS = 128, 24, 16
ADAPTERS = {  # name -> LoraConfig arguments: ranks 4 and 8 (padded to 8), plain and rank-stabilised scaling
    "qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all": dict(r=8, lora_alpha=4, use_rslora=True, target_modules="all-linear"),
}


def randomize(model: torch.nn.Module, only: str = "") -> None:
    """O(1) logits: weights ~ 0.1 N(0, 1), norms ~ 1 + 0.1 N(0, 1), for parameters whose name holds `only`."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only in name:
                p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))


@dataclass
class Setup:
    reference: peft.PeftModel  # the base with both adapters, switched by name
    loaded: LoadedModel
    index: dict[str, int]
    folders: dict[str, Path]
    base: Path
    prompt: np.ndarray  # [PROMPT_LEN]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    base = hf.LlamaForCausalLM(hf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attn_implementation="eager")).eval()
    randomize(base)
    base.generation_config.eos_token_id = None  # generate exactly NEW_TOKENS tokens
    base.save_pretrained(root / "base")
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(root / "base" / "tokenizer.json"))

    folders = {name: root / name for name in ADAPTERS}
    for name, args in ADAPTERS.items():  # peft starts lora_B at zero: randomize both halves
        adapted = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**args))
        randomize(adapted, "lora_")
        adapted.save_pretrained(folders[name])
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), folders["qv"], adapter_name="qv").eval()
    reference.load_adapter(folders["all"], adapter_name="all")
    loaded, index = load_adapters(load_model(root / "base"), folders)
    prompt = np.random.default_rng(0).integers(0, VOCAB, PROMPT_LEN)
    return Setup(reference, loaded, index, folders, root / "base", prompt)


def reference_logits(setup: Setup, rows: list[str]) -> np.ndarray:
    """peft's logits [len(rows), PROMPT_LEN, VOCAB], each row with its adapter ("__base__": none)."""
    tokens = torch.tensor(np.tile(setup.prompt, (len(rows), 1)))
    with torch.no_grad():
        return setup.reference(tokens, adapter_names=rows).logits.numpy()


def test_config_and_indices(setup):
    cfg = setup.loaded.cfg
    assert setup.index == {"qv": 0, "all": 1}
    assert (cfg.lora_adapters, cfg.lora_rank, cfg.lora_targets) == (2, 8, ("q", "k", "v", "o", "gate", "up", "down"))
    np.testing.assert_allclose(setup.loaded.variables["lora"]["scale"], [8 / 4, 4 / np.sqrt(8)], rtol=1e-6)


def test_rows_match_peft_logits(setup):
    rows = ["qv", "all", "__base__"]
    expected = reference_logits(setup, rows)
    tokens = jnp.asarray(np.tile(setup.prompt, (3, 1)))
    positions = jnp.broadcast_to(jnp.arange(PROMPT_LEN), tokens.shape)
    adapter = jnp.array([setup.index["qv"], setup.index["all"], -1])
    logits, _ = Transformer(setup.loaded.cfg).apply(setup.loaded.variables, tokens, positions, None, adapter)
    diff = np.abs(np.asarray(logits) - expected).max(axis=(1, 2))
    print(f"max |hire - peft| logits per row {dict(zip(rows, diff))}")
    assert (diff <= TOL).all()
    # Each adapter moves the logits well beyond the tolerance, and differently.
    spread = [np.abs(expected[i] - expected[j]).max() for i, j in ((0, 1), (0, 2), (1, 2))]
    assert min(spread) > 100 * TOL, spread


def peft_greedy(model: peft.PeftModel, prompt: np.ndarray, adapter: str | None) -> list[int]:
    """peft's greedy continuation of `prompt` with `adapter` (None: the base model)."""
    def run() -> list[int]:
        out = model.generate(input_ids=torch.tensor(prompt[None]), attention_mask=torch.ones(1, len(prompt)),
                             do_sample=False, max_new_tokens=NEW_TOKENS)
        return out[0, len(prompt):].tolist()

    if adapter is None:
        with model.disable_adapter():
            return run()
    model.set_adapter(adapter)
    return run()


def test_engine_greedy_generation_matches_peft(setup):
    rows = ["qv", "all", None]
    expected = [peft_greedy(setup.reference, setup.prompt, name) for name in rows]
    engine = Engine(setup.loaded, slots=4, max_len=64)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = generate(engine, [setup.prompt.tolist()] * 3, params,
                    adapters=[setup.index[n] if n else -1 for n in rows])
    assert [o.tokens for o in outs] == expected
    assert len({tuple(e) for e in expected}) == 3


def test_key_spellings(setup, tmp_path):
    """Keys with an adapter name before ".weight", or with no ".weight", load to the same variables."""
    tensors = load_file(setup.folders["qv"] / "adapter_model.safetensors")
    loaded = {}
    for spelling in (".qv.weight", ""):
        folder = Path(shutil.copytree(setup.folders["qv"], tmp_path / f"qv{spelling}"))
        save_file({k.replace(".weight", spelling): v for k, v in tensors.items()}, folder / "adapter_model.safetensors")
        loaded[spelling] = load_adapters(setup.loaded, {"qv": folder})[0].variables["lora"]
    expected = load_adapters(setup.loaded, {"qv": setup.folders["qv"]})[0].variables["lora"]
    for got in loaded.values():
        jax.tree.map(np.testing.assert_array_equal, got, expected)


@pytest.fixture
def broken(setup, tmp_path) -> Path:
    """A copy of the rank-4 adapter to damage."""
    return Path(shutil.copytree(setup.folders["qv"], tmp_path / "broken"))


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize("changes, message", [
    (dict(target_modules=["q_proj", "lm_head"]), r"target_modules \['lm_head'\]"),
    (dict(use_dora=True), "use_dora"),
    (dict(bias="lora_only"), "bias 'lora_only'"),
    (dict(peft_type="IA3"), "IA3"),
], ids=["unknown-target", "dora", "bias", "not-lora"])
def test_unsupported_config(setup, broken, changes, message):
    edit_config(broken, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_adapters(setup.loaded, {"x": broken})


def test_wrong_shape_names_tensor_and_shapes(setup, broken):
    tensors = load_file(broken / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key] = np.zeros((64, 4), np.float32)  # v_proj's output is 2 kv heads * 16 = 32
    save_file(tensors, broken / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(key) + r" has shape \(64, 4\), expected \(32, 4\)"):
        load_adapters(setup.loaded, {"x": broken})


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_missing_file(setup, broken, name):
    (broken / name).unlink()
    with pytest.raises(CheckpointError, match=name):
        load_adapters(setup.loaded, {"x": broken})


def test_mixture_of_experts_ffn_is_refused(setup):
    cfg = setup.loaded.cfg
    moe = ModelConfig(vocab_size=VOCAB, dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                      n_kv_heads=cfg.n_kv_heads, ffn_dim=cfg.ffn_dim, n_experts=4, name="moe")
    model = LoadedModel(moe, init_params(moe), None)
    assert load_adapters(model, {"qv": setup.folders["qv"]})[0].cfg.lora_targets == ("q", "v")
    with pytest.raises(CheckpointError, match="mixture of experts"):
        load_adapters(model, {"all": setup.folders["all"]})


def test_cli_generates_with_a_named_adapter(setup):
    prompt = " ".join(f"t{t}" for t in setup.prompt)
    engine = Engine(setup.loaded, slots=1, max_len=64)
    [expected] = generate(engine, [prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                          adapters=[setup.index["all"]])
    args = ["generate", "--model", str(setup.base), "--prompt", prompt, "--temperature", "0", "--max-tokens", "8",
            "--ignore-eos", "--lora", f"qv={setup.folders['qv']}", "--lora", f"all={setup.folders['all']}"]
    result = CliRunner().invoke(main, [*args, "--adapter", "all"], catch_exceptions=False)
    assert result.stdout == prompt + expected.text + "\n"
    drafted = CliRunner().invoke(main, [*args, "--adapter", "all", "--draft", "ngram"], catch_exceptions=False)
    assert drafted.stdout == result.stdout  # verified with the adapter: the adapted model's own text
    base = CliRunner().invoke(main, args, catch_exceptions=False)
    assert base.stdout != result.stdout
