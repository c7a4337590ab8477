"""Shared test settings."""
import os
import platform
from pathlib import Path

import jax
import pytest

from hire.engine import use_compilation_cache


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One folder of compiled programs for the whole run, $HIRE_CACHE: this process, the CLI runs, servers and Ray
    nodes the tests start (they inherit the environment) and their actors all keep their programs there, so that a
    program compiled once is loaded, not compiled, wherever it is needed again (e.g. test_shards_serve's sharded
    programs are test_shards'). A fresh folder: nothing is read from, or left in, the user's cache. Under pytest-xdist
    (.ci/run) the workers' shared temporary folder holds it, so that a program one worker compiled the other loads."""
    with pytest.MonkeyPatch.context() as env:
        if "PYTEST_XDIST_WORKER" in os.environ:
            folder = tmp_path_factory.getbasetemp().parent / "xla"
            folder.mkdir(exist_ok=True)
        else:
            folder = tmp_path_factory.mktemp("xla")
        folder = str(folder)
        env.setenv("HIRE_CACHE", folder)
        use_compilation_cache(folder)
        yield folder


@pytest.fixture(autouse=True)
def full_precision_matmuls():
    """float32 matmuls at full precision on accelerators too (GPUs otherwise may use TF32)."""
    with jax.default_matmul_precision("highest"):
        yield


def _cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())


@pytest.fixture
def avx2_then_vnni():
    """run(module, f) -> (f() on a hire kernel module's AVX2 loops, f() on its AVX-512 VNNI ones) (hire/csrc/kernels.h);
    skips where the CPU lacks VNNI (after checking /proc/cpuinfo agrees: a build that misses it fails) or the kernels
    are not built off x86-64. Each module's own setting comes back after the test."""
    restore = []

    def run(module, f):
        if module is None and platform.machine().lower() not in ("x86_64", "amd64"):
            pytest.skip("hire's kernels are built on x86-64 only")
        assert module, "the kernel is not built: pip install -e . (or python setup.py build_ext --inplace)"
        restore.append((module, module.vnni()))
        if not module.vnni(True):
            assert not {"avx512_vnni", "avx512vl"} <= _cpu_flags(), "this CPU has AVX-512 VNNI; the kernel missed it"
            pytest.skip("this CPU lacks AVX-512 VNNI")
        vnni = f()
        module.vnni(False)
        return f(), vnni

    yield run
    for module, on in reversed(restore):
        module.vnni(on)
