"""Array-library adapters: move host data into NumPy, array_api_strict, torch or CuPy and back.

The math in :mod:`ngdref` never imports an array library; these adapters are
where a caller picks one. Optional libraries are imported lazily, so this
module works with NumPy alone.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from ngdref.checks import check_choice

__all__ = ["LIBRARIES", "from_numpy", "to_numpy", "unavailable"]

#: the array libraries ngdref is tested on, in report order
LIBRARIES = ("numpy", "array_api_strict", "torch", "cupy")


def unavailable(library: str) -> str:
    """Why ``library`` cannot be used here ('' when it can).

    CuPy needs a CUDA device as well as the package: ``cupy.cuda.is_available()``.
    """
    check_choice(library, "library", LIBRARIES)
    try:
        module = importlib.import_module(library)
    except ImportError:
        return f"{library} is not installed"
    if library == "cupy" and not module.cuda.is_available():
        return "cupy is installed but no CUDA device is available"
    return ""


def from_numpy(array: Any, library: str, *, dtype: str | None = None) -> Any:
    """Copy a NumPy array (or nested lists) into ``library``, optionally casting to ``dtype``.

    torch arrays land on the CPU; CuPy arrays on the current CUDA device.
    """
    reason = unavailable(library)
    if reason:
        raise RuntimeError(f"library {library!r} cannot be used: {reason}")
    a = np.asarray(array)
    if dtype is not None:
        a = a.astype(dtype)
    if library == "numpy":
        return a
    if library == "torch":
        import torch

        return torch.from_numpy(np.ascontiguousarray(a))
    module = importlib.import_module(library)
    return module.asarray(a)


def to_numpy(array: Any) -> np.ndarray:
    """Copy any supported array (NumPy, array_api_strict, torch on any device, CuPy) to NumPy."""
    if isinstance(array, np.ndarray):
        return array
    module = type(array).__module__.split(".")[0]
    if module == "torch":
        return array.detach().cpu().numpy()
    if module == "cupy":
        return array.get()
    if module == "array_api_strict":
        return np.from_dlpack(array)
    raise TypeError(
        f"array must be a NumPy, array_api_strict, torch or CuPy array, got {type(array)}"
    )
