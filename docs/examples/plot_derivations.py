"""
Verify a derivation numerically
===============================

The paper's central identities, checked on a small MLP in float64 against dense linear algebra
written out here with NumPy:

* the EF push-through identity, :math:`G^\\top (G G^\\top + \\lambda I_N)^{-1} 1 =
  (G^\\top G + \\lambda I_P)^{-1} G^\\top 1`, for every damping;
* iEF's two damping spaces, which differ for :math:`\\lambda > 0`;
* the undamped limits :math:`G\\, d_{EF} \\to 1` and :math:`G\\, d_{iEF} \\to s`
  (Eq. 6, 7 and 10);
* what a damping value means under the mean reduction: :math:`\\mathrm{iEF}_R(\\lambda) =
  R\\, \\mathrm{iEF}_{sum}(\\lambda / R^2)`.

The conventions are stated on :doc:`/conventions`.
"""

import matplotlib.pyplot as plt
import numpy as np

import ngdref
from backends import MLPProvider, mlp_init

sizes = (6, 12, 4)  # a tanh MLP: P = 6*12 + 12 + 12*4 + 4 = 136 parameters
rng = np.random.default_rng(0)
N = 10
x, y = rng.standard_normal((N, 6)), rng.integers(0, 4, N)
provider = MLPProvider(mlp_init(sizes, 0, np), x, sizes)
loss = ngdref.SoftmaxCrossEntropy()

q = ngdref.batch_quantities(provider, loss, y)  # sum convention
G, s, g = q.per_sample_grads, q.logit_grad_sq_norms, q.grad
P = G.shape[1]
print(f"N = {N}, P = {P}")


def relative(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# %%
# EF: the Gram form equals the parameter-space solve
# --------------------------------------------------
# ``ngdref.ef_update`` solves the N x N system; the reference solves the P x P one directly.
# At small damping the difference is the dense solve's own rounding: its condition number
# grows like :math:`1/\lambda`, the N x N one's does not.

for lam in (1e-6, 1e-3, 1.0):
    dense = np.linalg.solve(G.T @ G + lam * np.eye(P), g)
    print(f"lambda = {lam:g}: |ef_update - dense| / |dense| = "
          f"{relative(ngdref.ef_update(G, damping=lam), dense):.1e}")

# %%
# iEF: two damping spaces
# -----------------------
# The paper damps the Gram matrix (``damping_space="sample"``); damping :math:`F_{iEF}` itself
# (``"parameter"``) is a different vector for :math:`\lambda > 0`.

F_iEF = G.T @ np.diag(1.0 / s) @ G
for lam in (1e-6, 1e-3, 1.0):
    parameter = ngdref.ief_update(G, s, damping=lam, damping_space="parameter")
    sample = ngdref.ief_update(G, s, damping=lam)
    dense = np.linalg.solve(F_iEF + lam * np.eye(P), g)
    print(f"lambda = {lam:g}: parameter vs dense {relative(parameter, dense):.1e}, "
          f"sample vs parameter {relative(sample, parameter):.1e}")

# %%
# The undamped limits
# -------------------
# With :math:`G` of full row rank (N < P), :math:`G d_{EF} \to 1` (every sample's loss drops
# by the same amount to first order) and :math:`G d_{iEF} \to s` as the damping goes to 0. The
# misfit shrinks linearly in :math:`\lambda` until rounding stops it.

dampings = np.logspace(-12, 0, 13)
ef_misfit = [relative(ngdref.loss_reductions(G, ngdref.ef_update(G, damping=lam)), np.ones(N))
             for lam in dampings]
ief_misfit = [relative(ngdref.loss_reductions(G, ngdref.ief_update(G, s, damping=lam)), s)
              for lam in dampings]
print(f"at lambda = 1e-12: |G d_EF - 1| / |1| = {ef_misfit[0]:.1e}, "
      f"|G d_iEF - s| / |s| = {ief_misfit[0]:.1e}")
assert ef_misfit[0] < 1e-8 and ief_misfit[0] < 1e-8

fig, ax = plt.subplots(figsize=(5, 3.5))
ax.loglog(dampings, ef_misfit, "o-", label=r"EF: $\|G d - 1\| / \|1\|$")
ax.loglog(dampings, ief_misfit, "s-", label=r"iEF: $\|G d - s\| / \|s\|$")
ax.set_xlabel(r"damping $\lambda$ (sum convention)")
ax.set_ylabel("relative misfit")
ax.legend()
fig.tight_layout()

# %%
# Damping under the mean reduction
# --------------------------------
# Under ``reduction="mean"`` (R = 1/N) every row is R times the sum-convention row, so one
# damping number means :math:`\lambda / R^2` in the sum convention.

R = 1.0 / N
lam = 1e-4
mean = ngdref.directions(provider, loss, y, damping=lam, methods=("ief",), reduction="mean")
expected = R * ngdref.ief_update(G, s, damping=lam / R**2)
print(f"|iEF_mean(lambda) - R iEF_sum(lambda / R^2)| / |.| = {relative(mean['ief'], expected):.1e}")
