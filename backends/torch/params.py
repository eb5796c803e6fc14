r"""theta (P,): the trainable parameters of a ``torch.nn.Module`` as one flat vector.

The parameters with ``requires_grad=True``, in ``named_parameters()`` order, each flattened
row-major and concatenated; they must share one device and one dtype, float32 or float64.
:class:`backends.TorchProvider` evaluates its model at this theta.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn


def _named_parameters(model: nn.Module, modules: Sequence[tuple[str, nn.Module]] | None
                      ) -> Iterator[tuple[str, nn.Parameter]]:
    """``model.named_parameters()`` (each parameter once, at its first name), from the
    ``named_modules()`` list ``modules`` when the caller has it."""
    if modules is None:
        yield from model.named_parameters()
        return
    seen: set[int] = set()
    for prefix, module in modules:
        for attr, p in module._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                yield (f"{prefix}.{attr}" if prefix else attr), p


class ParamLayout:
    """The layout of theta: names, shapes and sizes of the trainable parameters, dtype,
    device and P (:attr:`num_params`), and theta itself (a copy, or ``params``).

    Attributes
    ----------
    param_names : tuple of str
        The trainable parameters' names, in theta's order.
    param_shapes : tuple of tuple of int
        Their shapes, in theta's order.
    param_tensors : tuple of torch.Tensor
        The trainable parameter tensors themselves (the model's, not copies), in theta's
        order: what a walk over the model's modules finds them by.
    num_params : int
        P.
    """

    def __init__(self, model: nn.Module, params: torch.Tensor | None, *,
                 modules: Sequence[tuple[str, nn.Module]] | None = None) -> None:
        named = [(name, p) for name, p in _named_parameters(model, modules) if p.requires_grad]
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
        self.param_tensors: tuple[torch.Tensor, ...] = tuple(p for _, p in named)
        self.param_shapes: tuple[tuple[int, ...], ...] = tuple(tuple(p.shape) for _, p in named)
        self._sizes = tuple(p.numel() for _, p in named)
        self.num_params = int(sum(self._sizes))

        if params is None:
            with torch.no_grad():
                theta = torch.cat([p.detach().reshape(-1) for _, p in named])  # a new tensor
        else:
            self._check_flat(params, "params")
            theta = params.detach().clone()
        self._theta = theta

    def params_vector(self) -> torch.Tensor:
        """theta, shape (P,): a copy of the parameters the provider evaluates the model at."""
        return self._theta.clone()

    @property
    def theta(self) -> torch.Tensor:
        """theta, shape (P,), itself: the provider's own tensor, not a copy (never change it in
        place; :meth:`params_vector` gives a copy)."""
        return self._theta

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a (P,) vector into ``{name: tensor of the parameter's shape}`` (views).

        Differentiable: gradients flow back to ``vector``.
        """
        self._check_flat(vector, "vector")
        out = {}
        for name, shape, piece in zip(
            self.param_names, self.param_shapes, torch.split(vector, self._sizes), strict=True
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
        for name, shape in zip(self.param_names, self.param_shapes, strict=True):
            t = tensors[name]
            if tuple(t.shape) != shape:
                raise ValueError(f"tensors[{name!r}] has shape {tuple(t.shape)}, expected {shape}")
            pieces.append(t.reshape(-1))
        return torch.cat(pieces)

    # ------------------------------------------------------------ validation
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
