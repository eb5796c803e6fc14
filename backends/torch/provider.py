r"""A :class:`ngdref.JacobianProvider` for any ``torch.nn.Module``, built on ``torch.func``.

The provider stands for ``z_n = f(theta, x_n)`` where ``theta`` (P,) is the
flat vector of the model's **trainable** parameters (``requires_grad=True``,
e.g. the LoRA or prompt-tuning adapters of a peft model), concatenated in
``named_parameters()`` order, each parameter flattened row-major. Frozen
parameters are constants. ``z_n`` (C,) are the per-sample logits.

======================  ==================  ==============================================
method                  shapes              how
======================  ==================  ==============================================
``logits()``            -> (N, C)           one forward pass, computed once
``jvp(v)``              (P,) -> (N, C)      ``torch.func.jvp`` (forward mode) on the batch
``per_sample_rows(u)``  (N, C) -> (N, P)    the route ``per_sample`` (below), certified;
                                            a PerSampleRows, G never formed where factors
``vjp(u)``              (N, C) -> (N, P)    the same rows as a dense tensor
``vjp_sum(u)``          (N, C) -> (P,)      one ordinary backward pass (no ``vmap``)
``jacobian()``          -> (N, C, P)        ``vmap(jacrev)`` over samples
======================  ==================  ==============================================

Every result is in the paper's **sum** convention: row n of ``vjp(u)`` is
``J_n^T u_n`` and nothing is divided by N or by a token count. With
``u = loss.grad(logits, targets)`` row n is ``grad_theta l_n``. A mean-reduced
loss multiplies these by a reduction factor that the callers apply.

Conventions
-----------
Per-sample routes (``per_sample``)
    :mod:`backends.torch.per_sample.routes`: "auto", "ghost" and "hooks" take one hooked
    forward and one backward pass (:class:`backends.torch.per_sample.layer_pass.LayerPass`;
    every call's batch axis by provenance, never by a length that happens to be N), and a
    parameter that pass cannot split falls through, by itself, to the per-module vmap, the
    whole-model vmap, the loop; "vmap" falls back to the loop where torch cannot run it; a
    route never raises where a later one works. :attr:`TorchProvider.routes` and
    :attr:`TorchProvider.fallbacks` (and the rows' ``.routes``, ``.fallbacks``) say which
    route every parameter took, and why.
Certificate
    :meth:`per_sample_rows` compares its rows' G v, for a random v, with an independent G v
    (:mod:`backends.torch.per_sample.certify`) as ``certify`` says ("first": the first call
    for each model structure and input shapes), and on a mismatch raises
    ``ngdref.certificate.RowsCertificateError`` or redoes the rows by vmap, then the loop
    (``on_mismatch``). Where the certificate cannot run at all, the rows come from the loop,
    exact by construction, and the fallbacks say why. :attr:`TorchProvider.certificate`.
Mode policy
    Every pass runs with every submodule in the mode ``mode`` says: "eval" (default: dropout
    off, batch norm on its running statistics, as the paper's training steps and evaluation
    do) or "train"; each submodule's own flag is restored after the pass. Modules without
    per-sample gradients under that mode (batch norm on batch statistics, dropout in train
    mode, ``scale_grad_by_freq``, ``max_norm``) are refused by name before any pass
    (:mod:`backends.torch.per_sample.semantics`).
Logits, labels, masks
    ``output_fn`` maps the model output to an (N, ...) tensor (default: the output itself,
    or its ``.logits``); the trailing axes are flattened row-major to C (a seq2seq model's
    (N, T, V) decoder logits become (N, T V), the layout of
    ``ngdref.SequenceSoftmaxCrossEntropy``). A ``"labels"`` entry of dict inputs is kept as
    :attr:`TorchProvider.targets`; under ``vmap`` a 2-D ``attention_mask`` of an encoder (or
    encoder-decoder) Hugging Face model becomes a 4-D additive one
    (:mod:`backends.torch.inputs`).
Forward mode
    :meth:`TorchProvider.jvp` needs forward-mode AD for every operation: Hugging Face models
    with ``attn_implementation="eager"`` (checked: ``ValueError`` otherwise).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.func import jvp as func_jvp

from ngdref.checks import NonFiniteError, check_choice, check_int
from ngdref.provider import JacobianProvider

from .inputs import (
    POSITIONAL,
    check_forward_ad,
    default_output_fn,
    hf_models,
    split_inputs,
    vmap_masks,
)
from .params import ParamLayout
from .per_sample.layer_pass import LayerPass
from .per_sample.policy import CERTIFY, ON_MISMATCH, CertifiedRows, certified_rows, structure_key
from .per_sample.routes import LAYER_ROUTES, resolve_per_sample
from .per_sample.rows import GhostRows, RoutedRows, stack_rows
from .per_sample.semantics import MODES, applied_mode, refuse_semantics
from .per_sample.vmap import dense_ranges, error_line, is_ours, vmap_jacobian

__all__ = ["TorchProvider", "default_output_fn"]


class TorchProvider(ParamLayout, JacobianProvider):
    r"""Per-sample logit Jacobians of a ``torch.nn.Module`` over its trainable parameters.

    .. math::
        z_n = f(\theta, x_n) \in \mathbb{R}^C, \quad
        J_n = \partial z_n / \partial \theta \in \mathbb{R}^{C \times P}

    Parameters
    ----------
    model : torch.nn.Module
        Any module; its parameters with ``requires_grad=True`` form theta, in
        ``named_parameters()`` order. They must share one device and one dtype,
        float32 or float64, which is the dtype of every result.
    inputs : torch.Tensor or mapping of str to torch.Tensor
        One batch of N samples. A tensor is passed positionally, ``model(inputs)``; a mapping
        as keywords, ``model(**inputs)`` (Hugging Face: ``input_ids``, ``attention_mask``,
        ``decoder_input_ids``, ``labels``, ``pixel_values``, ...). Tensors must have N as
        their first axis; non-tensor values are passed unchanged. ``labels`` are taken out,
        see :attr:`targets`.
    output_fn : callable, optional
        ``output_fn(model_output) -> tensor (N, ...)``; trailing axes are flattened row-major
        into C. Default :func:`default_output_fn`. Under ``vmap`` it receives the output of a
        batch of one sample.
    params : torch.Tensor, shape (P,), optional
        theta at which the model is evaluated. Default: a copy of the model's current
        trainable parameters.
    chunk_size : int >= 1, optional
        Samples per pass, to bound memory: the vmap batches, one hooked forward and backward
        pass per chunk for the layer routes (their rows stacked), and the plain forward,
        ``jvp`` and ``vjp_sum`` passes. The loop takes one sample per pass anyway. Default:
        all N at once.
    per_sample : {"auto", "ghost", "hooks", "vmap", "loop"}
        The route of the per-sample rows (module docstring): per weight ghost factors or
        materialised rows by the registry's cost model, factors wherever possible,
        materialised per-layer rows, dense rows by ``torch.func.vmap``, single-sample passes.
    mode : {"eval", "train"}
        The mode policy of every pass (module docstring).
    certify : {"first", "always", "never"}
        When :meth:`per_sample_rows` certifies its rows: the first call for each model
        structure and input shapes (default), every call, or never.
    on_mismatch : {"raise", "fallback"}
        Rows that fail their certificate: raise ``ngdref.certificate.RowsCertificateError``,
        or redo them by vmap, then the loop, reported in :attr:`fallbacks`.
    certify_samples : int >= 1, optional
        Certify a seeded window of this many samples per call (default: all N).
    certify_seed : int >= 0
        Seed of the certificate's random vector (an optimiser passes its step).
    per_sample_method, layer_route : str, optional
        Deprecated spellings of ``per_sample`` (a ``DeprecationWarning``): "vmap", "loop",
        "hooks" and "auto" as they are, "ghost" with ``layer_route`` "auto" / "ghost" /
        "materialise" for "auto" / "ghost" / "hooks". Callers using them keep the behaviour
        they were written for: ``certify="never"`` unless given.

    Attributes
    ----------
    num_params, param_names, param_shapes, param_tensors, theta
        P, the trainable parameters' names, shapes and tensors, and theta (P,)
        (:class:`~backends.torch.params.ParamLayout`).
    targets : torch.Tensor or None
        The ``labels`` entry of dict inputs, unchanged.
    per_sample : str
        The route asked for.
    certified : backends.torch.per_sample.policy.CertifiedRows or None
        The last :meth:`per_sample_rows` call's route, certificate and certificate fallbacks.

    Raises
    ------
    backends.torch.per_sample.semantics.PerSampleSemanticsError
        A module has no per-sample gradients under ``mode`` (before any pass).
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: torch.Tensor | Mapping[str, Any],
        *,
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        params: torch.Tensor | None = None,
        chunk_size: int | None = None,
        per_sample: str = "auto",
        mode: str = "eval",
        certify: str | None = None,
        on_mismatch: str = "raise",
        certify_samples: int | None = None,
        certify_seed: int = 0,
        per_sample_method: str | None = None,
        layer_route: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.output_fn = default_output_fn if output_fn is None else output_fn
        if not callable(self.output_fn):
            raise TypeError(f"output_fn must be callable, got {type(output_fn).__name__}")
        self._modules = list(model.named_modules())  # one walk for every use of this step
        super().__init__(model, params, modules=self._modules)
        self.chunk_size = check_int(chunk_size, "chunk_size", optional=True)
        self.per_sample, deprecated = resolve_per_sample(per_sample, per_sample_method,
                                                         layer_route)
        self.mode = check_choice(mode, "mode", MODES)
        self.certify = check_choice(
            ("never" if deprecated else "first") if certify is None else certify, "certify",
            CERTIFY)
        self.on_mismatch = check_choice(on_mismatch, "on_mismatch", ON_MISMATCH)
        self.certify_samples = check_int(certify_samples, "certify_samples", optional=True)
        self.certify_seed = check_int(certify_seed, "certify_seed", minimum=0)
        self._hf = hf_models(model, (m for _, m in self._modules))
        batch = split_inputs(self._hf, inputs, self.device, self.dtype)
        self.targets: torch.Tensor | None = batch.targets
        self._positional, self._batched, self._static = (
            batch.positional, batch.batched, batch.static
        )
        self._n = batch.num_samples
        refuse_semantics(model, self.mode, modules=self._modules)  # before any pass
        self.certified: CertifiedRows | None = None
        self.layer_pass: LayerPass | None = None
        self._layer_failure: str | None = None
        self._logits = self._compute_logits()

    # ---- the batch -----------------------------------------------------------------------
    def chunks(self) -> Iterator[slice]:
        """The samples of each pass: consecutive slices of ``chunk_size`` (one if None)."""
        step = self._n if self.chunk_size is None else self.chunk_size
        for start in range(0, self._n, step):
            yield slice(start, min(start + step, self._n))

    def batch(self, rows: slice) -> dict[str, torch.Tensor]:
        """The per-sample model inputs (name -> tensor) of the samples ``rows``."""
        return {key: t[rows] for key, t in self._batched.items()}

    def restricted(self, rows: slice) -> TorchProvider:
        """The provider on the samples ``rows`` only, unchunked (a shallow copy, no forward
        pass; ``self`` for all)."""
        if rows == slice(0, self._n):
            return self
        part = copy.copy(self)
        part._batched = self.batch(rows)
        part._n = rows.stop - rows.start
        part._logits = self._logits[rows]
        part.chunk_size = None
        part.layer_pass = None
        return part

    @property
    def num_samples(self) -> int:
        """N, the batch size."""
        return self._n

    # ---- forwards ------------------------------------------------------------------------
    def named_modules(self) -> list[tuple[str, nn.Module]]:
        """``model.named_modules()``, walked once for the provider's life (one step)."""
        return self._modules

    def module_mode(self) -> AbstractContextManager[None]:
        """The context of every pass: the mode policy applied to every submodule, each one's
        own flag restored after (:func:`~backends.torch.per_sample.semantics.applied_mode`)."""
        return applied_mode(self.model, self.mode, modules=[m for _, m in self._modules])

    def eval_mode(self) -> AbstractContextManager[None]:
        """:meth:`module_mode` under its earlier name (it applies ``mode``, eval by default)."""
        return self.module_mode()

    def vmap_context(self) -> AbstractContextManager[None]:
        """The mode policy and the Hugging Face masks' 4-D form, for the vmap passes."""
        stack = ExitStack()
        stack.enter_context(self.module_mode())
        stack.enter_context(vmap_masks(self._hf))
        return stack

    def _call(self, theta: torch.Tensor, batched: Mapping[str, torch.Tensor],
              params: Any = None) -> Any:
        params = self.unflatten(theta) if params is None else params
        if self._positional:
            return functional_call(self.model, params, (batched[POSITIONAL],), self._static)
        return functional_call(self.model, params, (), {**batched, **self._static})

    def batch_logits(
        self, theta: torch.Tensor, batched: Mapping[str, torch.Tensor], params: Any = None
    ) -> Any:
        """Logits (n, C) of n samples (``batched``: from :meth:`batch`) at ``theta`` (P,), in the
        caller's grad and module modes (``params``: ``unflatten(theta)`` if given)."""
        z = self.output_fn(self._call(theta, batched, params))
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"output_fn must return a tensor, got {type(z).__name__}")
        n = next(iter(batched.values())).shape[0]
        if z.ndim == 0 or z.shape[0] != n:
            raise ValueError(
                f"output_fn returned shape {tuple(z.shape)} for a batch of {n}: "
                "the first axis must be the samples"
            )
        return z.reshape(n, -1)

    def sub_batch_logits(self, params: Mapping[str, torch.Tensor], rows: slice) -> Any:
        """Logits (n, C) of the samples ``rows`` with the trainable parameters ``params``
        (:meth:`unflatten`'s layout): the loop's and the certificate's ``BatchModel``."""
        return self.batch_logits(self._theta, self.batch(rows), params)

    def sample_logits(self, theta: torch.Tensor, sample: Mapping[str, torch.Tensor]) -> Any:
        """Logits (C,) of one sample (no batch axis), for ``vmap``."""
        return self.batch_logits(theta, {k: t.unsqueeze(0) for k, t in sample.items()})[0]

    def _new_layer_pass(self) -> LayerPass | None:
        """A hooked forward pass of the layer routes, or None (why: ``_layer_failure``) when
        torch cannot run it hooked (the whole-model routes then take every parameter)."""
        try:
            return LayerPass(self, LAYER_ROUTES[self.per_sample])
        except Exception as err:
            if is_ours(err):
                raise
            self._layer_failure = f"the hooked forward pass failed ({error_line(err)})"
            return None

    def _compute_logits(self) -> torch.Tensor:
        if self.per_sample in LAYER_ROUTES and self.chunk_size is None:
            # the forward the first rows need anyway: an optimiser step costs one forward
            self.layer_pass = self._new_layer_pass()
        z = None if self.layer_pass is None else self.layer_pass.logits
        if z is None:
            with torch.no_grad(), self.module_mode():
                z = torch.cat(
                    [self.batch_logits(self._theta, self.batch(s)) for s in self.chunks()])
        if not torch.is_floating_point(z):
            raise TypeError(f"logits: output_fn returned dtype {z.dtype}, need floating point")
        if not bool(torch.isfinite(z).all()):
            raise NonFiniteError(
                "logits: the model output contains NaN or infinite values at these "
                "parameters and inputs"
            )
        return z

    # ---- operations ----------------------------------------------------------------------
    def logits(self) -> torch.Tensor:
        """Logits z, shape (N, C), computed once, in the mode policy."""
        return self._logits

    def jvp(self, vector: torch.Tensor) -> torch.Tensor:
        r"""Jacobian-vector products, row n is ``J_n v``; shape (N, C).

        .. math:: (J v)_n = \frac{d}{d\epsilon} f(\theta + \epsilon v, x_n) \big|_{\epsilon=0}

        One forward-mode pass (``torch.func.jvp``) per chunk of samples.

        Parameters
        ----------
        vector : torch.Tensor, shape (P,)
            Same dtype and device as theta.
        """
        self._check_vector(vector)
        self._check_forward_ad()
        out = []
        with self.module_mode():
            for rows in self.chunks():
                batch = self.batch(rows)
                try:
                    _, tangent = func_jvp(
                        lambda th, b=batch: self.batch_logits(th, b), (self._theta,), (vector,)
                    )
                except NotImplementedError as err:
                    if "forward AD" not in str(err):
                        raise
                    raise NotImplementedError(
                        "jvp: an operation of the model has no forward-mode AD rule (for "
                        "Hugging Face models load them with attn_implementation='eager'): "
                        f"{err}"
                    ) from err
                out.append(tangent.detach())
        return out[0] if len(out) == 1 else torch.cat(out)

    def vjp(self, cotangents: torch.Tensor) -> Any:
        r"""Per-sample vector-Jacobian products, row n is ``J_n^T u_n``; shape (N, P).

        .. math:: G_{n,:} = u_n^\top J_n

        The rows of :meth:`per_sample_rows` as a dense tensor; for ``per_sample="ghost"`` the
        :class:`~backends.torch.per_sample.rows.GhostRows` themselves (G never formed).

        Parameters
        ----------
        cotangents : torch.Tensor, shape (N, C)
            Same dtype and device as the logits.
        """
        ghost = self.per_sample == "ghost"
        rows = self.per_sample_rows(cotangents, keep_graph=ghost)
        if ghost:
            return rows
        return rows.materialise() if isinstance(rows, GhostRows) else rows.array

    def per_sample_rows(self, cotangents: torch.Tensor, *, keep_graph: bool = True) -> Any:
        r"""The per-sample rows u_n^T J_n (N, P) as an ``ngdref.PerSampleRows``, certified.

        The route :attr:`per_sample` (module docstring): GhostRows from one backward pass
        through the hooked forward (a new forward if an earlier call released it,
        ``keep_graph=False``) for the layer routes, dense rows for "vmap" and "loop". The
        certificate, ``on_mismatch`` and the fallbacks as the module docstring says; the rows'
        ``.routes`` and ``.fallbacks`` and :attr:`certified` tell what happened.
        """
        self._check_cotangents(cotangents)
        first = self.per_sample
        routes = {first: lambda: self._rows(first, cotangents, keep_graph)}
        for name in ("vmap", "loop"):
            routes.setdefault(name, lambda name=name: self._rows(name, cotangents, keep_graph))
        if self.certify == "never":
            self.certified = CertifiedRows(routes[first](), first, None, ())
        else:
            key = structure_key(self.model, (self._batched, self._static), self.mode,
                                self.output_fn, self.per_sample, self.chunk_size)
            self.certified = certified_rows(
                self, cotangents, routes, owner=self.model, key=key, certify=self.certify,
                on_mismatch=self.on_mismatch, seed=self.certify_seed,
                samples=self.certify_samples)
        return self.certified.rows

    @property
    def certificate(self) -> Any:
        """The ``ngdref.certificate.Certificate`` of the last rows (None: none ran)."""
        return None if self.certified is None else self.certified.certificate

    @property
    def routes(self) -> dict[str, str]:
        """The route every trainable parameter took in the last rows, by name."""
        return dict(getattr(getattr(self.certified, "rows", None), "routes", {}))

    @property
    def fallbacks(self) -> tuple[str, ...]:
        """The last rows' fallbacks (parameters that took a later route, rows that failed
        their certificate), with the reasons."""
        rows = getattr(self.certified, "rows", None)
        return (*getattr(rows, "fallbacks", ()), *getattr(self.certified, "fallbacks", ()))

    def _rows(self, route: str, cotangents: torch.Tensor, keep_graph: bool) -> Any:
        """The rows by ``route``, uncertified."""
        if route not in LAYER_ROUTES:
            return self._dense_rows(route, cotangents, None)
        parts = []
        for rows in self.chunks():
            part = self.restricted(rows)
            if part.layer_pass is None or part.layer_pass.spent:
                part.layer_pass = part._new_layer_pass()
            if part.layer_pass is None:
                why = part._layer_failure or self._layer_failure
                parts.append(part._dense_rows("vmap", cotangents[rows], why))
            else:
                parts.append(part.layer_pass.rows(cotangents[rows], keep_graph=keep_graph))
        return parts[0] if len(parts) == 1 else stack_rows(parts)

    def _dense_rows(self, route: str, cotangents: torch.Tensor, why: str | None) -> RoutedRows:
        (rows,), used, vmap_failed = dense_ranges(self, cotangents, [(0, self.num_params)],
                                                  route=route)
        notes = [] if why is None else [f"every parameter: whole-model {used} ({why})"]
        if vmap_failed is not None:
            notes.append(f"every parameter: loop of single-sample passes (torch.func.vmap "
                         f"could not run the model: {vmap_failed})")
        return RoutedRows(rows, routes=dict.fromkeys(self.param_names, used), fallbacks=notes)

    def dense_ranges(self, cotangents: torch.Tensor, ranges: list[tuple[int, int]]
                     ) -> tuple[list[torch.Tensor], str, str | None]:
        """The whole-model routes for slices of theta (:func:`.per_sample.vmap.dense_ranges`):
        vmap, else the loop; the loop alone for ``per_sample="loop"``."""
        route = "loop" if self.per_sample == "loop" else "vmap"
        return dense_ranges(self, cotangents, ranges, route=route)

    def vjp_ranges(self, cotangents: torch.Tensor, ranges: list[tuple[int, int]]
                   ) -> list[torch.Tensor]:
        r"""Per-sample ``J_n^T u_n`` on the (offset, size) slices ``ranges`` of theta, one
        (N, size) each, the rest of theta held fixed (:meth:`dense_ranges`)."""
        self._check_cotangents(cotangents)
        return self.dense_ranges(cotangents, ranges)[0]

    def vjp_sum(self, cotangents: torch.Tensor) -> torch.Tensor:
        r"""Summed vector-Jacobian product :math:`g = \sum_n J_n^\top u_n`; shape (P,).

        One ordinary forward and backward pass (per chunk if ``chunk_size`` is set), no
        ``vmap``. With ``u = loss.grad(...)`` this is the gradient of the summed loss.
        """
        self._check_cotangents(cotangents)
        total = torch.zeros(self.num_params, dtype=self.dtype, device=self.device)
        with self.module_mode(), torch.enable_grad():
            for rows in self.chunks():
                theta = self._theta.detach().requires_grad_(True)
                z = self.batch_logits(theta, self.batch(rows))
                (g,) = torch.autograd.grad(z, theta, grad_outputs=cotangents[rows])
                total += g
        return total

    def jacobian(self) -> torch.Tensor:
        r"""Per-sample logit Jacobians ``J_n = dz_n/dtheta``; shape (N, C, P).

        ``vmap`` over samples of ``jacrev``, chunked by ``chunk_size``.
        """
        return vmap_jacobian(self)

    # ---- validation ----------------------------------------------------------------------
    def _check_forward_ad(self) -> None:
        check_forward_ad(self._hf)

    def _check_vector(self, vector: Any) -> None:
        super()._check_vector(vector)
        self._check_dtype_device(vector, "vector")

    def _check_cotangents(self, cotangents: Any) -> None:
        super()._check_cotangents(cotangents)
        self._check_dtype_device(cotangents, "cotangents", self._logits.dtype, "the logits")
