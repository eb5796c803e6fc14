r"""A :class:`ngdref.JacobianProvider` for any ``torch.nn.Module``, built on ``torch.func``.

The provider stands for ``z_n = f(theta, x_n)`` where ``theta`` (P,) is the
flat vector of the model's **trainable** parameters (``requires_grad=True``,
e.g. the LoRA or prompt-tuning adapters of a peft model), concatenated in
``named_parameters()`` order, each parameter flattened row-major. Frozen
parameters are constants. ``z_n`` (C,) are the per-sample logits.

=================  ==================  ==================================================
method             shapes              how
=================  ==================  ==================================================
``logits()``       -> (N, C)           one forward pass under ``torch.no_grad``, cached
``jvp(v)``         (P,) -> (N, C)      ``torch.func.jvp`` (forward mode) on the batch
``vjp(u)``         (N, C) -> (N, P)    ``vmap`` over samples of ``torch.func.vjp``, or
                                       one backward pass with ``nn.Linear`` hooks
``vjp_sum(u)``     (N, C) -> (P,)      one ordinary backward pass (no ``vmap``)
``jacobian()``     -> (N, C, P)        ``vmap(jacrev)`` over samples
=================  ==================  ==================================================

Every result is in the paper's **sum** convention: row n of ``vjp(u)`` is
``J_n^T u_n`` and nothing is divided by N or by a token count. With
``u = loss.grad(logits, targets)`` row n is ``grad_theta l_n``. A mean-reduced
loss multiplies these by a reduction factor that the callers apply.

Conventions
-----------
Eval mode
    Every pass runs with the model in eval mode (dropout off, batch norm on
    its running statistics), as the paper's training steps and evaluation do.
    The train/eval flag of every submodule is restored after each pass, so the
    user's model keeps its mode.
Logits
    ``output_fn`` maps the model output to an (N, ...) tensor (default: the
    output itself if it is a tensor, else its ``.logits``); the trailing axes
    are flattened row-major to C. A sequence-to-sequence model's (N, T, V)
    decoder logits, one row per label position, become (N, T * V) (position,
    then vocabulary), the layout of
    ``ngdref.SequenceSoftmaxCrossEntropy(vocab_size, ignore_index=-100)``:
    positions labelled -100 stay in the logits and the loss ignores them, and
    the per-sample loss (label word + EOS for T5) sums over the sample's label
    tokens, so a per-sample gradient is a per-sequence gradient.
Labels, attention masks under ``vmap``
    A ``"labels"`` entry of dict inputs is kept as :attr:`TorchProvider.targets`, not
    passed to the model; during the ``vmap`` passes a 2-D ``attention_mask`` of an encoder
    or encoder-decoder Hugging Face model becomes a 4-D additive one
    (:mod:`backends.torch.inputs`).
Forward mode
    :meth:`TorchProvider.jvp` needs every operation to support forward-mode
    AD; PyTorch's ``scaled_dot_product_attention`` does not, so Hugging Face
    models must be loaded with ``attn_implementation="eager"`` (e.g.
    ``T5Config(..., attn_implementation="eager")``). The provider checks the
    configs and raises a ``ValueError`` otherwise. The reverse-mode passes
    work with "sdpa" too, but ``vmap`` has no batching rule for its CPU
    kernel and falls back to a slow per-sample loop: "eager" is preferable.
Per-sample gradients by hooks
    When every trainable parameter is the weight or bias of an ``nn.Linear``, one batched
    backward pass with hooks gives the per-sample gradients; a parameter the hooks cannot
    account for (tied, or a call on a tensor that is not per sample) is detected, not
    guessed (:mod:`backends.torch.per_sample.linear_hooks`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap
from torch.func import jvp as func_jvp
from torch.func import vjp as func_vjp

from ngdref.checks import NonFiniteError, check_choice, check_int
from ngdref.provider import JacobianProvider
from ngdref.rows import as_rows

from .inputs import POSITIONAL, hf_models, split_inputs, vmap_masks
from .params import ParamLayout
from .per_sample.layer_pass import ROUTES, LayerPass
from .per_sample.linear_hooks import hookable, vjp_hooks

__all__ = ["TorchProvider", "default_output_fn"]

_METHODS = ("auto", "vmap", "hooks", "ghost")


def default_output_fn(output: Any) -> torch.Tensor:
    """The model output if it is a tensor, else its ``.logits`` (Hugging Face outputs)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(
        f"output_fn: the model returned {type(output).__name__}, which is neither a tensor "
        "nor has a .logits tensor; pass output_fn=... mapping it to logits of shape (N, ...)"
    )


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
        One batch of N samples. A tensor is passed positionally,
        ``model(inputs)``; a mapping as keywords, ``model(**inputs)`` (Hugging
        Face: ``input_ids``, ``attention_mask``, ``decoder_input_ids``,
        ``labels``, ``pixel_values``, ...). Tensors must have N as their first
        axis; non-tensor values are passed unchanged. ``labels`` are taken out,
        see :attr:`targets`.
    output_fn : callable, optional
        ``output_fn(model_output) -> tensor (N, ...)``; trailing axes are
        flattened row-major into C. Default :func:`default_output_fn`.
        Under ``vmap`` it receives the output of a batch of one sample.
    params : torch.Tensor, shape (P,), optional
        theta at which the model is evaluated. Default: a copy of the model's
        current trainable parameters (later in-place changes of the model's
        parameters do not affect the provider).
    chunk_size : int >= 1, optional
        Samples processed per pass (``vmap`` batch, hooks backward, forward
        and ``jvp`` passes) to bound memory. Default: all N at once.
    per_sample_method : {"auto", "vmap", "hooks", "ghost"}
        Route of :meth:`vjp`. "hooks" needs every trainable parameter to be
        the weight or bias of an ``nn.Linear``; "auto" takes hooks when that
        holds (falling back to vmap for a parameter the hooks cannot account
        for), vmap otherwise. "ghost": per-layer factors from one forward and one
        backward pass with module hooks (:mod:`backends.torch.per_sample.layer_pass`), given
        by :meth:`per_sample_rows` without forming G; not with ``chunk_size``.
    layer_route : {"auto", "ghost", "materialise"}
        For "ghost": per weight the cheaper route by the cost model of
        :func:`backends.torch.per_sample.rows.ghost_is_cheaper`, factors wherever possible, or
        materialised per-layer rows everywhere.

    Attributes
    ----------
    num_params : int
        P.
    param_names : tuple of str
        Names of the trainable parameters, in theta order.
    param_shapes, param_tensors, theta
        Their shapes and tensors, and theta (P,) (:class:`~backends.torch.params.ParamLayout`).
    targets : torch.Tensor or None
        The ``labels`` entry of dict inputs, unchanged (e.g. (N, T) token ids
        with -100 padding for a seq2seq model, to pair with
        ``ngdref.SequenceSoftmaxCrossEntropy``).
    per_sample_method : str
        The route :meth:`vjp` takes, "vmap" or "hooks", after resolving "auto".

    Notes
    -----
    All results are torch tensors on the model's device in the sum convention
    (no reduction factor). See the module docstring for eval mode, masks and
    forward mode.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: torch.Tensor | Mapping[str, Any],
        *,
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        params: torch.Tensor | None = None,
        chunk_size: int | None = None,
        per_sample_method: str = "auto",
        layer_route: str = "auto",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.output_fn = default_output_fn if output_fn is None else output_fn
        if not callable(self.output_fn):
            raise TypeError(f"output_fn must be callable, got {type(output_fn).__name__}")

        super().__init__(model, params)
        self.chunk_size = check_int(chunk_size, "chunk_size", optional=True)

        self._hf = hf_models(model)
        batch = split_inputs(self._hf, inputs, self.device, self.dtype)
        self.targets: torch.Tensor | None = batch.targets
        self._positional, self._batched, self._static = (
            batch.positional, batch.batched, batch.static
        )
        self._n = batch.num_samples

        check_choice(per_sample_method, "per_sample_method", _METHODS)
        # only the Linear-hooks route needs the check (walking the modules costs per step)
        linear = per_sample_method in ("auto", "hooks") and hookable(model, self.param_names)
        if per_sample_method == "hooks" and not linear:
            raise ValueError(
                "per_sample_method='hooks' needs every trainable parameter to be the weight or "
                "bias of an nn.Linear; use 'vmap' (or 'auto') for this model"
            )
        # "auto" may still fall back to vmap if a hooks pass cannot account for a parameter.
        if per_sample_method == "ghost":
            if chunk_size is not None:
                raise ValueError(
                    "chunk_size must be None for per_sample_method='ghost' (one forward and "
                    "one backward pass over the whole batch)"
                )
            check_choice(layer_route, "layer_route", ROUTES)
        self.layer_route = layer_route
        self.layer_pass: LayerPass | None = None
        self._auto = per_sample_method == "auto"
        if self._auto:
            per_sample_method = "hooks" if linear else "vmap"
        self.per_sample_method = per_sample_method

        self._logits = self._compute_logits()

    def chunks(self) -> Iterator[slice]:
        """The samples of each pass: consecutive slices of ``chunk_size`` (one if None)."""
        step = self._n if self.chunk_size is None else self.chunk_size
        for start in range(0, self._n, step):
            yield slice(start, min(start + step, self._n))

    def batch(self, rows: slice) -> dict[str, torch.Tensor]:
        """The per-sample model inputs (name -> tensor) of the samples ``rows``."""
        return {key: t[rows] for key, t in self._batched.items()}

    def restricted(self, rows: slice) -> TorchProvider:
        """The provider on the samples ``rows`` only, unchunked: a shallow copy that shares the
        model, theta and the inputs (sliced, not copied); no forward pass. ``self`` for all."""
        if rows == slice(0, self._n):
            return self
        part = copy.copy(self)
        part._batched = self.batch(rows)
        part._n = rows.stop - rows.start
        part._logits = self._logits[rows]
        part.chunk_size = None
        part._pending = None
        part.layer_pass = None
        return part

    # ------------------------------------------------------------- forwards
    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """Run with every submodule in eval mode, then restore each one's flag."""
        modes = [(m, m.training) for m in self.model.modules()]
        if any(training for _, training in modes):  # eval() walks the model once more
            self.model.eval()
        try:
            yield
        finally:
            for m, training in modes:
                if m.training != training:  # Module.__setattr__ costs per module
                    m.training = training

    def _call(
        self, theta: torch.Tensor, batched: Mapping[str, torch.Tensor], params: Any = None
    ) -> Any:
        params = self.unflatten(theta) if params is None else params
        if self._positional:
            return functional_call(self.model, params, (batched[POSITIONAL],), self._static)
        return functional_call(self.model, params, (), {**batched, **self._static})

    def batch_logits(
        self, theta: torch.Tensor, batched: Mapping[str, torch.Tensor], params: Any = None
    ) -> Any:
        """Logits (n, C) of n samples (``batched``: from :meth:`batch`) at ``theta`` (P,), in the
        caller's grad and eval modes (``params``: ``unflatten(theta)`` if given)."""
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

    def _sample_logits(self, theta: torch.Tensor, sample: Mapping[str, torch.Tensor]) -> Any:
        """Logits (C,) of one sample (no batch axis), for ``vmap``."""
        return self.batch_logits(theta, {k: t.unsqueeze(0) for k, t in sample.items()})[0]

    def _compute_logits(self) -> torch.Tensor:
        self._pending: LayerPass | None = None
        if self.per_sample_method == "ghost":
            self.layer_pass = LayerPass(self, self.layer_route)
            z = self.layer_pass.logits
        elif self.per_sample_method == "hooks" and self.chunk_size is None:
            # The forward the first hooks vjp needs anyway: keep its graph for that vjp (an
            # optimiser step then costs one forward, not two). Any other first use drops it.
            self._pending = LayerPass(self, "ghost")  # factors: vjp writes them into G
            z = self._pending.logits
        else:
            with torch.no_grad(), self.eval_mode():
                z = torch.cat(
                    [self.batch_logits(self._theta, self.batch(s)) for s in self.chunks()]
                )
        if not torch.is_floating_point(z):
            raise TypeError(f"logits: output_fn returned dtype {z.dtype}, need floating point")
        if not bool(torch.isfinite(z).all()):
            raise NonFiniteError(
                "logits: the model output contains NaN or infinite values at these "
                "parameters and inputs"
            )
        return z

    def _in_dims(self) -> dict[str, int]:
        return {key: 0 for key in self._batched}

    # ------------------------------------------------------------ operations
    def logits(self) -> torch.Tensor:
        """Logits z, shape (N, C), computed once under ``torch.no_grad`` in eval mode."""
        return self._logits

    @property
    def num_samples(self) -> int:
        """N, the batch size."""
        return self._n

    def jvp(self, vector: torch.Tensor) -> torch.Tensor:
        r"""Jacobian-vector products, row n is ``J_n v``; shape (N, C).

        .. math:: (J v)_n = \frac{d}{d\epsilon} f(\theta + \epsilon v, x_n) \big|_{\epsilon=0}

        One forward-mode pass (``torch.func.jvp``) per chunk of samples.
        Hugging Face models need ``attn_implementation="eager"``. Parts of a
        model computed in float32 limit the agreement with reverse mode even
        in a float64 model: T5LayerNorm takes its variance and HF's eager ViT
        attention its softmax in float32 (about 1e-7 relative).

        Parameters
        ----------
        vector : torch.Tensor, shape (P,)
            Same dtype and device as theta.
        """
        self._pending = None  # the retained logits graph is only for a hooks vjp
        self._check_vector(vector)
        self._check_forward_ad()
        out = []
        with self.eval_mode():
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

        With ``u = loss.grad(logits, targets)`` row n is ``grad_theta l_n``
        (sum convention, no reduction factor). Route: :attr:`per_sample_method`; "ghost"
        returns a :class:`backends.torch.per_sample.rows.GhostRows` (an ``ngdref.PerSampleRows``, G
        never formed; ``.materialise()`` gives the tensor).

        Parameters
        ----------
        cotangents : torch.Tensor, shape (N, C)
            Same dtype and device as the logits.
        """
        self._check_cotangents(cotangents)
        if self.per_sample_method == "ghost":  # rows without G (ngdref takes PerSampleRows)
            return self.per_sample_rows(cotangents, keep_graph=True)
        if self.per_sample_method == "hooks":
            pending, self._pending = self._pending, None  # its forward serves this vjp only
            grads, fallbacks = vjp_hooks(self, cotangents, pending=pending, strict=not self._auto)
            if fallbacks:  # "auto" (rows exact by vmap): this model is not hook-friendly
                self.per_sample_method = "vmap"
            return grads
        return self._vjp_vmap(cotangents)

    def _vjp_vmap(self, cotangents: torch.Tensor) -> torch.Tensor:
        def one(theta: torch.Tensor, sample: dict, u: torch.Tensor) -> torch.Tensor:
            _, pullback = func_vjp(lambda th: self._sample_logits(th, sample), theta)
            return pullback(u)[0]

        per_sample = vmap(one, in_dims=(None, self._in_dims(), 0))
        out = []
        with self.eval_mode(), vmap_masks(self._hf):
            for rows in self.chunks():
                out.append(per_sample(self._theta, self.batch(rows), cotangents[rows]).detach())
        return out[0] if len(out) == 1 else torch.cat(out)

    def per_sample_rows(self, cotangents: torch.Tensor, *, keep_graph: bool = True) -> Any:
        r"""The per-sample rows u_n^T J_n (N, P) as an ``ngdref.PerSampleRows``.

        "ghost": :class:`backends.torch.per_sample.rows.GhostRows` from one backward pass through
        the hooked forward (a new forward if an earlier call released it, ``keep_graph=False``);
        other routes: ``ngdref.as_rows(self.vjp(cotangents))``.
        """
        self._check_cotangents(cotangents)
        if self.per_sample_method != "ghost":
            return as_rows(self.vjp(cotangents))
        if self.layer_pass is None or self.layer_pass.spent:
            self.layer_pass = LayerPass(self, self.layer_route)
        return self.layer_pass.rows(cotangents, keep_graph=keep_graph)

    def vjp_ranges(
        self, cotangents: torch.Tensor, ranges: list[tuple[int, int]]
    ) -> list[torch.Tensor]:
        r"""Per-sample ``J_n^T u_n`` restricted to slices of theta: one (N, size) per range.

        ``ranges`` holds (offset, size) pairs; ``vmap`` over samples of a vjp with respect to
        those slices only (the rest of theta held fixed), so only N x sum(sizes) is formed.
        """
        self._check_cotangents(cotangents)
        cuts = sorted(ranges)
        fixed, start = [], 0
        for offset, size in cuts:
            fixed.append(self._theta[start:offset])
            start = offset + size
        tail = self._theta[start:]

        def assemble(pieces: tuple[torch.Tensor, ...]) -> torch.Tensor:
            parts = []
            for constant, piece in zip(fixed, pieces, strict=True):
                parts += [constant, piece]
            return torch.cat([*parts, tail])

        def one(pieces: tuple, sample: dict, u: torch.Tensor) -> tuple:
            _, pullback = func_vjp(lambda *q: self._sample_logits(assemble(q), sample), *pieces)
            return pullback(u)

        per_sample = vmap(one, in_dims=(None, self._in_dims(), 0))
        primals = tuple(self._theta[o:o + s] for o, s in cuts)
        out: list[list[torch.Tensor]] = [[] for _ in cuts]
        with self.eval_mode(), vmap_masks(self._hf):
            for rows in self.chunks():
                for i, g in enumerate(per_sample(primals, self.batch(rows), cotangents[rows])):
                    out[i].append(g.detach())
        by_range = {cut: torch.cat(parts) for cut, parts in zip(cuts, out, strict=True)}
        return [by_range[r] for r in ranges]

    def vjp_sum(self, cotangents: torch.Tensor) -> torch.Tensor:
        r"""Summed vector-Jacobian product ``sum_n J_n^T u_n``; shape (P,).

        .. math:: g = \sum_n J_n^\top u_n

        One ordinary forward and backward pass (per chunk if ``chunk_size``
        is set), no ``vmap``. With ``u = loss.grad(...)`` this is the gradient
        of the summed loss.
        """
        self._pending = None  # the retained logits graph is only for a hooks vjp
        self._check_cotangents(cotangents)
        total = torch.zeros(self.num_params, dtype=self.dtype, device=self.device)
        with self.eval_mode(), torch.enable_grad():
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
        self._pending = None  # the retained logits graph is only for a hooks vjp
        per_sample = vmap(jacrev(self._sample_logits), in_dims=(None, self._in_dims()))
        out = []
        with self.eval_mode(), vmap_masks(self._hf):
            for rows in self.chunks():
                out.append(per_sample(self._theta, self.batch(rows)).detach())
        return out[0] if len(out) == 1 else torch.cat(out)

    # ------------------------------------------------------------ validation
    def _check_forward_ad(self) -> None:
        for hf in self._hf:
            impl = getattr(hf.config, "_attn_implementation", None)
            if impl not in (None, "eager"):
                raise ValueError(
                    f"jvp uses forward-mode AD, which attn_implementation={impl!r} of "
                    f"{type(hf).__name__} does not support; load the model with "
                    "attn_implementation='eager'"
                )

    def _check_vector(self, vector: Any) -> None:
        super()._check_vector(vector)
        self._check_dtype_device(vector, "vector")

    def _check_cotangents(self, cotangents: Any) -> None:
        super()._check_cotangents(cotangents)
        self._check_dtype_device(cotangents, "cotangents", self._logits.dtype, "the logits")
