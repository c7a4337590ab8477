"""Inputs of smollm2-135m-instruct-draft's recipe (configs/smollm2-135m-instruct-draft.toml), from the repository root:

    python scripts/draft_data.py

- out/draft-data: the training text, this repository's English and Python text and the Python standard library's
  source (hire.data's stdlib corpus), one document per file (data.source, pattern "*.txt"); docs/cluster.md is the
  validation document and the text the draft's speed is benchmarked on.
- out/tokenizer-smollm2.json: the large model's tokenizer (tokenizer.path).
- out/smollm2-draft-init: the recipe's `init`, fresh weights of the draft's shape (read from the recipe) except
  the tied embedding table: the large model's, projected on its top singular directions (U_d S_d of its SVD) and
  scaled to the fresh table's standard deviation, so every token starts where the large model puts it.
"""
from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import numpy as np

from hire.bpe import open_bpe
from hire.checkpoint import load_model
from hire.formats.native import save_native
from hire.data import stdlib_files
from hire.model import init_params
from hire.train_config import load_config

RECIPE, LARGE = "configs/smollm2-135m-instruct-draft.toml", "smollm2-135m-instruct"
REPO = ["README.md", "docs/*.md", "models/*/README.md", "tests/data/tinyshakespeare.txt", "hire/*.py",
        "cluster/*.py", "workers/*.py", "tests/*.py"]


def main() -> None:
    cfg, out = load_config(RECIPE), Path("out")
    root, stdlib = Path(__file__).resolve().parent.parent, Path(sysconfig.get_paths()["stdlib"])
    sources = [(p, "repo/" + p.relative_to(root).as_posix()) for pattern in REPO for p in sorted(root.glob(pattern))]
    sources += [(p, "stdlib/" + p.relative_to(stdlib).as_posix()) for p in stdlib_files()]
    for path, name in sources:
        (Path(cfg.data.source) / f"{name}.txt").parent.mkdir(parents=True, exist_ok=True)
        (Path(cfg.data.source) / f"{name}.txt").write_text(path.read_text(encoding="utf-8", errors="replace"))
    large = load_model(LARGE, dtype="float32", quantize="none")
    shutil.copyfile(large.tokenizer.path, cfg.tokenizer.path)
    table = np.asarray(large.variables["params"]["embed"], np.float32)
    u, s, _ = np.linalg.svd(table, full_matrices=False)
    variables = init_params(cfg.model, cfg.seed)
    fresh = np.asarray(variables["params"]["embed"])
    projected = u[:, : cfg.model.dim] * s[: cfg.model.dim]
    variables["params"]["embed"] = projected * (fresh.std() / projected.std())
    save_native(out / "smollm2-draft-init", cfg.model, variables, open_bpe(cfg.tokenizer.path))
    print(f"{len(sources)} files to {cfg.data.source}; {cfg.tokenizer.path}; {out / 'smollm2-draft-init'}")


if __name__ == "__main__":
    main()
