"""Input validators: one home for every argument check of ngdref, its backends and validation.

Every check names the offending argument and says what was expected, so that a
user reading the traceback knows which input to fix. Nothing is coerced: a
wrong dtype, shape, device or namespace is an error, never a silent cast.

Two families:

- array checks (:func:`namespace`, :func:`check_ndim`, :func:`check_floating`,
  :func:`check_finite`, :func:`check_array`, :func:`check_rows`, :func:`check_vector`,
  :func:`check_grad_matrix`, :func:`check_logit_matrices`, :func:`check_same_dtype`),
  which take the array
  namespace from their inputs;
- option checks on plain Python values (:func:`check_int`, :func:`check_real`,
  :func:`check_choice`, :func:`check_damping`), which return the checked value.

``bool`` is never accepted as a number (``True`` is an ``int`` in Python, but a
flag passed where a count is expected is a bug at the call site).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Collection
from typing import Any

import array_api_compat

__all__ = [
    "NonFiniteError",
    "check_array",
    "check_choice",
    "check_damping",
    "check_finite",
    "check_floating",
    "check_grad_matrix",
    "check_int",
    "check_logit_matrices",
    "check_ndim",
    "check_real",
    "check_rows",
    "check_same_dtype",
    "check_vector",
    "namespace",
]


def namespace(**arrays: Any) -> Any:
    """Return the single array namespace shared by the named arrays.

    Raises
    ------
    TypeError
        If an argument is not an array, or the arrays come from different
        namespaces (e.g. a NumPy array next to a torch tensor), or live on
        different devices.
    """
    namespaces = {}
    for name, array in arrays.items():
        if array is None:
            continue
        if not array_api_compat.is_array_api_obj(array):
            raise TypeError(
                f"{name} must be an array (NumPy, CuPy, torch, array_api_strict, ...), "
                f"got {type(array).__name__}"
            )
        namespaces[name] = array_api_compat.array_namespace(array)
    if not namespaces:
        raise TypeError("at least one array argument is required")
    first_name, xp = next(iter(namespaces.items()))
    for name, other in namespaces.items():
        if other is not xp:
            raise TypeError(
                f"{name} comes from namespace {other.__name__} but {first_name} comes from "
                f"{xp.__name__}: pass all arrays from one library"
            )
    devices = {
        name: array_api_compat.device(array) for name, array in arrays.items() if array is not None
    }
    first_device = devices[first_name]
    for name, dev in devices.items():
        if dev != first_device:
            raise TypeError(
                f"{name} is on device {dev} but {first_name} is on device {first_device}: "
                "move them to one device"
            )
    _check_float64(xp)
    return xp


#: (namespace, its default floating dtype) seen to hold float64; the default dtype is part of
#: the key because JAX's x64 switch changes both at run time
_FLOAT64: set[tuple[int, Any]] = set()


def _check_float64(xp: Any) -> None:
    """Refuse a namespace whose float64 silently becomes float32 (JAX without x64).

    The small systems are formed and solved in float64 (the conventions page,
    :ref:`conv-precision`), and their singularity thresholds assume float64: a namespace
    that rounds a float64 request to float32 would give float32 solves judged as float64.
    """
    key = (id(xp), xp.zeros(1).dtype)
    if key in _FLOAT64:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # JAX warns before it truncates
        held = xp.zeros(1, dtype=xp.float64).dtype == xp.float64
    if not held:
        raise TypeError(
            f"the array namespace {xp.__name__} turns float64 into float32 here, and ngdref "
            "forms its small systems in float64: for JAX, enable 64-bit types first "
            "(jax.config.update('jax_enable_x64', True))"
        )
    _FLOAT64.add(key)


def check_ndim(x: Any, name: str, ndim: int, layout: str) -> None:
    """Raise ``ValueError`` unless ``x`` has ``ndim`` axes; ``layout`` names them."""
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} axes {layout}, got shape {tuple(x.shape)}")


def check_floating(xp: Any, x: Any, name: str) -> None:
    """Raise ``TypeError`` unless ``x`` has a real floating dtype."""
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(f"{name} must have a real floating dtype, got {x.dtype}")


class NonFiniteError(ValueError):
    """An input or an intermediate result holds NaN or infinity (a diverged model, say)."""


#: entries per block of :func:`check_finite`'s torch route
_FINITE_BLOCK = 2**20


def check_finite(xp: Any, x: Any, name: str) -> None:
    """Raise :class:`NonFiniteError` if ``x`` holds a NaN or an infinity.

    A torch floating tensor is checked by sum(x - x): x - x is exactly 0 at a finite entry and
    NaN at a NaN or an infinity, so the sum is 0 if and only if every entry is finite. That is
    one pass, in blocks of 2**20 entries (a bounded temporary, whatever the size of x); torch's
    ``isfinite`` and ``all`` take several (10 ms against 0.6 ms on 3.2 million float32 values,
    twice per SF step on a 3.2M-parameter model).
    """
    if array_api_compat.is_torch_namespace(xp) and x.dtype.is_floating_point:
        blocks = x.reshape(-1).split(_FINITE_BLOCK)
        finite = bool(sum((b - b).sum() for b in blocks) == 0)
    else:
        finite = bool(xp.all(xp.isfinite(x)))
    if not finite:
        raise NonFiniteError(f"{name} contains NaN or infinite values")


#: what :func:`check_array` says of an empty first axis of samples
EMPTY_BATCH = "an empty batch (N = 0): at least one sample is needed"


def check_array(
    xp: Any, x: Any, name: str, ndim: int, layout: str, *, empty: str = EMPTY_BATCH
) -> None:
    """Raise unless ``x`` has ``ndim`` axes, a real floating dtype, a non-empty first axis and
    finite entries; ``empty`` completes ``"{name} is ..."`` for an empty first axis."""
    check_ndim(x, name, ndim, layout)
    check_floating(xp, x, name)
    if x.shape[0] == 0:
        raise ValueError(f"{name} is {empty}")
    check_finite(xp, x, name)


def check_rows(x: Any, name: str, rows: int, reference: str) -> None:
    """Raise ``ValueError`` unless ``x.shape[0] == rows``."""
    if x.shape[0] != rows:
        raise ValueError(f"{name} has {x.shape[0]} rows but {reference} has {rows}")


def check_int(value: Any, name: str, *, minimum: int = 1, optional: bool = False) -> Any:
    """Return ``value`` after checking it is an ``int`` (not a ``bool``) >= ``minimum``.

    ``optional=True`` also accepts ``None`` (returned as is).

    Raises
    ------
    ValueError
        ``"{name} must be an int >= {minimum}, got {value!r}"`` (``"None or an int"``
        when optional).
    """
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = f"{'None or ' if optional else ''}an int >= {minimum}"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def check_real(value: Any, name: str, *, positive: bool = False) -> float:
    """Return ``value`` as a float after checking it is a finite real number >= 0 (> 0 if asked).

    Raises
    ------
    TypeError
        If ``value`` is not an ``int`` or ``float`` (or is a ``bool``).
    ValueError
        If it is NaN, infinite, negative, or zero when ``positive``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be finite and {'>' if positive else '>='} 0, got {value}")
    return float(value)


def check_choice(value: Any, name: str, options: Collection[Any]) -> Any:
    """Return ``value`` after checking it is one of ``options``.

    Raises
    ------
    ValueError
        ``"{name} must be one of {options}, got {value!r}"``.
    """
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def check_damping(damping: Any, *, positive: bool = False) -> float:
    """Return ``damping`` as a float after checking it is finite and >= 0 (> 0 if asked)."""
    if isinstance(damping, bool) or not isinstance(damping, (int, float)):
        raise TypeError(f"damping must be a Python float, got {type(damping).__name__}")
    damping = float(damping)
    if not math.isfinite(damping) or damping < 0:
        raise ValueError(f"damping must be finite and >= 0, got {damping}")
    if positive and damping == 0:
        raise ValueError(
            "damping must be > 0 here: this update inverts F + damping * I in parameter "
            "space, which is singular when N * C < P"
        )
    return damping


def check_grad_matrix(
    per_sample_grads: Any, name: str = "per_sample_grads", *, finite: bool = True
) -> Any:
    """Validate an (N, P) matrix of per-sample gradients and return its namespace.

    ``finite=False`` skips the O(N P) finiteness pass for callers that check a
    derived quantity instead (the N x N Gram matrix, the gradient sum): a NaN or
    infinity in the matrix reaches those, and they report it under ``name``.
    """
    xp = namespace(**{name: per_sample_grads})
    check_ndim(per_sample_grads, name, 2, "(N, P)")
    check_floating(xp, per_sample_grads, name)
    if per_sample_grads.shape[0] == 0:
        raise ValueError(f"{name} is {EMPTY_BATCH}")
    if per_sample_grads.shape[1] == 0:
        raise ValueError(f"{name} has no parameters (P = 0)")
    if finite:
        check_finite(xp, per_sample_grads, name)
    return xp


def check_vector(xp: Any, x: Any, name: str, size: int, reference: str, dtype: Any) -> None:
    """Validate a 1-D floating vector of a given length and dtype."""
    check_ndim(x, name, 1, "(n,)")
    check_floating(xp, x, name)
    if x.shape[0] != size:
        raise ValueError(f"{name} has {x.shape[0]} entries but {reference} has {size}")
    if x.dtype != dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {reference} has dtype {dtype}")
    check_finite(xp, x, name)


def check_same_dtype(x: Any, name: str, reference: Any, reference_name: str) -> None:
    """Raise ``TypeError`` unless ``x`` has the dtype of ``reference``: nothing is cast."""
    if x.dtype != reference.dtype:
        raise TypeError(
            f"{name} has dtype {x.dtype} but {reference_name} has dtype {reference.dtype}"
        )


def check_logit_matrices(xp: Any, matrices: Any, name: str, jacobians: Any) -> None:
    """Raise unless ``matrices`` are (N, C, C), one C x C matrix per sample of ``jacobians``
    (N, C, P), in their dtype and finite."""
    n, c, _ = jacobians.shape
    if tuple(matrices.shape) != (n, c, c):
        raise ValueError(
            f"{name} must have shape {(n, c, c)} for jacobians of shape "
            f"{tuple(jacobians.shape)}, got {tuple(matrices.shape)}"
        )
    check_same_dtype(matrices, name, jacobians, "jacobians")
    check_finite(xp, matrices, name)
