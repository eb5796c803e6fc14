r"""Certify the per-sample rows of a step: their G v against an independent G v, in torch.

:func:`certify_rows` draws a Gaussian v (P,) from a seeded ``torch.Generator``, takes
:math:`r = G_{rows} v` from the rows under test (any ``ngdref.PerSampleRows``: ghost factors,
materialised blocks, vmap or loop rows, or a dense (N, P) tensor) and compares it with

.. math:: r^*_n = u_n \cdot (J_n v), \qquad n = 1, \dots, N,

where :math:`J v` (N, C) comes from the batched forward pass and nothing per sample:

``"forward"``
    one forward-mode pass (``torch.autograd.forward_ad``, no graph) of the batch's logits at
    theta along v: about 2 forward passes of cost (every matmul carries its tangent;
    ``F.linear`` and ``F.layer_norm`` by formulas of this module, :data:`_RULES`, several
    times cheaper than torch's own rules on the CPU; ``F.embedding_bag``, which has no
    forward-mode rule nor double backward in torch, by its own formula there too);
``"double-backward"``
    where forward mode is unsupported: with a dummy W (N, C) requiring grad,
    :math:`t(W) = \nabla_\theta \sum_{n} W_n \cdot z_n = J^\top W` (a backward pass that
    builds its own graph), then :math:`J v = \nabla_W (t(W) \cdot v)`; W of shape (N, C)
    rather than (N,) costs nothing more and gives the tangents t_n = J_n v the bound needs;
``"auto"``
    forward mode, and the double backward pass if an operation has no forward-mode rule.

Both run ``scaled_dot_product_attention`` on its math kernel (the fused kernels have neither
rule). The comparison and its rounding bound are :mod:`ngdref.certificate` (derivation
there): :math:`|r_n - r^*_n| \le c\,u\,(\|g_n\|\|v\| + \sqrt{L}\,\|u_n\|\|J_n v\|)` per
sample, with u the unit roundoff of the least precise arithmetic the reference pass ran (a
``TorchFunctionMode`` sees every result: T5's layer norm takes its variance in float32 even
in a float64 model; float32 convolutions and matmuls count as TF32 or bfloat16 where torch's
flags allow those), L the number of its floating-point torch functions, and
:math:`\|g_n\|` from the rows' Gram diagonal (or ``row_sq_norms`` if the step has it).

v is Gaussian, not Rademacher: a wrong row is then caught with probability one (a
Rademacher v misses a row error :math:`e_1 - e_2` half the time), the miss probability below
the bound is explicit (:mod:`ngdref.certificate`), and v is an exact input of both routes, so
its rounding to the dtype does not matter.

The options of ``TorchProvider`` and the optimisers (``certify``, ``on_mismatch``,
``certify_samples``) and the policy that runs them over a step's routes are
:mod:`backends.torch.per_sample.policy`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import array_api_compat
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from ngdref.certificate import (
    Certificate,
    certify_products,
    product_bounds,
    unit_roundoff,
)
from ngdref.checks import NonFiniteError, check_choice, check_int
from ngdref.rows import as_rows, sq_row_norms

from .loop import BatchModel
from .vmap import error_line

__all__ = ["REFERENCES", "CertificateUnavailableError", "certify_rows", "gaussian_vector",
           "reference_tangents"]

REFERENCES = ("auto", "forward", "double-backward")


class CertificateUnavailableError(RuntimeError):
    """Neither reference route can run on the model (no forward-mode rule and no double
    backward for one of its operations): its rows cannot be certified."""


#: torch functions whose float32 kernels may round to TF32 / bfloat16 (backend flags)
_MATMULS = frozenset({
    "linear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "baddbmm", "addbmm",
    "mv", "addmv", "einsum", "bilinear", "tensordot", "scaled_dot_product_attention",
})


class _Watch(TorchFunctionMode):
    """The reference pass's mode: counts its floating-point torch functions (its depth L),
    records the dtypes they return and where a float32 convolution or matmul ran, and gives
    forward mode torch's reverse-mode convention for ``F.embedding(..., padding_idx=i)``:
    row i is not trained, so its tangent is zero (forward mode would otherwise carry it into
    the padding positions' outputs, and G v would disagree with every reverse route)."""

    def __init__(self) -> None:
        super().__init__()
        #: whether the pass runs in forward mode (dual tensors): ``F.linear`` and
        #: ``F.layer_norm`` then take :data:`_RULES`
        self.forward = False
        self.depth = 0
        self.dtypes: set[torch.dtype] = set()
        self.float32_ops: set[tuple[str, str]] = set()  # (device type, "conv" | "matmul")

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.embedding:
            args, kwargs = _untrained_padding_row(tuple(args), dict(kwargs))
        try:
            rule = _RULES.get(func) if self.forward else None
        except TypeError:  # an unhashable callable (the watch of the forward pass sees some)
            rule = None
        out = func(*args, **kwargs) if rule is None else rule(*args, **kwargs)
        floating = [t for t in (out if isinstance(out, (tuple, list)) else (out,))
                    if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if floating:
            self.depth += 1
            self.dtypes.update(t.dtype for t in floating)
            name = getattr(func, "__name__", "")
            kind = "conv" if name.startswith("conv") else "matmul" if name in _MATMULS else None
            if kind and floating[0].dtype == torch.float32:
                self.float32_ops.add((floating[0].device.type, kind))
        return out

    def unit_roundoff(self) -> float:
        """u of the least precise arithmetic seen: the dtypes, and TF32 (u = 2^-11) or
        bfloat16 (2^-8) inside float32 convolutions and matmuls where torch's flags allow
        them (cuDNN's TF32 convolutions are on by default on CUDA)."""
        u = unit_roundoff(torch, *self.dtypes) if self.dtypes else 0.0
        precision = torch.get_float32_matmul_precision()  # "highest", "high" (TF32), "medium"
        lowered = {"high": 2.0**-11, "medium": 2.0**-8}.get(precision, 0.0)
        for device, kind in self.float32_ops:
            if device == "cuda" and kind == "conv" and torch.backends.cudnn.allow_tf32:
                u = max(u, 2.0**-11)
            if device == "cuda" and kind == "matmul" and torch.backends.cuda.matmul.allow_tf32:
                u = max(u, 2.0**-11)
            if kind == "matmul":
                u = max(u, lowered)
        return u


def _linear_jvp(input: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    r"""``F.linear`` on dual tensors by the product rule, each term only where its tangent is:

    .. math:: \dot y = \dot x W^\top + x \dot W^\top + \dot b.

    Torch's own forward-mode rule for ``linear`` costs about 3.8 plain calls (measured for a
    frozen (32128, 512) weight on a (16, 48, 512) input, CPU float32); this one costs one
    plain call per tangent present, so a frozen layer's tangent costs one matmul. The primal
    is the plain call.
    The arguments keep ``F.linear``'s names: a model may pass them as keywords.
    """
    x, x_dot = forward_ad.unpack_dual(input)
    w, w_dot = forward_ad.unpack_dual(weight)
    b, b_dot = (None, None) if bias is None else forward_ad.unpack_dual(bias)
    primal = F.linear(x, w, b)
    terms = [F.linear(x_dot, w)] if x_dot is not None else []
    if w_dot is not None:
        terms.append(F.linear(x, w_dot))
    if b_dot is not None:
        terms.append(b_dot.expand(primal.shape))
    if not terms:
        return primal
    return forward_ad.make_dual(primal, sum(terms[1:], terms[0]))


def _layer_norm_jvp(input: torch.Tensor, normalized_shape: Any,
                    weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                    eps: float = 1e-5) -> torch.Tensor:
    r"""``F.layer_norm`` on dual tensors: with :math:`\hat x = (x - \mu) r`, mean and
    :math:`r = (\sigma^2 + \epsilon)^{-1/2}` over the normalised axes (``native_layer_norm``
    returns both with the primal),

    .. math:: \dot y = w \odot r\,(\dot x - \overline{\dot x}
              - \hat x\,\overline{\hat x \odot \dot x}) + \hat x \odot \dot w + \dot b,

    each term only where its tangent is (the bars: means over the normalised axes). Torch's
    own forward-mode rule costs about 17 plain calls (measured on a (32, 197, 384) input,
    CPU float32); this one about 6. Like torch's rule it counts as one function of the pass.
    """
    x, x_dot = forward_ad.unpack_dual(input)
    w, w_dot = (None, None) if weight is None else forward_ad.unpack_dual(weight)
    b, b_dot = (None, None) if bias is None else forward_ad.unpack_dual(bias)
    if x_dot is None and w_dot is None and b_dot is None:
        return F.layer_norm(x, normalized_shape, w, b, eps)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
    primal, mean, rstd = torch.native_layer_norm(x, list(shape), w, b, eps)
    axes = tuple(range(-len(shape), 0))
    x_hat = (x - mean) * rstd
    terms = []
    if x_dot is not None:
        centred = x_dot - x_dot.mean(axes, keepdim=True)
        d = rstd * (centred - x_hat * (x_hat * x_dot).mean(axes, keepdim=True))
        terms.append(d if w is None else d * w)
    if w_dot is not None:
        terms.append(x_hat * w_dot)
    if b_dot is not None:
        terms.append(b_dot.expand(primal.shape))
    return forward_ad.make_dual(primal, sum(terms[1:], terms[0]).to(primal.dtype))


def _embedding_bag_jvp(input: torch.Tensor, weight: torch.Tensor, offsets: Any = None,
                       max_norm: Any = None, norm_type: float = 2.0,
                       scale_grad_by_freq: bool = False, mode: str = "mean",
                       sparse: bool = False, per_sample_weights: Any = None,
                       include_last_offset: bool = False, padding_idx: Any = None
                       ) -> torch.Tensor:
    r"""``F.embedding_bag`` on dual tensors (torch has no forward-mode rule for it). Modes sum
    and mean are linear in the table and (sum) in the weights w_p of the positions:

    .. math:: \dot y = \mathrm{bag}(\dot W; w) + \mathrm{bag}(W; \dot w);

    mode max passes on the tangent of the row that won each (bag, dimension), the
    ``max_indices`` of torch's backward (nothing for an empty bag). Positions at
    ``padding_idx`` are left out of every bag, so that row's tangent never enters. The
    arguments keep ``F.embedding_bag``'s names."""
    w, w_dot = forward_ad.unpack_dual(weight)
    p, p_dot = (None, None) if per_sample_weights is None else forward_ad.unpack_dual(
        per_sample_weights)

    def bag(table: torch.Tensor, weights: Any) -> torch.Tensor:
        return F.embedding_bag(input, table, offsets, max_norm, norm_type, scale_grad_by_freq,
                               mode, sparse, weights, include_last_offset, padding_idx)

    primal = bag(w, p)
    terms = [bag(w_dot, p)] if w_dot is not None and mode != "max" else []
    if w_dot is not None and mode == "max":
        flat = input.reshape(-1)
        starts = offsets if input.ndim == 1 else torch.arange(
            0, flat.numel(), input.shape[-1], device=flat.device)
        found = torch.embedding_bag(w, flat, starts, False, 2, False, None,
                                    include_last_offset, padding_idx)
        column = torch.arange(w.shape[1], device=w.device).expand_as(found[3])
        terms.append(w_dot[found[3], column] * (found[2] > 0)[:, None])
    if p_dot is not None:
        terms.append(bag(w, p_dot))
    if not terms:
        return primal
    return forward_ad.make_dual(primal, sum(terms[1:], terms[0]))


#: forward-mode rules of the reference pass cheaper than torch's (same J v up to rounding),
#: or where torch has none (``F.embedding_bag``)
_RULES: dict[Any, Callable[..., torch.Tensor]] = {F.linear: _linear_jvp,
                                                  F.layer_norm: _layer_norm_jvp,
                                                  F.embedding_bag: _embedding_bag_jvp}


def _untrained_padding_row(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``F.embedding``'s arguments with the forward tangent of row ``padding_idx`` zeroed."""
    weight = kwargs["weight"] if "weight" in kwargs else args[1]
    padding = kwargs.get("padding_idx", args[2] if len(args) > 2 else None)
    primal, tangent = forward_ad.unpack_dual(weight)
    if padding is None or tangent is None:
        return args, kwargs
    tangent = tangent.clone()
    tangent[padding] = 0
    weight = forward_ad.make_dual(primal, tangent)
    if "weight" in kwargs:
        return args, {**kwargs, "weight": weight}
    return (args[0], weight, *args[2:]), kwargs


def gaussian_vector(size: int, *, seed: int, dtype: torch.dtype,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """v ~ N(0, I) (size,), drawn on ``device`` by a ``torch.Generator`` of that device seeded
    with ``seed`` (reproducible per device type; a P-vector is not drawn on the CPU and
    copied to an accelerator)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(size, generator=generator, dtype=dtype, device=device)


def _forward(logits: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor,
             vector: torch.Tensor) -> torch.Tensor:
    # forward-mode AD without a graph: cheaper than torch.func.jvp (no functorch wrapping)
    with torch.no_grad(), forward_ad.dual_level():
        return forward_ad.unpack_dual(logits(forward_ad.make_dual(theta, vector))).tangent


def _double_backward(logits: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor,
                     vector: torch.Tensor, watch: _Watch) -> torch.Tensor:
    """J v = grad_w <J^T w, v>, with w a fixed Gaussian. A first backward that is not itself
    differentiable (a custom ``autograd.Function`` marked ``once_differentiable``) silently
    drops its paths from J v, so the pass must satisfy <J v, w> = <v, J^T w> (both in float64,
    within sqrt(u) of their scale: rounding is far smaller, a dropped path far larger)."""
    with torch.enable_grad():
        leaf = theta.detach().requires_grad_(True)
        z = logits(leaf)
        gen = torch.Generator(device=z.device).manual_seed(0)
        w = torch.randn(z.shape, generator=gen, dtype=z.dtype, device=z.device)
        dummy = w.clone().requires_grad_(True)
        (t,) = torch.autograd.grad(z, leaf, grad_outputs=dummy, create_graph=True)
        (tangents,) = torch.autograd.grad(t, dummy, grad_outputs=vector)
    a, b, t, v = (x.detach().double().reshape(-1) for x in (tangents, w, t, vector))
    gap = float(torch.dot(a, b) - torch.dot(v, t))
    scale = float(a.norm() * b.norm() + v.norm() * t.norm())
    u = watch.unit_roundoff()
    if not abs(gap) <= max(u**0.5, 1e3 * u) * scale:
        raise RuntimeError(f"the backward pass is not differentiable along every path "
                           f"(<J v, w> - <v, J^T w> = {gap:.3e} of {scale:.3e})")
    return tangents


def reference_tangents(
    model: BatchModel, vector: torch.Tensor, *, route: str = "auto",
    theta: torch.Tensor | None = None, rows: slice | None = None,
) -> tuple[torch.Tensor, str, _Watch]:
    r"""J v (n, C) of the logits of the samples ``rows`` along ``vector`` (P,), one pass.

    Parameters
    ----------
    model : BatchModel
    vector : torch.Tensor, shape (P,)
    route : {"auto", "forward", "double-backward"}
        See the module docstring.
    theta : torch.Tensor, shape (P,), optional
        ``model.params_vector()`` if the caller has it.
    rows : slice, optional
        The samples (default all N): one pass over them as a batch.

    Returns
    -------
    tangents : torch.Tensor, shape (n, C)
        Row i is :math:`J_{n_i} v` (detached).
    route : str
        The route taken.
    watch : _Watch
        What the pass computed in: its depth (floating-point torch functions), dtypes and
        :meth:`_Watch.unit_roundoff`.
    """
    check_choice(route, "route", REFERENCES)
    theta = (model.params_vector() if theta is None else theta).detach()
    rows = slice(0, model.num_samples) if rows is None else rows

    def logits(th: torch.Tensor) -> torch.Tensor:
        return model.sub_batch_logits(model.unflatten(th), rows)

    watch = _Watch()
    # the math kernel of scaled_dot_product_attention has both rules; the fused CPU and CUDA
    # kernels have neither (nn.MultiheadAttention, Hugging Face's "sdpa" attention)
    with model.module_mode(), sdpa_kernel(SDPBackend.MATH), watch:
        if route != "double-backward":
            try:
                watch.forward = True
                tangents = _forward(logits, theta, vector)
                route = "forward"
            except (NotImplementedError, RuntimeError) as err:
                # no forward rule (mkldnn's LSTM, packed sequences, ...): try the other route,
                # and report both if the model itself is at fault
                if route == "forward":
                    raise
                forward_error = err
                watch.depth = 0  # the depth of the pass that completes
            finally:
                watch.forward = False
        if route != "forward":
            try:
                tangents = _double_backward(logits, theta, vector, watch)
            except (NotImplementedError, RuntimeError) as err:
                if route == "auto":
                    raise CertificateUnavailableError(
                        f"forward mode: {error_line(forward_error)}; double backward: "
                        f"{error_line(err)}") from err
                raise
            route = "double-backward"
    return tangents.detach().reshape(tangents.shape[0], -1), route, watch


def _check_rows(rows: Any, n: int, theta: torch.Tensor) -> Any:
    rows = as_rows(rows, name="rows")
    if not array_api_compat.is_torch_namespace(rows.array_namespace()):
        raise TypeError("rows must be torch rows (a tensor or a PerSampleRows of torch)")
    if tuple(rows.shape) != (n, theta.numel()):
        raise ValueError(f"rows has shape {tuple(rows.shape)}, expected (N, P) = "
                         f"{(n, theta.numel())}")
    if rows.dtype != theta.dtype:
        raise TypeError(f"rows has dtype {rows.dtype} but the parameters have {theta.dtype}")
    return rows


def _check_inputs(cotangents: Any, row_sq_norms: Any, n: int, theta: torch.Tensor) -> None:
    if not isinstance(cotangents, torch.Tensor) or cotangents.ndim != 2 or \
            cotangents.shape[0] != n:
        got = tuple(cotangents.shape) if isinstance(cotangents, torch.Tensor) else cotangents
        raise ValueError(f"cotangents must be a torch.Tensor of shape (N = {n}, C), got {got!r}")
    if cotangents.dtype != theta.dtype or cotangents.device != theta.device:
        raise TypeError(f"cotangents has dtype {cotangents.dtype} on {cotangents.device}; the "
                        f"parameters have {theta.dtype} on {theta.device}")
    if row_sq_norms is not None and (
        not isinstance(row_sq_norms, torch.Tensor) or tuple(row_sq_norms.shape) != (n,)
        or not row_sq_norms.is_floating_point()
    ):
        raise ValueError(f"row_sq_norms must be a floating torch.Tensor of shape (N = {n},)")


def _window(n: int, samples: int | None, seed: int) -> slice:
    """``samples`` consecutive samples from a seeded offset, or all N."""
    if samples is None or samples >= n:
        return slice(0, n)
    generator = torch.Generator().manual_seed(seed)
    start = int(torch.randint(0, n - samples + 1, (1,), generator=generator))
    return slice(start, start + samples)


def certify_rows(
    model: BatchModel,
    rows: Any,
    cotangents: torch.Tensor,
    *,
    seed: int = 0,
    route: str = "auto",
    row_sq_norms: torch.Tensor | None = None,
    samples: int | None = None,
) -> Certificate:
    r"""Certify per-sample rows :math:`G_{n,:} = u_n^\top J_n` against an independent G v.

    Parameters
    ----------
    model : BatchModel
        The provider the rows were computed from (same batch, theta and mode).
    rows : ngdref.PerSampleRows or torch.Tensor, shape (N, P)
        The rows under test, in the cotangents' convention (sum: row n = grad l_n).
    cotangents : torch.Tensor, shape (N, C)
        u, the cotangents the rows were computed with, theta's dtype and device.
    seed : int >= 0
        Seed of the Gaussian v (:func:`gaussian_vector`) and of the window of ``samples``.
    route : {"auto", "forward", "double-backward"}
        The reference's route (:func:`reference_tangents`).
    row_sq_norms : torch.Tensor, shape (N,), optional
        :math:`\|g_n\|^2` if the caller has them (the diagonal of the Gram it formed);
        default ``ngdref.rows.sq_row_norms(rows)``.
    samples : int >= 1, optional
        Certify only this many consecutive samples, from an offset drawn with ``seed``: the
        reference pass runs on them alone (its cost scales with samples / N). A route that
        is wrong for the model is wrong on every sample and still caught; a single wrong row
        is caught only if it is in the window. Default: all N.

    Returns
    -------
    ngdref.certificate.Certificate
        error and bound at the worst sample, the route, u, and the seconds it took.

    Raises
    ------
    ngdref.certificate.RowsCertificateError
        The rows are wrong beyond rounding (the exception carries error, bound, sample and
        route).
    CertificateUnavailableError
        ``route="auto"`` and neither reference route runs on the model.
    ValueError, TypeError
        Bad rows, cotangents, seed, route, row_sq_norms or samples (named), before any pass.
    """
    start = time.perf_counter()
    check_int(seed, "seed", minimum=0)
    check_int(samples, "samples", optional=True)
    check_choice(route, "route", REFERENCES)
    theta = model.params_vector().detach()
    n = model.num_samples
    rows = _check_rows(rows, n, theta)
    _check_inputs(cotangents, row_sq_norms, n, theta)
    window = _window(n, samples, seed)
    vector = gaussian_vector(theta.numel(), seed=seed, dtype=theta.dtype, device=theta.device)
    products = rows.matvec(vector)[window]
    tangents, used, watch = reference_tangents(model, vector, route=route, theta=theta,
                                               rows=window)
    u64 = cotangents[window].to(torch.float64)
    if tuple(tangents.shape) != tuple(u64.shape):
        raise ValueError(f"cotangents has shape {tuple(cotangents.shape)} but the model's "
                         f"logits have {(n, *tuple(tangents.shape[1:]))}")
    reference = (tangents.to(torch.float64) * u64).sum(dim=1)
    norms = sq_row_norms(rows) if row_sq_norms is None else row_sq_norms
    if not bool(torch.isfinite(norms).all()):  # the rows' fault, named as the steps name them
        raise NonFiniteError("per_sample_grads contain NaN or infinite values (their squared "
                             "norms do): the certificate cannot compare them")
    u = max(unit_roundoff(torch, theta.dtype, rows.dtype), watch.unit_roundoff())
    bounds = product_bounds(
        norms[window].to(torch.float64),
        float(torch.linalg.vector_norm(vector.to(torch.float64))),
        torch.linalg.vector_norm(u64, dim=1),
        torch.linalg.vector_norm(tangents.to(torch.float64), dim=1), unit_roundoff=u,
        depth=max(1, watch.depth),
    )
    result = certify_products(products, reference, bounds, route=used, unit_roundoff=u,
                              first_sample=window.start)
    return dataclasses.replace(result, seconds=time.perf_counter() - start)
