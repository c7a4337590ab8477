"""Loading hire's C++ kernels for XLA's CPU backend (hire/csrc, built by setup.py): hire._qmatmul (hire.quant) and
hire._scores (hire.predictors). Each picks its int8 product at run time: AVX-512 VNNI where the CPU has it, unless
HIRE_KERNELS=avx2 at import; its vnni(False) switches to the AVX2 loops (the results are the same)."""
from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import jax


def load(name: str, abi: int, targets: dict[str, str]) -> ModuleType | None:
    """Import hire.`name` and register its handlers with XLA for the CPU (`targets`: target name -> module attribute);
    None where it was not built, was built from other sources (its `abi`, the handlers' calling convention, is not
    `abi`: warned), or this CPU lacks the instructions it needs."""
    try:
        module = importlib.import_module(f"hire.{name}")
    except ImportError:
        return None
    if getattr(module, "abi", 1) != abi:
        warnings.warn(f"hire.{name} is out of date (built from older sources), so hire does without it (slower); "
                      "python setup.py build_ext --inplace rebuilds it", stacklevel=2)
        return None
    if not module.supported:
        return None
    for target, attr in targets.items():
        jax.ffi.register_ffi_target(target, getattr(module, attr), platform="cpu")
    return module
