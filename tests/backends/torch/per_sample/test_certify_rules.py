"""The certificate's own forward-mode rules against torch's rules (``torch.func.jvp``).

The reference pass of the certificate takes ``F.linear`` (the product rule) and
``F.layer_norm`` on dual tensors by formulas of its own, cheaper than torch's
(``backends.torch.per_sample.certify._RULES``). The independent route here is
``torch.func.jvp`` (torch's rules throughout) in float64, on layers whose input, weight and
bias each carry a tangent or not, 2-D and 3-D inputs (sequence-first too), layer norms over
one and two axes, without affine parameters, and calls with keywords.

Bound: both routes compute the same products and sums in another order. Per layer the
tangent is at most three terms, each a dot product of length d_in, so a forward error of
gamma_{d_in + 3} <= (d_in + 3) u times |x_dot| |W| + |x| |W_dot| + |b_dot| per entry; through
L such layers, the tanh between them (Lipschitz 1) and the layer norms (whose tangent is
r (x_dot - means), a handful of roundings of terms bounded by ||J||) the difference is below
2 L (d + 3) u ||J||_F ||v|| with d the widest input, ||J||_F the Frobenius norm of the
batch's Jacobian (float64 ``jacrev``) and the factor 2 for the two routes. A dropped term
(e.g. the weight's tangent) is off by O(||J_W v_W||), orders of magnitude above it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import jacrev, jvp  # noqa: E402

from backends.torch.per_sample.certify import reference_tangents  # noqa: E402
from tests.backends.torch.per_sample.models import Adapter  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")


class KeywordLinear(nn.Linear):
    """``F.linear`` called with keywords only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(input=x, weight=self.weight, bias=self.bias)


class KeywordLayerNorm(nn.LayerNorm):
    """``F.layer_norm`` called with keywords only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(input=x, normalized_shape=self.normalized_shape,
                            weight=self.weight, bias=self.bias, eps=self.eps)


def _linears(layer: type) -> nn.Module:
    return nn.Sequential(layer(5, 6), nn.Tanh(), layer(6, 4, bias=False), nn.Tanh(),
                         layer(4, 3))


def _norms(norm: Any) -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), norm(), nn.Tanh(), nn.Linear(6, 3))


class Unflatten(nn.Module):
    """(..., 6) -> (..., 2, 3), normalised over both trailing axes, flattened back."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.unflatten(-1, (2, 3))).flatten(-2)


#: (id, model, trainable parameters, input shape, batch axis)
CASES = [
    ("frozen-weights-trainable-last-bias", lambda: _linears(nn.Linear), ("4.bias",), (7, 5), 0),
    ("trainable-first-weight-only", lambda: _linears(nn.Linear), ("0.weight",), (7, 5), 0),
    ("every-parameter", lambda: _linears(nn.Linear),
     ("0.weight", "0.bias", "2.weight", "4.weight", "4.bias"), (7, 5), 0),
    ("middle-weight-3d-batch-first", lambda: _linears(nn.Linear), ("2.weight",), (7, 3, 5), 0),
    ("first-bias-3d-sequence-first-T=N", lambda: _linears(nn.Linear), ("0.bias",),
     (7, 7, 5), 1),
    ("linear-keywords", lambda: _linears(KeywordLinear), ("0.weight", "4.bias"), (7, 5), 0),
    ("frozen-norm-trainable-first-linear", lambda: _norms(lambda: nn.LayerNorm(6)),
     ("0.weight",), (7, 5), 0),
    ("norm-weight-and-bias-only", lambda: _norms(lambda: nn.LayerNorm(6)),
     ("1.weight", "1.bias"), (7, 3, 5), 0),
    ("norm-everything-sequence-first", lambda: _norms(lambda: nn.LayerNorm(6)),
     ("0.weight", "0.bias", "1.weight", "1.bias", "3.weight"), (4, 7, 5), 1),
    ("norm-without-affine", lambda: _norms(lambda: nn.LayerNorm(6, elementwise_affine=False)),
     ("0.bias", "3.weight"), (7, 5), 0),
    ("norm-over-two-axes", lambda: _norms(Unflatten), ("0.weight", "1.norm.weight"), (7, 5), 0),
    ("norm-keywords", lambda: _norms(lambda: KeywordLayerNorm(6)), ("0.weight", "1.bias"),
     (7, 5), 0),
]


@pytest.mark.parametrize(("build", "trainable", "shape", "axis"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_tangents_equal_torch_jvp(build: Callable[[], nn.Module], trainable: tuple[str, ...],
                                  shape: tuple[int, ...], axis: int) -> None:
    torch.manual_seed(0)
    model = build().double()
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(trainable)
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    adapter = Adapter(model, (x,), (axis,),
                      output_fn=lambda z: z.movedim(axis, 0) if z.ndim == 3 else z)
    theta = adapter.params_vector()
    v = torch.randn(theta.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def logits(th: torch.Tensor) -> torch.Tensor:
        return adapter.sub_batch_logits(adapter.unflatten(th), slice(None))

    got, route, watch = reference_tangents(adapter, v, route="forward")
    _, want = jvp(logits, (theta,), (v,))
    jac = jacrev(logits)(theta)
    bound = 2 * 3 * (6 + 3) * torch.finfo(torch.float64).eps / 2 * float(
        torch.linalg.vector_norm(jac) * torch.linalg.vector_norm(v))
    assert route == "forward"
    assert float(torch.linalg.vector_norm(got - want.reshape(got.shape))) <= bound
    assert float(torch.linalg.vector_norm(want)) > 1e3 * bound  # the test can fail
    assert watch.depth >= len(model)  # every layer counted once, as before
