r"""The N per-sample gradients G (N, P) as an object, without materialising G if need be.

Every Gram-form update (EF, iEF, SF, :func:`ngdref.gram_update`, the damped Gram
solve, the near-duplicate filter, :func:`ngdref.grad_norm_imbalance`) needs only
four things from G: its Gram matrix :math:`G G^\top`, its cross-Gram
:math:`G H^\top` with another set of rows (SF's sampled rows against the true
ones), :math:`G v` and :math:`G^\top w`. :class:`PerSampleRows` is that protocol.
A backend can implement it without ever forming G (the "ghost" route of
per-layer inputs and output gradients); a dense (N, P) array becomes one by
:func:`as_rows` (:class:`DenseRows`).

Conventions: the rows are whatever the caller's convention makes them (the
paper's sum convention: row n = grad l_n); Gram matrices come back in float64
whatever the rows' dtype (the authors' practice, and what the N x N solves
need); ``rmatvec`` returns the rows' dtype. For torch, P vectors are flattened
over the model's trainable parameters in ``named_parameters()`` order.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import array_api_compat

from ngdref.checks import check_grad_matrix, check_ndim, namespace

__all__ = [
    "DenseRows",
    "PerSampleRows",
    "as_rows",
    "gram_matrix",
    "ones_like_rows",
    "rows_device",
    "rows_namespace",
    "sq_row_norms",
]


@runtime_checkable
class PerSampleRows(Protocol):
    """The N per-sample gradients G (N, P), given through products only.

    Attributes
    ----------
    shape : tuple of int
        (N, P).
    dtype
        Dtype of the rows (float32 / float64) in their namespace.

    An implementation whose arrays are not on the namespace's default device (torch on
    CUDA) should also expose a ``device`` attribute (see :func:`rows_device`).
    """

    shape: tuple[int, int]
    dtype: Any

    def array_namespace(self) -> Any:
        """The array_api_compat namespace of the rows."""
        ...

    def gram(self) -> Any:
        r""":math:`G G^\top`, (N, N), float64."""
        ...

    def cross_gram(self, other: PerSampleRows) -> Any:
        r""":math:`G H^\top` with H = ``other`` (M, P): (N, M), float64."""
        ...

    def matvec(self, v: Any) -> Any:
        """G v: (P,) -> (N,)."""
        ...

    def rmatvec(self, w: Any) -> Any:
        r""":math:`G^\top w`: (N,) -> (P,), in ``self.dtype``."""
        ...


def _products64(a: Any, b: Any) -> Any:
    r""":math:`A B^\top` (M, K) of A (M, P) and B (K, P), accumulated in float64.

    Float32 inputs are cast in column blocks of at most 2**20 entries (8 MB), not
    as a whole, so the float64 copy never costs a second copy of the rows.
    """
    xp = array_api_compat.array_namespace(a, b)
    m, p = a.shape
    block = max(1, 2**20 // max(m, b.shape[0], 1))
    if (a.dtype == xp.float64 and b.dtype == xp.float64) or p <= block:
        a64 = xp.astype(a, xp.float64, copy=False)
        b64 = a64 if b is a else xp.astype(b, xp.float64, copy=False)
        return xp.matmul(a64, xp.matrix_transpose(b64))
    out = None
    for start in range(0, p, block):
        stop = min(start + block, p)
        a64 = xp.astype(a[:, start:stop], xp.float64)
        b64 = a64 if b is a else xp.astype(b[:, start:stop], xp.float64)
        part = xp.matmul(a64, xp.matrix_transpose(b64))
        out = part if out is None else out + part
        del a64, b64  # before the next block's copies
    return out


def gram_matrix(rows: Any) -> Any:
    r"""Gram matrix :math:`K = A A^\top` (M, M), float64, of dense rows (M, P) or PerSampleRows."""
    if isinstance(rows, PerSampleRows) and not array_api_compat.is_array_api_obj(rows):
        return rows.gram()
    return _products64(rows, rows)


class DenseRows:
    """:class:`PerSampleRows` over a dense (N, P) array (NumPy, CuPy, torch, array_api_strict).

    Parameters
    ----------
    array : array, shape (N, P), real floating
    name : str
        The caller's name for ``array`` in error messages.
    """

    def __init__(self, array: Any, *, name: str = "per_sample_grads") -> None:
        self._xp = check_grad_matrix(array, name, finite=False)
        self.array = array
        self.name = name

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.array.shape[0]), int(self.array.shape[1]))

    @property
    def dtype(self) -> Any:
        return self.array.dtype

    def array_namespace(self) -> Any:
        return self._xp

    def gram(self) -> Any:
        return _products64(self.array, self.array)

    def cross_gram(self, other: PerSampleRows) -> Any:
        other = as_rows(other, name="other")
        if isinstance(other, DenseRows):
            namespace(rows=self.array, other=other.array)
            return _products64(self.array, other.array)
        # other is not dense: row i of G H^T is (H g_i)^T, one matvec per row of G
        xp = self._xp
        columns = [
            xp.astype(other.matvec(self.array[i, :]), xp.float64) for i in range(self.shape[0])
        ]
        return xp.stack(columns, axis=0)

    def matvec(self, v: Any) -> Any:
        check_ndim(v, "v", 1, "(P,)")
        return self._xp.matmul(self.array, v[:, None])[:, 0]

    def rmatvec(self, w: Any) -> Any:
        check_ndim(w, "w", 1, "(N,)")
        xp = self._xp
        return xp.matmul(xp.astype(w, self.dtype)[None, :], self.array)[0, :]


def as_rows(x: Any, *, name: str = "per_sample_grads") -> PerSampleRows:
    """A dense (N, P) array -> :class:`DenseRows`; a :class:`PerSampleRows` passes through.

    Raises
    ------
    TypeError
        If ``x`` is neither (the message names ``name``).
    """
    if array_api_compat.is_array_api_obj(x):
        return DenseRows(x, name=name)
    if isinstance(x, PerSampleRows):
        return x
    raise TypeError(
        f"{name} must be an array of shape (N, P) or a PerSampleRows (shape, dtype, "
        f"array_namespace, gram, cross_gram, matvec, rmatvec), got {type(x).__name__}"
    )


def rows_namespace(
    rows: PerSampleRows, rows_name: str, *, rows_first: bool = True, **arrays: Any
) -> Any:
    """The namespace of ``rows``, after checking that ``arrays`` share it and its device.

    Messages name the arguments in the order given (``rows_first``), like
    :func:`ngdref.checks.namespace`.
    """
    if isinstance(rows, DenseRows):
        dense = {rows_name: rows.array}
        return namespace(**(dense | arrays if rows_first else arrays | dense))
    xp = rows.array_namespace()
    if any(a is not None for a in arrays.values()):
        other = namespace(**arrays)
        if other is not xp:
            name = next(n for n, a in arrays.items() if a is not None)
            raise TypeError(
                f"{name} comes from namespace {other.__name__} but {rows_name} comes from "
                f"{xp.__name__}: pass all arrays from one library"
            )
    return xp


def rows_device(rows: PerSampleRows) -> Any:
    """The device of the rows: a DenseRows' array's, else an optional ``device`` attribute.

    The protocol does not require ``device``; an implementation whose arrays do not live
    on the namespace's default device (torch on CUDA, CuPy) should expose it.
    """
    if isinstance(rows, DenseRows):
        return array_api_compat.device(rows.array)
    return getattr(rows, "device", None)


def ones_like_rows(rows: PerSampleRows) -> Any:
    """A vector of N ones in the rows' namespace, dtype and device (the rhs of EF and of g)."""
    xp = rows.array_namespace()
    return xp.ones(rows.shape[0], dtype=rows.dtype, device=rows_device(rows))


def sq_row_norms(rows: Any, gram: Any = None) -> Any:
    """Squared row norms ||g_n||^2 (N,), float64: O(N P) for dense rows, else diag(G G^T).

    ``gram``, the rows' Gram matrix when the caller has formed it already, stands in for
    ``rows.gram()`` (the same matrix, not formed twice); dense rows do not use it.
    """
    rows = as_rows(rows)
    if isinstance(rows, DenseRows):
        xp, a = rows.array_namespace(), rows.array
        block = max(1, 2**20 // max(a.shape[0], 1))  # float64 copies of 8 MB column blocks
        total = None
        for start in range(0, a.shape[1], block):
            part = xp.astype(a[:, start:min(start + block, a.shape[1])], xp.float64, copy=False)
            sums = xp.sum(part * part, axis=1)
            total = sums if total is None else total + sums
        return total
    return rows.array_namespace().linalg.diagonal(rows.gram() if gram is None else gram)
