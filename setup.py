"""hire's one compiled part, hire._qmatmul: the quantized matmul kernels for XLA's CPU backend (hire/csrc/qmatmul.cc,
used by hire.quant). Everything else is declared in pyproject.toml.

The kernels use AVX2, FMA and F16C, so they are built on x86-64 only, against the XLA FFI headers jaxlib ships. The
build is optional: where it fails (no C++ compiler), hire multiplies dequantized weights instead, more slowly.
"""
import platform
from pathlib import Path

from setuptools import Extension, setup


def kernels() -> list[Extension]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    import jaxlib

    headers = str(Path(jaxlib.__file__).parent / "include")
    return [Extension("hire._qmatmul", ["hire/csrc/qmatmul.cc"], include_dirs=[headers], language="c++",
                      extra_compile_args=["-O3", "-std=c++17", "-mavx2", "-mfma", "-mf16c"], optional=True)]


setup(ext_modules=kernels())
