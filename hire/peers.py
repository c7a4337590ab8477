"""hire beside its peers: llama.cpp and transformers decoding the same GGUF file at the same precision.

llama.cpp is built once from the llama-cpp-python source distribution on the package index (it vendors
llama.cpp) into hire's cache; it is a yardstick here, never a dependency of hire. Every engine runs in its own
process, one at a time, interleaved round by round so that the machine's drift hits each alike; the table
holds medians over the rounds and ratios of the medians.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import click

from hire.checkpoint import resolve_model
from hire.config import OptionError

LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python release whose vendored llama.cpp is built
TARGETS = ("llama-bench", "llama-batched-bench", "llama-quantize")
# precision -> (llama.cpp file type, hire's loading flags)
PRECISIONS = {
    "f32": ("F32", ["--quantize", "none", "--dtype", "float32"]),
    "int8": ("Q8_0", ["--quantize", "int8"]),
    "int4": ("Q4_1", ["--quantize", "int4"]),
}


def cache_dir() -> Path:
    return Path(os.environ.get("HIRE_CACHE", "~/.cache/hire")).expanduser() / "llama.cpp" / LLAMA_CPP_PYTHON


def log(message: str) -> None:
    click.echo(message, err=True)


def build_llamacpp() -> Path:
    """The folder of llama.cpp's built tools, building them first if they are missing (10-20 min on 2 cores)."""
    root = cache_dir()
    bin_dir = root / "build" / "bin"
    if all((bin_dir / t).is_file() for t in TARGETS):
        return bin_dir
    source = root / "src"
    if not (source / "CMakeLists.txt").is_file():
        log(f"fetching llama-cpp-python {LLAMA_CPP_PYTHON}'s source distribution (it vendors llama.cpp)")
        with tempfile.TemporaryDirectory() as tmp:
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp,
                  f"llama-cpp-python=={LLAMA_CPP_PYTHON}"])
            sdist = next(Path(tmp).glob("*.tar.gz"))
            with tarfile.open(sdist) as tar:
                tar.extractall(tmp, filter="data")
            vendored = next(Path(tmp).glob("*/vendor/llama.cpp"))
            source.parent.mkdir(parents=True, exist_ok=True)
            vendored.rename(source)
    log(f"building {', '.join(TARGETS)} in {root / 'build'} (10-20 minutes on 2 cores; once)")
    _run(["cmake", "-S", str(source), "-B", str(root / "build"), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
          "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF"])
    _run(["cmake", "--build", str(root / "build"), "-j", str(os.cpu_count() or 2), "--target", *TARGETS])
    return bin_dir


def _run(cmd: list[str], **kw: Any) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise click.ClickException(f"{Path(cmd[0]).name} failed ({done.returncode}): " + " | ".join(tail))
    return done.stdout


def peer_file(bin_dir: Path, gguf: Path, file_type: str) -> Path:
    """`gguf` at llama.cpp's `file_type` (F32, Q8_0, Q4_1): the file itself when it is of that type, else made once
    with llama-quantize into the cache."""
    import gguf as ggml

    field = ggml.GGUFReader(gguf).fields.get("general.file_type")
    if field is not None and ggml.LlamaFileType(field.contents()).name in (f"ALL_{file_type}", f"MOSTLY_{file_type}"):
        return gguf
    out = cache_dir() / "files" / f"{gguf.parent.name}.{gguf.stem}.{file_type}.gguf"  # pulled files are all model.gguf
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        log(f"llama-quantize {gguf.name} -> {out.name}")
        _run([str(bin_dir / "llama-quantize"), "--allow-requantize", str(gguf), str(out.with_suffix(".tmp")),
              file_type])
        out.with_suffix(".tmp").rename(out)
    return out


def llamacpp_decode(bin_dir: Path, file: Path, batches: list[int], steps: int, prompt_len: int,
                    threads: int) -> dict[int, float]:
    """Aggregate decode tokens/s per batch size, from llama-batched-bench (each sequence its own prompt)."""
    out = _run([str(bin_dir / "llama-batched-bench"), "-m", str(file), "-c", str(max(batches) * (prompt_len + steps)),
                "-npp", str(prompt_len), "-ntg", str(steps), "-npl", ",".join(map(str, batches)),
                "-t", str(threads), "--output-format", "jsonl"])
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {r["pl"]: r["speed_tg"] for r in rows}


def llamacpp_prefill(bin_dir: Path, file: Path, prompt_len: int, threads: int) -> float:
    out = _run([str(bin_dir / "llama-bench"), "-m", str(file), "-p", str(prompt_len), "-n", "0", "-r", "3",
                "-t", str(threads), "-o", "json"])
    return json.loads(out)[0]["avg_ts"]


def hire_decode(model: str, flags: list[str], batches: list[int], steps: int, prompt_len: int,
                prefill_len: int) -> tuple[dict[int, float], float | None, list[dict]]:
    """hire bench decode in a process of its own: tokens/s per batch, prefill tokens/s, and its JSON rows."""
    cmd = [sys.executable, "-m", "hire.cli", "bench", "decode", "--model", model, *flags, "--steps", str(steps),
           "--prompt-len", str(prompt_len), "--repeats", "3", *(a for b in batches for a in ("--batch", str(b)))]
    rows = [json.loads(line) for line in _run(cmd).splitlines() if line.startswith("{")]
    prefill = None
    if prefill_len:
        cmd = [*cmd[:cmd.index("--steps")], "--steps", "1", "--prompt-len", str(prefill_len), "--repeats", "3",
               "--batch", "1"]
        prefill = json.loads(_run(cmd).splitlines()[-1]).get("prefill_tokens_per_s")
    return {r["batch"]: r["tokens_per_s"] for r in rows}, prefill, rows


TRANSFORMERS_SNIPPET = """
import json, sys, time, torch
from pathlib import Path
from transformers import AutoModelForCausalLM
torch.set_num_threads(int(sys.argv[5]))
path = Path(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
steps, prompt_len = int(sys.argv[3]), int(sys.argv[4])
out = {}
for batch in map(int, sys.argv[2].split(",")):
    ids = torch.randint(10, 1000, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    model.generate(ids, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})
    with torch.inference_mode():
        start = time.perf_counter(); model.generate(ids, **kw); seconds = time.perf_counter() - start
        start = time.perf_counter(); model(ids[:, :1]); first = time.perf_counter() - start
    out[batch] = batch * steps / max(seconds - first, 1e-9)
print(json.dumps(out))
"""


def transformers_decode(gguf: Path, batches: list[int], steps: int, prompt_len: int, threads: int) -> dict[int, float]:
    """transformers' generate at float32 on the dequantized GGUF: decode tokens/s per batch (prefill excluded)."""
    out = _run([sys.executable, "-c", TRANSFORMERS_SNIPPET, str(gguf), ",".join(map(str, batches)), str(steps),
                str(prompt_len), str(threads)])
    return {int(k): v for k, v in json.loads(out.splitlines()[-1]).items()}


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def bench_peers(model: str, precisions: list[str], batches: list[int], steps: int, prompt_len: int,
                prefill_len: int, rounds: int, threads: int, with_transformers: bool) -> dict[str, Any]:
    """Interleaved rounds of hire, llama.cpp (and transformers at f32) on the GGUF file of `model` (a pulled name or a
    .gguf file); medians and ratios per precision/batch."""
    path = resolve_model(model)
    gguf = path if path.suffix == ".gguf" else next(path.glob("*.gguf"), None)
    if gguf is None:
        raise OptionError(f"{path} holds no .gguf file", "--model")
    bin_dir = build_llamacpp()
    files = {p: peer_file(bin_dir, gguf, PRECISIONS[p][0]) for p in precisions}
    samples: dict[tuple[str, str, int | str], list[float]] = {}
    loads = [load_average()]

    def add(engine: str, precision: str, values: dict) -> None:
        for key, value in values.items():
            if value is not None:
                samples.setdefault((engine, precision, key), []).append(value)

    for r in range(rounds):
        for p in precisions:
            log(f"round {r + 1}/{rounds}, {p}: hire, llama.cpp" + (", transformers" if with_transformers and
                                                                    p == "f32" else ""))
            tps, prefill, hire_rows = hire_decode(model, PRECISIONS[p][1], batches, steps, prompt_len, prefill_len)
            add("hire", p, tps | {"prefill": prefill})
            add("hire_floor", p, {r["batch"]: r["ratio_to_floor"] for r in hire_rows})
            add("llama.cpp", p, llamacpp_decode(bin_dir, files[p], batches, steps, prompt_len, threads)
                | ({"prefill": llamacpp_prefill(bin_dir, files[p], prefill_len, threads)} if prefill_len else {}))
            if with_transformers and p == "f32":
                add("transformers", p, transformers_decode(gguf, batches, steps, prompt_len, threads))
            loads.append(load_average())
    rows = []

    def median(engine: str, precision: str, key: Any, digits: int = 1) -> float | None:
        values = samples.get((engine, precision, key))
        return round(statistics.median(values), digits) if values else None

    for p in precisions:
        for key in [*batches, *(["prefill"] if prefill_len else [])]:
            row = {"precision": p, "llama.cpp_type": PRECISIONS[p][0], "batch": key,
                   "hire": median("hire", p, key), "llama.cpp": median("llama.cpp", p, key),
                   "transformers": median("transformers", p, key),
                   "hire_ratio_to_floor": median("hire_floor", p, key, 3)}
            row["hire/llama.cpp"] = row["hire"] and row["llama.cpp"] and round(row["hire"] / row["llama.cpp"], 3)
            row["hire/transformers"] = row["hire"] and row["transformers"] and round(
                row["hire"] / row["transformers"], 3)
            rows.append(row)
    return {"model": model, "gguf": gguf.name, "steps": steps, "prompt_len": prompt_len, "prefill_len": prefill_len,
            "rounds": rounds, "threads": threads, "load_average": loads, "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    """The table as docs/benchmarks.md holds it (tokens/s; 'prefill' rows are a prompt of prefill_len tokens;
    hire's ratio_to_floor as hire bench decode measures it, the floor counting the bytes its precision reads)."""
    lines = ["| precision | llama.cpp file | batch | hire | llama.cpp | hire / llama.cpp | transformers "
             "| hire / transformers | hire ratio_to_floor |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cells = [r["precision"], r["llama.cpp_type"], r["batch"], r["hire"], r["llama.cpp"], r["hire/llama.cpp"],
                 r["transformers"], r["hire/transformers"], r["hire_ratio_to_floor"]]
        lines.append("| " + " | ".join("—" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines)
