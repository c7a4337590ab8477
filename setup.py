"""hire's compiled parts, kernels for XLA's CPU backend: hire._qmatmul, the quantized matmul (hire/csrc/qmatmul.cc, used
by hire.quant), and hire._scores, HiRE-Q's int8 score product (hire/csrc/scores.cc, used by hire.predictors).
Everything else is declared in pyproject.toml.

The kernels use AVX2, FMA and F16C (and AVX-512 VNNI where the CPU has it, chosen at run time), so they are built on
x86-64 only, against the XLA FFI headers jaxlib ships. The build is optional: where it fails (no C++ compiler), hire
multiplies dequantized weights instead, more slowly.
"""
import platform
from pathlib import Path

from setuptools import Extension, setup


def kernels() -> list[Extension]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    import jaxlib

    headers = str(Path(jaxlib.__file__).parent / "include")
    return [Extension(f"hire._{name}", [f"hire/csrc/{name}.cc"], depends=["hire/csrc/kernels.h"],
                      include_dirs=[headers], language="c++",
                      extra_compile_args=["-O3", "-std=c++17", "-mavx2", "-mfma", "-mf16c"], optional=True)
            for name in ("qmatmul", "scores")]


setup(ext_modules=kernels())
