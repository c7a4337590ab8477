"""The engine and generation loop on the real stories260K model and small random configs."""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hire.checkpoint import load_model
from hire.config import ModelConfig
from hire.engine import Engine
from hire.generate import generate, stream
from hire.loaded import LoadedModel
from hire.model import Transformer, init_params
from hire.sampling import SamplingParams, filter_logits

STORIES = Path(__file__).resolve().parent / "data" / "stories260K"
PROMPTS = ["Once upon a time", "The cat", "Tom and his mom went to the big park to play with a red ball and"]


@pytest.fixture(scope="module")
def stories() -> LoadedModel:
    return load_model(STORIES)


@pytest.fixture(scope="module")
def engine(stories) -> Engine:
    return Engine(stories, slots=4, max_len=256)


def recompute_greedy(model: LoadedModel, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens by running the whole sequence from scratch at every step, no cache: one compiled program, the
    sequence padded to its final length (the causal mask keeps the padding out of the last real position)."""
    apply, tokens, length = jax.jit(Transformer(model.cfg).apply), list(prompt), len(prompt) + n
    for _ in range(n):
        padded = jnp.array([tokens + [0] * (length - len(tokens))])
        logits, _ = apply(model.variables, padded, jnp.arange(length)[None])
        tokens.append(int(jnp.argmax(logits[0, len(tokens) - 1])))
    return tokens[len(prompt):]


def test_cached_decoding_equals_recomputing(stories, engine):
    prompt = stories.tokenizer.encode(PROMPTS[1])
    [out] = generate(engine, [prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert out.tokens == recompute_greedy(stories, prompt, 24)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_mixed_batch_equals_each_alone(engine, temperature):
    params = [SamplingParams(temperature=temperature, top_p=0.9, max_tokens=40, seed=i) for i in range(len(PROMPTS))]
    together = generate(engine, PROMPTS, params)
    for prompt, p, out in zip(PROMPTS, params, together):
        [alone] = generate(engine, [prompt], p)
        assert out.tokens == alone.tokens and out.text == alone.text
    assert len({tuple(o.tokens) for o in together}) == len(PROMPTS)


def test_more_prompts_than_slots(engine):
    prompts = PROMPTS * 3  # 9 requests through 4 slots
    outs = generate(engine, prompts, SamplingParams(temperature=0, max_tokens=12))
    assert [o.tokens for o in outs[:3]] == [o.tokens for o in outs[3:6]] == [o.tokens for o in outs[6:]]


def test_same_seed_same_sample(engine):
    a, b, c = (generate(engine, [PROMPTS[0]], SamplingParams(temperature=1.0, max_tokens=30, seed=s))[0]
               for s in (7, 7, 8))
    assert a.tokens == b.tokens and a.tokens != c.tokens


def test_stream_matches_generate(engine):
    params = SamplingParams(temperature=0.7, max_tokens=30, seed=3)
    events = list(stream(engine, PROMPTS[0], params))
    [out] = generate(engine, [PROMPTS[0]], params)
    assert "".join(e.text for e in events) == out.text
    assert events[-1].finish_reason == out.finish_reason and all(e.finish_reason is None for e in events[:-1])


def test_stops_and_limits(stories, engine):
    [free] = generate(engine, [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    assert len(free.tokens) == 40 and free.finish_reason == "length"
    cut = free.text[10:14]
    [stopped] = generate(engine, [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=40, stop_strings=(cut,)))
    assert stopped.finish_reason == "stop" and stopped.text == free.text[: free.text.index(cut)]
    [by_id] = generate(engine, [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=40, stop_ids=(free.tokens[5],)))
    assert by_id.finish_reason == "stop" and by_id.tokens == free.tokens[:5]
    # the context bounds generation: a 250-token prompt in a 256 context leaves 6 tokens
    long = stories.tokenizer.encode(PROMPTS[2]) * 14
    [edge] = generate(engine, [long[:250]], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    assert len(edge.tokens) == 6 and edge.finish_reason == "length"


def test_logprobs_are_the_models(stories, engine):
    prompt = stories.tokenizer.encode(PROMPTS[0])
    [out] = generate(engine, [prompt], SamplingParams(temperature=1.0, max_tokens=8, seed=1, logprobs=True,
                                                      ignore_eos=True))
    seq = prompt + out.tokens
    logits, _ = jax.jit(Transformer(stories.cfg).apply)(stories.variables, jnp.array([seq]), jnp.arange(len(seq))[None])
    expected = jax.nn.log_softmax(logits[0, len(prompt) - 1:-1])[jnp.arange(8), jnp.array(out.tokens)]
    np.testing.assert_allclose(out.logprobs, expected, atol=1e-4)


@pytest.mark.parametrize("bad, field", [("", "prompt"), ([1, 999999], "prompt"), ([5] * 300, "prompt")])
def test_bad_prompts_are_named(engine, bad, field):
    with pytest.raises(ValueError, match=field):
        generate(engine, [bad], SamplingParams(max_tokens=4))


def test_unknown_adapter_is_named(engine):
    with pytest.raises(ValueError, match="adapter"):
        generate(engine, ["hi"], SamplingParams(max_tokens=4), adapters=[0])


@pytest.mark.parametrize("kwargs, field", [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                                           ({"top_p": 1.5}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
                                           ({"top_k": -2}, "top_k")])
def test_bad_sampling_is_named(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_filter_logits_top_k_and_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]] * 3))
    kept = filter_logits(logits, jnp.array([2, 0, 0]), jnp.array([1.0, 0.7, 0.71])) > -jnp.inf
    assert kept.tolist() == [[True, True, False, False, False],   # top-2
                             [True, True, False, False, False],   # 0.5 + 0.2 reaches 0.7
                             [True, True, True, False, False]]    # 0.71 needs the third


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # MHA, GQA, MQA: one code path
def test_attention_variants_cache_equals_full(kv_heads):
    cfg = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=kv_heads, ffn_dim=64, max_seq_len=64)
    model = LoadedModel(cfg, init_params(cfg, seed=kv_heads), None)
    prompt = [3, 14, 15, 92, 65, 35]
    state_engine = Engine(model, slots=2, max_len=64)
    state = state_engine.init_state()
    state = state_engine.insert(state_engine.prefill(prompt, SamplingParams(temperature=0, seed=0)), state, 1)
    tokens = [int(state.tokens[1])]
    state, out = state_engine.generate_steps(state, 10, len(prompt) + 11)
    tokens += np.asarray(out.tokens[:, 1]).tolist()
    assert tokens == recompute_greedy(model, prompt, 11)


def lora_model(scale: float) -> LoadedModel:
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=32,
                      lora_adapters=2, lora_rank=4, lora_targets=("q", "v", "o", "gate", "down"))
    variables = init_params(cfg, seed=1)
    keys = iter(jax.random.split(jax.random.PRNGKey(2), 64))
    lora = jax.tree.map(lambda a: jax.random.normal(next(keys), a.shape) * 0.2, variables["lora"])
    lora["scale"] = jnp.full((2,), scale)
    return LoadedModel(cfg, {"params": variables["params"], "lora": lora}, None)


def forward(model: LoadedModel, tokens, adapter):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return Transformer(model.cfg).apply(model.variables, tokens, positions, None, adapter)[0]


TOKENS = jnp.array([[5, 9, 2, 33, 7, 1, 60, 12]] * 3)


def test_lora_scale_zero_is_base():
    model = lora_model(0.0)
    np.testing.assert_allclose(forward(model, TOKENS, jnp.array([0, 1, -1])), forward(model, TOKENS, None), atol=1e-6)


def test_lora_rows_pick_their_adapter_and_merge_equals_unmerged():
    model = lora_model(1.5)
    mixed = forward(model, TOKENS, jnp.array([0, 1, -1]))
    base = forward(model, TOKENS[:1], None)[0]
    assert not np.allclose(mixed[0], base, atol=1e-3) and not np.allclose(mixed[0], mixed[1], atol=1e-3)
    np.testing.assert_allclose(mixed[2], base, atol=1e-6)
    for adapter in (0, 1):
        merged = jax.tree.map(lambda a: a, model.variables["params"])
        for layer, modules in model.variables["lora"].items():
            if layer == "scale":
                continue
            for block, projections in modules.items():
                for name, ab in projections.items():
                    kernel = merged[layer][block][name]["kernel"]
                    merged[layer][block][name]["kernel"] = kernel + 1.5 * ab["a"][adapter] @ ab["b"][adapter]
        plain = LoadedModel(model.cfg.replace(lora_adapters=0), {"params": merged}, None)
        np.testing.assert_allclose(forward(plain, TOKENS[:1], None)[0], mixed[adapter], atol=1e-5)


def test_warm_up_compiles_every_program_a_request_needs(stories):
    engine = Engine(stories, slots=2, max_len=64)
    engine.warm_up(chunk=4)
    compiled = [f._cache_size() for f in (engine._prefill, engine._insert, engine._generate_steps)]
    prompts = [[1] * n for n in (3, 20, 40, 63)]  # every prompt bucket, decoding to the end of the context
    generate(engine, prompts, SamplingParams(temperature=0.7, seed=1, ignore_eos=True), chunk=4)
    assert [f._cache_size() for f in (engine._prefill, engine._insert, engine._generate_steps)] == compiled
