"""Shared helpers for the kernel property tests."""

import jax
import pytest


@pytest.fixture(scope="session")
def x64():
    """Returns a context-manager factory that enables float64 only inside its ``with`` block."""

    def enable():
        if hasattr(jax, "enable_x64"):
            return jax.enable_x64(True)
        from jax.experimental import enable_x64  # older JAX spelling

        return enable_x64()

    return enable

