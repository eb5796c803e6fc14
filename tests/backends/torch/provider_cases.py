"""The cases and independent references of the TorchProvider tests, in float64.

Cases are data (:data:`CASES`): a name and a builder of the model, its inputs, the ngdref loss
paired with the provider and the single-sample reference loss. Expected values never come from
the provider's own machinery:

- per-sample gradients (:func:`loop_per_sample_grads`): a Python loop of single-sample forward
  passes through the model's ordinary ``__call__`` (2-D attention masks, Hugging Face's own
  ``labels -> decoder_input_ids``) and ``loss.backward()`` on a ``torch.nn`` loss with
  ``reduction="sum"``;
- Jacobians (:func:`reference_jacobian`): ``torch.autograd.functional.jacobian`` (one reverse
  pass per output row, full batch, no ``vmap``).

Used by tests/backends/torch/test_provider*.py and per_sample/test_layer_pass.py. Import it
after ``pytest.importorskip("torch")``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import ngdref
from backends.torch.provider import TorchProvider
from tests.array_backends import tolerance
from validation.tiny_models import (
    VIT_LORA_TARGETS,
    lora,
    t5_adapter,
    tiny_cnn_batch,
    tiny_t5_batch,
    tiny_t5_config,
    tiny_vit_config,
)

F64 = tolerance("float64")
F32 = tolerance("float32")
IGNORE = -100
VOCAB = 40


# ---- cases -------------------------------------------------------------------------------------
@dataclass
class Case:
    """A model on one batch with everything a test needs to check the provider."""

    name: str
    model: nn.Module
    inputs: Any  # what TorchProvider gets
    targets: Any  # the ngdref loss's targets
    loss: ngdref.LogitLoss
    sample_loss: Callable[[int], Any]  # n -> l_n through the model's ordinary forward
    batch_logits: Callable[[dict[str, Any]], Any]  # {name: param} -> (N, C), ordinary forward
    hookable: bool  # all trainable parameters live in nn.Linear layers
    exact_forward_mode: bool = True  # False: the model computes part of its forward in float32

    @property
    def trainable(self) -> list[tuple[str, Any]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    @property
    def num_samples(self) -> int:
        return int(self.targets.shape[0])


def _reference_call(model: nn.Module, params: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
    return torch.func.functional_call(model, params, args, kwargs)


def ce_sum(logits: Any, labels: Any) -> Any:
    return nn.CrossEntropyLoss(reduction="sum", ignore_index=IGNORE)(logits, labels)


def _mlp(loss_kind: str) -> Case:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    model[0].bias.requires_grad_(False)  # a frozen parameter: not part of theta
    x = torch.randn(5, 4, dtype=torch.float64)
    if loss_kind == "ce":
        y = torch.randint(0, 3, (5,))
        loss: ngdref.LogitLoss = ngdref.SoftmaxCrossEntropy()

        def sample_loss(n: int) -> Any:
            return ce_sum(model(x[n:n + 1]), y[n:n + 1])
    else:
        y = torch.randn(5, 3, dtype=torch.float64)
        loss = ngdref.SquaredError()

        def sample_loss(n: int) -> Any:
            return 0.5 * nn.MSELoss(reduction="sum")(model(x[n:n + 1]), y[n:n + 1])

    return Case(
        f"mlp_{loss_kind}", model, x, y, loss, sample_loss,
        lambda p: _reference_call(model, p, x), hookable=True,
    )


def _cnn() -> Case:
    model, x, y = tiny_cnn_batch(seed=1, num_samples=4)
    return Case(
        "cnn", model, x, y, ngdref.SoftmaxCrossEntropy(),
        lambda n: ce_sum(model(x[n:n + 1]), y[n:n + 1]),
        lambda p: _reference_call(model, p, x), hookable=False,
    )


def t5_config() -> Any:
    """The tiny T5 of these cases: vocabulary 40, d_model 16, one encoder and decoder layer."""
    pytest.importorskip("transformers")
    return tiny_t5_config(vocab_size=VOCAB, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)


def t5_batch() -> dict[str, Any]:
    """Four padded T5 samples (:func:`validation.tiny_models.tiny_t5_batch`, seed 3)."""
    return tiny_t5_batch(VOCAB, seed=3, ignore_index=IGNORE)


def _t5(adapter: str) -> Case:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    torch.manual_seed(2)
    base = transformers.T5ForConditionalGeneration(t5_config())
    model = t5_adapter(base, adapter).double().eval()
    batch = t5_batch()
    labels = batch["labels"]

    def forward(params: dict[str, Any] | None, rows: slice) -> Any:
        kwargs = {k: v[rows] for k, v in batch.items()}
        out = model(**kwargs) if params is None else _reference_call(model, params, **kwargs)
        return out.logits  # HF derives decoder_input_ids from labels itself

    return Case(
        f"t5_{adapter}", model, batch, labels, ngdref.SequenceSoftmaxCrossEntropy(VOCAB),
        lambda n: ce_sum(forward(None, slice(n, n + 1))[0], labels[n]),
        lambda p: forward(p, slice(None)).reshape(labels.shape[0], -1),
        hookable=adapter == "lora",
        # T5LayerNorm computes its variance in float32 even in a float64 model
        exact_forward_mode=False,
    )


def _vit_model(attn_implementation: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    torch.manual_seed(4)
    config = tiny_vit_config(
        image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=5, attn_implementation=attn_implementation,
    )
    model = transformers.ViTForImageClassification(config)
    return lora(model, r=2, targets=VIT_LORA_TARGETS).double().eval()


def vit_case(attn_implementation: str = "eager") -> Case:
    model = _vit_model(attn_implementation)
    generator = torch.Generator().manual_seed(5)
    pixels = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 5, (4,), generator=generator)
    inputs = {"pixel_values": pixels, "labels": labels}
    return Case(
        f"vit_lora_{attn_implementation}", model, inputs, labels, ngdref.SoftmaxCrossEntropy(),
        lambda n: ce_sum(model(pixel_values=pixels[n:n + 1]).logits, labels[n:n + 1]),
        lambda p: _reference_call(model, p, pixel_values=pixels).logits, hookable=True,
        # HF's eager ViT attention takes its softmax in float32 even in a float64 model
        exact_forward_mode=False,
    )


BUILDERS: dict[str, Callable[[], Case]] = {
    "mlp_ce": lambda: _mlp("ce"),
    "mlp_squared_error": lambda: _mlp("se"),
    "cnn": _cnn,
    "t5_lora": lambda: _t5("lora"),
    "t5_prompt": lambda: _t5("prompt"),
    "vit_lora": vit_case,
}
CASES = list(BUILDERS)
HOOKABLE = ["mlp_ce", "mlp_squared_error", "t5_lora", "vit_lora"]
EXACT_FORWARD_MODE = ["mlp_ce", "mlp_squared_error", "cnn"]


@functools.cache
def case(name: str) -> Case:
    return BUILDERS[name]()


# ---- independent references -------------------------------------------------------------------
def loop_per_sample_grads(c: Case) -> Any:
    """Rows grad_theta l_n from N single-sample ``loss.backward()`` calls."""
    params = [p for _, p in c.trainable]
    rows = []
    for n in range(c.num_samples):
        for p in params:
            p.grad = None
        c.sample_loss(n).backward()
        rows.append(torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params
        ]))
    for p in params:
        p.grad = None
    return torch.stack(rows)


def reference_jacobian(c: Case) -> Any:
    names = [n for n, _ in c.trainable]
    shapes = [p.shape for _, p in c.trainable]
    sizes = [p.numel() for _, p in c.trainable]
    theta = torch.cat([p.detach().reshape(-1) for _, p in c.trainable])

    def fn(flat: Any) -> Any:
        pieces = torch.split(flat, sizes)
        return c.batch_logits(
            {n: x.reshape(s) for n, x, s in zip(names, pieces, shapes, strict=True)}
        )

    jac = torch.autograd.functional.jacobian(fn, theta)
    return jac.reshape(c.num_samples, -1, theta.shape[0])


def assert_close(actual: Any, expected: Any, tol: dict[str, float] = F64, scale: bool = True):
    """assert_close with atol relative to the size of the expected values."""
    atol = tol["atol"] * (max(1.0, float(expected.abs().max())) if scale else 1.0)
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=atol)


def logit_grads(c: Case, provider: TorchProvider) -> Any:
    return c.loss.grad(provider.logits(), c.targets)

