"""Raw torch errors the optimisers and the provider used to pass on, now named (issue 20).

Each case is a call that once raised a library-internal message (``mat1 and mat2 must have
the same dtype``, ``Tensor.item() cannot be called on meta tensors``, ``value cannot be
converted to type float without overflow``); now the exception names the argument, the value
and what was expected, and is raised before anything changes: the parameters stay bitwise
equal and the optimiser's step counter stays 0.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import ngdref  # noqa: E402
from backends.torch.optim.kfac import EKFAC  # noqa: E402
from backends.torch.optim.methods import IEF, SF  # noqa: E402
from backends.torch.provider import TorchProvider  # noqa: E402

CE = ngdref.SoftmaxCrossEntropy()
Y = torch.tensor([0, 1, 0, 1])


def _model(device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(device)


def _ief(model: nn.Module, **kw: Any) -> Any:
    return IEF(model, CE, lr=kw.pop("lr", 0.1), damping=1e-3, **kw)


def _sf(model: nn.Module, **kw: Any) -> Any:
    return SF(model, CE, lr=kw.pop("lr", 0.1), damping=1e-3, total_steps=3, **kw)


def _ekfac(model: nn.Module, **kw: Any) -> Any:
    return EKFAC(model, CE, lr=kw.pop("lr", 0.1), damping=1e-3, **kw)


F64 = torch.randn(4, 3, dtype=torch.float64)
F32 = torch.randn(4, 3)
#: (id, the model's device, optimiser builder, its options, the batch, error type, message)
CASES: list[tuple[str, str, Callable, dict, Any, type, str]] = [
    *[(f"{name}-float64-batch", "cpu", build, {}, (F64, Y), TypeError,
       "inputs has dtype torch.float64 but the model's trainable parameters are torch.float32")
      for name, build in (("ief", _ief), ("sf", _sf), ("ekfac", _ekfac))],
    *[(f"{name}-meta-model", "meta", build, {}, (F32.to("meta"), Y.to("meta")), ValueError,
       "model: its trainable parameters are on the meta device")
      for name, build in (("ief", _ief), ("ekfac", _ekfac))],
    ("ief-meta-batch", "cpu", _ief, {}, (F32.to("meta"), Y), TypeError,
     "inputs is on device meta but the model's trainable parameters are on cpu"),
    *[(f"{name}-lr-overflow", "cpu", build, {"lr": 1e300}, (F32, Y), ngdref.NonFiniteError,
       "lr: the step multiplier")
      for name, build in (("ief", _ief), ("sf", _sf), ("ekfac", _ekfac))],
]


@pytest.mark.parametrize(("device", "build", "options", "batch", "error", "message"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_raw_errors_are_named_before_anything_changes(
    device: str, build: Callable, options: dict, batch: Any, error: type, message: str
) -> None:
    model = _model(device)
    before = [p.detach().clone() for p in model.parameters()]
    opt = build(model, **options)
    with pytest.raises(error, match=re.escape(message)):
        opt.step(lambda: batch)
    assert opt.steps_taken == 0
    if device != "meta":
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_the_provider_names_a_dtype_mismatch_and_a_meta_model() -> None:
    with pytest.raises(TypeError, match=re.escape("inputs has dtype torch.float64")):
        TorchProvider(_model(), F64)
    with pytest.raises(ValueError, match="meta device"):
        TorchProvider(_model("meta"), F32.to("meta"))
    TorchProvider(_model().double(), F64)  # agreeing dtypes are fine
