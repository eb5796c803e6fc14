"""The array backends of the test matrix and the per-dtype tolerances (one place)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from backends.arrays.adapters import LIBRARIES, from_numpy, to_numpy, unavailable

#: (rtol, atol) per dtype name for comparisons of two exact routes to one value.
TOLERANCES = {"float64": (1e-9, 1e-11), "float32": (2e-4, 1e-5)}


def tolerance(dtype: str = "float64") -> dict[str, float]:
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


@dataclass(frozen=True)
class Backend:
    """An array library under test, with conversions to and from NumPy."""

    name: str

    def unavailable(self) -> str:
        return unavailable(self.name)

    @property
    def module(self) -> str:
        return self.name

    @property
    def xp(self) -> Any:
        import array_api_compat

        if self.name == "array_api_strict":
            return importlib.import_module("array_api_strict")
        return array_api_compat.array_namespace(self.asarray(np.zeros(1)))

    def asarray(self, a: Any, dtype: str | None = None) -> Any:
        """NumPy (or nested lists) -> this backend, keeping the dtype unless ``dtype`` says."""
        return from_numpy(a, self.name, dtype=dtype)

    def to_numpy(self, a: Any) -> np.ndarray:
        return to_numpy(a)


BACKENDS = [Backend(name) for name in LIBRARIES]
