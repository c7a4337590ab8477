"""llama2.c checkpoints and tokenizers against llama2.c's own behaviour (run.c)."""
import shutil
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hire.checkpoint import load_model
from hire.formats import CheckpointError
from hire.formats.llama2c import MAGIC, layout, read_header
from hire.loaded import LoadedModel
from hire.model import Transformer, init_cache
from hire.tokenizer import Llama2cTokenizer, StreamDecoder

DATA = Path(__file__).resolve().parent / "data"
STORIES = DATA / "stories260K"
TEXTS = ["Once upon a time", "", " ", "a", "Hello world", "  two  spaces\nand\ttabs", "naïve café, über straße",
         "日本語のテキスト", "emoji 😀🚀 and 👩‍👩‍👧 family", "<0x41> <s> </s>", "x" * 50]


@pytest.fixture(scope="module")
def stories() -> LoadedModel:
    return load_model(STORIES)


@pytest.fixture(scope="module", params=[STORIES / "tok512.bin", DATA / "llama2-tokenizer-32000.bin"],
                ids=["tok512", "llama2"])
def tokenizer(request) -> Llama2cTokenizer:
    return Llama2cTokenizer(request.param)


def greedy(m: LoadedModel, prompt: str, steps: int) -> str:
    """Prefill the prompt, then feed back the argmax token one at a time through the KV cache."""
    apply = jax.jit(Transformer(m.cfg).apply)
    ids = m.tokenizer.encode(prompt)
    logits, cache = apply(m.variables, jnp.array([ids]), jnp.arange(len(ids))[None],
                                init_cache(m.cfg, 1, m.cfg.max_seq_len))
    for _ in range(steps):
        ids.append(int(jnp.argmax(logits[0, -1])))
        logits, cache = apply(m.variables, jnp.array([ids[-1:]]), jnp.array([[len(ids) - 1]]), cache)
    return m.tokenizer.decode(ids)


def reference_encode(tok: Llama2cTokenizer, text: str) -> list[int]:
    """run.c's encode, loop for loop: BOS, dummy prefix, code points with byte fallback, greedy merges."""
    ids = [1] + ([tok.pieces.index(b" ")] if text else [])
    for ch in text:
        raw = ch.encode()
        ids += [tok.pieces.index(raw)] if raw in tok.pieces else [b + 3 for b in raw]
    while True:
        best, best_id, best_at = -1e10, -1, -1
        for i in range(len(ids) - 1):
            merged = tok.pieces[ids[i]] + tok.pieces[ids[i + 1]]
            if merged in tok.pieces and tok.scores[tok.pieces.index(merged)] > best:
                best_id = tok.pieces.index(merged)
                best, best_at = tok.scores[best_id], i
        if best_at < 0:
            return ids
        ids[best_at:best_at + 2] = [best_id]


def test_stories260k_greedy(stories):
    assert stories.cfg.vocab_size == 512 and stories.cfg.n_kv_heads == 4 and stories.cfg.tie_embeddings
    assert greedy(stories, "Once upon a time", 30).startswith(
        "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.")


def test_encode_matches_run_c(tokenizer):
    for text in TEXTS:
        assert tokenizer.encode(text) == reference_encode(tokenizer, text), text


def test_known_ids():
    assert Llama2cTokenizer(STORIES / "tok512.bin").encode("Once upon a time") == [1, 403, 407, 261, 378]
    llama = Llama2cTokenizer(DATA / "llama2-tokenizer-32000.bin")
    assert llama.encode("Hello world") == [1, 15043, 3186]
    assert llama.encode("Hello world", bos=False) == [15043, 3186]
    assert llama.encode("") == [1]


def test_round_trip(tokenizer):
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text
        assert tokenizer.decode(tokenizer.encode(text) + [tokenizer.eos_id]) == text


def test_stream_decoder(tokenizer):
    prompt, reply = tokenizer.encode("Say:"), tokenizer.encode("naïve 😀 done", bos=False)
    stream = StreamDecoder(tokenizer, prompt)
    pieces = [stream.push(t) for t in reply]
    assert "".join(pieces) + stream.flush() == " naïve 😀 done"
    assert "\ufffd" not in "".join(pieces)
    stream = StreamDecoder(tokenizer)
    assert stream.push(0xF0 + 3) == "" and stream.flush() == "\ufffd"  # a lone UTF-8 lead byte


def test_version1_untied_export_matches_legacy(stories, tmp_path):
    """Re-export stories260K as llama2.c's version-1 format with a separate classifier: same logits."""
    legacy = read_header(STORIES / "stories260K.bin")
    data = np.fromfile(STORIES / "stories260K.bin", np.float32, offset=legacy.size)
    arrays, at = {}, 0
    for name, shape in layout(legacy):
        arrays[name], at = data[at:at + np.prod(shape)], at + np.prod(shape)
    arrays["wcls"] = arrays["embed"]
    order = ["rms_att", "rms_ffn", "rms_final", "embed", "wq", "wk", "wv", "wo", "w1", "w2", "w3", "wcls"]
    header = struct.pack("<Ii7iB", MAGIC, 1, *legacy[1:6], legacy.vocab_size, legacy.seq_len, 0)
    folder = tmp_path / "v1"
    folder.mkdir()
    (folder / "model.bin").write_bytes(header.ljust(256, b"\0") + np.concatenate([arrays[n] for n in order]).tobytes())
    shutil.copy(STORIES / "tok512.bin", folder / "tokenizer.bin")
    v1 = load_model(folder)
    assert not v1.cfg.tie_embeddings and v1.cfg.name == "v1"
    tokens = jnp.array([stories.tokenizer.encode("Once upon a time")])
    positions = jnp.arange(tokens.shape[1])[None]
    logits = [jax.jit(Transformer(m.cfg).apply)(m.variables, tokens, positions)[0] for m in (v1, stories)]
    np.testing.assert_allclose(*logits, atol=1e-5)


def test_folder_errors(tmp_path):
    shutil.copy(STORIES / "tok512.bin", tmp_path / "tok512.bin")
    with pytest.raises(CheckpointError, match="expected one llama2.c model .bin, found 0"):
        load_model(tmp_path)
    (tmp_path / "tok512.bin").unlink()
    shutil.copy(STORIES / "stories260K.bin", tmp_path / "m.bin")
    with pytest.raises(CheckpointError, match="no llama2.c tokenizer .bin with 512 tokens"):
        load_model(tmp_path / "m.bin")
