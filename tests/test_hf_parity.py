"""hire's Hugging Face loader against transformers itself, on tiny random float32 models.

Each architecture is built in transformers, saved with save_pretrained, loaded with load_hf and
compared: prefill logits, token-by-token decode through the KV cache, greedy generation, and a
right-padded batch. Then the errors of broken folders, and config.json mapping on its own.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as hf
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from hire.calibrate import build_predictors
from hire.config import RopeScaling
from hire.engine import Engine
from hire.formats import CheckpointError
from hire.formats.hf import hf_config, load_hf
from hire.generate import generate
from hire.loaded import LoadedModel
from hire.model import Transformer, init_cache
from hire.predictor_files import sparsify
from hire.sampling import SamplingParams

TOL = 1e-4
PROMPT_LEN, NEW_TOKENS = 40, 32
COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, attn_implementation="eager")
ARCHS = {
    "llama": (hf.LlamaConfig, hf.LlamaForCausalLM, {}),
    # original_max_position 128 puts head_dim 16's frequencies in all three bands: kept, smoothed, divided.
    "llama3-rope": (hf.LlamaConfig, hf.LlamaForCausalLM, dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=128))),
    "mistral": (hf.MistralConfig, hf.MistralForCausalLM, dict(sliding_window=16)),
    "qwen2": (hf.Qwen2Config, hf.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "mixtral": (hf.MixtralConfig, hf.MixtralForCausalLM, dict(num_local_experts=4, num_experts_per_tok=2)),
    # MQA, head_dim apart from width, a window shorter than the prompt on layers 0 and 2 (RoPE base 1e4) and
    # global layers 1 and 3 (1e6), attention scaled by 24 ** -0.5 rather than head_dim's.
    "gemma3": (hf.Gemma3TextConfig, hf.Gemma3ForCausalLM, dict(
        num_hidden_layers=4, num_key_value_heads=1, head_dim=32, sliding_window=16, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention"] * 2)),
}


@dataclass
class Case:
    torch_model: torch.nn.Module
    loaded: LoadedModel
    folder: Path
    prompt: np.ndarray  # [PROMPT_LEN]
    logits: np.ndarray  # transformers' [PROMPT_LEN, vocab]

    def __post_init__(self):
        self.apply = jax.jit(Transformer(self.loaded.cfg).apply)

    def hire(self, tokens, positions, cache=None, logit_index=None):
        return self.apply(self.loaded.variables, jnp.asarray(tokens), jnp.asarray(positions), cache,
                          logit_index=None if logit_index is None else jnp.asarray(logit_index))


def torch_logits(model: torch.nn.Module, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([list(tokens)])).logits[0].numpy()


def save(arch: str, folder: Path, **save_args) -> torch.nn.Module:
    """A random `arch` model with O(1) logits and nonzero biases, saved with a tokenizer into `folder`."""
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(0)
    model = randomize(model_cls(config_cls(**{**COMMON, **extra})).eval())
    model.generation_config.eos_token_id = None  # generate exactly NEW_TOKENS tokens
    model.save_pretrained(folder, **save_args)
    save_tokenizer(folder)
    return model


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model


def save_tokenizer(folder: Path) -> None:
    vocab = {f"t{i}": i for i in range(COMMON["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module", params=list(ARCHS))
def case(request, tmp_path_factory) -> Case:
    folder = tmp_path_factory.mktemp(request.param, numbered=False)
    # Mixtral goes through a sharded checkpoint (model.safetensors.index.json).
    model = save(request.param, folder, **({"max_shard_size": "100KB"} if request.param == "mixtral" else {}))
    prompt = np.random.default_rng(0).integers(0, COMMON["vocab_size"], PROMPT_LEN)
    return Case(model, load_hf(folder), folder, prompt, torch_logits(model, prompt))


def report(case: Case, what: str, diff: float) -> None:
    print(f"{case.folder.name} {what}: max |hire - transformers| = {diff:.2e}")
    assert diff <= TOL


def test_prefill_logits(case):
    positions = np.arange(PROMPT_LEN)[None]
    logits, _ = case.hire(case.prompt[None], positions)
    report(case, "prefill", np.abs(np.asarray(logits[0]) - case.logits).max())
    cfg = case.loaded.cfg
    # The sliding window, the rope scaling and Gemma's local layers must matter over this prompt.
    changes = [dict(sliding_window=0)] * bool(cfg.sliding_window) + [dict(rope_scaling=None)] * bool(cfg.rope_scaling)
    changes += [dict(global_every=0), dict(rope_local_theta=0.0), dict(query_scale=0.0)] * bool(cfg.global_every)
    for change in changes:
        other, _ = jax.jit(Transformer(cfg.replace(**change)).apply)(case.loaded.variables, case.prompt[None],
                                                                     positions)
        assert np.abs(np.asarray(other[0]) - case.logits).max() > 100 * TOL, change


def test_decode_matches_full_sequence(case):
    cache = init_cache(case.loaded.cfg, 1, PROMPT_LEN)
    steps = []
    for t, token in enumerate(case.prompt):
        logits, cache = case.hire([[token]], [[t]], cache)
        steps.append(np.asarray(logits[0, 0]))
    report(case, "decode", np.abs(np.stack(steps) - case.logits).max())


def test_greedy_generation(case):
    expected = case.torch_model.generate(torch.tensor(case.prompt[None]), attention_mask=torch.ones(1, PROMPT_LEN),
                                         do_sample=False, max_new_tokens=NEW_TOKENS)[0, PROMPT_LEN:].tolist()
    engine = Engine(case.loaded, slots=2, max_len=PROMPT_LEN + NEW_TOKENS + 8)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    [out] = generate(engine, [case.prompt.tolist()], params)
    assert out.tokens == expected
    assert len(set(out.tokens)) > 1  # not a degenerate model


def test_right_padded_batch(case):
    lengths = np.array([PROMPT_LEN, PROMPT_LEN - 13])
    tokens = np.zeros((2, PROMPT_LEN), np.int64)
    tokens[0], tokens[1, :lengths[1]] = case.prompt, case.prompt[:lengths[1]]
    positions = np.broadcast_to(np.arange(PROMPT_LEN), (2, PROMPT_LEN))
    cache = init_cache(case.loaded.cfg, 2, PROMPT_LEN + 1)
    logits, cache = case.hire(tokens, positions, cache, lengths - 1)
    report(case, "padded batch prefill", np.abs(np.asarray(logits) - case.logits[lengths - 1]).max())
    # One decode step per row at its own position overwrites the padding in the cache.
    nxt = np.asarray(jnp.argmax(logits, -1))
    logits, _ = case.hire(nxt[:, None], lengths[:, None], cache)
    alone = np.stack([torch_logits(case.torch_model, [*case.prompt[:n], t])[-1] for n, t in zip(lengths, nxt)])
    report(case, "padded batch decode", np.abs(np.asarray(logits[:, 0]) - alone).max())


def test_hire_on_gemma3(tmp_path):
    """HiRE's candidate softmax and group-sparse FFN between Gemma's sandwich norms: exact when every row and group
    is a candidate, and different (so wired in) when few are."""
    save("gemma3", tmp_path)
    model = load_hf(tmp_path)
    found = build_predictors(model, ["lr", "int8"], rank=8)
    prompt = np.random.default_rng(0).integers(0, COMMON["vocab_size"], (1, PROMPT_LEN))
    positions = np.arange(PROMPT_LEN)[None]
    dense, _ = jax.jit(Transformer(model.cfg).apply)(model.variables, prompt, positions)

    def hired(**settings):
        sparse_model = sparsify(model, model.cfg.replace(**settings), found)
        return jax.jit(Transformer(sparse_model.cfg).apply)(sparse_model.variables, prompt, positions)[0]

    every_row = dict(softmax="hire-q", softmax_k=160, softmax_oversample=1, ffn="group-sparse", ffn_predictor="lr",
                     ffn_k=6, ffn_oversample=1)
    assert np.abs(np.asarray(hired(**every_row) - dense)).max() <= TOL
    assert np.abs(np.asarray(hired(**{**every_row, "ffn_k": 1}) - dense)).max() > 100 * TOL


def test_gemma3_multimodal_folder_loads_its_text_model(tmp_path):
    """A gemma3 folder (Gemma3ForConditionalGeneration: text_config, language_model.* tensors, a vision tower):
    hire runs its text model as transformers does on text alone."""
    _, _, extra = ARCHS["gemma3"]
    text = {**COMMON, **extra, "vocab_size": COMMON["vocab_size"] + 3}  # + image, begin- and end-of-image tokens
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    torch.manual_seed(0)
    model = randomize(hf.Gemma3ForConditionalGeneration(hf.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=160, eoi_token_index=161,
        image_token_index=162, eos_token_id=[1, 106])).eval())
    model.save_pretrained(tmp_path)
    save_tokenizer(tmp_path)
    loaded = load_hf(tmp_path)
    assert (loaded.cfg.global_every, loaded.cfg.sliding_window, loaded.cfg.eos_id) == (2, 16, 1)
    prompt = np.random.default_rng(0).integers(0, COMMON["vocab_size"], PROMPT_LEN)
    logits, _ = Transformer(loaded.cfg).apply(loaded.variables, prompt[None], np.arange(PROMPT_LEN)[None])
    assert np.abs(np.asarray(logits[0]) - torch_logits(model, prompt)).max() <= TOL


def test_mixtral_fused_expert_layout(tmp_path):
    """transformers 5's in-memory layout (fused gate_up_proj) loads to the same variables."""
    model = save("mixtral", tmp_path / "per-expert")  # save_pretrained writes per-expert w1/w2/w3
    fused = Path(shutil.copytree(tmp_path / "per-expert", tmp_path / "fused"))
    save_file({k: v.numpy() for k, v in model.state_dict().items()}, fused / "model.safetensors")
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(fused / "model.safetensors")
    jax.tree.map(np.testing.assert_array_equal, load_hf(fused).variables, load_hf(tmp_path / "per-expert").variables)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama-errors")
    save("llama", folder)
    return folder


@pytest.fixture
def broken(llama_folder, tmp_path) -> Path:
    """A copy of the tiny Llama folder to damage."""
    return Path(shutil.copytree(llama_folder, tmp_path / "model"))


def edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


@pytest.mark.parametrize("edit, named", [
    (lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((16, 64), np.float32)}),
     "model.layers.0.self_attn.k_proj.weight"),
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "model.layers.1.mlp.up_proj.weight"),
    (lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)}),
     "model.layers.0.self_attn.o_proj.bias"),
], ids=["wrong-shape", "missing", "unexpected"])
def test_bad_tensor_is_named(broken, edit, named):
    edit_tensors(broken, edit)
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        load_hf(broken)


def test_unknown_model_type(broken):
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="gpt2.*llama, mistral, qwen2, mixtral"):
        load_hf(broken)


@pytest.mark.parametrize("name, message", [("model.safetensors", "safetensors"), ("tokenizer.json", "tokenizer.json"),
                                           ("config.json", "config.json")])
def test_missing_file(broken, name, message):
    (broken / name).unlink()
    with pytest.raises(CheckpointError, match=message):
        load_hf(broken)


def test_missing_shard(tmp_path):
    folder = tmp_path / "sharded"
    save("llama", folder, max_shard_size="50KB")
    shard = sorted(folder.glob("*-of-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load_hf(folder)


def test_bfloat16_checkpoint(tmp_path):
    model = save("llama", tmp_path / "f32").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    shutil.copy(tmp_path / "f32" / "tokenizer.json", tmp_path / "bf16")
    loaded = load_hf(tmp_path / "bf16")
    assert loaded.cfg.dtype == "bfloat16" and loaded.variables["params"]["embed"].dtype == jnp.bfloat16
    as_f32 = load_hf(tmp_path / "bf16", dtype="float32").variables["params"]["embed"]
    assert as_f32.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(as_f32), model.model.embed_tokens.weight.detach().float().numpy())


@pytest.mark.parametrize("template", [True, False])
def test_bos_follows_tokenizer_post_processor(broken, template):
    """BOS is prepended where tokenizer.json's post-processor would (Llama's does, Qwen's does not)."""
    tokenizer = Tokenizer.from_file(str(broken / "tokenizer.json"))
    if template:
        tokenizer.post_processor = processors.TemplateProcessing(single="t1 $A", special_tokens=[("t1", 1)])
    tokenizer.save(str(broken / "tokenizer.json"))
    assert load_hf(broken).tokenizer.encode("t5 t6") == [1] * template + [5, 6]


BASE = dict(model_type="llama", vocab_size=32, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
            intermediate_size=128)


@pytest.mark.parametrize("extra, expected", [
    (dict(rope_theta=5e5, rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                            high_freq_factor=4.0, original_max_position_embeddings=8192)),
     dict(rope_theta=5e5, rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), n_kv_heads=4)),
    (dict(model_type="qwen2", sliding_window=4096, max_window_layers=28), dict(sliding_window=0, attention_bias=True)),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=0),
     dict(sliding_window=64)),
    (dict(model_type="mistral", sliding_window=4096, eos_token_id=[7, 8], bos_token_id=5),
     dict(sliding_window=4096, eos_id=7, bos_id=5)),
    (dict(hidden_act="gelu_pytorch_tanh", torch_dtype="bfloat16", head_dim=32), dict(activation="gelu_tanh",
                                                                                      dtype="bfloat16", head_dim=32)),
])
def test_config_mapping(extra, expected):
    cfg = hf_config({**BASE, **extra})
    assert {field: getattr(cfg, field) for field in expected} == expected


# Gemma 3 270M's config.json as transformers 4 wrote it (the pattern as sliding_window_pattern, flat rope fields).
GEMMA3_270M = dict(
    model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
    num_attention_heads=4, num_key_value_heads=1, head_dim=256, hidden_activation="gelu_pytorch_tanh",
    query_pre_attn_scalar=256, rms_norm_eps=1e-6, rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling=None,
    sliding_window=512, sliding_window_pattern=6, final_logit_softcapping=None, attn_logit_softcapping=None,
    max_position_embeddings=32768, bos_token_id=2, eos_token_id=[1, 106], torch_dtype="bfloat16")


@pytest.mark.parametrize("extra, expected", [
    ({}, dict(n_kv_heads=1, head_dim=256, activation="gelu_tanh", sliding_window=512, global_every=6,
              rope_theta=1e6, rope_local_theta=1e4, rope_scaling=None, query_scale=256.0, norm_offset=1.0,
              qk_norm=True, post_norms=True, embed_scale=True, tie_embeddings=True, bos_id=2, eos_id=1)),
    # Gemma 3 4B's linear scaling of the global layers, in transformers 5's per-layer-type rope_parameters.
    (dict(rope_parameters=dict(full_attention=dict(rope_type="linear", factor=8.0, rope_theta=1e6),
                               sliding_attention=dict(rope_type="default", rope_theta=1e4))),
     dict(rope_theta=1e6, rope_local_theta=1e4, rope_scaling=RopeScaling(factor=8.0, kind="linear"))),
    (dict(layer_types=["sliding_attention"] * 18), dict(sliding_window=512, global_every=0)),
    (dict(layer_types=["full_attention"] * 18), dict(sliding_window=0, global_every=0)),
])
def test_gemma3_config_mapping(extra, expected):
    """Gemma 3 270M's own config.json, and variants of it."""
    cfg = hf_config({**GEMMA3_270M, **extra})
    assert {field: getattr(cfg, field) for field in expected} == expected


def test_gemma3_multimodal_config_takes_text_config_and_defaults():
    """Gemma 3 4B's config.json as transformers 4 wrote it: text_config lists only what differs from the defaults."""
    cfg = hf_config(dict(model_type="gemma3", eos_token_id=[1, 106], text_config=dict(
        model_type="gemma3_text", hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
        rope_scaling=dict(factor=8.0, rope_type="linear"), sliding_window=1024)))
    assert (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size) == (2560, 8, 4, 256, 262208)
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.rope_scaling) == (1e6, 1e4, RopeScaling(8.0, kind="linear"))
    assert (cfg.sliding_window, cfg.global_every, cfg.eos_id, cfg.bos_id, cfg.tie_embeddings) == (1024, 6, 1, 2, True)


@pytest.mark.parametrize("extra, message", [
    (dict(final_logit_softcapping=30.0), "final_logit_softcapping"),
    (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(layer_types=["full_attention", "sliding_attention"] * 9), "layer_types"),
    (dict(layer_types=["sliding_attention"] * 17), "layer_types"),
    (dict(hidden_activation="swish"), "hidden_activation 'swish'"),
])
def test_gemma3_config_errors(extra, message):
    with pytest.raises(CheckpointError, match=message):
        hf_config({**GEMMA3_270M, **extra})


@pytest.mark.parametrize("extra, message", [
    (dict(rope_parameters=dict(rope_type="yarn", factor=4.0)), "yarn"),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=2), "sliding"),
    (dict(hidden_act="swish"), "swish"),
])
def test_config_errors(extra, message):
    with pytest.raises(CheckpointError, match=message):
        hf_config({**BASE, **extra})
