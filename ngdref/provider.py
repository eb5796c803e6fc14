r"""The per-sample Jacobian provider protocol.

A provider stands for a model evaluated on one batch, ``z_n = f(theta, x_n)``
with logits z (N, C) and a flat parameter vector theta (P,). It exposes the
logit Jacobians ``J_n = dz_n/dtheta`` (C, P) through four operations:

=================  ==================  =======================================
method             shapes              formula
=================  ==================  =======================================
``logits()``       -> (N, C)           z_n
``jvp(v)``         (P,) -> (N, C)      J_n v
``vjp(u)``         (N, C) -> (N, P)    row n is J_n^T u_n (per sample, no sum)
``vjp_sum(u)``     (N, C) -> (P,)      sum_n J_n^T u_n
``jacobian()``     -> (N, C, P)        J_n
=================  ==================  =======================================

A subclass implements :meth:`~JacobianProvider.logits` (computed once and cached: the
defaults and ``num_samples`` call it freely), ``num_params`` and at least one of
:meth:`~JacobianProvider.jacobian`, :meth:`~JacobianProvider.vjp` or
:meth:`~JacobianProvider.jvp`; the others have defaults derived from what is there. The
Gram-form updates only need :meth:`~JacobianProvider.vjp` (an (N, P) result), so a
provider that implements :meth:`~JacobianProvider.vjp` natively, chunking over samples
as it sees fit, never materialises the (N, C, P) Jacobian; its
:meth:`~JacobianProvider.vjp` may even return a :class:`ngdref.rows.PerSampleRows`
instead of an (N, P) array (then it implements :meth:`~JacobianProvider.jacobian` or
:meth:`~JacobianProvider.jvp` itself if the Jacobian-based routes are wanted).

Arrays come back in the provider's own namespace, dtype and device.
"""

from __future__ import annotations

from typing import Any

import array_api_compat

from ngdref.checks import check_finite, check_floating, check_ndim, namespace
from ngdref.rows import ones_like_rows

__all__ = ["JacobianProvider"]


def _basis(shape: tuple[int, ...], index: int, xp: Any, dtype: Any, device: Any) -> Any:
    """A fresh array of ``shape`` whose last-axis entry ``index`` is 1 everywhere, else 0."""
    hot = xp.arange(shape[-1], device=device) == index
    return xp.zeros(shape, dtype=dtype, device=device) + xp.astype(hot, dtype)


def _check_dtype(x: Any, name: str, logits: Any) -> None:
    if x.dtype != logits.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but the provider's logits have {logits.dtype}")


class JacobianProvider:
    """Base class of per-sample Jacobian providers; see the module docstring."""

    num_params: int

    def logits(self) -> Any:
        """Logits z, shape (N, C)."""
        raise NotImplementedError

    @property
    def num_samples(self) -> int:
        """N, the batch size."""
        return int(self.logits().shape[0])

    @property
    def num_outputs(self) -> int:
        """C, the logits per sample."""
        return int(self.logits().shape[1])

    def _implements(self, method: str) -> bool:
        return getattr(type(self), method) is not getattr(JacobianProvider, method)

    # ---- the operations, each with a default derived from another ---------
    def jacobian(self) -> Any:
        """Per-sample Jacobians J_n, shape (N, C, P).

        Default: C vector-Jacobian products with basis cotangents if
        :meth:`vjp` is implemented, else P Jacobian-vector products.
        """
        z = self.logits()
        xp = array_api_compat.array_namespace(z)
        n, c = z.shape
        dev = array_api_compat.device(z)
        if self._implements("vjp"):
            # writable (N, C) cotangents, one basis direction of the logits at a time
            rows = [self.vjp(_basis((n, c), i, xp, z.dtype, dev)) for i in range(c)]
            return xp.stack(rows, axis=1)
        if self._implements("jvp"):
            # one basis vector at a time: never a P x P identity
            cols = [
                self.jvp(_basis((self.num_params,), j, xp, z.dtype, dev))
                for j in range(self.num_params)
            ]
            return xp.stack(cols, axis=2)
        raise NotImplementedError(
            f"{type(self).__name__} must implement jacobian(), vjp() or jvp()"
        )

    def jvp(self, vector: Any) -> Any:
        """Jacobian-vector products J_n v for v (P,), shape (N, C).

        Default: from :meth:`jacobian`.
        """
        self._check_vector(vector)
        jac = self.jacobian()
        xp = array_api_compat.array_namespace(jac)
        return xp.matmul(jac, vector[:, None])[..., 0]

    def vjp(self, cotangents: Any) -> Any:
        """Per-sample vector-Jacobian products J_n^T u_n, shape (N, P).

        Default: from :meth:`jacobian`.
        """
        self._check_cotangents(cotangents)
        jac = self.jacobian()
        xp = array_api_compat.array_namespace(jac)
        return xp.matmul(cotangents[:, None, :], jac)[:, 0, :]

    def vjp_sum(self, cotangents: Any) -> Any:
        """Summed vector-Jacobian product sum_n J_n^T u_n, shape (P,).

        Default: the sum of :meth:`vjp`; autodiff providers override it with
        one backward pass.
        """
        per_sample = self.vjp(cotangents)
        if not array_api_compat.is_array_api_obj(per_sample):  # a PerSampleRows
            return per_sample.rmatvec(ones_like_rows(per_sample))
        xp = array_api_compat.array_namespace(per_sample)
        return xp.sum(per_sample, axis=0)

    # ---- validation ------------------------------------------------------
    def _check_vector(self, vector: Any) -> None:
        xp = namespace(vector=vector, logits=self.logits())
        check_ndim(vector, "vector", 1, "(P,)")
        check_floating(xp, vector, "vector")
        _check_dtype(vector, "vector", self.logits())
        check_finite(xp, vector, "vector")
        if vector.shape[0] != self.num_params:
            raise ValueError(
                f"vector has {vector.shape[0]} entries but the provider has "
                f"{self.num_params} parameters"
            )

    def _check_cotangents(self, cotangents: Any) -> None:
        z = self.logits()
        xp = namespace(cotangents=cotangents, logits=z)
        check_ndim(cotangents, "cotangents", 2, "(N, C)")
        check_floating(xp, cotangents, "cotangents")
        _check_dtype(cotangents, "cotangents", z)
        check_finite(xp, cotangents, "cotangents")
        if tuple(cotangents.shape) != tuple(z.shape):
            raise ValueError(
                f"cotangents must have the logits' shape {tuple(z.shape)}, "
                f"got {tuple(cotangents.shape)}"
            )
