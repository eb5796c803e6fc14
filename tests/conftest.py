"""Shared fixtures: the array backends every core test runs on, and tolerances.

Loaded before any test module, it also keeps Hugging Face offline for the whole suite
(``HF_HUB_OFFLINE`` and ``HF_DATASETS_OFFLINE`` default to 1): test modules need not set them.

Each backend is a namespace that the math core receives arrays from. NumPy and
array_api_strict always run; torch runs when installed (CPU, float64); CuPy
runs only when ``cupy.cuda.is_available()`` and skips cleanly otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from tests.array_backends import BACKENDS, Backend, tolerance


@pytest.fixture(params=BACKENDS, ids=[b.name for b in BACKENDS])
def backend(request: pytest.FixtureRequest) -> Backend:
    """An available array backend (skips when the library or device is missing)."""
    b: Backend = request.param
    reason = b.unavailable()
    if reason:
        pytest.skip(reason)
    return b


@pytest.fixture(scope="module")
def torch_one_thread() -> Iterator[None]:
    """Run a module's tiny torch models on one intra-op thread, restoring the count after.

    Tiny models gain nothing from intra-op threads and lose much to OpenMP synchronisation on
    a loaded 2-core machine (a tiny T5 forward measured 50x slower on two threads there).
    Opt in with ``pytestmark = pytest.mark.usefixtures("torch_one_thread")``.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


__all__ = ["backend", "tolerance", "torch_one_thread"]
