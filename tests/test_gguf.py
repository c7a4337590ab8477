"""GGUF loading (hire.formats.gguf) and its tokenizer (hire.formats.gguf_tokenizer) against transformers' own
GGUF loader: tiny random llama and qwen2 models written with gguf.GGUFWriter in every type gguf.quants writes, the real
SmolLM2 and Gemma 3 files (fetched by hire's registry, as `hire pull` does), and broken files."""
from __future__ import annotations

import sysconfig
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers as hf
from click.testing import CliRunner
from tiny_gguf import TYPES, random_llama, write_llama

from hire.checkpoint import detect_format, load_model, resolve_model
from hire.cli import main
from hire.engine import Engine
from hire.formats import CheckpointError
from hire.formats.gguf import GGUFFile
from hire.formats.gguf_tokenizer import gguf_tokenizer
from hire.generate import generate
from hire.model import Transformer, rope_frequencies
from hire.sampling import SamplingParams

TOL = 1e-4
TEXTS = ["Hello, world!", "  leading spaces and trailing   ", "digits 1234567890 and 3.14159, 1,000,000",
         "unicode: héllo wörld — naïve café 日本語のテキスト 😀👍🏽 Ελληνικά русский", "tabs\tand\nnewlines\n\n\nend",
         "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
         "<start_of_turn>user\nhi<end_of_turn>\n<bos>x",
         "def f(x):\n    return x ** 2  # comment\n", "multiple     spaces      here", " ", "a\u00a0b\u200bc",
         "<unk> <pad> <eos> <|endoftext|>", "<0x41> ▁ ▁▁ literal", "\n\n\n\n\n\n", "   \n  \t "]


def hf_gguf(path, **kw):
    return hf.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                   attn_implementation="eager", **kw).eval()


def hire_logits(loaded, ids: np.ndarray) -> np.ndarray:
    logits, _ = Transformer(loaded.cfg).apply(loaded.variables, ids[None], np.arange(len(ids))[None])
    return np.asarray(logits[0])


@pytest.fixture(scope="module", params=[(False, "gpt2", "llama"), (True, "llama", "llama"), (True, "gpt2", "qwen2")],
                ids=["llama-untied-gpt2", "llama-tied-sentencepiece", "qwen2-tied-gpt2"])
def tiny(request, tmp_path_factory):
    tie, tokenizer, arch = request.param
    model = random_llama(seed=1, tie=tie, arch=arch)
    path = write_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model, tokenizer=tokenizer)
    return path, model


def test_tiny_logits_match_transformers(tiny):
    path, float_model = tiny
    assert {t.tensor_type.name for t in GGUFFile(path).tensors.values()} >= set(TYPES)
    loaded = load_model(path, dtype="float32")  # dequantized, as transformers reads it (test_quant: kept quantized)
    assert detect_format(path) == detect_format(path.parent) == "gguf"
    ids = np.random.RandomState(0).randint(0, loaded.cfg.vocab_size, 40)
    with torch.no_grad():
        want = hf_gguf(path)(torch.tensor(ids[None])).logits[0].numpy()
        exact = float_model(torch.tensor(ids[None])).logits[0].numpy()
    diff = np.abs(hire_logits(loaded, ids) - want).max()
    print(f"{path.name}: max |hire - transformers| = {diff:.2e}; quantized against float: "
          f"{np.abs(exact - want).max():.2e}")
    assert diff <= TOL < np.abs(exact - want).max()
    assert loaded.cfg.tie_embeddings == float_model.config.tie_word_embeddings
    assert loaded.cfg.attention_bias == (float_model.config.model_type == "qwen2")
    assert np.abs(hire_logits(load_model(path.parent, dtype="float32"), ids) - want).max() <= TOL  # its folder


def test_reader_reads_as_gguf_reader(tiny):
    """hire's faster reader (hire.formats.gguf._Reader) gives the fields and tensors gguf.GGUFReader gives."""
    import gguf

    from hire.formats.gguf import _Reader

    path, _ = tiny
    ours, theirs = _Reader(path), gguf.GGUFReader(path)
    assert list(ours.fields) == list(theirs.fields)
    for key, field in theirs.fields.items():
        assert ours.fields[key].contents() == field.contents(), key
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.name, a.tensor_type, list(a.shape)) == (b.name, b.tensor_type, list(b.shape))
        assert np.array_equal(a.data, b.data)


def test_tiny_tokenizer_matches_transformers(tiny):
    path, _ = tiny
    tok = load_model(path).tokenizer
    ref = hf.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = ["the cat sat on the mat", " the  cats", "hello\nworld <|im_start|>x<|im_end|>", "éü 日本 ", "<s>x</s>"]
    for text in texts:
        assert tok.encode(text, bos=False) == ref(text, add_special_tokens=False).input_ids, text
        assert tok.encode(text) == ref(text).input_ids, text
        assert tok.decode(tok.encode(text)) == ref.decode(ref(text).input_ids, skip_special_tokens=True)
    if ref.backend_tokenizer.model.__class__.__name__ == "BPE" and tok.chat_template:  # the byte-level one
        # tokenizer.ggml.pre "smollm" splits digits one by one (llama.cpp; SmolLM2's own tokenizer.json), though
        # the vocabulary merges "1 2"; transformers' GGUF tokenizer does not split them
        assert tok.encode("12", bos=False) == [tok._tok.token_to_id("1"), tok._tok.token_to_id("2")]
        assert tok.end_ids == (tok.eos_id, 0) and tok.chat_template.startswith("{% for m in messages %}")
        assert not tok.add_bos
    else:
        assert tok.end_ids == (2,) and tok.chat_template is None and tok.add_bos


def test_convert_gguf(tiny, tmp_path):
    path, _ = tiny
    result = CliRunner().invoke(main, ["convert", str(path), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    src, dst = load_model(path), load_model(tmp_path / "out")
    assert detect_format(tmp_path / "out") == "hire" and src.cfg == dst.cfg
    ids = np.arange(30) % src.cfg.vocab_size
    assert np.array_equal(hire_logits(src, ids), hire_logits(dst, ids))
    for attr in ("chat_template", "end_ids", "bos_id", "eos_id", "add_bos"):
        assert getattr(src.tokenizer, attr) == getattr(dst.tokenizer, attr), attr
    assert src.tokenizer.encode(TEXTS[5]) == dst.tokenizer.encode(TEXTS[5])


def test_generate_command_takes_a_gguf_file(tiny):
    path, _ = tiny
    result = CliRunner().invoke(main, ["generate", "--model", str(path), "--prompt", "the cat", "--max-tokens", "4",
                                       "--temperature", "0"])
    assert result.exit_code == 0, result.output


# --- the real models, fetched through hire's registry (hire.registry.pull) into hire's model folder ---------

@pytest.fixture(scope="module", params=["smollm2-135m-instruct", "gemma3-270m"])
def real(request):
    folder = resolve_model(request.param)  # pulled on first use
    return folder, next(folder.glob("*.gguf"))


def test_real_tokenizer_matches_transformers(real):
    folder, path = real
    f = GGUFFile(path)
    tok = gguf_tokenizer(f, f.shape("token_embd.weight")[0])
    ref = hf.AutoTokenizer.from_pretrained(str(folder), gguf_file=path.name)
    for text in TEXTS:
        ids = tok.encode(text, bos=False)
        assert ids == ref(text, add_special_tokens=False).input_ids, text
        assert tok.encode(text) == ref(text).input_ids, text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    if f.arch == "llama":
        assert tok.chat_template.startswith("{% for message in messages %}") and "<|im_start|>" in tok.chat_template
        assert tok.end_ids == (2,) and tok.bos_id == 1 and not tok.add_bos
    else:
        assert tok.chat_template is None and tok.end_ids == (1,) and tok.bos_id == 2 and tok.add_bos


def greedy_matches_transformers(engine: Engine, ref, prompts: list[str], n: int) -> None:
    """hire's n greedy tokens for each prompt are transformers' greedy ones (`generate(do_sample=False)`, which stops
    at an EOS of its generation config): each is the argmax of transformers' logits after the prompt and hire's
    tokens before it. One forward pass over them gives every step's logits (greedy decoding is a function of them),
    where `generate` would take n passes (in eager attention, most of this module's time). hire decodes the n tokens
    in one chunk: one decode program to compile per attention span, not one per 16 tokens' span."""
    eos = ref.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or ())
    for prompt in prompts:
        ids = engine.tokenizer.encode(prompt)
        [out] = generate(engine, [ids], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), chunk=n)
        with torch.no_grad():
            want = ref(torch.tensor([ids + out.tokens[:-1]])).logits[0, len(ids) - 1:].argmax(-1).tolist()
        end = next((i + 1 for i, t in enumerate(want) if t in eos), n)  # where transformers' greedy run stops
        assert out.tokens[:end] == want[:end], prompt
        assert end == n or want[end - 1] in engine.tokenizer.end_ids


def test_smollm2_greedy_matches_transformers():
    path = next(resolve_model("smollm2-135m-instruct").glob("*.gguf"))
    loaded = load_model(path, dtype="float32")
    assert (loaded.cfg.n_layers, loaded.cfg.dim, loaded.cfg.n_heads, loaded.cfg.n_kv_heads) == (30, 576, 9, 3)
    assert loaded.cfg.tie_embeddings and loaded.cfg.vocab_size == 49152
    prompts = ["The capital of France is", "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n",
               "def fibonacci(n):"]
    greedy_matches_transformers(Engine(loaded, slots=1, max_len=64), hf_gguf(path), prompts, 30)


@pytest.fixture(scope="module")
def gemma3():
    """Gemma 3 270M in hire and in transformers, both from the GGUF file hire pulled, and one hire engine for both
    tests (a context of 1024, which the longer test needs): its programs compile once."""
    path = next(resolve_model("gemma3-270m").glob("*.gguf"))
    loaded = load_model(path, dtype="float32")
    return loaded, hf_gguf(path), Engine(loaded, slots=1, max_len=1024)


def test_gemma3_matches_transformers(gemma3):
    """Gemma 3 270M (Q5_0, Q4_K, Q6_K, Q8_0 and F32 tensors): logits and greedy tokens as transformers', and
    a low loss on plain English, which taking llama.cpp's +1 off every norm (q/k norms included) gives: left on
    the q/k norms, the loss below goes from 1.56 to 2.90 nats."""
    loaded, ref, engine = gemma3
    cfg = loaded.cfg
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size) == (
        18, 640, 4, 1, 256, 262144)
    assert (cfg.sliding_window, cfg.global_every, cfg.rope_theta, cfg.rope_local_theta) == (512, 6, 1e6, 1e4)
    text = ("The capital of France is Paris. It is known for the Eiffel Tower, which was built in 1889 for the "
            "World's Fair. Paris is also famous for its museums, such as the Louvre.")
    ids = np.array(loaded.tokenizer.encode(text))
    with torch.no_grad():
        want = ref(torch.tensor(ids[None])).logits[0].numpy()
    got = hire_logits(loaded, ids)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    logp = np.asarray(jax.nn.log_softmax(got[:-1]))
    assert -logp[np.arange(len(ids) - 1), ids[1:]].mean() < 2.0
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
               "The three laws of thermodynamics are", "Translate to French: I would like a cup of coffee."]
    greedy_matches_transformers(engine, ref, prompts, 30)


def test_gemma3_past_the_sliding_window(gemma3):
    """A prompt longer than the 512-token window, where the 15 local layers (RoPE base 1e4) see only its last 512
    positions and the 3 global ones (1e6) all of it: logits and greedy tokens as transformers'."""
    loaded, ref, engine = gemma3
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()[:2600]
    ids = np.array(loaded.tokenizer.encode(text))
    assert 600 < len(ids) < 900
    with torch.no_grad():
        want = ref(torch.tensor(ids[None])).logits[0].numpy()
    got = hire_logits(loaded, ids)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    everywhere, _ = Transformer(loaded.cfg.replace(sliding_window=0)).apply(loaded.variables, ids[None],
                                                                           np.arange(len(ids))[None])
    assert np.abs(np.asarray(everywhere[0, 520:]) - want[520:]).max() > 1e-2 * np.abs(want).max()  # the window matters
    greedy_matches_transformers(engine, ref, [text], 30)


# --- broken files: one-line errors that name the field or tensor ------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama():
    return random_llama(seed=2)


def broken(tmp_path, model, **kw):
    return write_llama(tmp_path / "bad.gguf", model, **kw)


def load_error(path) -> str:
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message, message
    return message


@pytest.mark.parametrize("cut, named", [(-3000, "tensor output.weight: its data ends at byte"),
                                        (300, "not a readable GGUF file (corrupt or truncated after metadata field")])
def test_truncated_file(tmp_path, tiny_llama, cut, named):
    path = broken(tmp_path, tiny_llama)
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    assert named in load_error(path)


def test_corrupt_file(tmp_path, tiny_llama):
    path = broken(tmp_path, tiny_llama)
    data = bytearray(path.read_bytes())
    data[:4] = b"GGUX"
    path.write_bytes(data)
    assert "not a readable GGUF file" in load_error(path) and "magic" in load_error(path)


@pytest.mark.parametrize("kw, named", [
    (dict(types=("Q8_1",)), "tensor token_embd.weight has type Q8_1, which is not supported; supported: F32, F16"),
    (dict(arch="phi3"), "general.architecture 'phi3' is not supported; supported: llama, qwen2, gemma3"),
    (dict(drop=("tokenizer.ggml.model",)), "no tokenizer in the file (metadata field tokenizer.ggml.model"),
    (dict(drop=("tokenizer.ggml.tokens",)), "missing metadata field tokenizer.ggml.tokens"),
    (dict(fields={"tokenizer.ggml.model": ("bert", "string")}), "tokenizer.ggml.model 'bert' is not supported"),
    (dict(fields={"tokenizer.ggml.pre": ("weird", "string")}), "tokenizer.ggml.pre 'weird' is not supported"),
    (dict(drop=("llama.block_count",)), "missing metadata field llama.block_count"),
    (dict(fields={"llama.block_count": ("two", "string")}), "metadata field llama.block_count should be a int"),
    (dict(drop=("blk.1.ffn_up.weight",)), "missing tensor blk.1.ffn_up.weight"),
    (dict(fields={"llama.feed_forward_length": (128, "uint32")}), "tensor blk.0.ffn_down.weight has shape (64, 96), "
                                                                   "but the metadata implies (64, 128)"),
    (dict(fields={"llama.rope.scaling.type": ("yarn", "string")}), "llama.rope.scaling.type 'yarn' is not supported"),
    (dict(fields={"tokenizer.ggml.eos_token_id": (5000, "uint32")}), "tokenizer.ggml.eos_token_id 5000 is not one"),
    (dict(fields={"tokenizer.chat_template": ("{% for m in messages %}{{ m }", "string")}),
     "tokenizer.chat_template: the chat template does not parse"),
])
def test_bad_metadata_or_tensor(tmp_path, tiny_llama, kw, named):
    assert named in load_error(broken(tmp_path, tiny_llama, **kw))


def test_bad_file_fails_before_a_server_starts(tmp_path, tiny_llama):
    path = broken(tmp_path, tiny_llama, types=("Q8_1",))
    for command in (["generate", "--prompt", "x"], ["serve"], ["serve-grpc"]):
        result = CliRunner().invoke(main, [*command, "--model", str(path)])
        assert result.exit_code == 1 and "Error: " in result.output, (command, result.output)
        assert "token_embd.weight has type Q8_1" in result.output and result.output.count("\n") == 1, result.output


def llama3_factors(head_dim: int, theta: float, factor: float, low: float, high: float, original: int) -> np.ndarray:
    """The RoPE frequency factors llama.cpp's converter writes to rope_freqs.weight for Llama 3.1's scaling."""
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = (original / wavelen - low) / (high - low)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor,
                                                               1 / ((1 - smooth) / factor + smooth))).astype(np.float32)


@pytest.mark.parametrize("original, ok", [(8192, True), (4096, False)])
def test_llama31_rope_freqs(tmp_path, original, ok):
    """Llama 3.1's scaling, stored as rope_freqs.weight: recovered (float32 weights: logits as the float model's),
    or, for factors of other parameters, an error naming the tensor."""
    model = random_llama(seed=4)
    rope = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8192)
    model = type(model)(type(model.config)(**{**model.config.to_dict(), "rope_parameters": rope})).eval()
    factors = llama3_factors(16, 10000.0, 8.0, 1.0, 4.0, original)
    path = write_llama(tmp_path / "llama31.gguf", model, types=("F32",), tensors={"rope_freqs.weight": factors})
    if not ok:
        assert "tensor rope_freqs.weight holds RoPE frequency factors that are not Llama 3.1's" in load_error(path)
        return
    loaded = load_model(path)
    assert loaded.cfg.rope_scaling.factor == 8.0 and loaded.cfg.rope_scaling.kind == "llama3"
    scaled = np.asarray(rope_frequencies(loaded.cfg))
    assert np.allclose(np.asarray(rope_frequencies(loaded.cfg.replace(rope_scaling=None))) / scaled, factors)
    ids = np.arange(40) % 300
    with torch.no_grad():
        want = model(torch.tensor(ids[None])).logits[0].numpy()
    assert np.abs(hire_logits(loaded, ids) - want).max() <= TOL
