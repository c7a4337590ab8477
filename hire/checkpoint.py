"""Find a model by name or path, load it whatever its format, and convert it to hire's own.

Formats, told apart by the folder's content: hire's (config.json with "format": "hire"),
Hugging Face's (config.json with "model_type"), GGUF (a .gguf file) and llama2.c's (a model .bin and a
tokenizer .bin). A name of hire.registry that is not here yet is pulled on first use.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hire.config import ModelConfig, OptionError
from hire.formats import CheckpointError, read_json
from hire.loaded import LoadedModel
from hire.predictor_files import exact_settings, with_predictors
from hire.registry import REGISTRY, model_dirs, pull

DEFAULT_MODEL = "smollm2-135m-instruct"  # what --model means when left out (pulled on first use: hire.registry)
HALF_ON_CPU = ("on the CPU, XLA converts every 16-bit weight matrix to float32 before each product, so {} decodes "
               "slower than float32 (docs/benchmarks.md): for smaller weights use --quantize int8 (integer products, "
               "within 0.6% of float32's perplexity: docs/models.md), else --dtype float32")


def resolve_model(name_or_path: str | Path) -> Path:
    """An existing path as is (symlinks resolved), else a bare name found in model_dirs(), else a name of
    hire.registry, pulled now (it says so on stderr)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path.resolve()
    if len(path.parts) == 1:
        for d in model_dirs():
            if (d / path).exists():
                return (d / path).resolve()
        if str(path) in REGISTRY:
            return pull(str(path))
        raise CheckpointError(f"no model {str(name_or_path)!r}: not a path, nor a name in "
                              + ", ".join(map(str, model_dirs())))
    raise CheckpointError(f"no such model path: {path}")


def model_folder(name_or_path: str | Path) -> Path:
    """The folder a model (a name under models/ or a path) keeps its config and predictors in."""
    path = resolve_model(name_or_path)
    return path if path.is_dir() else path.parent


def detect_format(path: Path) -> str:
    """"hire", "hf", "gguf", "llama2c" or "tandem" (a tandem small model, hire.tandem), for an existing model path."""
    config = path / "config.json"
    if config.is_file():
        raw = read_json(config)
        if raw.get("format") == "hire":
            return "hire"
        if raw.get("format") == "hire-tandem":
            return "tandem"
        if "model_type" in raw:
            return "hf"
        raise CheckpointError(f"{config} has neither \"format\": \"hire\" nor a Hugging Face \"model_type\"")
    if _is_gguf(path) if path.is_file() else any(path.glob("*.gguf")):
        return "gguf"
    if path.is_file() or any(path.glob("*.bin")):
        return "llama2c"
    raise CheckpointError(f"{path}: no config.json (hire or Hugging Face), no .gguf and no llama2.c .bin; "
                          "cannot tell what model this is")


def available_models() -> list[tuple[str, str, str]]:
    """`hire models`: the models a name can mean here (in hire.registry.model_dirs, as (name, format, path)) and the
    ones hire.registry can pull (as (name, "pull", what it is))."""
    found: dict[str, tuple[str, str, str]] = {}
    for folder in model_dirs():
        for path in sorted(folder.iterdir()) if folder.is_dir() else ():
            try:
                kind = detect_format(path)
            except (CheckpointError, OSError):
                continue
            if not path.name.startswith(".") and path.name not in found and (path.is_dir() or kind == "gguf"):
                found[path.name] = (path.name, kind, str(path))
    return [*found.values(), *((name, "pull", f"{entry.description}; {entry.size / 1e6:.0f} MB; {entry.license} "
                                              f"(hire pull {name})") for name, entry in REGISTRY.items()
                                if name not in found)]


def _is_gguf(file: Path) -> bool:
    """Whether `file` is named .gguf or starts with GGUF's magic."""
    with open(file, "rb") as f:
        return file.suffix == ".gguf" or f.read(4) == b"GGUF"


def load_model(path: str | Path, dtype: str | None = None, quantize: str | None = None, **hire: Any) -> LoadedModel:
    """Load a model by name or path; `dtype` ("float32", "bfloat16", "float16") overrides the stored one, `quantize`
    ("none", "int8", "int4") the stored weights' quantization (hire.quant; "none" dequantizes).

    `hire` overrides the config's HiRE fields (e.g. softmax="hire-lr", ffn="group-sparse"); a config that
    asks for HiRE runs with the predictors saved beside the checkpoint (hire.predictor_files).
    """
    path = resolve_model(path)
    fmt = detect_format(path)
    if fmt == "tandem":
        raise CheckpointError(f"{path} is a tandem model: it drafts for its large model (see hire.tandem."
                              "load_tandem and `hire generate --draft`), it does not run alone")
    if fmt == "hire":
        from hire.formats.native import load_native as load
    elif fmt == "hf":
        from hire.formats.hf import load_hf as load
    elif fmt == "gguf":
        from hire.formats.gguf import load_gguf as load
    else:
        from hire.formats.llama2c import load_llama2c as load
    if fmt == "gguf":  # kept quantized as the file has it, or converted block by block
        model = load(path, dtype, quantize)
    else:
        model = load(path, dtype)
        if quantize is not None:
            model = quantized(model, quantize)
    cfg = with_hire(model.cfg, hire)
    if not cfg.sparse:
        return LoadedModel(cfg, model.variables, model.tokenizer) if hire else model
    dense = LoadedModel(cfg.dense(), model.variables, model.tokenizer)
    return with_predictors(dense, path if path.is_dir() else path.parent, cfg)


def load(model: str | Path, dtype: str | None = None, hire: dict[str, Any] | None = None,
         quantize: str | None = None) -> LoadedModel:
    """load_model for a command: a bad `hire` (hire.config.hire_overrides) or `quantize` is an OptionError naming
    its option, a 16-bit dtype on the CPU is refused (HALF_ON_CPU), and a model stored so is warned about."""
    import jax

    cpu = jax.default_backend() == "cpu"
    if cpu and dtype in ("bfloat16", "float16"):
        raise OptionError(HALF_ON_CPU.format(dtype), "--dtype")
    try:
        loaded = load_model(model, dtype=dtype, quantize=quantize, **(hire or {}))
    except CheckpointError:
        raise
    except ValueError as e:
        raise OptionError(str(e), "--quantize" if quantize and "quantize" in str(e) else "--softmax/--ffn/--hire") \
            from None
    if cpu and loaded.cfg.dtype != "float32":
        print(f"warning: {loaded.cfg.name} is stored in {loaded.cfg.dtype}; {HALF_ON_CPU.format('it')}",
              file=sys.stderr)
    return loaded


def load_with_adapters(model: str | Path, dtype: str | None, loras: tuple[str, ...], hire: dict[str, Any] | None = None,
                       quantize: str | None = None) -> tuple[LoadedModel, dict[str, int]]:
    """`load`, with the `--lora NAME=PATH` adapters `loras` loaded (hire.lora), and each adapter name's index."""
    from hire.lora import load_adapters

    loaded = load(model, dtype, hire, quantize)
    if not loras:
        return loaded, {}
    pairs = [spec.split("=", 1) for spec in loras]
    if any(len(p) != 2 or not all(p) for p in pairs):
        raise OptionError("expected NAME=PATH", "--lora")
    return load_adapters(loaded, dict(pairs))


def exact(model: str | Path) -> dict[str, str]:
    """The overrides that run `model` exactly, with no predictor (hire.predictor_files.exact_settings)."""
    return exact_settings(model_folder(model))


def quantized(model: LoadedModel, kind: str) -> LoadedModel:
    """`model` with its Linear kernels quantized to `kind` (hire.quant) and its embedding to `kind` too, or int8 beside
    int4 (quant.EMBED_BESIDE); "none" dequantizes."""
    from hire import quant
    from hire.formats import prepare_variables

    embed = quant.EMBED_BESIDE.get(kind, "")
    if kind == model.cfg.quantize and (embed or kind) == model.cfg.embed_quantize:
        return model
    cfg = model.cfg.replace(quantize=kind, quantize_embed=embed)
    params = quant.quantize_params(model.variables["params"], kind, embed or None)
    return LoadedModel(cfg, prepare_variables(cfg, {**model.variables, "params": params}), model.tokenizer)


def with_hire(cfg: ModelConfig, hire: dict[str, Any]) -> ModelConfig:
    """`cfg` with the HiRE overrides `hire` (ModelConfig fields)."""
    if cfg.ffn == "group-topk" and hire.get("ffn") == "group-sparse":
        hire = {"ffn_keep_k": True, **hire}  # trained on its top ffn_k groups: of the candidates, keep those
    return cfg.replace(**hire) if hire else cfg


def convert(src: str | Path, dst: str | Path, dtype: str | None = None, quantize: str | None = None) -> LoadedModel:
    """Load `src` in any format and save it to the folder `dst` in hire's format (quantized as `quantize` says)."""
    from hire.formats.native import save_native

    model = load_model(src, dtype, quantize)
    save_native(dst, model.cfg, model.variables, model.tokenizer)
    return model
