"""Shared test settings."""
import os

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
