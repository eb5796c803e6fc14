r"""The independent route for the layer registry's tests, and the one place of their tolerances.

A :class:`Case` is a small model, a batch of N samples in some layout and where their
samples lie. Two routes give the per-sample gradients G (N, P) of the per-sample losses

.. math:: l_n = \sum_k \langle c_{kn}, y_{kn} \rangle + \tfrac14 \lVert y_{kn} \rVert^2

(y_kn: sample n's entries of the k-th output, c_kn fixed random; the sum convention):

* the registry: the model runs once under :class:`~backends.torch.layers.Recorder`, one
  backward pass of sum_n l_n gives every call's parts, :func:`~backends.torch.layers.assemble`
  makes one block per parameter, :class:`backends.ghost.GhostRows` holds them;
* the reference: a Python loop of single-sample forward passes through the model's own
  ``__call__`` (no hooks, no decomposed forward) and ``torch.autograd.grad`` in float64.

Tolerance (one place per dtype, :func:`rtol`). Every quantity compared is a sum of
products; a sum of K terms computed in precision eps is off by at most gamma_K sum |terms|
(Higham, Thm 3.1, gamma_K ~ K eps). In these cases no sum runs over more than K = 2^9 terms
(positions x widths x kernel entries), a value passes through at most 8 such stages (the
forward and backward passes of up to three linear stages, the factor product, the Gram
product), and the random data keep sum |terms| within a few times |sum| (no designed
cancellation). So a relative error norm-wise of C eps with C = 2^12 bounds both routes:
4.5e-13 in float64, 2.4e-4 for a float32 batch against the float64 loop (whose own error is
negligible). Comparisons: ||G - G_ref||_F <= tol ||G_ref||_F;
||K - G_ref G_ref^T||_F <= 3 tol ||G_ref||_F^2 (K - K_ref = E G^T + G E^T + E E^T);
||G v - G_ref v|| <= tol ||G_ref||_F ||v||, the same for G^T w.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from backends.torch.axes import BATCH_FIRST, BatchAxis, batch_first
from backends.torch.layers import Recorder, assemble
from backends.torch.per_sample.rows import DenseBlock, GhostRows

#: machine epsilon (unit roundoff 2^-p) per dtype, and the bound's constant (module docstring)
EPS = {torch.float64: 2.0**-53, torch.float32: 2.0**-24}
C = 2**12


def rtol(dtype: torch.dtype) -> float:
    """Norm-wise relative bound of the comparisons for a batch computed in ``dtype``."""
    return C * EPS[dtype]


def one(x: torch.Tensor, axis: BatchAxis, n: int, i: int) -> torch.Tensor:
    """Sample i's entries of ``x`` in the batch's own layout, for a batch of one."""
    s = batch_first(x, axis, n)[i]
    k = axis.axis
    return s.reshape(*x.shape[:k], axis.outer * axis.inner, *x.shape[k + 1:])


@dataclass(frozen=True)
class Case:
    """A model, its batch and where the samples lie.

    ``batch()`` returns (args, kwargs) in float64; ``axes``/``kwaxes`` give the batch axis of
    each tensor argument (None: shared by all samples); ``outputs`` picks the output tensors
    the loss reads, ``out_axes`` their batch axes; ``axis_of`` gives the recorder a call's
    batch axis (default: ``axes[0]`` for every call); ``sample(i, args, kwargs)`` overrides the
    split of the batch into single samples; ``train``: the forward pass runs in train mode.
    """

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[], tuple[tuple, dict]]
    n: int = 3
    axes: tuple[BatchAxis | None, ...] = (BATCH_FIRST,)
    kwaxes: dict[str, BatchAxis | None] = field(default_factory=dict)
    outputs: Callable[[Any], tuple[torch.Tensor, ...]] = lambda y: (y,)
    out_axes: tuple[BatchAxis, ...] | None = None
    axis_of: Callable[[nn.Module, tuple, dict], BatchAxis | None] | None = None
    sample: Callable[[int, tuple, dict], tuple[tuple, dict]] | None = None
    train: bool = False

    def __str__(self) -> str:
        return self.name

    def record_axis(self, module: nn.Module, args: tuple, kwargs: dict) -> BatchAxis | None:
        return self.axes[0] if self.axis_of is None else self.axis_of(module, args, kwargs)

    def single(self, i: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.sample is not None:
            return self.sample(i, args, kwargs)
        sliced: dict[int, torch.Tensor] = {}  # one tensor passed twice stays one (q is k is v)

        def part(x: Any, ax: BatchAxis | None) -> Any:
            if ax is None:
                return x
            return sliced.setdefault(id(x), one(x, ax, self.n, i))

        a = tuple(part(x, ax) for x, ax in zip(args, self.axes, strict=False))
        a += args[len(self.axes):]
        kw = {k: part(v, self.kwaxes.get(k)) for k, v in kwargs.items()}
        return a, kw


def _cast(v: Any, dtype: torch.dtype) -> Any:
    return v.to(dtype) if isinstance(v, torch.Tensor) and torch.is_floating_point(v) else v


def cast(args: tuple, kwargs: dict, dtype: torch.dtype) -> tuple[tuple, dict]:
    """Floating arguments in ``dtype``; one tensor passed twice stays one tensor."""
    done: dict[int, Any] = {}

    def f(v: Any) -> Any:
        if id(v) not in done:
            done[id(v)] = _cast(v, dtype)
        return done[id(v)]

    return tuple(f(a) for a in args), {k: f(v) for k, v in kwargs.items()}


def models(case: Case, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    """(the batch route's model in ``dtype``, the loop's float64 copy of the same values)."""
    torch.manual_seed(0)
    model = case.build().to(dtype)
    model.train(case.train)
    reference = copy.deepcopy(model).double()
    return model, reference


def inputs(case: Case, dtype: torch.dtype) -> tuple[tuple, dict]:
    """The batch in ``dtype``; the loop casts the same values back to float64."""
    torch.manual_seed(1)
    return cast(*case.batch(), dtype)


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def loss(case: Case, ys: Sequence[torch.Tensor], n: int, samples: Sequence[int]) -> torch.Tensor:
    """sum over ``samples`` of l_n, from outputs ``ys`` holding ``n`` samples in order."""
    axes = case.out_axes or (case.axes[0],) * len(ys)
    total = torch.zeros((), dtype=ys[0].dtype)
    for k, (y, ax) in enumerate(zip(ys, axes, strict=True)):
        per = batch_first(y, ax, n).reshape(n, -1)
        gen = torch.Generator().manual_seed(100 + k)
        c = torch.randn(case.n, per.shape[1], generator=gen, dtype=torch.float64).to(y.dtype)
        total = total + (c[list(samples)] * per).sum() + 0.25 * (per * per).sum()
    return total


def reference_rows(case: Case, model: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """G (N, P) float64: one forward and backward pass per sample through the model."""
    params = [p for _, p in trainable(model)]
    rows = []
    for i in range(case.n):
        a, kw = case.single(i, *cast(args, kwargs, torch.float64))
        y = model(*a, **kw)
        grads = torch.autograd.grad(loss(case, case.outputs(y), 1, [i]), params,
                                    allow_unused=True)
        rows.append(torch.cat([
            torch.zeros(p.numel(), dtype=torch.float64) if g is None
            else (g.to_dense() if g.is_sparse else g).reshape(-1)
            for p, g in zip(params, grads, strict=True)]))
    return torch.stack(rows)


@dataclass
class Batch:
    """What the registry's route gave for one case."""

    recorder: Recorder
    output: Any
    uses: dict[nn.Parameter, list]
    params: list[tuple[str, nn.Parameter]]


def record(case: Case, model: nn.Module, args: tuple, kwargs: dict) -> Batch:
    """One forward pass under the Recorder and one backward pass of sum_n l_n."""
    recorder = Recorder(model, case.record_axis, case.n, mode="train" if case.train else "eval")
    with recorder.recording():
        y = model(*args, **kwargs)
    total = loss(case, case.outputs(y), case.n, range(case.n))
    uses = recorder.uses([total], [torch.ones((), dtype=total.dtype)])
    return Batch(recorder, y, uses, trainable(model))


def rows_of(batch: Batch, n: int, route: str) -> GhostRows:
    """GhostRows of the recorded uses, one block per trainable parameter."""
    factors, dense, offset = [], [], 0
    dtype = batch.params[0][1].dtype
    for name, p in batch.params:
        if p not in batch.uses:
            raise AssertionError(f"{name}: no recorded use (refused: {batch.recorder.refused})")
        block = assemble(offset, tuple(p.shape), batch.uses[p], route=route)
        (dense if isinstance(block, DenseBlock) else factors).append(block)
        offset += p.numel()
    return GhostRows(n, offset, factors=factors, dense=dense, dtype=dtype,
                     device=torch.device("cpu"))


def assert_rows_match(rows: GhostRows, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Materialised rows, Gram, G v and G^T w against G_ref (bounds in the module docstring)."""
    tol = rtol(dtype)
    scale = float(torch.linalg.norm(expected))
    assert scale > 0, "the reference rows are all zero: the case tests nothing"
    got = rows.materialise().double()
    err = float(torch.linalg.norm(got - expected))
    assert err <= tol * scale, f"rows off by {err / scale:.3g} relative (bound {tol:.3g})"
    gram_err = float(torch.linalg.norm(rows.gram() - expected @ expected.T))
    assert gram_err <= 3 * tol * scale**2, (
        f"Gram off by {gram_err / scale**2:.3g} of ||G||^2 (bound {3 * tol:.3g})")
    gen = torch.Generator().manual_seed(7)
    v = torch.randn(expected.shape[1], generator=gen, dtype=torch.float64)
    w = torch.randn(expected.shape[0], generator=gen, dtype=torch.float64)
    gv = float(torch.linalg.norm(rows.matvec(v.to(dtype)).double() - expected @ v))
    assert gv <= tol * scale * float(torch.linalg.norm(v)), f"G v off by {gv:.3g}"
    gtw = float(torch.linalg.norm(rows.rmatvec(w.to(dtype)).double() - expected.T @ w))
    assert gtw <= tol * scale * float(torch.linalg.norm(w)), f"G^T w off by {gtw:.3g}"


def assert_close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                 what: str) -> None:
    """Norm-wise ||got - expected|| <= tol ||expected|| (tol for ``dtype``)."""
    scale = float(torch.linalg.norm(expected.double()))
    err = float(torch.linalg.norm(got.double() - expected.double()))
    assert err <= rtol(dtype) * max(scale, math.ulp(1.0)), (
        f"{what} off by {err:.3g} (||expected|| = {scale:.3g}, bound {rtol(dtype):.3g} relative)")
