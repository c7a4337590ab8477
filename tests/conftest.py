"""Shared test settings."""
import jax
import pytest


@pytest.fixture(autouse=True)
def full_precision_matmuls():
    """float32 matmuls at full precision on accelerators too (GPUs otherwise may use TF32)."""
    with jax.default_matmul_precision("highest"):
        yield
