"""ngdref: a numerical reference for natural-gradient methods (NGD, EF, iEF, SF).

The math is written once against the array API standard: every function takes
its array namespace from its inputs (NumPy, CuPy, torch, array_api_strict)
and returns arrays of that namespace, dtype and device. Conventions: the
paper's sum-reduced loss unless a ``reduction`` says otherwise; iEF damping
in sample space (the paper's lambda I_N) unless ``damping_space="parameter"``
(EF's two damping spaces agree); under a reduction factor R one damping number
damps EF, iEF and SF alike, as in the paper (stated once in
:mod:`ngdref.directions`). Per-sample gradients are a dense (N, P) array or any
:class:`~ngdref.rows.PerSampleRows`; :class:`~ngdref.linalg.DampedGram` is the
reusable damped Gram solve. Every convention is stated on the documentation's
conventions page (:ref:`conventions`).
"""

from ngdref.cg import CGResult, NotConvergedError, conjugate_gradient
from ngdref.checks import NonFiniteError
from ngdref.curvature import (
    ef_matrix,
    fisher_matrix,
    gn_matrix,
    ief_matrix,
    ief_matrix_logit,
    sf_matrix,
)
from ngdref.directions import (
    METHODS,
    BatchQuantities,
    batch_quantities,
    directions,
    sampled_grads,
    sampling_key,
)
from ngdref.kfac import (
    KroneckerFactors,
    kfac_block_matrix,
    kfac_factors,
    kfac_inverse_apply,
)
from ngdref.linalg import (
    DampedGram,
    GramSolve,
    SingularMatrixError,
    near_duplicate_mask,
)
from ngdref.losses import (
    LogitLoss,
    SequenceSoftmaxCrossEntropy,
    SigmoidBinaryCrossEntropy,
    SoftmaxCrossEntropy,
    SquaredError,
    reduction_factor,
)
from ngdref.ngd import gn_update, ngd_update, ngd_update_cg
from ngdref.provider import JacobianProvider
from ngdref.quality import (
    QuadraticForm,
    fisher_quadratic_form,
    fisher_vp,
    gamma,
    gamma_ratio,
    grad_norm_imbalance,
    loss_reductions,
    projections,
)
from ngdref.rows import DenseRows, PerSampleRows, as_rows, gram_matrix
from ngdref.updates import (
    ef_update,
    gram_update,
    ief_update,
    sf_update,
    sgd_update,
)

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "BatchQuantities",
    "CGResult",
    "DampedGram",
    "DenseRows",
    "GramSolve",
    "JacobianProvider",
    "KroneckerFactors",
    "LogitLoss",
    "NonFiniteError",
    "NotConvergedError",
    "PerSampleRows",
    "QuadraticForm",
    "SequenceSoftmaxCrossEntropy",
    "SigmoidBinaryCrossEntropy",
    "SingularMatrixError",
    "SoftmaxCrossEntropy",
    "SquaredError",
    "as_rows",
    "batch_quantities",
    "checks",
    "conjugate_gradient",
    "directions",
    "ef_matrix",
    "ef_update",
    "fisher_matrix",
    "fisher_quadratic_form",
    "fisher_vp",
    "gamma",
    "gamma_ratio",
    "gn_matrix",
    "gn_update",
    "grad_norm_imbalance",
    "gram_matrix",
    "gram_update",
    "ief_matrix",
    "ief_matrix_logit",
    "ief_update",
    "kfac_block_matrix",
    "kfac_factors",
    "kfac_inverse_apply",
    "loss_reductions",
    "near_duplicate_mask",
    "ngd_update",
    "ngd_update_cg",
    "projections",
    "reduction_factor",
    "sampled_grads",
    "sampling_key",
    "sf_matrix",
    "sf_update",
    "sgd_update",
]
