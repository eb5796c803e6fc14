"""``backends.NGD``'s default CG tolerance follows the model's dtype (``default_cg_tol``).

A float32 Fisher-vector product carries a relative rounding of a few eps32 times the condition
number, so CG's true residual stalls far above float64's 1e-10: with that fixed default every
float32 NGD step raised ``ngdref.NotConvergedError``. The default (``cg_tol=None``) is 1e-10 in
float64 and sqrt(eps32) = 3.5e-4 in float32.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import ngdref  # noqa: E402
from backends.torch.optim.methods import NGD  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _mlp_step(dtype: torch.dtype, **options: float) -> NGD:
    """One NGD step of a tiny tanh MLP (8 samples, 5 -> 6 -> 3) in ``dtype``."""
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=dtype))
    x = torch.randn(8, 5, generator=generator, dtype=dtype)
    y = torch.randint(0, 3, (8,), generator=generator)
    opt = NGD(model, ngdref.SoftmaxCrossEntropy(), lr=0.1, damping=1e-4, **options)
    opt.step(lambda: (x, y))
    return opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_default_cg_tol_converges_in_the_models_dtype(dtype: torch.dtype) -> None:
    opt = _mlp_step(dtype)
    assert opt.param_groups[0]["cg_tol"] is None
    assert opt.diagnostics["cg_iterations"] >= 1
    assert opt.steps_taken == 1


def test_a_float64_tolerance_is_still_refused_on_float32() -> None:
    """An explicit 1e-10 (the former default) cannot be reached by float32 products."""
    with pytest.raises(ngdref.NotConvergedError):
        _mlp_step(torch.float32, cg_tol=1e-10)
