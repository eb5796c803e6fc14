"""The torch-only validation cases as data: real ``nn.Module`` models that have no array-API twin.

A :class:`TorchProblem` is a name, a builder of the model on one batch
(:class:`TorchBatch`) and what applies to it (the hooks route, BackPACK,
matrix-free NGD). Nothing is built (and neither torch nor transformers is
imported) until :meth:`TorchProblem.build` is called, so listing the cases
costs nothing and works without torch.

The reference of every comparison is :class:`backends.TorchProvider` with
``per_sample="vmap"`` in float64; it is cross-checked against the
hooks route, central differences through :func:`flat_logits_function` (a
flat-parameter wrapper of the model's ordinary forward by
``torch.func.functional_call``, independent of the provider's own
unflattening and input handling) and the peer-library oracles of
:mod:`validation.oracles.peers`.

The Hugging Face models (T5, ViT) compute parts of their forward in float32
even after ``.double()`` (T5LayerNorm's variance, the eager ViT attention's
softmax): see :data:`FD_STEP_FLOAT32_INTERNALS` and the tolerances in
:mod:`validation.crosscheck` for what that costs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import ngdref

__all__ = [
    "FD_STEP_FLOAT32_INTERNALS",
    "TorchBatch",
    "TorchProblem",
    "flat_logits_function",
    "torch_problems",
]

IGNORE_INDEX = -100
T5_VOCAB = 16

#: Relative central-difference step for models with float32 internals. Their
#: logits carry float32 rounding noise, ``delta ~ 2e-7 |z|`` (a few eps_32), that is
#: not smooth in theta; a central difference with step h then errs by about
#: ``h^2 |z'''| / 6`` (truncation) + delta / h (noise), smallest near
#: ``h = (3 delta / |z'''|)^(1/3)`` ~ eps_32^(1/3) = 5e-3 when z and its derivatives
#: are of one scale, where both terms are ~ eps_32^(2/3) = 2.4e-5 relative. The
#: float64 default eps_64^(1/3) = 6e-6 would leave a noise term of
#: 2e-7 / 6e-6 = 3e-2. A model whose logits are more curved in theta takes a
#: smaller step (``TorchProblem.fd_step``, chosen from a scan of steps
#: 3e-6 .. 3e-3 against the autodiff Jacobian).
FD_STEP_FLOAT32_INTERNALS = 5e-3


@dataclass
class TorchBatch:
    """A model on one batch, ready for :class:`backends.TorchProvider`.

    Attributes
    ----------
    model : torch.nn.Module
        float64, eval mode; its trainable parameters are theta.
    inputs : torch.Tensor or dict of str to torch.Tensor
        What the provider gets (dict inputs may hold ``labels``).
    targets : torch.Tensor
        The targets of ``loss``.
    loss : ngdref.LogitLoss
    forward_inputs : torch.Tensor or dict
        What the model's ordinary ``__call__`` gets for the same logits (for
        the finite-difference wrapper and the oracles): Hugging Face seq2seq
        models get ``labels`` and derive ``decoder_input_ids`` themselves.
    """

    model: Any
    inputs: Any
    targets: Any
    loss: ngdref.LogitLoss
    forward_inputs: Any

    @property
    def num_samples(self) -> int:
        """N."""
        return int(self.targets.shape[0])


@dataclass(frozen=True)
class TorchProblem:
    """A torch-only validation case.

    Attributes
    ----------
    name : str
    builder : callable () -> TorchBatch
    damping : float
        lambda of every update. The float64 models take 1e-3 like the
        array-API problems; the Hugging Face ones 3e-3 .. 5e-3 times the
        largest eigenvalue of F (330 for T5-LoRA, < 1 for the others), so that
        CG on their float32-noisy Fisher-vector products converges in tens of
        iterations (at 1e-3 T5-LoRA's CG stalls at a residual of 1e-4).
    cg_tol : float
        Relative residual of the CG solves: 1e-12 in float64; 1e-6 for models
        with float32 internals, whose Fisher-vector products carry float32
        rounding (~1e-8 relative) that CG cannot resolve below.
    hooks : bool
        Every trainable parameter lives in an ``nn.Linear``: the hooks route applies.
    backpack : bool
        BackPACK supports every module (MLP, CNN; not transformers).
    large_output : bool
        C stands for a real vocabulary: GN and NGD are solved matrix-free by
        conjugate gradients on Fisher-vector products (no Woodbury over N*C).
    float32_internals : bool
        The model computes parts of its forward in float32 (Hugging Face).
    requires : tuple of str
        Importable modules the case needs (skipped otherwise).
    notes : str
    fd_step : float, optional
        Relative central-difference step; default eps_64^(1/3) for float64
        models and :data:`FD_STEP_FLOAT32_INTERNALS` for models with float32
        internals.
    """

    name: str
    builder: Callable[[], TorchBatch]
    damping: float = 1e-3
    cg_tol: float = 1e-12
    hooks: bool = False
    backpack: bool = False
    large_output: bool = False
    float32_internals: bool = False
    requires: tuple[str, ...] = ("torch",)
    notes: str = field(default="")
    fd_step: float | None = None

    def unavailable(self) -> str:
        """Why this case cannot run here ('' when it can)."""
        for module in self.requires:
            try:
                importlib.import_module(module)
            except ImportError as err:
                return f"{module} is not importable ({err})"
        return ""

    def build(self) -> TorchBatch:
        """The model and batch (imports torch and the libraries in ``requires``)."""
        return self.builder()

    @property
    def relative_step(self) -> float | None:
        """Relative finite-difference step (None: the float64 default eps^(1/3))."""
        if self.fd_step is not None:
            return self.fd_step
        return FD_STEP_FLOAT32_INTERNALS if self.float32_internals else None


def flat_logits_function(model: Any, forward_inputs: Any) -> Callable[[Any, Any], Any]:
    """``fn(theta, _) -> logits (N, C)``: the model's ordinary forward at a flat theta.

    theta (P,) is split over the trainable parameters in ``named_parameters()``
    order (each flattened row-major) and substituted by
    ``torch.func.functional_call``; the model runs in eval mode under
    ``torch.no_grad`` and its logits (:func:`backends.default_output_fn`: the output
    itself or its ``.logits``) are flattened to (N, C). Suitable for
    :class:`backends.FiniteDifferenceProvider`.

    Parameters
    ----------
    model : torch.nn.Module
    forward_inputs : torch.Tensor or mapping
        Passed positionally (tensor) or as keywords (mapping) to ``model``.

    Returns
    -------
    callable (theta, inputs) -> torch.Tensor
        ``inputs`` is ignored (the batch is bound here).
    """
    import torch

    from backends import default_output_fn

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    shapes = [tuple(p.shape) for _, p in named]
    sizes = [p.numel() for _, p in named]

    def fn(theta: Any, _inputs: Any = None) -> Any:
        pieces = torch.split(theta, sizes)
        params = {n: x.reshape(s) for n, x, s in zip(names, pieces, shapes, strict=True)}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                if isinstance(forward_inputs, Mapping):
                    out = torch.func.functional_call(model, params, (), dict(forward_inputs))
                else:
                    out = torch.func.functional_call(model, params, (forward_inputs,))
        finally:
            model.train(was_training)
        z = default_output_fn(out)
        return z.reshape(z.shape[0], -1)

    return fn


# ---- builders ----------------------------------------------------------------------------------
def _mlp() -> TorchBatch:
    import torch
    from torch import nn

    torch.manual_seed(10)
    model = nn.Sequential(
        nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 4)
    ).double().eval()
    model[0].bias.requires_grad_(False)  # a frozen parameter: not part of theta
    x = torch.randn(8, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (8,))
    return TorchBatch(model, x, y, ngdref.SoftmaxCrossEntropy(), x)


def _cnn() -> TorchBatch:
    from validation.tiny_models import tiny_cnn_batch

    model, x, y = tiny_cnn_batch(seed=11, num_samples=6)
    return TorchBatch(model, x, y, ngdref.SoftmaxCrossEntropy(), x)


def _t5(adapter: str) -> TorchBatch:
    import torch
    import transformers

    from validation.tiny_models import t5_adapter, tiny_t5_batch, tiny_t5_config

    torch.manual_seed(12)
    config = tiny_t5_config(
        vocab_size=T5_VOCAB, d_model=8, d_ff=16, num_layers=1, num_heads=2, d_kv=4,
        # T5 v1.1's smooth gated-GELU feed-forward: t5-base's ReLU has kinks that make
        # central differences first-order accurate wherever a step crosses one
        feed_forward_proj="gated-gelu",
    )
    base = transformers.T5ForConditionalGeneration(config)
    model = t5_adapter(base, adapter).double().eval()
    batch = tiny_t5_batch(T5_VOCAB, seed=13, ignore_index=IGNORE_INDEX)
    labels = batch["labels"]
    loss = ngdref.SequenceSoftmaxCrossEntropy(T5_VOCAB, ignore_index=IGNORE_INDEX)
    return TorchBatch(model, batch, labels, loss, batch)


def _vit() -> TorchBatch:
    import torch
    import transformers

    from validation.tiny_models import VIT_LORA_TARGETS, lora, tiny_vit_config

    torch.manual_seed(14)
    config = tiny_vit_config(
        image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=5,
    )
    model = transformers.ViTForImageClassification(config)
    model = lora(model, r=2, targets=VIT_LORA_TARGETS).double().eval()
    generator = torch.Generator().manual_seed(15)
    pixels = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 5, (4,), generator=generator)
    return TorchBatch(
        model, {"pixel_values": pixels, "labels": labels}, labels,
        ngdref.SoftmaxCrossEntropy(), {"pixel_values": pixels},
    )


_HF = ("torch", "transformers", "peft")


def torch_problems() -> list[TorchProblem]:
    """The built-in torch-only cases (nothing is built yet)."""
    return [
        TorchProblem(
            "torch-mlp", _mlp, hooks=True, backpack=True,
            notes="nn.Linear/Tanh stack, one frozen bias",
        ),
        TorchProblem("torch-cnn", _cnn, backpack=True, notes="Conv2d + Tanh + Linear"),
        TorchProblem(
            "t5-lora", lambda: _t5("lora"), damping=1.0, cg_tol=1e-6, hooks=True,
            large_output=True, float32_internals=True, requires=_HF,
            # |J| / |z| ~ 8, 40x the prompt case: more curved, so a smaller step
            # (Jacobian error 8e-5 at 1e-3, 2.5e-4 at 3e-3, 8e-4 at 1e-4)
            fd_step=1e-3,
            notes=f"tiny random T5, LoRA r=2 on q/v, sequence CE over T=3 x V={T5_VOCAB}",
        ),
        TorchProblem(
            "t5-prompt", lambda: _t5("prompt"), damping=3e-3, cg_tol=1e-6, large_output=True,
            float32_internals=True, requires=_HF,
            notes="tiny random T5, prompt tuning with 3 virtual tokens",
        ),
        TorchProblem(
            "vit-lora", _vit, damping=2e-3, cg_tol=1e-6, hooks=True, float32_internals=True,
            requires=_HF,
            notes="tiny random ViT, LoRA r=2 on q/v, 5 classes",
        ),
    ]
