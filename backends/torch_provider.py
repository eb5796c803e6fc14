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
Labels
    A ``"labels"`` entry of dict inputs is taken out of the model inputs (so
    the model never computes its mean-reduced loss) and kept as
    :attr:`TorchProvider.targets`. For an encoder-decoder Hugging Face model
    without ``decoder_input_ids`` they are derived from the labels with the
    model's own ``prepare_decoder_input_ids_from_labels`` (shift right, -100
    -> pad), exactly as the model does when it gets ``labels``.
Attention masks under ``vmap``
    ``vmap`` over a 2-D ``attention_mask`` fails in transformers 5 (its mask
    builder branches on ``mask.all()``), while a 4-D additive float mask
    (0 where attended, ``finfo(dtype).min`` where masked, shape
    (1, 1, 1, S) per sample) is used as given. During the ``vmap`` passes the
    provider therefore converts a 2-D ``attention_mask`` to that 4-D form in a
    forward pre-hook on the outermost Hugging Face model, i.e. after wrappers
    such as peft prompt tuning have prepended the virtual tokens' mask. This is
    done for encoder and encoder-decoder models (bidirectional masks); the
    masks of decoder-only causal LMs and ``decoder_attention_mask`` are left
    as they are (they ``vmap`` fine). Passes without ``vmap`` use the masks as
    given.
Forward mode
    :meth:`TorchProvider.jvp` needs every operation to support forward-mode
    AD; PyTorch's ``scaled_dot_product_attention`` does not, so Hugging Face
    models must be loaded with ``attn_implementation="eager"`` (e.g.
    ``T5Config(..., attn_implementation="eager")``). The provider checks the
    configs and raises a ``ValueError`` otherwise. The reverse-mode passes
    work with "sdpa" too, but ``vmap`` has no batching rule for its CPU
    kernel and falls back to a slow per-sample loop: "eager" is preferable.
Per-sample gradients by hooks
    When every trainable parameter is the weight or bias of an ``nn.Linear``
    (LoRA A/B matrices, an MLP), per-sample vector-Jacobian products can be
    taken in one batched backward pass, as the paper's code does: a forward
    hook keeps each layer's input ``a_n`` (N, ..., in), a hook on its output
    receives ``g_n`` (N, ..., out) and the per-sample weight gradient is
    ``sum_positions g_n a_n^T`` (bias: ``sum_positions g_n``). The hooks exist
    only during that pass (module hooks and ``torch.func`` transforms do not
    mix). Each pass also checks that the per-sample gradients sum to the
    ordinary gradient of the same backward pass, which catches weights used
    outside their layer's forward (tied weights) or layers that mix samples.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap
from torch.func import jvp as func_jvp
from torch.func import vjp as func_vjp

from backends.ghost_hooks import ROUTES, LayerPass
from ngdref._checks import NonFiniteError
from ngdref.provider import JacobianProvider
from ngdref.rows import as_rows

__all__ = ["TorchProvider", "default_output_fn"]

_POSITIONAL = "<input>"
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


def _hf_models(model: nn.Module) -> list[nn.Module]:
    """The Hugging Face ``PreTrainedModel`` submodules, outermost first ([] without HF).

    A model built from transformers has imported it already; importing it here for a plain
    torch model would cost seconds, so an unimported transformers means no HF submodule.
    """
    if "transformers" not in sys.modules:
        return []
    from transformers import PreTrainedModel

    return [m for m in model.modules() if isinstance(m, PreTrainedModel)]


def _is_plain_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


class TorchProvider(JacobianProvider):
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
        holds (falling back to vmap if the pass's sum check fails), vmap
        otherwise. "ghost": per-layer factors from one forward and one
        backward pass with module hooks (:mod:`backends.ghost_hooks`), given
        by :meth:`per_sample_rows` without forming G; not with ``chunk_size``.
    layer_route : {"auto", "ghost", "materialise"}
        For "ghost": per weight the cheaper route by the cost model of
        :func:`backends.ghost.ghost_is_cheaper`, factors wherever possible, or
        materialised per-layer rows everywhere.

    Attributes
    ----------
    num_params : int
        P.
    param_names : tuple of str
        Names of the trainable parameters, in theta order.
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

        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(
                "model has no trainable parameters (none with requires_grad=True): "
                "theta would be empty"
            )
        first = named[0][1]
        for name, p in named:
            if p.dtype not in (torch.float32, torch.float64):
                raise TypeError(
                    f"model: trainable parameter {name} has dtype {p.dtype}; "
                    "float32 or float64 is required"
                )
            if p.dtype != first.dtype:
                raise TypeError(
                    f"model: trainable parameter {name} has dtype {p.dtype} but "
                    f"{named[0][0]} has {first.dtype}; all trainable parameters must share one"
                )
            if p.device != first.device:
                raise TypeError(
                    f"model: trainable parameter {name} is on device {p.device} but "
                    f"{named[0][0]} is on {first.device}; move the model to one device"
                )
        self.dtype: torch.dtype = first.dtype
        self.device: torch.device = first.device
        self.param_names: tuple[str, ...] = tuple(name for name, _ in named)
        self._shapes = tuple(tuple(p.shape) for _, p in named)
        self._sizes = tuple(p.numel() for _, p in named)
        self.num_params = int(sum(self._sizes))

        if params is None:
            with torch.no_grad():
                theta = torch.cat([p.detach().reshape(-1) for _, p in named]).clone()
        else:
            self._check_flat(params, "params")
            theta = params.detach().clone()
        self._theta = theta

        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
        self.chunk_size = chunk_size

        self._split_inputs(inputs)
        self._hf = _hf_models(model)

        if per_sample_method not in _METHODS:
            raise ValueError(
                f"per_sample_method must be one of {_METHODS}, got {per_sample_method!r}"
            )
        # only the Linear-hooks route needs the slots (walking the modules costs per step)
        self._linear_slots = (
            self._find_linear_slots() if per_sample_method in ("auto", "hooks") else None
        )
        if per_sample_method == "hooks" and self._linear_slots is None:
            raise ValueError(
                "per_sample_method='hooks' needs every trainable parameter to be the weight or "
                "bias of an nn.Linear; use 'vmap' (or 'auto') for this model"
            )
        # "auto" may still fall back to vmap if a hooks pass fails its sum check.
        if per_sample_method == "ghost":
            if chunk_size is not None:
                raise ValueError(
                    "chunk_size must be None for per_sample_method='ghost' (one forward and "
                    "one backward pass over the whole batch)"
                )
            if layer_route not in ROUTES:
                raise ValueError(f"layer_route must be one of {ROUTES}, got {layer_route!r}")
        self.layer_route = layer_route
        self.layer_pass: LayerPass | None = None
        self._auto = per_sample_method == "auto"
        if self._auto:
            per_sample_method = "hooks" if self._linear_slots is not None else "vmap"
        self.per_sample_method = per_sample_method

        self._logits = self._compute_logits()

    # ------------------------------------------------------------------ inputs
    def _split_inputs(self, inputs: Any) -> None:
        """Sort inputs into batched tensors, static values and the targets."""
        self.targets: torch.Tensor | None = None
        if isinstance(inputs, torch.Tensor):
            self._positional = True
            batched: dict[str, torch.Tensor] = {_POSITIONAL: inputs}
            static: dict[str, Any] = {}
        elif isinstance(inputs, Mapping):
            self._positional = False
            batched, static = {}, {}
            for key, value in inputs.items():
                if not isinstance(key, str):
                    raise TypeError(f"inputs: keys must be str, got {key!r}")
                if isinstance(value, torch.Tensor):
                    batched[key] = value
                else:
                    static[key] = value
            self.targets = batched.pop("labels", None)
        else:
            raise TypeError(
                f"inputs must be a torch.Tensor or a mapping of str to tensors, "
                f"got {type(inputs).__name__}"
            )
        if not batched:
            raise ValueError("inputs holds no tensor: at least one batched tensor is needed")
        sizes = {key: (t.shape[0] if t.ndim else None) for key, t in batched.items()}
        first_key = next(iter(sizes))
        n = sizes[first_key]
        for key, size in sizes.items():
            label = "inputs" if key == _POSITIONAL else f"inputs[{key!r}]"
            if size is None:
                raise ValueError(f"{label} is a 0-d tensor; the batch must be its first axis")
            if size != n:
                raise ValueError(
                    f"{label} has {size} samples (first axis) but inputs[{first_key!r}] has {n}"
                )
            if batched[key].device != self.device:
                raise TypeError(
                    f"{label} is on device {batched[key].device} but the model's trainable "
                    f"parameters are on {self.device}"
                )
        if n == 0:
            raise ValueError("inputs is an empty batch (N = 0): at least one sample is needed")
        if self.targets is not None and (self.targets.ndim == 0 or self.targets.shape[0] != n):
            raise ValueError(
                f"inputs['labels'] has shape {tuple(self.targets.shape)} but "
                f"inputs[{first_key!r}] has {n} samples"
            )
        if (
            self.targets is not None
            and "decoder_input_ids" not in batched
            and "decoder_inputs_embeds" not in batched
        ):
            prepare = self._decoder_input_preparer()
            if prepare is not None:
                batched["decoder_input_ids"] = prepare(labels=self.targets)
        self._n = int(n)
        self._batched = batched
        self._static = static

    def _decoder_input_preparer(self) -> Callable[..., torch.Tensor] | None:
        hf = _hf_models(self.model)
        if not hf or not getattr(hf[0].config, "is_encoder_decoder", False):
            return None
        return getattr(hf[0], "prepare_decoder_input_ids_from_labels", None)

    def _slices(self) -> Iterator[slice]:
        step = self._n if self.chunk_size is None else self.chunk_size
        for start in range(0, self._n, step):
            yield slice(start, min(start + step, self._n))

    def _batch(self, rows: slice) -> dict[str, torch.Tensor]:
        return {key: t[rows] for key, t in self._batched.items()}

    # ---------------------------------------------------------------- theta
    def params_vector(self) -> torch.Tensor:
        """theta, shape (P,): a copy of the parameters the provider evaluates the model at."""
        return self._theta.clone()

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a (P,) vector into ``{name: tensor of the parameter's shape}`` (views).

        Differentiable: gradients flow back to ``vector``.
        """
        self._check_flat(vector, "vector")
        out = {}
        for name, shape, piece in zip(
            self.param_names, self._shapes, torch.split(vector, self._sizes), strict=True
        ):
            out[name] = piece.view(shape)
        return out

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate ``{name: tensor}`` (one entry per trainable parameter) into (P,).

        The inverse of :meth:`unflatten`, e.g. for ``{name: p.grad}``.
        """
        if not isinstance(tensors, Mapping):
            raise TypeError(f"tensors must be a mapping of name to tensor, got {type(tensors)}")
        missing = [name for name in self.param_names if name not in tensors]
        extra = [name for name in tensors if name not in self.param_names]
        if missing or extra:
            raise ValueError(
                f"tensors must have exactly the trainable parameters' names; "
                f"missing {missing}, unexpected {extra}"
            )
        pieces = []
        for name, shape in zip(self.param_names, self._shapes, strict=True):
            t = tensors[name]
            if tuple(t.shape) != shape:
                raise ValueError(f"tensors[{name!r}] has shape {tuple(t.shape)}, expected {shape}")
            pieces.append(t.reshape(-1))
        return torch.cat(pieces)

    # ------------------------------------------------------------- forwards
    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        """Run with every submodule in eval mode, then restore each one's flag."""
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            yield
        finally:
            for m, training in modes:
                m.training = training

    def _call(
        self, theta: torch.Tensor, batched: Mapping[str, torch.Tensor], params: Any = None
    ) -> Any:
        params = self.unflatten(theta) if params is None else params
        if self._positional:
            return functional_call(self.model, params, (batched[_POSITIONAL],), self._static)
        return functional_call(self.model, params, (), {**batched, **self._static})

    def _batch_logits(
        self, theta: torch.Tensor, batched: Mapping[str, torch.Tensor], params: Any = None
    ) -> Any:
        """Logits (n, C) of a batch of n samples (``params``: ``unflatten(theta)`` if given)."""
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
        return self._batch_logits(theta, {k: t.unsqueeze(0) for k, t in sample.items()})[0]

    def _compute_logits(self) -> torch.Tensor:
        self._pending: tuple | None = None
        if self.per_sample_method == "ghost":
            self.layer_pass = LayerPass(self, self.layer_route)
            z = self.layer_pass.logits
        elif self.per_sample_method == "hooks" and self.chunk_size is None:
            # The forward the first hooks vjp needs anyway: keep its graph for that vjp (an
            # optimiser step then costs one forward, not two). Any other first use drops it.
            self._pending = self._hooks_forward(self._batch(slice(None)))
            z = self._pending[0].detach()
        else:
            with torch.no_grad(), self._eval_mode():
                z = torch.cat(
                    [self._batch_logits(self._theta, self._batch(s)) for s in self._slices()]
                )
        if not torch.is_floating_point(z):
            raise TypeError(f"logits: output_fn returned dtype {z.dtype}, need floating point")
        if not bool(torch.isfinite(z).all()):
            raise NonFiniteError(
                "logits: the model output contains NaN or infinite values at these "
                "parameters and inputs"
            )
        return z

    @contextlib.contextmanager
    def _vmap_masks(self) -> Iterator[None]:
        """Convert 2-D attention masks to 4-D additive ones on the outermost HF model."""
        if not self._hf:
            yield
            return
        hf = self._hf[0]
        config = hf.config
        causal = not getattr(config, "is_encoder_decoder", False) and hf.can_generate()
        if causal:
            yield
            return

        def to_additive(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.ndim == 2:
                dtype = hf.dtype
                keep = mask.to(dtype)
                kwargs["attention_mask"] = (1.0 - keep)[:, None, None, :] * torch.finfo(dtype).min
            return args, kwargs

        handle = hf.register_forward_pre_hook(to_additive, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

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
        with self._eval_mode():
            for rows in self._slices():
                batch = self._batch(rows)
                try:
                    _, tangent = func_jvp(
                        lambda th, b=batch: self._batch_logits(th, b), (self._theta,), (vector,)
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
        returns a :class:`backends.ghost.GhostRows` (an ``ngdref.PerSampleRows``, G never
        formed; ``.materialise()`` gives the tensor).

        Parameters
        ----------
        cotangents : torch.Tensor, shape (N, C)
            Same dtype and device as the logits.
        """
        self._check_cotangents(cotangents)
        if self.per_sample_method == "ghost":  # rows without G (ngdref takes PerSampleRows)
            return self.per_sample_rows(cotangents, keep_graph=True)
        if self.per_sample_method == "hooks":
            result = self._vjp_hooks(cotangents)
            if result is not None:
                return result
            # "auto" and the sum check failed: this model is not hook-friendly.
            self.per_sample_method = "vmap"
        return self._vjp_vmap(cotangents)

    def _vjp_vmap(self, cotangents: torch.Tensor) -> torch.Tensor:
        def one(theta: torch.Tensor, sample: dict, u: torch.Tensor) -> torch.Tensor:
            _, pullback = func_vjp(lambda th: self._sample_logits(th, sample), theta)
            return pullback(u)[0]

        per_sample = vmap(one, in_dims=(None, self._in_dims(), 0))
        out = []
        with self._eval_mode(), self._vmap_masks():
            for rows in self._slices():
                out.append(per_sample(self._theta, self._batch(rows), cotangents[rows]).detach())
        return out[0] if len(out) == 1 else torch.cat(out)

    def per_sample_rows(self, cotangents: torch.Tensor, *, keep_graph: bool = True) -> Any:
        r"""The per-sample rows u_n^T J_n (N, P) as an ``ngdref.PerSampleRows``.

        "ghost": :class:`backends.ghost.GhostRows` from one backward pass through the hooked
        forward (a new forward if an earlier call released it, ``keep_graph=False``); other
        routes: ``ngdref.as_rows(self.vjp(cotangents))``.
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
        with self._eval_mode(), self._vmap_masks():
            for rows in self._slices():
                for i, g in enumerate(per_sample(primals, self._batch(rows), cotangents[rows])):
                    out[i].append(g.detach())
        by_range = {cut: torch.cat(parts) for cut, parts in zip(cuts, out, strict=True)}
        return [by_range[r] for r in ranges]

    def _find_linear_slots(self) -> dict[nn.Module, dict[str, tuple[int, int]]] | None:
        """``{linear: {"weight"|"bias": (offset, size)}}``, None if a parameter is elsewhere."""
        slots: dict[nn.Module, dict[str, tuple[int, int]]] = {}
        offset = 0
        for name, size in zip(self.param_names, self._sizes, strict=True):
            path, _, attr = name.rpartition(".")
            module = self.model.get_submodule(path)
            if not _is_plain_linear(module) or attr not in ("weight", "bias"):
                return None
            slots.setdefault(module, {})[attr] = (offset, size)
            offset += size
        return slots

    def _vjp_hooks(self, cotangents: torch.Tensor) -> torch.Tensor | None:
        """One backward pass per chunk; hooks collect the per-sample Linear gradients.

        Returns None when "auto" chose hooks and the sum check failed.
        """
        out = []
        for rows in self._slices():
            grads, total, failures = self._hooks_pass(self._batch(rows), cotangents[rows])
            mismatch = (grads.sum(0) - total).norm()
            scale = grads.norm(dim=1).sum() + total.norm()
            tolerance = math.sqrt(torch.finfo(self.dtype).eps) * scale
            if failures or not mismatch <= tolerance:  # written so that a NaN mismatch fails
                if self._auto:
                    return None
                raise RuntimeError(
                    "per_sample_method='hooks': the per-sample gradients from the nn.Linear "
                    "hooks do not add up to the batch gradient (a trainable weight is used "
                    "outside its layer's forward, or a layer mixes samples"
                    + (f"; {failures[0]}" if failures else "")
                    + "); use per_sample_method='vmap'"
                )
            out.append(grads)
        return out[0] if len(out) == 1 else torch.cat(out)

    def _hooks_pass(
        self, batch: Mapping[str, torch.Tensor], cotangents: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Per-sample gradients (n, P) from hooks, the batch gradient (P,), and failures."""
        if self._pending is not None:
            state, self._pending = self._pending, None
        else:
            state = self._hooks_forward(batch)
        z, theta, grads, failures = state
        (total,) = torch.autograd.grad(z, theta, grad_outputs=cotangents)
        return grads, total, failures

    def _hooks_forward(
        self, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
        """The forward of a hooks pass: logits with their graph, theta, the G buffer, failures."""
        slots_of = self._linear_slots
        assert slots_of is not None
        n = next(iter(batch.values())).shape[0]
        grads = torch.zeros(n, self.num_params, dtype=self.dtype, device=self.device)
        failures: list[str] = []

        def forward_hook(module: nn.Module, args: tuple, output: Any) -> None:
            a = args[0]
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            if a.ndim < 2 or a.shape[0] != n:
                failures.append(f"an nn.Linear got an input of shape {tuple(a.shape)}")
                return
            a = a.detach().reshape(n, -1, a.shape[-1])
            slots = slots_of[module]

            def backward_hook(g: torch.Tensor) -> None:
                # per-sample dW = sum over positions of outer(output grad, input)
                g = g.reshape(n, -1, g.shape[-1])
                if "weight" in slots:
                    off, size = slots["weight"]
                    grads[:, off:off + size] += torch.bmm(g.transpose(1, 2), a).reshape(n, -1)
                if "bias" in slots:
                    off, size = slots["bias"]
                    grads[:, off:off + size] += g.sum(dim=1)

            output.register_hook(backward_hook)

        handles = [m.register_forward_hook(forward_hook) for m in slots_of]
        try:
            with self._eval_mode(), torch.enable_grad():
                theta = self._theta.detach().requires_grad_(True)
                z = self._batch_logits(theta, batch)
        finally:
            for h in handles:
                h.remove()
        return z, theta, grads, failures

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
        with self._eval_mode(), torch.enable_grad():
            for rows in self._slices():
                theta = self._theta.detach().requires_grad_(True)
                z = self._batch_logits(theta, self._batch(rows))
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
        with self._eval_mode(), self._vmap_masks():
            for rows in self._slices():
                out.append(per_sample(self._theta, self._batch(rows)).detach())
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

    def _check_flat(self, vector: Any, name: str) -> None:
        if not isinstance(vector, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(vector).__name__}")
        if vector.ndim != 1 or vector.shape[0] != self.num_params:
            raise ValueError(
                f"{name} must have shape ({self.num_params},) (P, the trainable parameters), "
                f"got {tuple(vector.shape)}"
            )
        self._check_dtype_device(vector, name)

    def _check_dtype_device(
        self, array: torch.Tensor, name: str, dtype: torch.dtype | None = None,
        reference: str = "the provider's parameters",
    ) -> None:
        dtype = self.dtype if dtype is None else dtype
        if array.device != self.device:
            raise TypeError(
                f"{name} is on device {array.device} but {reference} are on {self.device}"
            )
        if array.dtype != dtype:
            raise TypeError(f"{name} has dtype {array.dtype} but {reference} have dtype {dtype}")

    def _check_vector(self, vector: Any) -> None:
        super()._check_vector(vector)
        self._check_dtype_device(vector, "vector")

    def _check_cotangents(self, cotangents: Any) -> None:
        super()._check_cotangents(cotangents)
        self._check_dtype_device(cotangents, "cotangents", self._logits.dtype, "the logits")
