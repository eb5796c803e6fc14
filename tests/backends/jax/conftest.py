"""Fixtures of the JAX tests: 64-bit types inside a test only, never leaking out of it.

JAX's ``jax_enable_x64`` is a process-wide flag; ``jax.enable_x64(True)`` is its scoped form.
The ``x64`` fixture turns it on for one test, and every test here checks that it is off
before and after, so that float64 in one test cannot change the dtypes of another.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _x64_does_not_leak() -> Iterator[None]:
    jax = pytest.importorskip("jax")
    assert not jax.config.read("jax_enable_x64"), "jax_enable_x64 was left on before this test"
    yield
    assert not jax.config.read("jax_enable_x64"), "this test left jax_enable_x64 on"


@pytest.fixture
def x64() -> Iterator[None]:
    """64-bit types on for the test (float32 arrays stay float32)."""
    import jax

    with jax.enable_x64(True):
        yield
