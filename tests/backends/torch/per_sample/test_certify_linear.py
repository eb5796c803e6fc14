"""The certificate's forward-mode rule for ``F.linear`` against torch's own ``torch.func.jvp``.

The reference pass of the certificate takes ``F.linear`` on dual tensors by the product rule,
one plain call per tangent present (:func:`backends.torch.per_sample.certify._linear_jvp`),
instead of torch's rule (which also forms the constant weight's terms). The independent
route here is ``torch.func.jvp`` (torch's rules throughout) in float64, on layers whose
input, weight and bias each carry a tangent or not, 2-D and 3-D inputs (sequence-first too),
and ``F.linear`` called with keywords.

Bound: both routes compute the same products and sums in another order. Per layer the
tangent is at most three terms, each a dot product of length d_in, so a forward error of
gamma_{d_in + 3} <= (d_in + 3) u times |x_dot| |W| + |x| |W_dot| + |b_dot| per entry; through
L such layers and the tanh between them (Lipschitz 1) the difference is below
2 L (d + 3) u ||J||_F ||v|| with d the widest input, ||J||_F the Frobenius norm of the
batch's Jacobian (float64 ``jacrev``) and the factor 2 for the two routes. A dropped term
(e.g. the weight's tangent) is off by O(||J_W v_W||), orders of magnitude above it.
"""

from __future__ import annotations

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


def _model(trainable: tuple[str, ...], layer: type = nn.Linear) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(layer(5, 6), nn.Tanh(), layer(6, 4, bias=False), nn.Tanh(),
                          layer(4, 3)).double()
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    return model


#: (id, trainable parameters, layer class, input shape, batch axis)
CASES = [
    ("frozen-weights-trainable-last-bias", ("4.bias",), nn.Linear, (7, 5), 0),
    ("trainable-first-weight-only", ("0.weight",), nn.Linear, (7, 5), 0),
    ("every-parameter", ("0.weight", "0.bias", "2.weight", "4.weight", "4.bias"),
     nn.Linear, (7, 5), 0),
    ("middle-weight-3d-batch-first", ("2.weight",), nn.Linear, (7, 3, 5), 0),
    ("first-bias-3d-sequence-first-T=N", ("0.bias",), nn.Linear, (7, 7, 5), 1),
    ("keywords", ("0.weight", "4.bias"), KeywordLinear, (7, 5), 0),
]


@pytest.mark.parametrize(("trainable", "layer", "shape", "axis"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_linear_tangents_equal_torch_jvp(trainable: tuple[str, ...], layer: type,
                                         shape: tuple[int, ...], axis: int) -> None:
    model = _model(trainable, layer)
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
    assert watch.depth >= 5  # every layer and activation counted once, as before
