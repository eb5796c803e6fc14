"""
ngdref as the oracle for your own K-FAC
=======================================

You have written a K-FAC step by hand: hooks that keep each layer's inputs and output
gradients, Kronecker factors from them, and a damped inverse through the factors'
eigendecompositions. Is it right? Take one step with it and one with ``backends.EKFAC`` (the
paper's *empirical* KFAC: the true labels' output gradients) on the same model and batch, in
float64, and compare. Then see the oracle catch a plausible slip: a factor normalised
differently, which silently changes what the damping means.

The conventions (sum-convention :math:`B`, :math:`A` averaged over its terms, row-major
:math:`\\mathrm{vec}(W)`, separate bias blocks) are on :doc:`/conventions` (K-FAC section).
"""

import copy

import matplotlib.pyplot as plt
import torch

import ngdref
from backends import EKFAC

torch.manual_seed(0)
N, D, H, C = 16, 5, 7, 3
model = torch.nn.Sequential(
    torch.nn.Linear(D, H), torch.nn.Tanh(), torch.nn.Linear(H, C)
).double()
x = torch.randn(N, D, dtype=torch.float64)
y = torch.randint(0, C, (N,))
damping = 1e-3

# %%
# The hand-written step
# ---------------------
# Hooks keep the inputs :math:`a_n` and the output gradients :math:`b_n` of each
# ``nn.Linear``. With the summed loss, :math:`b_n` is the gradient of :math:`l_n` alone. Then
# :math:`A = \frac1N \sum_n a_n a_n^\top`, :math:`B = \sum_n b_n b_n^\top`, and the weight's
# update is :math:`(B \otimes A + \lambda I)^{-1} \mathrm{vec}(\nabla_W L)`, applied through
# :math:`B = U \mathrm{diag}(\beta) U^\top`, :math:`A = V \mathrm{diag}(\alpha) V^\top`; the
# bias has its own block :math:`B + \lambda I`.


def my_kfac_step(model, x, y, damping, normalise_a=True):
    """The update of every parameter, flat in ``model.parameters()`` order."""
    inputs, grads, hooks = {}, {}, []

    def keep(layer, args, out):
        inputs[layer] = args[0].detach()
        out.register_hook(lambda grad: grads.__setitem__(layer, grad.detach()))

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            hooks.append(layer.register_forward_hook(keep))
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    for hook in hooks:
        hook.remove()
    steps = {}
    with torch.no_grad():
        for layer, a in inputs.items():
            b = grads[layer]
            A = a.T @ a / (a.shape[0] if normalise_a else 1.0)
            B = b.T @ b
            beta, U = torch.linalg.eigh(B)
            alpha, V = torch.linalg.eigh(A)
            rotated = U.T @ layer.weight.grad @ V / (beta[:, None] * alpha[None, :] + damping)
            steps[layer.weight] = U @ rotated @ V.T
            eye = torch.eye(B.shape[0], dtype=B.dtype)
            steps[layer.bias] = torch.linalg.solve(B + damping * eye, layer.bias.grad)
    return torch.cat([steps[p].reshape(-1) for p in model.parameters()])


def ekfac_step(model, x, y, damping, **options):
    """The parameter change of one EKFAC step with lr = 1, flat."""
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    twin = copy.deepcopy(model)
    opt = EKFAC(twin, ngdref.SoftmaxCrossEntropy(), lr=1.0, damping=damping, reduction="sum",
                **options)
    opt.step(lambda: (x, y))  # the closure returns the batch
    return before - torch.cat([p.detach().reshape(-1) for p in twin.parameters()])


def relative(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


# %%
# The oracle's step
# -----------------
# ``EKFAC`` with ``lr=1`` and the sum convention takes
# :math:`\theta \leftarrow \theta - (K + \lambda I)^{-1} g`.

mine = my_kfac_step(copy.deepcopy(model), x, y, damping)
theirs = ekfac_step(model, x, y, damping)
error = relative(mine, theirs)
print(f"|my step - EKFAC step| / |EKFAC step| = {error:.1e}")
assert error < 1e-10

# %%
# A slip the oracle catches
# -------------------------
# Summing :math:`A` over the samples instead of averaging it is the other common
# normalisation. The block is then N times larger, so the same damping number regularises N
# times less, and the step changes. The oracle has the slip as a named option,
# ``normalisation="sum"``, which is how you find out which convention your code follows.

slipped = my_kfac_step(copy.deepcopy(model), x, y, damping, normalise_a=False)
print(f"A summed vs EKFAC (mean):       {relative(slipped, theirs):.1e}")
print(f"A summed vs EKFAC(normalisation='sum'): "
      f"{relative(slipped, ekfac_step(model, x, y, damping, normalisation='sum')):.1e}")

# %%
# Where the two steps point
# -------------------------
# The per-parameter changes of the two steps, one against the other: on the diagonal.

fig, ax = plt.subplots(figsize=(4, 4))
ax.plot(theirs.numpy(), mine.numpy(), ".")
ax.set_xlabel("EKFAC step (ngdref)")
ax.set_ylabel("hand-written step")
fig.tight_layout()
