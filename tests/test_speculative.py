"""Speculative decoding: greedy output equals the large model's, sampled output follows its distribution,
rollback leaves caches equal to a fresh prefill."""
from __future__ import annotations

import functools
import itertools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import chisquare

from hire import quant
from hire.checkpoint import load_model, resolve_model
from hire.config import ModelConfig
from hire.drafters import ModelDrafter, NGramDrafter
from hire.engine import Engine
from hire.generate import generate
from hire.loaded import LoadedModel
from hire.model import init_cache, init_params
from hire.request import make_requests
from hire.router import ConfidenceRouter, collect, fit, scores
from hire.sampling import RowSampling, SamplingParams
from hire.scheduler import run
from hire.speculative import (
    SpecStats,
    SpeculativeBatch,
    Speculator,
    filtered,
    run_model,
    speculative_generate,
    verify_lengths,
)
from hire.tandem import TandemConfig, TandemDrafter, TandemModel, init_tandem

# 15-16 tokens each: one prefill bucket (16) and, with max_len 32, one attention span (32) for every block
PROMPTS = ["The cat sat on the mat. The cat sat", "Tom and his mom went to the park to play",
           "One day, a boy named Tim found a big", "Once upon a time, there was a girl named Lily."]
MAX_LEN = 32


@functools.partial(jax.jit, static_argnums=0)
def fresh_prefill(cfg: ModelConfig, variables: dict, tokens: jax.Array):
    """The cache of a prefill of tokens [1, T] from scratch."""
    n = tokens.shape[1]
    return run_model(cfg, variables, tokens, jnp.arange(n)[None], init_cache(cfg, 1, n))[1]


def random_model(cfg: ModelConfig, seed: int, scale: float = 1.0, tokenizer=None) -> LoadedModel:
    """Random weights; `scale` sharpens the output distribution."""
    return LoadedModel(cfg, jax.tree.map(lambda x: x * scale, init_params(cfg, seed)), tokenizer)


@pytest.fixture(scope="module")
def stories() -> LoadedModel:
    return load_model("stories260K")


@pytest.fixture(scope="module")
def engine(stories) -> Engine:
    return Engine(stories, slots=2, max_len=MAX_LEN)


@pytest.fixture(scope="module")
def drafters(stories) -> dict:
    small = ModelConfig(vocab_size=512, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=64)
    return {"ngram": NGramDrafter(512), "random": ModelDrafter(random_model(small, 1)),
            "self": ModelDrafter(stories)}


@pytest.fixture(scope="module")
def greedy_alone(engine) -> list:
    return generate(engine, PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_LEN, ignore_eos=True))


# each (drafter, γ, slots, router) compiles its own block program: the other tests reuse these
@pytest.mark.parametrize("name,gamma,slots,router", [("ngram", 1, 2, None), ("random", 3, 2, None),
                                                     ("self", 4, 1, ConfidenceRouter(0.6))])
def test_greedy_equals_large_model_alone(stories, engine, drafters, greedy_alone, name, gamma, slots, router):
    params = SamplingParams(temperature=0, max_tokens=MAX_LEN, ignore_eos=True)
    engine = engine if slots == engine.slots else Engine(stories, slots=slots, max_len=MAX_LEN)
    outs, stats = speculative_generate(engine, drafters[name], PROMPTS, params, gamma=gamma, router=router)
    assert [(o.tokens, o.text, o.finish_reason) for o in outs] == [(o.tokens, o.text, o.finish_reason)
                                                                   for o in greedy_alone]
    assert stats.tokens == sum(len(o.tokens) for o in outs) >= 4 * 16
    assert stats.proposed > 0
    if name == "self":  # the large model drafting for itself, a router stopping where it is unsure: blocks
        assert stats.acceptance_rate == 1.0 and 1 < stats.mean_accepted < gamma - 0.5  # end early, all accepted
    if name == "ngram":
        assert 0 < stats.acceptance_rate < 1 and stats.calls_per_token < 1
    if name == "random":  # random weights: (nearly) every draft is rejected, and the output is still exact
        assert stats.acceptance_rate < 0.2


def test_verification_over_part_of_a_longer_cache(stories, drafters):
    """A cache of 4 x MAX_LEN positions, blocks attending over its first 32 then 64 (kv_len): verification's
    lax.switch works on that window, written back in place, and the output stays the model's own."""
    engine = Engine(stories, slots=2, max_len=4 * MAX_LEN)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    alone = generate(engine, PROMPTS, params)
    outs, stats = speculative_generate(engine, drafters["ngram"], PROMPTS, params, gamma=2)
    assert [o.tokens for o in outs] == [o.tokens for o in alone] and all(len(o.tokens) == 40 for o in outs)
    assert stats.accepted > 0


def smol_attention(quantize: str, scale: float = 1.0, tokenizer=None) -> LoadedModel:
    """Random weights (times `scale`) with SmolLM2-135M's attention shape, 3 query heads of 64 per KV head, kept
    quantized (hire.quant) as SmolLM2 is pulled: int8 or int4 kernels, an int8 embedding table."""
    cfg = ModelConfig(vocab_size=512, dim=192, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=64, ffn_dim=256,
                      max_seq_len=256)
    params = jax.tree.map(lambda x: x * scale, init_params(cfg)["params"])
    if quantize == "none":
        return LoadedModel(cfg, {"params": params}, tokenizer)
    table = quant.EMBED_BESIDE.get(quantize, quantize)
    return LoadedModel(cfg.replace(quantize=quantize, quantize_embed=table),
                       {"params": quant.quantize_params(params, quantize, table)}, tokenizer)


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _pass(cfg: ModelConfig, variables: dict, tokens: jax.Array, positions: jax.Array, cache, kv_len: int,
          stepwise: bool):
    return run_model(cfg, variables, tokens, positions, cache, kv_len=kv_len, stepwise=stepwise)[:2]


@pytest.mark.parametrize("quantize,batch", [("int8", 1), ("int4", 1), ("int8", 3), ("int4", 4), ("none", 3)])
def test_verification_pass_equals_one_token_steps(quantize, batch):
    """Over an attention span of 128 and of 256 (where XLA's float32 attention sums in an order that depends on the
    query rows a product has, and int8 re-quantization of the activations grows that last bit), the (γ+1)-token
    verification pass gives the logits of γ+1 one-token steps bit for bit. (Float32 at batch 1 is not bit-identical:
    XLA multiplies one row by a dense kernel in another order than several.)"""
    model = smol_attention(quantize)
    cfg, T = model.cfg, 5
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 512, (batch, 256)), jnp.int32)
    at = lambda start, n: jnp.broadcast_to(start + jnp.arange(n), (batch, n))  # noqa: E731
    cache = _pass(cfg, model.variables, tokens[:, :120], at(0, 120), init_cache(cfg, batch, 256), 128, False)[1]
    for span, n in ((128, 120), (256, 248)):
        if n > 120:
            cache = _pass(cfg, model.variables, tokens[:, 120:n], at(120, n - 120), cache, span, False)[1]
        block = _pass(cfg, model.variables, tokens[:, n:n + T], at(n, T), cache, span, True)[0]
        steps, c = [], cache
        for i in range(T):
            logits, c = _pass(cfg, model.variables, tokens[:, n + i:n + i + 1], at(n + i, 1), c, span, False)
            steps.append(logits[:, 0])
        np.testing.assert_array_equal(np.asarray(block), np.stack(steps, axis=1), err_msg=f"span {span}")


def test_greedy_equals_model_alone_with_quantized_weights(stories):
    """Three prompts of 100 tokens in two slots, 60 greedy tokens each (attention spans 128 then 256), int4 weights:
    the model drafting for itself (every pass γ+1 tokens) and prompt lookup (passes of 1 to γ+1) give the same
    tokens and log-probabilities, bit for bit, as plain greedy decoding."""
    model = smol_attention("int4", scale=6.0, tokenizer=stories.tokenizer)
    prompts = [list(map(int, p)) for p in np.random.default_rng(1).integers(3, 512, (3, 100))]
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, logprobs=True)
    engine = Engine(model, slots=2, max_len=256)
    alone = generate(engine, prompts, params)
    for drafter in (ModelDrafter(model), NGramDrafter(512)):
        outs, stats = speculative_generate(engine, drafter, prompts, params, gamma=4)
        assert [(o.tokens, o.logprobs) for o in outs] == [(o.tokens, o.logprobs) for o in alone]
        assert all(len(o.tokens) == 60 for o in outs) and stats.proposed > 0


def with_adapters(model: LoadedModel) -> LoadedModel:
    """`model` with two random LoRA adapters (as hire.lora loads them: variables["lora"], scale 1.5)."""
    cfg = model.cfg.replace(lora_adapters=2, lora_rank=4, lora_targets=("q", "v", "o", "down"))
    keys = iter(jax.random.split(jax.random.PRNGKey(2), 64))
    lora = jax.tree.map(lambda a: jax.random.normal(next(keys), a.shape) * 0.2, init_params(cfg, seed=1)["lora"])
    return LoadedModel(cfg, {**model.variables, "lora": lora | {"scale": jnp.full((2,), 1.5)}}, model.tokenizer)


@pytest.mark.parametrize("variant", ["lora", "hire-q"])
def test_greedy_equals_the_engines_model_with_lora_or_hire(stories, drafters, greedy_alone, variant, tmp_path):
    """LoRA and HiRE are properties of the engine's model: verification and prefill run each row's adapter and the
    HiRE softmax, so the output is that model's own (which differs from the plain model's)."""
    if variant == "lora":
        model, adapters = with_adapters(stories), [0, 1, -1, 0]
    else:  # 2 candidate rows of 512, from the int4 predictor built at load: not always the exact argmax
        folder = shutil.copytree(resolve_model("stories260K"), tmp_path / "stories")
        model = load_model(folder, softmax="hire-q", hire_quant="int4", softmax_k=1, softmax_oversample=2)
        adapters = None
    engine = Engine(model, slots=2, max_len=MAX_LEN)
    params = SamplingParams(temperature=0, max_tokens=MAX_LEN, ignore_eos=True)
    alone = generate(engine, PROMPTS, params, adapters)
    outs, stats = speculative_generate(engine, drafters["ngram"], PROMPTS, params, gamma=2, adapters=adapters)
    assert [o.tokens for o in outs] == [o.tokens for o in alone] and stats.accepted > 0
    assert [o.tokens for o in alone] != [o.tokens for o in greedy_alone]


def test_stopping_rules_as_generate(engine, drafters, greedy_alone):
    stop = greedy_alone[1].text[5:9]  # text the completion reaches part way
    params = [SamplingParams(temperature=0, max_tokens=7), SamplingParams(temperature=0, stop_strings=(stop,))]
    alone = generate(engine, PROMPTS[:2], params)
    outs, _ = speculative_generate(engine, drafters["ngram"], PROMPTS[:2], params, gamma=1)
    assert [(o.tokens, o.text, o.finish_reason) for o in outs] == [(o.tokens, o.text, o.finish_reason) for o in alone]
    assert [o.finish_reason for o in outs] == ["length", "stop"] and len(outs[0].tokens) == 7


def test_sampled_rows_do_not_depend_on_neighbours(engine, drafters):
    params = [SamplingParams(temperature=0.8, top_p=0.9, max_tokens=MAX_LEN, seed=i) for i in range(3)]
    together, _ = speculative_generate(engine, drafters["random"], PROMPTS[:3], params, gamma=3)
    alone, _ = speculative_generate(engine, drafters["random"], PROMPTS[2:3], params[2:3], gamma=3)
    assert together[2].tokens == alone[0].tokens
    assert len({tuple(o.tokens) for o in together}) == 3


def test_rollback_leaves_caches_equal_to_fresh_prefill(stories, engine, drafters):
    drafter = drafters["random"]
    spec = Speculator(engine, drafter, gamma=3)
    state = spec.init_state()
    prompts = [stories.tokenizer.encode(p) for p in PROMPTS[:2]]
    emitted = [[], []]
    for slot, prompt in enumerate(prompts):
        state, token, _ = spec.prefill(state, slot, prompt, SamplingParams(temperature=0.0))
        emitted[slot].append(token)
    rejected = 0
    for _ in range(4):
        state, out = spec.block(state, MAX_LEN)
        for slot in range(2):
            emitted[slot] += np.asarray(out.tokens[slot, : out.count[slot]]).tolist()
            rejected += int(out.count[slot]) <= int(out.proposed[slot])
    assert rejected  # some drafts were rolled back
    for slot, prompt in enumerate(prompts):
        committed = prompt + emitted[slot][:-1]  # the last token is pending: not in any cache yet
        n = len(committed)
        assert int(state.target.positions[slot]) == n and int(state.target.tokens[slot]) == emitted[slot][-1]
        # the drafter's last committed position is refilled by its next step (never fed if its block was accepted)
        for cfg, variables, cache, valid in ((stories.cfg, stories.variables, state.target.cache, n),
                                             (drafter.cfg, drafter.variables, state.draft.cache, n - 1)):
            fresh = fresh_prefill(cfg, variables, jnp.array([committed]))
            for (k, v), (fk, fv) in zip(cache, fresh):
                np.testing.assert_allclose(k[slot, ..., :valid], fk[0, ..., :valid], atol=2e-5)
                np.testing.assert_allclose(v[slot, :, :valid], fv[0, :, :valid], atol=2e-5)
        assert np.abs(np.asarray(state.target.cache[0][0][slot, ..., n:])).sum() > 0  # stale entries past it


def test_blocks_end_where_proposals_end(stories, engine, drafters):
    spec = Speculator(engine, drafters["ngram"], gamma=1)
    state, first, _ = spec.prefill(spec.init_state(), 0, list(range(100, 116)), SamplingParams(temperature=0.0))
    state, out = spec.block(state, MAX_LEN)  # no suffix recurs in either row: a plain decode step
    assert int(out.verified) == 1 and out.proposed.tolist() == [0, 0] and out.count.tolist() == [1, 1]
    [alone] = generate(engine, [list(range(100, 116))], SamplingParams(temperature=0, max_tokens=2))
    assert alone.tokens == [first, int(out.tokens[0, 0])]
    assert verify_lengths(1) == (1, 2) and verify_lengths(4) == (1, 2, 4, 5) and verify_lengths(7) == (1, 2, 4, 8)


@pytest.mark.parametrize("plain_from,plain_steps", [(2, 5), (3, 0)])
def test_plain_steps_from_a_number_of_live_rows(engine, drafters, plain_from, plain_steps):
    """SpeculativeBatch(plain_from=2): while both requests are live each step decodes one token per row, drafting
    nothing (5 steps, until the first request has its 6 tokens); then the other drafts again, from a drafter that
    saw those tokens: the large model drafting for itself has every draft accepted. Greedy output is the model's
    alone either way; with plain_from above the live rows no step falls back."""
    params = [SamplingParams(temperature=0, max_tokens=6), SamplingParams(temperature=0, max_tokens=MAX_LEN)]
    alone = generate(engine, PROMPTS[:2], params)
    spec, stats = Speculator(engine, drafters["self"], gamma=3), SpecStats()
    requests = make_requests(engine, PROMPTS[:2], params, None)
    for _ in run(engine, requests, lambda: SpeculativeBatch(spec, stats, plain_from=plain_from)):
        pass
    assert [r.out.tokens for r in requests] == [o.tokens for o in alone] and len(alone[0].tokens) == 6
    assert stats.plain_steps == plain_steps and stats.proposed > 0 and stats.acceptance_rate == 1.0


def test_collect_and_fit_router(engine, drafters):
    prompts = [list(map(int, p)) for p in np.random.default_rng(0).integers(3, 40, (3, 16))]
    x, y = collect(engine, drafters["ngram"], 1, prompts, 12)
    assert x.shape == (len(y), 3) and set(np.unique(y)) <= {0.0, 1.0} and len(y) > 0
    rng = np.random.default_rng(1)  # a router learns a separable rule, and a threshold trades kept for accuracy
    x = rng.normal(size=(600, 5)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 3] > 0).astype(np.float32)
    router = fit(x[:400], y[:400], steps=300)
    held_out = scores(router, x[400:], y[400:])
    assert held_out["auc"] > 0.97 and held_out["accuracy"] > 0.9
    assert scores(router.with_threshold(0.9), x[400:], y[400:])["kept"] < held_out["kept"]


# --- sampled verification follows the large model's distribution ---------------------------------------------

VOCAB = 8
TINY = ModelConfig(vocab_size=VOCAB, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=16,
                   bos_id=0, eos_id=VOCAB)


def exact_marginals(model: LoadedModel, prompt: list[int], params: SamplingParams, n: int) -> np.ndarray:
    """P(generated token i = v) [n, V] for the first n tokens, by enumerating every continuation."""
    seqs = np.array(list(itertools.product(range(VOCAB), repeat=n - 1)), np.int32).reshape(-1, n - 1)
    tokens = jnp.array(np.concatenate([np.tile(prompt, (len(seqs), 1)), seqs], axis=1))

    @jax.jit
    def distributions(variables, tokens, rows):
        logits, _, _ = run_model(model.cfg, variables, tokens, jnp.arange(tokens.shape[1])[None], None)
        return jax.nn.softmax(filtered(logits[:, len(prompt) - 1:], rows), axis=-1)

    # [S, n, V]: row s's distributions of generated tokens 1 .. n
    probs = np.asarray(distributions(model.variables, tokens, RowSampling.of([params] * len(seqs))), np.float64)
    marginals, path = [], np.ones(len(seqs))  # path[s]: P(the first i generated tokens are seqs[s, :i])
    for i in range(n):  # each prefix of i tokens appears VOCAB ** (n - 1 - i) times among the rows
        marginals.append((path[:, None] * probs[:, i]).sum(0) / VOCAB ** (n - 1 - i))
        if i < n - 1:
            path = path * probs[np.arange(len(seqs)), i, seqs[:, i]]
    return np.array(marginals)


def tiny_tandem(seed: int, scale: float) -> TandemDrafter:
    """A random tandem drafter of TINY's shape reading TINY's last hidden state, in blocks of 2."""
    tandem = TandemConfig(large_dim=TINY.dim, large_layers=((1,),), block=2)
    variables = jax.tree.map(lambda x: x * scale, init_tandem(TINY, tandem, seed))
    return TandemDrafter(TandemModel(TINY, tandem, variables, None))


@pytest.mark.parametrize("drafter_kind", ["model", "ngram", "tandem"])
def test_sampled_output_follows_large_model(drafter_kind):
    target = random_model(TINY, 0, 5.0, load_model("stories260K").tokenizer)  # any tokenizer decodes ids < 8
    draft = random_model(TINY, 7, 5.0)
    drafter = {"model": lambda: ModelDrafter(draft), "ngram": lambda: NGramDrafter(VOCAB, n=2),
               "tandem": lambda: tiny_tandem(7, 5.0)}[drafter_kind]()
    prompt, samples, n = [1, 5, 3, 1, 5], 1000, 3
    engine = Engine(target, slots=samples, max_len=16)
    params = [SamplingParams(temperature=0.9, top_k=6, max_tokens=n, seed=s, ignore_eos=True) for s in range(samples)]
    outs, stats = speculative_generate(engine, drafter, [prompt] * samples, params, gamma=2)
    got = np.array([o.tokens for o in outs])  # [samples, n]
    want = exact_marginals(target, prompt, params[0], n)
    assert 0.1 < stats.acceptance_rate < 0.95  # drafts are both accepted and rejected
    for i in range(n):
        counts = np.bincount(got[:, i], minlength=VOCAB)
        keep = want[i] > 0
        assert counts[~keep].sum() == 0  # nothing top-k filters out
        assert chisquare(counts[keep], want[i][keep] / want[i][keep].sum() * samples).pvalue > 1e-3, i
    if drafter_kind == "model":  # the test tells distributions apart: the drafter's own marginal is rejected
        wrong = np.maximum(exact_marginals(draft, prompt, params[0], n)[1], 1e-12)
        counts = np.bincount(got[:, 1], minlength=VOCAB)
        assert chisquare(counts, wrong / wrong.sum() * samples).pvalue < 1e-6
