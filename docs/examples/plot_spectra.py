"""
Spectra with SciPy
==================

Every curvature matrix of a batch is a matrix-free ``scipy.sparse.linalg.LinearOperator``
(``backends.curvature_operator``), so SciPy's ``eigsh`` finds its top eigenvalues without a
P x P matrix. On a small NumPy MLP the dense matrices still fit, so each spectrum is checked
against ``numpy.linalg.eigvalsh`` of ngdref's dense matrix; then a damped solve by ``minres``
on the iEF operator is compared with ``ngdref.ief_update``'s parameter-space damping.
"""

import matplotlib.pyplot as plt
import numpy as np
from scipy.sparse.linalg import eigsh, minres

import ngdref
from backends import MLPProvider, curvature_operator, mlp_init

sizes = (8, 16, 4)  # P = 8*16 + 16 + 16*4 + 4 = 212
rng = np.random.default_rng(1)
N = 40
x, y = rng.standard_normal((N, 8)), rng.integers(0, 4, N)
provider = MLPProvider(mlp_init(sizes, 1, np), x, sizes)
loss = ngdref.SoftmaxCrossEntropy()

# %%
# Top eigenvalues, matrix-free and dense
# --------------------------------------
# ``eigsh`` needs only products with the operator. The dense references are ngdref's
# P x P matrices, in the same (sum) convention.

q = ngdref.batch_quantities(provider, loss, y)
G, s = q.per_sample_grads, q.logit_grad_sq_norms
J = provider.jacobian()
sampled = ngdref.sampled_grads(provider, loss, y, key=0)
dense = {
    "fisher": ngdref.fisher_matrix(J, loss.hessian(provider.logits(), y)),
    "gn": ngdref.gn_matrix(J),
    "ef": ngdref.ef_matrix(G),
    "ief": ngdref.ief_matrix(G, s),
    "sf": ngdref.sf_matrix(sampled),
}
k = 10
spectra = {}
for method, matrix in dense.items():
    op = curvature_operator(method, provider, loss, y, key=0)
    top = np.sort(eigsh(op, k=k, return_eigenvectors=False))[::-1]
    reference = np.linalg.eigvalsh(matrix)[::-1][:k]
    spectra[method] = top
    print(f"{method:>6}: lambda_1 = {top[0]:8.3f}, lambda_{k} / lambda_1 = {top[-1] / top[0]:.3f},"
          f" |eigsh - eigvalsh| / lambda_1 = {np.max(np.abs(top - reference)) / top[0]:.1e}")

# %%
# The ranks show the structure, out of P = 212: EF, iEF and SF have rank at most N = 40 (one
# row per sample), GN at most N C = 160 (C = 4 logits per sample), and the Fisher at most
# N (C - 1) = 120, because the softmax's logit Hessian has rank C - 1.

for method, matrix in dense.items():
    print(f"{method:>6}: rank {np.linalg.matrix_rank(matrix)}")

fig, ax = plt.subplots(figsize=(5, 3.5))
for method, top in spectra.items():
    ax.semilogy(np.arange(1, k + 1), top, "o-", label=method)
ax.set_xlabel("index")
ax.set_ylabel("eigenvalue")
ax.legend()
fig.tight_layout()

# %%
# A damped solve on the operator
# ------------------------------
# ``minres`` with ``shift=-lambda`` solves :math:`(F_{iEF} + \lambda I) d = g`: iEF with
# parameter-space damping, which ngdref computes through the N x N Gram matrix instead.

lam = 1e-2
op = curvature_operator("ief", provider, loss, y)
d_minres, info = minres(op, q.grad, shift=-lam, rtol=1e-12)
d_ngdref = ngdref.ief_update(G, s, damping=lam, damping_space="parameter")
error = np.linalg.norm(d_minres - d_ngdref) / np.linalg.norm(d_ngdref)
print(f"minres info {info}; |minres - ief_update(parameter)| / |.| = {error:.1e}")
