"""The hooked passes behind :func:`backends.torch.kfac.curvature.kfac_curvature`.

One forward pass with a forward hook on every supported layer (it keeps the layer's inputs
as (N, T, d_in) positions and puts a hook on its output tensor that keeps the output
gradients (N, T, d_out)), then one backward pass per logit-space cotangent: the true-label
logit gradients e_n and, for KFAC, a sampled label's (or the columns of the logit Hessian's
square root). Layers whose calls cannot be attributed to samples are reported, not used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import ngdref

from ..provider import TorchProvider

__all__ = ["Passes", "Recorder", "Use", "run_passes"]


def _unsupported_reason(module: nn.Module) -> str | None:
    """None if the module's parameters get Kronecker factors, else why not."""
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return None
    if isinstance(module, nn.Conv2d) and type(module).forward is nn.Conv2d.forward:
        if module.groups != 1:
            return f"nn.Conv2d with groups={module.groups} (only groups=1)"
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            return "nn.Conv2d with string padding or a non-zero padding_mode"
        return None
    return f"{type(module).__name__} is not a supported layer (nn.Linear, nn.Conv2d)"


class Recorder:
    """Forward and output-gradient hooks on the supported layers (inputs and grads per call)."""

    def __init__(self, modules: dict[str, nn.Module], n: int) -> None:
        self.modules = modules
        self.n = n
        self.inputs: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
        self.grads: dict[str, dict[int, torch.Tensor]] = {name: {} for name in modules}
        #: layer name -> why its calls cannot be attributed to samples (it falls back)
        self.failures: dict[str, str] = {}

    def _positions_in(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(module, nn.Conv2d):
            patches = nn.functional.unfold(
                x, module.kernel_size, module.dilation, module.padding, module.stride
            )
            return patches.transpose(1, 2)
        return x.reshape(self.n, -1, x.shape[-1])

    def _positions_out(self, module: nn.Module, g: torch.Tensor) -> torch.Tensor:
        if isinstance(module, nn.Conv2d):
            return g.flatten(2).transpose(1, 2)
        return g.reshape(self.n, -1, g.shape[-1])

    def hook(self, name: str) -> Callable[..., None]:
        def forward_hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0]
            if x.ndim < 2 or x.shape[0] != self.n:
                self.failures[name] = (
                    f"called on an input of shape {tuple(x.shape)}, not a batch of {self.n} "
                    "samples along its first axis"
                )
                return
            call = len(self.inputs[name])
            self.inputs[name].append(self._positions_in(module, x.detach()))

            def grad_hook(g: torch.Tensor) -> None:
                self.grads[name][call] = self._positions_out(module, g.detach())

            output.register_hook(grad_hook)

        return forward_hook

    def layer_inputs(self, name: str) -> torch.Tensor:
        return torch.cat(self.inputs[name], dim=1)

    def output_grads(self, name: str) -> torch.Tensor:
        grads = self.grads[name]
        out = torch.cat([grads[c] for c in range(len(self.inputs[name]))], dim=1)
        self.grads[name] = {}
        return out


@dataclass(frozen=True)
class Use:
    """The modules that call one trainable parameter, and its role there ("weight"/"bias")."""

    role: str
    modules: tuple[str, ...]


def _layers(
    model: nn.Module,
) -> tuple[dict[str, nn.Module], dict[str, str], dict[str, Use]]:
    """The supported modules to hook, the fallback reasons, and the Kronecker parameters.

    Parameters are named as ``named_parameters()`` names them (a tied parameter once, under
    its first name). A parameter shared by several modules gets one block: it is Kronecker
    factored when every module using it is a supported layer of one type and uses it in one
    role (its calls are then concatenated along the positions, as the k calls of one layer
    are), else it falls back to the diagonal block, which sums every use by construction.
    """
    canonical = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    layers: dict[str, nn.Module] = {}
    reasons: dict[str, str] = {}
    found: dict[str, list[tuple[str, str, nn.Module]]] = {}
    for module_name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        for pname, p in own:
            found.setdefault(canonical[id(p)], []).append((module_name, pname, module))
        if own and _unsupported_reason(module) is None:
            layers[module_name] = module
    kronecker: dict[str, Use] = {}
    for name, uses in found.items():
        reason = _shared_reason(name, uses)
        if reason is None:
            kronecker[name] = Use(uses[0][1], tuple(m for m, _, _ in uses))
        else:
            reasons[name] = reason
    used = {m for use in kronecker.values() for m in use.modules}
    return {m: mod for m, mod in layers.items() if m in used}, reasons, kronecker


def _shared_reason(name: str, uses: list[tuple[str, str, nn.Module]]) -> str | None:
    """None if every use of parameter ``name`` is a supported layer's weight (or bias) in
    modules of one type, else why its block is the diagonal fallback."""
    for module_name, pname, module in uses:
        reason = _unsupported_reason(module)
        if reason is not None:
            return reason if len(uses) == 1 else f"used by {module_name!r}: {reason}"
        if pname not in ("weight", "bias"):
            return f"{pname!r} of a supported layer is neither weight nor bias"
    where = [f"{m!r} ({type(mod).__name__}.{p})" for m, p, mod in uses]
    if len({p for _, p, _ in uses}) > 1 or len({type(mod) for _, _, mod in uses}) > 1:
        return f"shared by {', '.join(where)} in different roles or layer types"
    return None


def _sampled_cotangents(
    loss: ngdref.LogitLoss, logits: torch.Tensor, targets: Any, key: int, kfac_fisher: str
) -> list[torch.Tensor]:
    """The logit-space rows of KFAC's backward passes: one draw, or the C columns of Q_n."""
    if kfac_fisher == "mc":
        drawn = loss.sample(logits, key, targets=targets)[0]
        return [loss.grad(logits, drawn)]
    try:
        root = loss.hessian_sqrt(logits, targets)
    except NotImplementedError:
        root = torch.linalg.cholesky(loss.hessian(logits, targets))
    return [root[:, :, c] for c in range(root.shape[-1])]


@dataclass
class Passes:
    """What the forward and backward passes of :func:`kfac_curvature` recorded."""

    recorder: Recorder
    layers: dict[str, nn.Module]
    reasons: dict[str, str]
    #: Kronecker-factored parameter name -> its role and the modules that call it
    kronecker: dict[str, Use]
    grad: torch.Tensor
    loss: float
    logit_grad_sq_norms: torch.Tensor
    #: "true" / "sampled" -> the logit-space cotangents of those backward passes
    rows: dict[str, list[torch.Tensor]]
    #: "true" / "sampled" -> layer name -> output gradients (N, T, d_out), one per pass
    output_grads: dict[str, dict[str, list[torch.Tensor]]]


def run_passes(
    provider: TorchProvider,
    loss: ngdref.LogitLoss,
    targets: Any,
    methods: tuple[str, ...],
    key: int,
    kfac_fisher: str,
    strict: bool,
) -> Passes:
    """One hooked forward, the true-label backward and (for "kfac") the sampled ones."""
    model = provider.model
    layers, reasons, kronecker = _layers(model)
    recorder = Recorder(layers, provider.num_samples)
    handles = [m.register_forward_hook(recorder.hook(name)) for name, m in layers.items()]
    try:
        with provider.eval_mode(), torch.enable_grad():
            theta = provider.params_vector().requires_grad_(True)
            z = provider.batch_logits(theta, provider.batch(slice(None)))
    finally:
        for handle in handles:
            handle.remove()
    for name in list(layers):
        reason = recorder.failures.get(name) or (
            "" if recorder.inputs[name] else "layer not called in the forward"
        )
        if not reason:
            continue
        del layers[name]
        for pname, use in list(kronecker.items()):
            if name in use.modules:  # every use of a shared parameter falls back with it
                del kronecker[pname]
                shared = len(use.modules) > 1
                reasons[pname] = f"used by {name!r}: {reason}" if shared else reason
    if strict and reasons:
        raise ValueError(f"model has trainable parameters outside supported layers: {reasons}")
    logits = z.detach()
    e = loss.grad(logits, targets)
    value = float(torch.sum(loss.value(logits, targets)))
    rows = {"true": [e]}
    if "kfac" in methods:
        rows["sampled"] = _sampled_cotangents(loss, logits, targets, key, kfac_fisher)
    grad = None
    output_grads: dict[str, dict[str, list[torch.Tensor]]] = {}
    for kind, cotangents in rows.items():
        output_grads[kind] = {n: [] for n in layers}
        for u in cotangents:
            (g,) = torch.autograd.grad(z, theta, grad_outputs=u, retain_graph=True)
            grad = g if grad is None else grad
            for n in layers:
                output_grads[kind][n].append(recorder.output_grads(n))
    if not bool(torch.isfinite(grad).all()):
        raise ngdref.NonFiniteError("grad: the batch gradient contains NaN or infinite values")
    return Passes(
        recorder, layers, reasons, kronecker, grad, value, torch.sum(e * e, dim=1), rows,
        output_grads,
    )


