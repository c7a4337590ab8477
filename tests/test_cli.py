"""The `hire` command line, run in-process with click's runner."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from hire.checkpoint import load_model
from hire.cli import main

STORIES = Path(__file__).resolve().parent / "data" / "stories260K"
LILY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


@pytest.fixture
def run():
    def invoke(*args: str):
        return CliRunner().invoke(main, list(args), catch_exceptions=False)
    return invoke


def test_generate_named_model_greedy(run):
    result = run("generate", "--model", "stories260K", "--prompt", "Once upon a time", "--max-tokens", "30",
                 "--temperature", "0")
    assert result.exit_code == 0 and result.stdout.startswith(LILY)


def test_generate_seeded_sampling_repeats(run):
    args = ("generate", "--model", "stories260K", "--prompt", "The dog", "--max-tokens", "20", "--temperature", "1",
            "--seed", "5")
    first, second = run(*args), run(*args)
    assert first.exit_code == 0 and first.stdout == second.stdout


def test_generate_stop_string(run):
    result = run("generate", "--model", "stories260K", "--prompt", "Once upon a time", "--temperature", "0",
                 "--stop", "Lily")
    assert result.exit_code == 0 and result.stdout == "Once upon a time, there was a little girl named \n"


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model"], "no such model"),
    (["--prompt", ""], "empty prompt"),
    (["--top-p", "0"], "top-p"),
    (["--adapter", "x"], "no adapter 'x'"),
    (["--lora", "oops"], "NAME=PATH"),
    (["--dtype", "bfloat16"], "--quantize int8"),  # slower than float32 on the CPU
])
def test_generate_bad_input_is_named(run, args, message):
    result = CliRunner().invoke(main, ["generate", "--model", "stories260K", "--prompt", "hi", *args])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


def test_convert_then_generate(run, tmp_path):
    out = tmp_path / "converted"
    assert run("convert", str(STORIES), str(out)).exit_code == 0
    result = run("generate", "--model", str(out), "--prompt", "Once upon a time", "--max-tokens", "30",
                 "--temperature", "0")
    assert result.stdout.startswith(LILY)


def test_model_stored_in_bfloat16_is_warned_about_on_cpu(run, tmp_path):
    out = tmp_path / "half"
    assert run("convert", str(STORIES), str(out), "--dtype", "bfloat16").exit_code == 0
    result = run("generate", "--model", str(out), "--prompt", "Once upon a time", "--max-tokens", "4")
    assert result.exit_code == 0 and "stored in bfloat16" in result.stderr and "--quantize int8" in result.stderr


def test_bench_decode_prints_one_json_per_batch(run):
    result = run("bench", "decode", "--model", "stories260K", "--batch", "1", "--batch", "4", "--steps", "8",
                 "--repeats", "1")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["batch"] for r in rows] == [1, 4]
    for r in rows:
        assert {"model", "tokens_per_s", "ms_per_token", "weight_bytes", "bandwidth_gbps", "floor_ms_per_token",
                "ratio_to_floor"} <= set(r) and r["tokens_per_s"] > 0 and r["ratio_to_floor"] > 0


def test_default_model_is_hires_own(run):
    result = run("generate", "--prompt", "import os\n", "--max-tokens", "8", "--temperature", "0", "--ignore-eos")
    assert result.exit_code == 0 and result.stdout.startswith("import os\n") and len(result.stdout) > 12
    assert load_model("stdlib-9m").cfg.vocab_size == 16384
