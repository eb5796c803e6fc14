r"""Losses at the logit level: value, gradient, curvature and sampling per sample.

Every method works per sample in the paper's **sum** convention: ``value``
returns ``l_n`` (N,), ``grad`` returns ``e_n = dl_n/dz_n`` (N, C), ``hessian``
returns ``H_n = d^2 l_n / dz_n^2`` (N, C, C) and ``hessian_sqrt`` a factor
``Q_n`` with ``Q_n Q_n^T = H_n``. A mean-reduced loss multiplies all of these
by a reduction factor; that factor is applied by the callers
(:func:`ngdref.directions`, :func:`ngdref.quality.fisher_vp`), never here.

For the losses below ``H_n`` is also the Fisher of the predictive distribution
in logit space, so ``sum_n J_n^T H_n J_n`` is both the GGN and the Fisher.

Randomness for :meth:`LogitLoss.sample` comes in as an integer key (turned into
uniforms by the standard library's Mersenne Twister, so every backend draws the
same labels) or as an array of uniforms in [0, 1) of shape
:meth:`LogitLoss.uniforms_shape`.
"""

from __future__ import annotations

import math
import random
from typing import Any

import array_api_compat

from ngdref._softmax import categorical, cross_entropy, diag_embed, eye_like, softmax
from ngdref.checks import (
    check_finite,
    check_floating,
    check_int,
    check_ndim,
    check_same_dtype,
    namespace,
)

__all__ = [
    "LogitLoss",
    "SequenceSoftmaxCrossEntropy",
    "SigmoidBinaryCrossEntropy",
    "SoftmaxCrossEntropy",
    "SquaredError",
    "reduction_factor",
]


def _shares_passes(loss: LogitLoss, cls: type) -> bool:
    """Whether ``loss`` takes its value and grad from ``cls``'s formulas, so that ``cls``'s
    shared passes give both: a subclass that overrides either one gets the two calls (its own
    formula, never the base class's fused one)."""
    kind = type(loss)
    return kind.value is cls.value and kind.grad is cls.grad  # type: ignore[attr-defined]


class LogitLoss:
    """Base class: a per-sample loss ``l_n = loss(z_n, y_n)`` of logits z (N, C).

    Subclasses implement the closed forms; this class holds validation, the
    Hessian-vector product fallback and the conversion of keys to uniforms.
    """

    #: the dtype family the targets must have: "integral" or "real floating"
    target_kind: str = "real floating"

    def check(self, logits: Any, targets: Any) -> Any:
        """Validate ``logits`` (N, C) and ``targets``; return the namespace."""
        xp = namespace(logits=logits, targets=targets)
        check_ndim(logits, "logits", 2, "(N, C)")
        check_floating(xp, logits, "logits")
        if logits.shape[0] == 0:
            raise ValueError("logits is an empty batch (N = 0): at least one sample is needed")
        check_finite(xp, logits, "logits")
        expected = self.targets_shape(logits)
        if tuple(targets.shape) != expected:
            raise ValueError(
                f"targets must have shape {expected} for logits of shape "
                f"{tuple(logits.shape)}, got {tuple(targets.shape)}"
            )
        if not xp.isdtype(targets.dtype, self.target_kind):
            raise TypeError(
                f"targets must have a {self.target_kind} dtype for "
                f"{type(self).__name__}, got {targets.dtype}"
            )
        if self.target_kind == "real floating":
            check_same_dtype(targets, "targets", logits, "logits")
        self._check_target_values(xp, logits, targets)
        return xp

    def check_vectors(self, logits: Any, targets: Any, vectors: Any) -> Any:
        """Validate ``logits``, ``targets`` and per-sample ``vectors`` (N, C); return xp."""
        xp = self.check(logits, targets)
        namespace(logits=logits, vectors=vectors)
        if tuple(vectors.shape) != tuple(logits.shape):
            raise ValueError(
                f"vectors must have the logits' shape {tuple(logits.shape)}, "
                f"got {tuple(vectors.shape)}"
            )
        check_same_dtype(vectors, "vectors", logits, "logits")
        check_finite(xp, vectors, "vectors")
        return xp

    def targets_shape(self, logits: Any) -> tuple[int, ...]:
        """Shape the targets must have for ``logits``."""
        return tuple(logits.shape)

    def _check_target_values(self, xp: Any, logits: Any, targets: Any) -> None:
        check_finite(xp, targets, "targets")

    def value(self, logits: Any, targets: Any) -> Any:
        """Per-sample loss l_n, shape (N,)."""
        raise NotImplementedError

    def grad(self, logits: Any, targets: Any) -> Any:
        """Logit-level gradient e_n = dl_n/dz_n, shape (N, C)."""
        raise NotImplementedError

    def value_and_grad(self, logits: Any, targets: Any) -> tuple[Any, Any]:
        """``(value(logits, targets), grad(logits, targets))``: l_n (N,) and e_n (N, C).

        The same numbers as the two calls; the softmax losses share their passes over the
        logits (one check, one softmax), which a subclass that defines only :meth:`value`
        and :meth:`grad` need not do.
        """
        return self.value(logits, targets), self.grad(logits, targets)

    def hessian(self, logits: Any, targets: Any) -> Any:
        """Logit-level Hessian H_n, shape (N, C, C)."""
        raise NotImplementedError

    def hessian_sqrt(self, logits: Any, targets: Any) -> Any:
        """A factor Q_n with Q_n Q_n^T = H_n, shape (N, C, C)."""
        raise NotImplementedError

    def hessian_vp(self, logits: Any, targets: Any, vectors: Any) -> Any:
        """Per-sample H_n v_n for ``vectors`` (N, C); shape (N, C)."""
        xp = self.check_vectors(logits, targets, vectors)
        return xp.matmul(self.hessian(logits, targets), vectors[:, :, None])[:, :, 0]

    def uniforms_shape(self, logits: Any, num_samples: int) -> tuple[int, ...]:
        """Shape of the uniforms :meth:`sample` consumes."""
        raise NotImplementedError

    def sample(
        self, logits: Any, key: Any, *, num_samples: int = 1, targets: Any = None
    ) -> Any:
        """Draw targets from the model's predictive distribution.

        Parameters
        ----------
        logits : array, shape (N, C)
        key : int or array
            The sampling key: an integer seed (turned into uniforms by the standard
            library's Mersenne Twister, the same draws on every array library), or the
            uniforms themselves, in [0, 1), of shape ``uniforms_shape(logits, num_samples)``
            in the namespace of ``logits``.
        num_samples : int
            K, the number of targets drawn per sample.
        targets : array, optional
            The observed targets; losses with ignored positions
            (:class:`SequenceSoftmaxCrossEntropy`) keep them ignored in every draw.

        Returns
        -------
        array, shape ``(K, *targets_shape)``
            ``result[k]`` is a valid ``targets`` argument for the other methods.
        """
        xp = namespace(logits=logits)
        check_int(num_samples, "num_samples")
        shape = self.uniforms_shape(logits, num_samples)
        if isinstance(key, bool):
            raise TypeError("key must be an int seed or an array of uniforms, got bool")
        if isinstance(key, int):
            rng = random.Random(key)
            flat = [rng.random() for _ in range(math.prod(shape))]
            uniforms = xp.reshape(
                xp.asarray(flat, dtype=logits.dtype, device=array_api_compat.device(logits)),
                shape,
            )
            # a double just below 1 can round to 1.0 in float32: keep draws in [0, 1)
            uniforms = xp.clip(uniforms, max=1.0 - xp.finfo(logits.dtype).eps / 2)
        else:
            uniforms = key
            namespace(logits=logits, key=uniforms)
            if tuple(uniforms.shape) != shape:
                raise ValueError(
                    f"key must have shape {shape}, got {tuple(uniforms.shape)}"
                )
            check_floating(xp, uniforms, "key")
            if not bool(xp.all((uniforms >= 0) & (uniforms < 1))):
                raise ValueError("key must hold uniforms in [0, 1)")
        drawn = self._sample(xp, logits, uniforms)
        if targets is None:
            return drawn
        self.check(logits, targets)
        return self._keep_ignored(xp, drawn, targets)

    def _sample(self, xp: Any, logits: Any, uniforms: Any) -> Any:
        raise NotImplementedError

    def _keep_ignored(self, xp: Any, drawn: Any, targets: Any) -> Any:
        return drawn


class SoftmaxCrossEntropy(LogitLoss):
    r"""Softmax cross-entropy, ``l_n = -log softmax(z_n)[y_n]``.

    .. math::
        e_n = p_n - \mathrm{onehot}(y_n), \quad
        H_n = \mathrm{diag}(p_n) - p_n p_n^\top, \quad
        Q_n = \mathrm{diag}(\sqrt{p_n}) - p_n \sqrt{p_n}^\top

    Targets are integer class labels, shape (N,), in [0, C).
    """

    target_kind = "integral"

    def targets_shape(self, logits: Any) -> tuple[int, ...]:
        return (logits.shape[0],)

    def _check_target_values(self, xp: Any, logits: Any, targets: Any) -> None:
        c = logits.shape[1]
        if not bool(xp.all((targets >= 0) & (targets < c))):
            raise ValueError(f"targets must be class labels in [0, {c}), got values outside")

    def value(self, logits: Any, targets: Any) -> Any:
        return cross_entropy(self.check(logits, targets), logits, targets, grad=False)[0]

    def grad(self, logits: Any, targets: Any) -> Any:
        return cross_entropy(self.check(logits, targets), logits, targets, grad=True)[1]

    def value_and_grad(self, logits: Any, targets: Any) -> tuple[Any, Any]:
        if not _shares_passes(self, SoftmaxCrossEntropy):
            return super().value_and_grad(logits, targets)
        return cross_entropy(self.check(logits, targets), logits, targets, grad=True)

    def hessian(self, logits: Any, targets: Any) -> Any:
        xp = self.check(logits, targets)
        p = softmax(xp, logits)
        return diag_embed(xp, p) - p[:, :, None] * p[:, None, :]

    def hessian_sqrt(self, logits: Any, targets: Any) -> Any:
        xp = self.check(logits, targets)
        p = softmax(xp, logits)
        r = xp.sqrt(p)
        return diag_embed(xp, r) - p[:, :, None] * r[:, None, :]

    def hessian_vp(self, logits: Any, targets: Any, vectors: Any) -> Any:
        xp = self.check_vectors(logits, targets, vectors)
        p = softmax(xp, logits)
        return p * vectors - p * xp.sum(p * vectors, axis=1, keepdims=True)

    def uniforms_shape(self, logits: Any, num_samples: int) -> tuple[int, ...]:
        return (num_samples, logits.shape[0])

    def _sample(self, xp: Any, logits: Any, uniforms: Any) -> Any:
        return categorical(xp, softmax(xp, logits), uniforms)


class SquaredError(LogitLoss):
    r"""Squared error ``l_n = 0.5 ||z_n - y_n||^2``: ``e_n = z_n - y_n``, ``H_n = Q_n = I``.

    Targets are real, shape (N, C). The predictive distribution is N(z_n, I);
    :meth:`sample` draws from it by Box-Muller.
    """

    def value(self, logits: Any, targets: Any) -> Any:
        xp = self.check(logits, targets)
        r = logits - targets
        return 0.5 * xp.sum(r * r, axis=1)

    def grad(self, logits: Any, targets: Any) -> Any:
        self.check(logits, targets)
        return logits - targets

    def hessian(self, logits: Any, targets: Any) -> Any:
        xp = self.check(logits, targets)
        return xp.broadcast_to(
            eye_like(xp, logits), (logits.shape[0], logits.shape[1], logits.shape[1])
        )

    hessian_sqrt = hessian

    def hessian_vp(self, logits: Any, targets: Any, vectors: Any) -> Any:
        self.check_vectors(logits, targets, vectors)
        return vectors

    def uniforms_shape(self, logits: Any, num_samples: int) -> tuple[int, ...]:
        return (num_samples, logits.shape[0], logits.shape[1], 2)

    def _sample(self, xp: Any, logits: Any, uniforms: Any) -> Any:
        radius = xp.sqrt(-2.0 * xp.log(1.0 - uniforms[..., 0]))
        return logits[None, ...] + radius * xp.cos(2.0 * math.pi * uniforms[..., 1])


class SigmoidBinaryCrossEntropy(LogitLoss):
    r"""Independent sigmoid cross-entropies, ``l_n = sum_c softplus(z_nc) - y_nc z_nc``.

    .. math::
        e_n = \sigma(z_n) - y_n, \quad
        H_n = \mathrm{diag}(\sigma(z_n)(1 - \sigma(z_n))), \quad
        Q_n = H_n^{1/2}

    Targets are real in [0, 1], shape (N, C). With C = 1 this is logistic regression.
    """

    def _check_target_values(self, xp: Any, logits: Any, targets: Any) -> None:
        if not bool(xp.all((targets >= 0) & (targets <= 1))):
            raise ValueError("targets must lie in [0, 1] for SigmoidBinaryCrossEntropy")

    @staticmethod
    def _sigmoid(xp: Any, z: Any) -> Any:
        # the tanh form cannot overflow, unlike 1 / (1 + exp(-z)) for large negative z
        return 0.5 * (1.0 + xp.tanh(0.5 * z))

    def value(self, logits: Any, targets: Any) -> Any:
        xp = self.check(logits, targets)
        softplus = xp.maximum(logits, 0.0) + xp.log1p(xp.exp(-xp.abs(logits)))
        return xp.sum(softplus - targets * logits, axis=1)

    def grad(self, logits: Any, targets: Any) -> Any:
        xp = self.check(logits, targets)
        return self._sigmoid(xp, logits) - targets

    def _curvature(self, logits: Any, targets: Any) -> tuple[Any, Any]:
        xp = self.check(logits, targets)
        p = self._sigmoid(xp, logits)
        return xp, p * (1.0 - p)

    def hessian(self, logits: Any, targets: Any) -> Any:
        xp, h = self._curvature(logits, targets)
        return diag_embed(xp, h)

    def hessian_sqrt(self, logits: Any, targets: Any) -> Any:
        xp, h = self._curvature(logits, targets)
        return diag_embed(xp, xp.sqrt(h))

    def hessian_vp(self, logits: Any, targets: Any, vectors: Any) -> Any:
        self.check_vectors(logits, targets, vectors)
        _, h = self._curvature(logits, targets)
        return h * vectors

    def uniforms_shape(self, logits: Any, num_samples: int) -> tuple[int, ...]:
        return (num_samples, logits.shape[0], logits.shape[1])

    def _sample(self, xp: Any, logits: Any, uniforms: Any) -> Any:
        return xp.astype(uniforms < self._sigmoid(xp, logits)[None, ...], logits.dtype)


class SequenceSoftmaxCrossEntropy(LogitLoss):
    r"""Softmax cross-entropy summed over the label positions of a sequence.

    The logits of sample n are the T x V logits at its T label positions,
    flattened to C = T * V (row-major: position, then vocabulary). Targets are
    integer token ids, shape (N, T); positions equal to ``ignore_index`` do not
    contribute. The per-sample loss is a sum over positions (one sample is one
    sequence, as in the paper's per-sample gradients):

    .. math::
        l_n = \sum_{t: y_{nt} \ne \mathrm{ignore}} -\log \mathrm{softmax}(z_{nt})[y_{nt}]

    so ``e_n`` stacks ``m_{nt} (p_{nt} - onehot(y_{nt}))`` and ``H_n`` is block
    diagonal with blocks ``m_{nt} (diag(p_{nt}) - p_{nt} p_{nt}^T)``; ``s_n`` is
    the squared norm over all label positions and the whole vocabulary.

    A batch whose positions are all ignored is rejected. A single sample with
    all positions ignored has e_n = 0 and s_n = 0: the Gram-form updates accept
    it, the forms that divide by s_n (parameter-space iEF, ``ief_matrix``)
    raise. :meth:`hessian` and :meth:`hessian_sqrt` are dense (N, T*V, T*V),
    for small vocabularies only; at a real vocabulary use :meth:`hessian_vp`
    (``ngdref.fisher_vp`` and ``directions(..., ngd_solver="cg")``).
    """

    target_kind = "integral"

    def __init__(self, vocab_size: int, *, ignore_index: int = -100) -> None:
        self.vocab_size = check_int(vocab_size, "vocab_size")
        self.ignore_index = ignore_index

    def targets_shape(self, logits: Any) -> tuple[int, ...]:
        if logits.shape[1] % self.vocab_size != 0:
            raise ValueError(
                f"logits has {logits.shape[1]} columns, not a multiple of "
                f"vocab_size={self.vocab_size}"
            )
        return (logits.shape[0], logits.shape[1] // self.vocab_size)

    def _check_target_values(self, xp: Any, logits: Any, targets: Any) -> None:
        kept = targets != self.ignore_index
        if not bool(xp.any(kept)):
            raise ValueError(
                f"targets: every position equals ignore_index={self.ignore_index}; "
                "the batch has no label to fit"
            )
        valid = (targets >= 0) & (targets < self.vocab_size)
        if not bool(xp.all(valid | ~kept)):
            raise ValueError(f"targets must be token ids in [0, {self.vocab_size}) or ignore_index")

    def _parts(self, logits: Any, targets: Any) -> tuple[Any, Any, Any, Any]:
        """Namespace, per-position probabilities (N, T, V), mask (N, T, 1), safe labels."""
        xp = self.check(logits, targets)
        n, t = targets.shape
        z = xp.reshape(logits, (n, t, self.vocab_size))
        mask = targets != self.ignore_index
        labels = xp.where(mask, targets, xp.zeros_like(targets))
        return xp, z, xp.astype(mask, logits.dtype)[:, :, None], labels

    def value(self, logits: Any, targets: Any) -> Any:
        return self._cross_entropy(logits, targets, grad=False)[0]

    def grad(self, logits: Any, targets: Any) -> Any:
        return self._cross_entropy(logits, targets, grad=True)[1]

    def value_and_grad(self, logits: Any, targets: Any) -> tuple[Any, Any]:
        if not _shares_passes(self, SequenceSoftmaxCrossEntropy):
            return super().value_and_grad(logits, targets)
        return self._cross_entropy(logits, targets, grad=True)

    def _cross_entropy(self, logits: Any, targets: Any, *, grad: bool) -> tuple[Any, Any]:
        xp, z, mask, labels = self._parts(logits, targets)
        value, e = cross_entropy(xp, z, labels, grad=grad)
        value = xp.sum(mask[..., 0] * value, axis=1)
        return value, (xp.reshape(mask * e, logits.shape) if grad else None)

    def _block_diag(self, xp: Any, blocks: Any) -> Any:
        """(N, T, V, V) -> (N, T*V, T*V) block-diagonal."""
        n, t, v, _ = blocks.shape
        eye_t = xp.eye(t, dtype=blocks.dtype, device=array_api_compat.device(blocks))
        full = blocks[:, :, :, None, :] * eye_t[None, :, None, :, None]
        return xp.reshape(full, (n, t * v, t * v))

    def hessian(self, logits: Any, targets: Any) -> Any:
        xp, z, mask, _ = self._parts(logits, targets)
        p = softmax(xp, z)
        eye_v = xp.eye(self.vocab_size, dtype=logits.dtype, device=array_api_compat.device(logits))
        blocks = mask[..., None] * (p[..., None] * eye_v - p[..., :, None] * p[..., None, :])
        return self._block_diag(xp, blocks)

    def hessian_sqrt(self, logits: Any, targets: Any) -> Any:
        xp, z, mask, _ = self._parts(logits, targets)
        p = softmax(xp, z)
        r = xp.sqrt(p)
        eye_v = xp.eye(self.vocab_size, dtype=logits.dtype, device=array_api_compat.device(logits))
        blocks = mask[..., None] * (r[..., None] * eye_v - p[..., :, None] * r[..., None, :])
        return self._block_diag(xp, blocks)

    def hessian_vp(self, logits: Any, targets: Any, vectors: Any) -> Any:
        self.check_vectors(logits, targets, vectors)
        xp, z, mask, _ = self._parts(logits, targets)
        p = softmax(xp, z)
        v = xp.reshape(vectors, z.shape)
        hv = mask * (p * v - p * xp.sum(p * v, axis=-1, keepdims=True))
        return xp.reshape(hv, logits.shape)

    def uniforms_shape(self, logits: Any, num_samples: int) -> tuple[int, ...]:
        return (num_samples, *self.targets_shape(logits))

    def _keep_ignored(self, xp: Any, drawn: Any, targets: Any) -> Any:
        ignore = xp.full_like(drawn, self.ignore_index)
        return xp.where((targets != self.ignore_index)[None, ...], drawn, ignore)

    def _sample(self, xp: Any, logits: Any, uniforms: Any) -> Any:
        n, t = self.targets_shape(logits)
        z = xp.reshape(logits, (n, t, self.vocab_size))
        return categorical(xp, softmax(xp, z), uniforms)


def reduction_factor(reduction: str | float, num_samples: int) -> float:
    """The factor R that turns sum-convention per-sample quantities into a reduced loss's.

    Parameters
    ----------
    reduction : {"sum", "mean"} or float
        "sum" (the paper's convention, Eq. 1): R = 1. "mean" (torch.nn and
        Hugging Face default): R = 1/N. A positive float is used as R directly
        (e.g. 1 / number-of-label-tokens for Hugging Face's T5 token mean).
    num_samples : int
        N.

    Returns
    -------
    float
    """
    if isinstance(reduction, str):
        if reduction == "sum":
            return 1.0
        if reduction == "mean":
            return 1.0 / num_samples
        raise ValueError(f"reduction must be 'sum', 'mean' or a positive float, got {reduction!r}")
    if isinstance(reduction, bool) or not isinstance(reduction, (int, float)):
        raise TypeError(f"reduction must be 'sum', 'mean' or a positive float, got {reduction!r}")
    if not (math.isfinite(reduction) and reduction > 0):
        raise ValueError(f"reduction must be a finite positive factor, got {reduction}")
    return float(reduction)
