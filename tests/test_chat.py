"""Chat templates (hire.chat): rendering as transformers renders, where templates and end ids come from, the
template's BOS, generation stopping at every end id, `hire generate --chat`, and `hire chat` as a subprocess
reading a pipe."""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from click.testing import CliRunner
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers.utils.chat_template_utils import render_jinja_template

from cluster import launch
from cluster.bench_serving import free_port
from cluster.config import ServeConfig
from cluster.openai_api import ChatRequest, to_generate
from hire.chat import ChatError, ChatTemplate, chat_prompt
from hire.checkpoint import convert, load_model, resolve_model
from hire.cli import main
from hire.engine import Engine
from hire.formats import CheckpointError
from hire.generate import generate
from hire.registry import REPO
from hire.request import Completion, encode_prompt
from hire.sampling import SamplingParams

# ChatML, as SmolLM2 and Qwen write it: a default system message when the conversation has none.
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Gemma's shape: BOS written by the template, the system prompt folded into the first user turn, "model" for the
# assistant, roles that must alternate.
GEMMA = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first = messages[0]['content'] + '\n\n' -%}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {%- set first = '' -%}
    {%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + message['content'] | trim }}<end_of_turn>
{% endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}"""
CONVERSATION = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi there "},
                {"role": "assistant", "content": "Hello! ü"}, {"role": "user", "content": "What is 2+2?"}]
SHIPPED = REPO / "models" / "stdlib-9m"  # a small shipped model with a Hugging Face tokenizer
GREEDY = dict(temperature=0.0)
QUESTION = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "import os"}]


def transformers_render(template: str, messages: list[dict], **tokens: str) -> str:
    return render_jinja_template([messages], chat_template=template, add_generation_prompt=True, **tokens)[0][0]


@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:], CONVERSATION[1:2]])
def test_chatml_renders_as_transformers(messages):
    ours = ChatTemplate(CHATML, "<|im_start|>", "<|im_end|>").render(messages)
    assert ours == transformers_render(CHATML, messages)
    assert ours.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert ours.startswith("<|im_start|>system\n" + ("Answer briefly." if len(messages) == 4 else "You are a help"))


@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:]])
def test_gemma_style_renders_as_transformers(messages):
    ours = ChatTemplate(GEMMA, "<bos>", "<eos>").render(messages)
    assert ours == transformers_render(GEMMA, messages, bos_token="<bos>", eos_token="<eos>")
    first = "Answer briefly.\n\nHi there" if len(messages) == 4 else "Hi there"
    assert ours == (f"<bos><start_of_turn>user\n{first}<end_of_turn>\n<start_of_turn>model\nHello! ü<end_of_turn>\n"
                    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n")


def test_content_parts_and_refusals():
    template = ChatTemplate(GEMMA, "<bos>")
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    assert template.render(parts) == template.render([{"role": "user", "content": "Hi there"}])
    refused = {
        "roles must alternate": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        "messages[0].content[1] is not a text part": [{"role": "user", "content": [
            {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}]}],
        "messages[1].role is 'robot'": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}],
        "at least one message": [],
    }
    for why, messages in refused.items():
        with pytest.raises(ChatError, match=rf"^messages: .*{re.escape(why)}"):
            template.render(messages)
    # a template that fails on the messages it is given: the request's fault (400), not the server's
    with pytest.raises(ChatError, match="^messages: .*has no attribute .nothing."):
        ChatTemplate("{{ messages[0].content.nothing.deeper }}").render([{"role": "user", "content": "a"}])


def test_plain_format_without_a_template():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert chat_prompt(None, messages) == "system: Be brief.\nuser: Hi\nassistant:"
    body = ChatRequest(model="m", messages=messages)
    assert to_generate(body, "m", []).text == "system: Be brief.\nuser: Hi\nassistant:"
    assert to_generate(body, "m", [], ChatTemplate(CHATML)).text == ChatTemplate(CHATML).render(messages)


def hf_folder(folder: Path, template_files: dict[str, str], generation_eos=None) -> Path:
    """A tiny random Llama in a Hugging Face folder whose vocabulary has ChatML's special tokens (158, 159)."""
    import torch
    import transformers as hf

    torch.manual_seed(0)
    hf.LlamaForCausalLM(hf.LlamaConfig(vocab_size=160, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, bos_token_id=158, eos_token_id=0)).save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(158)} | {"<|im_start|>": 158, "<|im_end|>": 159}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
    for name, text in template_files.items():
        (folder / name).write_text(text)
    return folder


def test_hugging_face_templates_and_end_ids(tmp_path):
    # the template's <|im_end|> is special in the vocabulary: it ends generation besides config.json's EOS (0)
    as_string = hf_folder(tmp_path / "a", {"tokenizer_config.json": json.dumps({"chat_template": CHATML})})
    tok = load_model(as_string).tokenizer
    assert tok.chat_template == CHATML and tok.end_ids == (0, 159)
    assert ChatTemplate.of(tok) == ChatTemplate(CHATML, "<|im_start|>", "t0")
    # a list of named templates (the "default" one), generation_config's eos list, tokenizer_config's eos_token
    named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": GEMMA}]
    listed = hf_folder(tmp_path / "b", {"tokenizer_config.json": json.dumps(
        {"chat_template": named, "eos_token": {"content": "t7"}})}, generation_eos=[0, 5, 999])
    tok = load_model(listed).tokenizer
    assert tok.chat_template == GEMMA and tok.end_ids == (0, 5, 7)  # 999 is outside the vocabulary
    # chat_template.jinja comes first; hire convert keeps the template and the end ids
    jinja = hf_folder(tmp_path / "c", {"chat_template.jinja": CHATML, "tokenizer_config.json": json.dumps(
        {"chat_template": GEMMA})}, generation_eos=3)
    convert(jinja, tmp_path / "hire")
    tok = load_model(tmp_path / "hire").tokenizer
    assert (tmp_path / "hire" / "chat_template.jinja").read_text() == CHATML
    assert tok.chat_template == CHATML and tok.end_ids == (0, 3, 159)
    meta = json.loads((tmp_path / "hire" / "tokenizer_meta.json").read_text())  # the template in the meta file
    (tmp_path / "hire" / "chat_template.jinja").unlink()
    (tmp_path / "hire" / "tokenizer_meta.json").write_text(json.dumps({**meta, "chat_template": GEMMA}))
    assert load_model(tmp_path / "hire").tokenizer.chat_template == GEMMA
    bad = hf_folder(tmp_path / "d", {"chat_template.jinja": "{% for m in messages %}{{ m }"})
    with pytest.raises(CheckpointError, match=r"chat_template.jinja: the chat template does not parse"):
        load_model(bad)


def test_the_templates_bos_is_not_doubled(tmp_path):
    folder = hf_folder(tmp_path / "m", {"chat_template.jinja": "{{ bos_token }}" + CHATML})
    engine = Engine(load_model(folder), slots=1, max_len=64)
    ids = encode_prompt(engine, ChatTemplate.of(engine.tokenizer).render([{"role": "user", "content": "t5"}]))
    assert ids[:3] == [158, 158, 1] and ids.count(158) == 4  # the template's BOS, then <|im_start|>system ...
    engine.tokenizer.add_bos = True  # a tokenizer that adds BOS adds none before the template's
    bos_first = ChatTemplate(GEMMA, "<|im_start|>").render([{"role": "user", "content": "t5"}])
    assert encode_prompt(engine, bos_first)[:2] != [158, 158]
    assert encode_prompt(engine, "t5") == [158, 5]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """stdlib-9m with a ChatML template."""
    folder = tmp_path_factory.mktemp("chat") / "stdlib-9m"
    shutil.copytree(SHIPPED, folder, ignore=shutil.ignore_patterns("hire_predictors*"))  # served as loaded
    (folder / "chat_template.jinja").write_text(CHATML)
    return folder


@functools.cache
def engine_of(folder: Path) -> Engine:
    return Engine(load_model(folder), slots=1)


def answers(folder: Path, conversation: list[dict], max_tokens: int, **params) -> Completion:
    """The greedy answer to `conversation` by the model in `folder`, in-process."""
    engine = engine_of(folder)
    prompt = ChatTemplate.of(engine.tokenizer).render(conversation)
    return generate(engine, [prompt], SamplingParams(max_tokens=max_tokens, **GREEDY, **params))[0]


@pytest.fixture(scope="module")
def ended(chat_model, tmp_path_factory) -> tuple[Path, list[int], int]:
    """stdlib-9m with the Gemma-style template and an end id (tokenizer_meta.json's end_ids, as hire convert writes
    them): the token its greedy answer to QUESTION produces at position k; that answer's tokens, and k."""
    folder = tmp_path_factory.mktemp("ended") / "stdlib-9m"
    shutil.copytree(chat_model, folder)
    (folder / "chat_template.jinja").write_text(GEMMA)
    engine = Engine(load_model(folder), slots=1)  # not engine_of's: that one loads the end id written below
    prompt = ChatTemplate.of(engine.tokenizer).render(QUESTION)
    free = generate(engine, [prompt], SamplingParams(max_tokens=24, ignore_eos=True, **GREEDY))[0].tokens
    k = next(i for i in range(2, 24) if free[i] not in free[:i])
    assert 2 not in free[:k]
    meta = json.loads((folder / "tokenizer_meta.json").read_text())
    (folder / "tokenizer_meta.json").write_text(json.dumps({**meta, "end_ids": [2, free[k]]}))
    return folder, free, k


def test_generation_stops_at_every_end_id(ended):
    folder, free, k = ended
    stopped, past = answers(folder, QUESTION, 24), answers(folder, QUESTION, 24, ignore_eos=True)
    assert stopped.finish_reason == "stop" and stopped.tokens == free[:k] and past.tokens == free


@pytest.fixture(scope="module")
def server(ended):
    """hire serve's application on a local Ray, serving the `ended` model; its OpenAI base URL."""
    http = free_port()
    launch.start(ServeConfig(model=str(ended[0]), slots=2, max_len=256, http_port=http, grpc_port=free_port(),
                             num_cpus=2))
    yield f"http://127.0.0.1:{http}/v1"
    launch.stop()


def test_served_chat_applies_the_template_and_stops_at_its_end(ended, server):
    folder, free, k = ended
    expected = answers(folder, QUESTION, 24)
    client = openai.OpenAI(base_url=server, api_key="unused", max_retries=0)
    r = client.chat.completions.create(model="stdlib-9m", messages=QUESTION, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == expected.text and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == k == len(expected.tokens)
    assert r.usage.prompt_tokens == len(expected.prompt_tokens)
    assert expected.prompt_tokens[:2] == [1, 30]  # the template's own <bos>, not a second one
    refused = {"roles must alternate": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
               "not a text part": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    for why, messages in refused.items():
        with pytest.raises(openai.BadRequestError, match=why) as e:
            client.chat.completions.create(model="stdlib-9m", messages=messages, max_tokens=4)
        assert e.value.status_code == 400 and e.value.body["param"] == "messages"
    again = client.chat.completions.create(model="stdlib-9m", messages=QUESTION, max_tokens=24, temperature=0)
    assert again.choices[0].message.content == r.choices[0].message.content  # still serving


def test_generate_chat(chat_model):
    expected = answers(chat_model, [{"role": "user", "content": "import os"}], 10)
    result = CliRunner().invoke(main, ["generate", "--model", str(chat_model), "--chat", "--prompt", "import os",
                                       "--temperature", "0", "--max-tokens", "10"], catch_exceptions=False)
    assert result.exit_code == 0 and result.stdout == expected.text + "\n"


def test_hire_chat_reads_a_pipe(chat_model):
    """`hire chat` as a user runs it, its stdin a pipe: history kept, /reset forgets it but the system prompt,
    /exit ends before the last line."""
    system = {"role": "system", "content": "You write Python."}
    u1, u2 = {"role": "user", "content": "def parse(argv):"}, {"role": "user", "content": "import os"}
    a1 = answers(chat_model, [system, u1], 12).text
    a2 = answers(chat_model, [system, u1, {"role": "assistant", "content": a1}, u2], 12).text
    a3 = answers(chat_model, [system, u2], 12).text
    assert a2 != a3  # the history matters
    stdin = f"{u1['content']}\n{u2['content']}\n\n/reset\n{u2['content']}\n/exit\nnever read\n"
    done = hire_chat(stdin, "--model", str(chat_model), "--system", system["content"], "--max-tokens", "12")
    assert done.stdout == f"{a1}\n{a2}\n{a3}\n"
    assert "[conversation reset]" in done.stderr and done.stderr.count("tokens/s") == 3


def hire_chat(stdin: str, *args: str) -> subprocess.CompletedProcess:
    """`hire chat ARGS`, greedy, in its own process with `stdin` piped in; it must succeed."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", "from hire.cli import main; main()", "chat", "--temperature", "0",
                           *args], input=stdin, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    return done


def test_hire_chat_with_smollm2():
    """The real instruct model by name (pulled through hire's registry on first use): its ChatML template from
    the GGUF file, answers that end at <|im_end|> (its EOS, id 2), and a second question that needs the first."""
    resolve_model("smollm2-135m-instruct")
    done = hire_chat("What is the capital of France?\nAnd of Germany?\n", "--model", "smollm2-135m-instruct",
                     "--max-tokens", "30")
    france, germany = done.stdout.splitlines()
    assert "Paris" in france and "Berlin" in germany and "Germany" in germany
    assert done.stderr.count("finish: stop") == 2
