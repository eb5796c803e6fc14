r"""Per-sample rows by a loop of single-sample passes: the exact route for any model.

Row n of the per-sample rows G (N, P) is the vector-Jacobian product of sample n alone,

.. math:: G_{n,:} = u_n^\top J_n, \qquad J_n = \partial z_n / \partial \theta \in
    \mathbb{R}^{C \times P},

(sum convention: with ``u = loss.grad(logits, targets)`` row n is grad_theta l_n, nothing is
divided by N). This route computes it as the gradient of :math:`u_n \cdot z_n` from a forward
pass of sample n as a batch of one, and one backward pass, for n = 1, ..., N, writing each
row straight into a preallocated (N, size) output. It needs nothing from the model but its
call on a sub-batch, so it works where ``torch.func.vmap`` cannot:

- ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` (batch first or not, packed sequences);
- hand-written recurrent cells whose initial state is ``torch.zeros(batch, hidden)`` (a
  batch-sized constant is then a (1, hidden) constant);
- data-dependent Python control flow, in-place updates, anything autograd runs.

It is exact for models whose samples are independent (no batch statistics, no cross-sample
gradient scaling; :mod:`backends.torch.per_sample.semantics` refuses the others by name),
and costs N forward and N backward passes of one sample.

Parameters of theta that a caller does not ask for (``ranges``) are constants of the passes:
their weight gradients are never formed. A parameter asked for, in whole or in part, is a leaf
of its own shape (an ``Embedding(sparse=True)`` gives a sparse gradient, written densely).

:class:`BatchModel` names the little this route (and the certificate of
:mod:`backends.torch.per_sample.certify`) needs from a provider.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = ["BatchModel", "loop_vjp", "loop_vjp_ranges", "slice_packed"]


class BatchModel(Protocol):
    """The model of a provider on its batch of N samples, as the loop and the certificate
    need it.

    ``TorchProvider`` implements it with its functional call (eval mode, Hugging Face inputs,
    ``output_fn``); a test adapter with a few lines.
    """

    @property
    def num_samples(self) -> int:
        """N, the samples of the batch."""
        ...

    def params_vector(self) -> torch.Tensor:
        """theta (P,): the trainable parameters the model is evaluated at."""
        ...

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: view of the parameter's shape}`` of a (P,) vector, in theta order."""
        ...

    def sub_batch_logits(self, params: Mapping[str, torch.Tensor], rows: slice) -> torch.Tensor:
        """Logits (n, C) of the samples ``rows`` of the batch (a batch of n = len(rows)),
        with the trainable parameters ``params`` (as :meth:`unflatten` gives them)."""
        ...

    def module_mode(self) -> AbstractContextManager[None]:
        """The context every pass runs in: the mode policy applied to every submodule
        (eval mode by default), each module's flag restored after."""
        ...


@dataclass(frozen=True)
class _Segment:
    """Entries [start, stop) of one parameter's flattening, asked for by one range, written
    at ``column`` of that range's output."""

    start: int
    stop: int
    range_index: int
    column: int


def _plan(
    sizes: Mapping[str, int], ranges: Sequence[tuple[int, int]]
) -> dict[str, list[_Segment]]:
    """The segments of each parameter that the (checked, disjoint) ranges cover."""
    plan: dict[str, list[_Segment]] = {}
    offset = 0
    for name, size in sizes.items():
        segments = []
        for index, (start, length) in enumerate(ranges):
            lo, hi = max(start, offset), min(start + length, offset + size)
            if lo < hi:
                segments.append(_Segment(lo - offset, hi - offset, index, lo - start))
        if segments:
            plan[name] = sorted(segments, key=lambda s: s.start)
        offset += size
    return plan


def _leaves(
    values: Mapping[str, torch.Tensor], plan: Mapping[str, list[_Segment]]
) -> tuple[dict[str, torch.Tensor], list[tuple[torch.Tensor, list[_Segment]]]]:
    """Parameters for one pass: constants, except the planned ones, which are fresh leaves of
    their own shape (views of theta, no copy); a partly planned parameter is a whole leaf
    too (its gradient is cut afterwards: a sparse gradient cannot flow into a slice)."""
    params = dict(values)
    leaves = []
    for name, segments in plan.items():
        leaf = values[name].detach().requires_grad_(True)
        params[name] = leaf
        leaves.append((leaf, segments))
    return params, leaves


def _check_ranges(ranges: object, num_params: int) -> list[tuple[int, int]]:
    if not isinstance(ranges, Sequence) or not ranges:
        raise ValueError(f"ranges must be a non-empty list of (offset, size) pairs, got {ranges!r}")
    checked = []
    for pair in ranges:
        ok = isinstance(pair, tuple) and len(pair) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in pair
        )
        if not ok or pair[0] < 0 or pair[1] < 1 or pair[0] + pair[1] > num_params:
            raise ValueError(
                f"ranges: each entry must be a pair (offset, size) of ints with offset >= 0, "
                f"size >= 1 and offset + size <= P = {num_params}, got {pair!r}"
            )
        checked.append(pair)
    ordered = sorted(checked)
    for (a, size), (b, _) in itertools.pairwise(ordered):
        if a + size > b:
            raise ValueError(f"ranges must be disjoint; ({a}, {size}) overlaps the range at {b}")
    return checked


def _check_out(
    out: Sequence[torch.Tensor], shapes: Sequence[tuple[int, int]], theta: torch.Tensor
) -> None:
    if len(out) != len(shapes):
        raise ValueError(f"out must hold one tensor per range ({len(shapes)}), got {len(out)}")
    for i, (tensor, shape) in enumerate(zip(out, shapes, strict=True)):
        name = f"out[{i}]" if len(shapes) > 1 else "out"
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor)
            raise ValueError(f"{name} must be a torch.Tensor of shape {shape}, got {got}")
        if tensor.dtype != theta.dtype or tensor.device != theta.device:
            raise TypeError(
                f"{name} has dtype {tensor.dtype} on {tensor.device}; the parameters have "
                f"{theta.dtype} on {theta.device}"
            )


def _check_cotangents(cotangents: object, n: int, theta: torch.Tensor) -> torch.Tensor:
    if not isinstance(cotangents, torch.Tensor) or cotangents.ndim != 2:
        got = tuple(cotangents.shape) if isinstance(cotangents, torch.Tensor) else cotangents
        raise ValueError(f"cotangents must be a torch.Tensor of shape (N, C), got {got!r}")
    if cotangents.shape[0] != n:
        raise ValueError(f"cotangents has {cotangents.shape[0]} rows but the batch has N = {n}")
    if cotangents.dtype != theta.dtype or cotangents.device != theta.device:
        raise TypeError(
            f"cotangents has dtype {cotangents.dtype} on {cotangents.device}; the parameters "
            f"have {theta.dtype} on {theta.device}"
        )
    return cotangents


def loop_vjp_ranges(
    model: BatchModel,
    cotangents: torch.Tensor,
    ranges: Sequence[tuple[int, int]],
    *,
    out: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    r"""Per-sample ``u_n^T J_n`` restricted to slices of theta: one (N, size) per range.

    .. math:: \mathrm{out}_r[n, :] = \big(u_n^\top \partial z_n / \partial \theta\big)
        [\mathrm{offset}_r : \mathrm{offset}_r + \mathrm{size}_r]

    One forward and one backward pass per sample, each sample alone (a batch of one), in the
    provider's mode (eval by default); the rest of theta is held constant.

    Parameters
    ----------
    model : BatchModel
        The provider (or an adapter) whose batch and parameters are used.
    cotangents : torch.Tensor, shape (N, C)
        u, in theta's dtype and device.
    ranges : list of (int, int)
        Disjoint (offset, size) slices of theta (P,), in any order.
    out : list of torch.Tensor, optional
        One (N, size) tensor per range, theta's dtype and device, written in place.

    Returns
    -------
    list of torch.Tensor
        ``out`` (or new tensors), in the order of ``ranges``; sum convention.

    Raises
    ------
    ValueError
        Bad ranges, cotangents or out (named); a sample whose logits alone do not have the
        C entries of the cotangents (an output that depends on the batch, e.g. padded to the
        batch's longest sequence).
    """
    theta = model.params_vector().detach()
    n = model.num_samples
    u = _check_cotangents(cotangents, n, theta)
    checked = _check_ranges(ranges, theta.numel())
    shapes = [(n, size) for _, size in checked]
    if out is None:
        out = [torch.empty(shape, dtype=theta.dtype, device=theta.device) for shape in shapes]
    else:
        out = list(out)
        _check_out(out, shapes, theta)
    values = model.unflatten(theta)
    plan = _plan({name: v.numel() for name, v in values.items()}, checked)
    with model.module_mode(), torch.enable_grad():
        for i in range(n):
            params, leaves = _leaves(values, plan)
            z = model.sub_batch_logits(params, slice(i, i + 1))
            if z.ndim == 0 or z.shape[0] != 1 or z[0].numel() != u.shape[1]:
                raise ValueError(
                    f"sample {i} alone gives logits of shape {tuple(z.shape)}, but the "
                    f"cotangents have C = {u.shape[1]} per sample: the model's output depends "
                    "on the batch (e.g. padding to the batch's longest sequence; pass a fixed "
                    "total_length)"
                )
            _write_row(z.reshape(-1), u[i], leaves, [o[i] for o in out])
    return out


def _write_row(
    z: torch.Tensor,
    u: torch.Tensor,
    leaves: list[tuple[torch.Tensor, list[_Segment]]],
    rows: list[torch.Tensor],
) -> None:
    """The segments of d(u . z)/d(leaf) into ``rows`` (one row per range); zero where z does
    not use a leaf."""
    if z.requires_grad:
        grads = torch.autograd.grad(z @ u, [leaf for leaf, _ in leaves], allow_unused=True)
    else:
        grads = (None,) * len(leaves)
    for (_, segments), grad in zip(leaves, grads, strict=True):
        flat = None if grad is None else (grad.to_dense() if grad.is_sparse else grad).reshape(-1)
        for s in segments:
            target = rows[s.range_index][s.column:s.column + s.stop - s.start]
            if flat is None:
                target.zero_()
            else:
                target.copy_(flat[s.start:s.stop])


def loop_vjp(
    model: BatchModel, cotangents: torch.Tensor, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    r"""Per-sample rows ``G[n] = u_n^T J_n`` over all of theta; shape (N, P).

    :func:`loop_vjp_ranges` with the one range (0, P); ``out`` (N, P) is written in place.
    """
    theta = model.params_vector()
    (rows,) = loop_vjp_ranges(
        model, cotangents, [(0, theta.numel())], out=None if out is None else [out]
    )
    return rows


def slice_packed(
    packed: torch.nn.utils.rnn.PackedSequence, rows: slice
) -> torch.nn.utils.rnn.PackedSequence:
    """The samples ``rows`` of a ``PackedSequence``, packed again (same values per sample).

    A provider slicing its batch for :func:`loop_vjp` calls this for packed inputs: they
    cannot be indexed along a batch axis. Sample order is the original (unsorted) order.
    """
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    padded, lengths = pad_packed_sequence(packed, batch_first=True)
    return pack_padded_sequence(
        padded[rows], lengths[rows], batch_first=True, enforce_sorted=False
    )
