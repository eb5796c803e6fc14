"""Bad input: every public function refuses it with a typed error that names the argument.

Each case asserts the exception type and (literally, via re.escape) a part of the
message that names the offending argument, as STYLE.md asks.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import ngdref
from tests.array_backends import BACKENDS, Backend
from tests.cases import assert_close_norm, gram_rtol

N, C, P = 4, 3, 6


class Inputs:
    """Small valid arrays in one backend; each bad case breaks one of them."""

    def __init__(self, b: Backend) -> None:
        rng = np.random.default_rng(0)
        self.b = b
        self.np_g_rows = rng.standard_normal((N, P))
        self.g_rows = b.asarray(self.np_g_rows)
        self.s = b.asarray(rng.uniform(0.5, 1.5, N))
        self.jac = b.asarray(rng.standard_normal((N, C, P)))
        self.np_logits = rng.standard_normal((N, C))
        self.logits = b.asarray(self.np_logits)
        self.labels = b.asarray(np.array([0, 2, 1, 2]))
        loss = ngdref.SoftmaxCrossEntropy()
        self.hess = loss.hessian(self.logits, self.labels)
        self.factors = loss.hessian_sqrt(self.logits, self.labels)
        self.grad = b.asarray(self.np_g_rows.sum(0))
        self.fisher = ngdref.fisher_matrix(self.jac, self.hess)

    def a(self, x: Any, dtype: str | None = None) -> Any:
        return self.b.asarray(x, dtype)

    def with_nan(self, x: np.ndarray, index=(0,)) -> Any:
        x = np.array(x, dtype=float)
        x[index] = np.nan
        return self.b.asarray(x)


CE = ngdref.SoftmaxCrossEntropy()
MSE = ngdref.SquaredError()
BCE = ngdref.SigmoidBinaryCrossEntropy()
SEQ = ngdref.SequenceSoftmaxCrossEntropy(3)


def _provider(i: Inputs):
    from tests.cases import DenseProvider

    return DenseProvider(i.jac, i.logits)


def _cg(i: Inputs, **kwargs):
    xp = i.b.xp

    def matvec(v):
        return xp.matmul(i.fisher, v[:, None])[:, 0]

    return ngdref.ngd_update_cg(matvec, i.grad, **kwargs)


# (id, call, exception, literal message fragment naming the argument)
BAD: list[tuple[str, Callable[[Inputs], Any], type[BaseException], str]] = [
    # ---- shapes -------------------------------------------------------------
    ("grads_1d", lambda i: ngdref.ef_update(i.grad, damping=0.1), ValueError,
     "per_sample_grads must have 2 axes"),
    ("s_31_for_32_rows",
     lambda i: ngdref.ief_update(i.a(np.ones((32, 40))), i.a(np.ones(31)), damping=0.1),
     ValueError, "logit_grad_sq_norms has 31 entries but per_sample_grads rows has 32"),
    ("ief_matrix_s_rows",
     lambda i: ngdref.ief_matrix(i.g_rows, i.a(np.ones(N + 1))), ValueError,
     f"logit_grad_sq_norms has {N + 1} entries but per_sample_grads rows has {N}"),
    ("s_2d", lambda i: ngdref.ief_update(i.g_rows, i.a(np.ones((N, 1))), damping=0.1),
     ValueError, "logit_grad_sq_norms must have 1 axes"),
    ("jacobians_2d", lambda i: ngdref.gn_matrix(i.g_rows), ValueError,
     "jacobians must have 3 axes"),
    ("hessians_shape", lambda i: ngdref.fisher_matrix(i.jac, i.hess[:, :2, :2]), ValueError,
     "logit_hessians must have shape"),
    ("ngd_grad_length", lambda i: ngdref.ngd_update(i.jac, i.factors, i.grad[:-1], damping=1.0),
     ValueError, f"grad has {P - 1} entries but jacobians' last axis has {P}"),
    ("ngd_factor_shape",
     lambda i: ngdref.ngd_update(i.jac, i.factors[:-1, ...], i.grad, damping=1.0), ValueError,
     "logit_hessian_sqrt must have shape"),
    ("gn_grad_length", lambda i: ngdref.gn_update(i.jac, i.grad[:-1], damping=1.0), ValueError,
     f"grad has {P - 1} entries but jacobians' last axis has {P}"),
    ("sf_rows_not_multiple",
     lambda i: ngdref.sf_update(i.g_rows[:3, ...], i.grad, damping=1.0, num_samples=2), ValueError,
     "sampled_grads has 3 rows, not a multiple of num_samples=2"),
    ("sf_grad_length", lambda i: ngdref.sf_update(i.g_rows, i.grad[:-1], damping=1.0),
     ValueError, f"grad has {P - 1} entries but sampled_grads columns has {P}"),
    ("sf_num_samples_zero", lambda i: ngdref.sf_matrix(i.g_rows, num_samples=0), ValueError,
     "num_samples must be an int >= 1"),
    ("targets_shape", lambda i: CE.value(i.logits, i.labels[:-1]), ValueError,
     "targets must have shape"),
    ("logits_1d", lambda i: MSE.grad(i.grad, i.grad), ValueError, "logits must have 2 axes"),
    ("seq_vocab_multiple", lambda i: ngdref.SequenceSoftmaxCrossEntropy(2).value(
        i.logits, i.a(np.zeros((N, 1), dtype=np.int64))), ValueError,
     "not a multiple of vocab_size=2"),
    ("hessian_vp_vectors_shape",
     lambda i: MSE.hessian_vp(i.logits, i.logits, i.a(np.ones(C))), ValueError, "vectors"),
    ("gamma_update_length", lambda i: ngdref.gamma(i.grad[:-1], i.grad, fisher=i.fisher),
     ValueError,
     f"update has {P - 1} entries but grad has {P}"),
    ("gamma_fisher_shape", lambda i: ngdref.gamma(i.grad, i.grad, fisher=i.fisher[:-1, ...]),
     ValueError,
     "fisher must have shape"),
    ("gamma_no_fisher", lambda i: ngdref.gamma(i.grad, i.grad), TypeError,
     "exactly one of fisher_vp="),
    ("gamma_two_fishers",
     lambda i: ngdref.gamma(i.grad, i.grad, fisher=i.fisher, fisher_vp=lambda v: v), TypeError,
     "got ['fisher_vp', 'fisher']"),
    ("gamma_form_as_fvp", lambda i: ngdref.gamma(
        i.grad, i.grad, fisher_vp=ngdref.QuadraticForm(lambda v: v @ v)), TypeError,
     "a QuadraticForm goes to quadratic_form="),
    ("loss_reductions_length", lambda i: ngdref.loss_reductions(i.g_rows, i.grad[:-1]),
     ValueError, f"update has {P - 1} entries but per_sample_grads has {P} columns"),
    ("fisher_vp_vector_length",
     lambda i: ngdref.fisher_vp(_provider(i), CE, i.labels)(i.grad[:-1]), ValueError,
     f"vector has {P - 1} entries but the provider has {P} parameters"),
    ("cg_matvec_shape",
     lambda i: ngdref.ngd_update_cg(lambda v: v[:-1], i.grad, damping=0.1), ValueError,
     "matvec returned shape"),
    ("uniforms_shape", lambda i: CE.sample(i.logits, i.a(np.full((2, N + 1), 0.5)), num_samples=2),
     ValueError, "key must have shape"),
    ("uniforms_range", lambda i: CE.sample(i.logits, i.a(np.full((1, N), 1.0))), ValueError,
     "key must hold uniforms in [0, 1)"),
    ("sample_num_samples", lambda i: CE.sample(i.logits, 0, num_samples=0), ValueError,
     "num_samples must be an int >= 1"),
    ("sample_bool_key", lambda i: CE.sample(i.logits, True), TypeError, "key must be an int seed"),
    ("grads_not_array", lambda i: ngdref.ef_update(i.np_g_rows.tolist(), damping=0.1),
     TypeError, "per_sample_grads must be an array"),
    # ---- dtypes -------------------------------------------------------------
    ("s_dtype", lambda i: ngdref.ief_update(i.g_rows, i.a(np.ones(N), "float32"), damping=0.1),
     TypeError, "logit_grad_sq_norms has dtype"),
    ("sf_grad_dtype", lambda i: ngdref.sf_update(i.g_rows, i.a(np.ones(P), "float32"),
                                                  damping=0.1), TypeError, "grad has dtype"),
    ("ngd_grad_dtype",
     lambda i: ngdref.ngd_update(i.jac, i.factors, i.a(np.ones(P), "float32"), damping=0.1),
     TypeError, "grad has dtype"),
    ("int_logits", lambda i: CE.value(i.a(np.ones((N, C), dtype=np.int64)), i.labels),
     TypeError, "logits must have a real floating dtype"),
    ("int_grads", lambda i: ngdref.ef_update(i.a(np.ones((N, P), dtype=np.int64)), damping=0.1),
     TypeError, "per_sample_grads must have a real floating dtype"),
    ("float_labels", lambda i: CE.grad(i.logits, i.a(np.zeros(N))), TypeError,
     "targets must have a integral dtype"),
    # ---- non-finite values -----------------------------------------------------
    ("grads_nan", lambda i: ngdref.ef_update(i.with_nan(i.np_g_rows, (1, 2)), damping=0.1),
     ValueError, "per_sample_grads contains NaN or infinite values"),
    ("s_inf", lambda i: ngdref.ief_update(i.g_rows, i.a(np.array([1, np.inf, 1, 1.0])),
                                          damping=0.1), ValueError,
     "logit_grad_sq_norms contains NaN or infinite values"),
    ("logits_nan", lambda i: CE.grad(i.with_nan(i.np_logits, (2, 1)), i.labels), ValueError,
     "logits contains NaN or infinite values"),
    ("targets_nan", lambda i: MSE.grad(i.logits, i.with_nan(i.np_logits)), ValueError,
     "targets contains NaN or infinite values"),
    ("jacobians_inf",
     lambda i: ngdref.gn_matrix(i.a(np.full((N, C, P), np.inf))), ValueError,
     "jacobians contains NaN or infinite values"),
    ("hessians_nan",
     lambda i: ngdref.fisher_matrix(i.jac, i.a(np.full((N, C, C), np.nan))), ValueError,
     "logit_hessians contains NaN or infinite values"),
    ("factors_nan",
     lambda i: ngdref.ngd_update(i.jac, i.a(np.full((N, C, C), np.nan)), i.grad, damping=1.0),
     ValueError, "logit_hessian_sqrt contains NaN or infinite values"),
    ("ngd_grad_inf",
     lambda i: ngdref.ngd_update(i.jac, i.factors, i.a(np.full(P, np.inf)), damping=1.0),
     ValueError, "grad contains NaN or infinite values"),
    ("gamma_update_nan",
     lambda i: ngdref.gamma(i.a(np.full(P, np.nan)), i.grad, fisher=i.fisher), ValueError,
     "update contains NaN or infinite values"),
    ("logit_grads_nan",
     lambda i: ngdref.ief_matrix_logit(i.jac, i.with_nan(i.np_logits, (0, 0))), ValueError,
     "logit_grads contains NaN or infinite values"),
    ("cg_grad_nan",
     lambda i: ngdref.ngd_update_cg(lambda v: v, i.a(np.full(P, np.nan)), damping=0.1),
     ValueError,
     "grad contains NaN or infinite values"),
    # ---- damping -------------------------------------------------------------
    ("damping_negative", lambda i: ngdref.ef_update(i.g_rows, damping=-1e-3), ValueError,
     "damping must be finite and >= 0"),
    ("damping_nan", lambda i: ngdref.ief_update(i.g_rows, i.s, damping=float("nan")),
     ValueError, "damping must be finite and >= 0"),
    ("damping_inf",
     lambda i: ngdref.ngd_update(i.jac, i.factors, i.grad, damping=float("inf")), ValueError,
     "damping must be finite and >= 0"),
    ("damping_bool", lambda i: ngdref.ef_update(i.g_rows, damping=True), TypeError,
     "damping must be a Python float"),
    ("damping_str", lambda i: ngdref.sf_update(i.g_rows, i.grad, damping="0.1"), TypeError,
     "damping must be a Python float"),
    ("cg_damping_negative", lambda i: _cg(i, damping=-1.0), ValueError,
     "damping must be finite and >= 0"),
    ("sf_zero_damping_wide", lambda i: ngdref.sf_update(i.g_rows, i.grad, damping=0.0),
     ngdref.SingularMatrixError, "damping=0"),
    ("ngd_zero_damping_wide",
     lambda i: ngdref.ngd_update(i.a(np.ones((1, 2, 5))), i.a(np.ones((1, 2, 2))),
                                 i.a(np.ones(5)), damping=0.0),
     ngdref.SingularMatrixError, "damping=0"),
    ("ef_zero_damping_duplicate_rows",
     lambda i: ngdref.ef_update(i.a(np.vstack([i.np_g_rows, 2 * i.np_g_rows[1]])), damping=0.0),
     ngdref.SingularMatrixError, "increase damping"),
    ("ief_zero_damping_more_rows_than_params",
     lambda i: ngdref.ief_update(i.a(np.ones((3, 2)) + np.eye(3, 2)), i.a(np.ones(3)),
                                 damping=0.0), ngdref.SingularMatrixError, "increase damping"),
    # ---- empty batches -------------------------------------------------------
    ("grads_empty", lambda i: ngdref.ef_update(i.a(np.zeros((0, P))), damping=0.1), ValueError,
     "per_sample_grads is an empty batch (N = 0)"),
    ("ief_empty", lambda i: ngdref.ief_update(i.a(np.zeros((0, P))), i.a(np.zeros(0)),
                                              damping=0.1), ValueError,
     "per_sample_grads is an empty batch"),
    ("grads_no_params", lambda i: ngdref.sgd_update(i.a(np.zeros((N, 0)))), ValueError,
     "per_sample_grads has no parameters (P = 0)"),
    ("jacobians_empty", lambda i: ngdref.gn_matrix(i.a(np.zeros((0, C, P)))), ValueError,
     "jacobians is an empty batch (N = 0)"),
    ("logits_empty",
     lambda i: CE.value(i.a(np.zeros((0, C))), i.a(np.zeros(0, dtype=np.int64))), ValueError,
     "logits is an empty batch (N = 0)"),
    ("sf_empty", lambda i: ngdref.sf_update(i.a(np.zeros((0, P))), i.grad, damping=0.1),
     ValueError, "sampled_grads is an empty batch"),
    # ---- options ---------------------------------------------------------------
    ("damping_space", lambda i: ngdref.ief_update(i.g_rows, i.s, damping=0.1,
                                                  damping_space="both"), ValueError,
     "damping_space must be one of"),
    ("damping_mode", lambda i: ngdref.ef_update(i.g_rows, damping=0.1, damping_mode="rel"),
     ValueError, "damping_mode must be one of"),
    ("ief_parameter_diagonal",
     lambda i: ngdref.ief_update(i.g_rows, i.s, damping=0.1, damping_space="parameter",
                                 damping_mode="diagonal_only"), ValueError,
     "damping_mode='diagonal_only' is a sample-space damping"),
    ("ief_parameter_lm",
     lambda i: ngdref.ief_update(i.g_rows, i.s, damping=0.1, damping_space="parameter",
                                 damping_mode="levenberg_marquardt"), ValueError,
     "damping_mode='levenberg_marquardt' is a sample-space damping"),
    ("damping_mode_old_name",
     lambda i: ngdref.ef_update(i.g_rows, damping=0.1, damping_mode="diagonal"), ValueError,
     "damping_mode must be one of"),
    ("dedup_rule", lambda i: ngdref.ef_update(i.g_rows, damping=0.1, dedup_threshold=0.9,
                                              dedup_rule="pairs"), ValueError,
     "dedup_rule must be one of"),
    ("methods_unknown", lambda i: ngdref.directions(_provider(i), CE, i.labels, damping=0.1,
                                                    methods=("ef", "kfac")), ValueError,
     "methods must be a non-empty subset"),
    ("methods_empty", lambda i: ngdref.directions(_provider(i), CE, i.labels, damping=0.1,
                                                  methods=()), ValueError,
     "methods must be a non-empty subset"),
    ("sf_without_key", lambda i: ngdref.directions(_provider(i), CE, i.labels, damping=0.1,
                                                   methods=("sf",)), ValueError,
     "key is required"),
    ("ngd_solver", lambda i: ngdref.directions(_provider(i), CE, i.labels, damping=0.1,
                                               methods=("ngd",), ngd_solver="lu"), ValueError,
     "ngd_solver must be one of"),
    ("reduction_name", lambda i: ngdref.directions(_provider(i), CE, i.labels, damping=0.1,
                                                   reduction="avg", methods=("sgd",)),
     ValueError, "reduction must be 'sum', 'mean' or a positive float"),
    ("reduction_negative", lambda i: ngdref.fisher_vp(_provider(i), CE, i.labels,
                                                      reduction=-1.0), ValueError,
     "reduction must be a finite positive factor"),
    ("reduction_bool", lambda i: ngdref.reduction_factor(True, N), TypeError, "reduction must"),
    ("dedup_threshold", lambda i: ngdref.ef_update(i.g_rows, damping=0.0, dedup_threshold=1.5),
     ValueError, "dedup_threshold must be in (0, 1]"),
    # ---- the damped Gram solve object and the rows protocol ----------------------------
    ("damped_gram_rhs_length",
     lambda i: ngdref.DampedGram(i.g_rows).solve(i.s[:-1], damping=0.1), ValueError,
     f"rhs has {N - 1} rows but rows has {N}"),
    ("damped_gram_weights_mode",
     lambda i: ngdref.DampedGram(i.g_rows).solve(i.s, damping=0.1, sample_weights=i.s,
                                                 damping_mode="diagonal_only"), ValueError,
     "sample_weights cannot be combined with damping_mode='diagonal_only'"),
    ("damped_gram_and_dedup",
     lambda i: ngdref.ef_update(ngdref.DampedGram(i.g_rows), damping=0.1, dedup_threshold=0.9),
     ValueError, "dedup_threshold must be None when per_sample_grads is a DampedGram"),
    ("damped_gram_not_rows", lambda i: ngdref.DampedGram("rows"), TypeError,
     "rows must be an array of shape (N, P) or a PerSampleRows"),
    ("imbalance_statistic",
     lambda i: ngdref.grad_norm_imbalance(i.g_rows, statistic="max/min"), ValueError,
     "statistic must be one of"),
    ("imbalance_kept_length",
     lambda i: ngdref.grad_norm_imbalance(i.g_rows, kept=i.a(np.ones(N - 1, dtype=bool))),
     ValueError, f"kept must be a bool mask of {N} entries"),
    ("ief_parameter_zero_s",
     lambda i: ngdref.ief_update(i.g_rows, i.a(np.array([1.0, 0.0, 1.0, 1.0])), damping=0.1,
                                 damping_space="parameter"), ValueError,
     "logit_grad_sq_norms must be > 0 for damping_space='parameter'"),
    ("ief_negative_s", lambda i: ngdref.ief_update(i.g_rows, i.a(-np.ones(N)), damping=0.1),
     ValueError, "logit_grad_sq_norms must be >= 0"),
    ("ief_matrix_zero_s", lambda i: ngdref.ief_matrix(i.g_rows, i.a(np.zeros(N))), ValueError,
     "logit_grad_sq_norms must be > 0"),
    ("ief_logit_zero_row",
     lambda i: ngdref.ief_matrix_logit(i.jac, i.a(np.zeros((N, C)))), ValueError,
     "logit_grads has a zero row"),
    ("cg_tol", lambda i: _cg(i, damping=0.1, tol=0.0), ValueError, "tol must be > 0"),
    ("cg_maxiter", lambda i: _cg(i, damping=0.1, maxiter=0), ValueError,
     "maxiter must be >= 1"),
    ("cg_not_converged", lambda i: _cg(i, damping=1e-3, maxiter=1), ngdref.NotConvergedError,
     "maxiter=1"),
    ("vocab_size", lambda i: ngdref.SequenceSoftmaxCrossEntropy(0), ValueError,
     "vocab_size must be an int >= 1"),
    ("gamma_zero_update", lambda i: ngdref.gamma(i.a(np.zeros(P)), i.grad, fisher=i.fisher),
     ValueError, "update is the zero vector"),
    ("gamma_not_psd", lambda i: ngdref.gamma(i.grad, i.grad, fisher=i.a(-np.eye(P))), ValueError,
     "Fisher is not positive semi-definite"),
    ("projections_zero_row",
     lambda i: ngdref.projections(i.a(np.vstack([i.np_g_rows[:-1], np.zeros(P)])), i.grad),
     ValueError, "per_sample_grads has a zero row"),
    # ---- labels -------------------------------------------------------------------
    ("label_too_large", lambda i: CE.grad(i.logits, i.a(np.array([0, 1, C, 0]))), ValueError,
     f"targets must be class labels in [0, {C})"),
    ("label_negative", lambda i: CE.value(i.logits, i.a(np.array([0, -1, 2, 0]))), ValueError,
     f"targets must be class labels in [0, {C})"),
    ("bce_target_range", lambda i: BCE.grad(i.logits, i.a(np.full((N, C), 1.5))), ValueError,
     "targets must lie in [0, 1]"),
    ("seq_token_range",
     lambda i: SEQ.value(i.logits, i.a(np.array([[0], [3], [1], [-100]]))), ValueError,
     "targets must be token ids in [0, 3) or ignore_index"),
    ("seq_all_ignored", lambda i: SEQ.value(i.logits, i.a(np.full((N, 1), -100))), ValueError,
     "targets: every position equals ignore_index=-100"),
    ("seq_all_ignored_sample",
     lambda i: SEQ.sample(i.logits, 0, targets=i.a(np.full((N, 1), -100))), ValueError,
     "every position equals ignore_index"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "error", "message"), [c[1:] for c in BAD],
                         ids=[c[0] for c in BAD])  # fmt: skip
def test_bad_input_raises_and_names_the_argument(call, error, message, backend):
    with pytest.raises(error, match=re.escape(message)):
        call(Inputs(backend))


# ---- nothing is coerced: mismatched dtypes (ngdref/_checks.py's contract) ----------
# These arguments are combined with a checked array without a dtype check; the
# library's contract ("a wrong dtype ... is an error, never a silent cast") asks
# for a TypeError that names them. See the report for the proposed fix.
DTYPE_BAD = [
    ("fisher_hessians_dtype",
     lambda i: ngdref.fisher_matrix(i.a(np.ones((N, C, P)), "float32"), i.hess), "logit_hessians"),
    ("ngd_factors_dtype",
     lambda i: ngdref.ngd_update(i.a(np.ones((N, C, P)), "float32"), i.factors,
                                 i.a(np.ones(P), "float32"), damping=0.1), "logit_hessian_sqrt"),
    ("ief_logit_grads_dtype",
     lambda i: ngdref.ief_matrix_logit(i.a(np.ones((N, C, P)), "float32"), i.logits),
     "logit_grads"),
    ("mse_targets_dtype",
     lambda i: MSE.grad(i.a(i.np_logits, "float32"), i.logits), "targets"),
    ("hessian_vp_vectors_dtype",
     lambda i: CE.hessian_vp(i.logits, i.labels, i.a(i.np_logits, "float32")), "vectors"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "message"), [c[1:] for c in DTYPE_BAD],
                         ids=[c[0] for c in DTYPE_BAD])  # fmt: skip
def test_mismatched_dtypes_are_refused(call, message, backend):
    with pytest.raises(TypeError, match=re.escape(message)):
        call(Inputs(backend))


# ---- mixed namespaces and devices ------------------------------------------------
PAIRS = [("numpy", "torch"), ("numpy", "array_api_strict"), ("torch", "numpy")]


def _backend(name: str) -> Backend:
    b = next(b for b in BACKENDS if b.name == name)
    if b.unavailable():
        pytest.skip(b.unavailable())
    return b


MIXED = [
    ("ief_s", lambda i, o: ngdref.ief_update(i.g_rows, o.s, damping=0.1),
     "logit_grad_sq_norms comes from namespace"),
    ("ief_matrix_s", lambda i, o: ngdref.ief_matrix(i.g_rows, o.s),
     "logit_grad_sq_norms comes from namespace"),
    ("fisher_hessians", lambda i, o: ngdref.fisher_matrix(i.jac, o.hess),
     "logit_hessians comes from namespace"),
    ("ngd_grad", lambda i, o: ngdref.ngd_update(i.jac, i.factors, o.grad, damping=0.1),
     "grad comes from namespace"),
    ("ngd_factors", lambda i, o: ngdref.ngd_update(i.jac, o.factors, i.grad, damping=0.1),
     "logit_hessian_sqrt comes from namespace"),
    ("gn_grad", lambda i, o: ngdref.gn_update(i.jac, o.grad, damping=0.1),
     "grad comes from namespace"),
    ("sf_rows", lambda i, o: ngdref.sf_update(o.g_rows, i.grad, damping=0.1),
     "but grad comes from"),
    ("loss_targets", lambda i, o: CE.grad(i.logits, o.labels), "targets comes from namespace"),
    ("gamma_grad", lambda i, o: ngdref.gamma(i.grad, o.grad, fisher=i.fisher),
     "grad comes from namespace"),
    ("gamma_fisher", lambda i, o: ngdref.gamma(i.grad, i.grad, fisher=o.fisher),
     "but fisher comes from"),
    ("loss_reductions", lambda i, o: ngdref.loss_reductions(i.g_rows, o.grad),
     "update comes from namespace"),
    ("ief_logit", lambda i, o: ngdref.ief_matrix_logit(i.jac, o.logits),
     "logit_grads comes from namespace"),
    ("uniforms", lambda i, o: CE.sample(i.logits, o.a(np.full((1, N), 0.5))),
     "key comes from namespace"),
    ("hessian_vp_vectors", lambda i, o: CE.hessian_vp(i.logits, i.labels, o.logits), "vectors"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "message"), [c[1:] for c in MIXED], ids=[c[0] for c in MIXED])
@pytest.mark.parametrize(("first", "second"), PAIRS, ids=[f"{a}+{b}" for a, b in PAIRS])
def test_mixed_namespaces_are_refused(first, second, call, message):
    one, other = Inputs(_backend(first)), Inputs(_backend(second))
    with pytest.raises(TypeError, match=re.escape(message)):
        call(one, other)


def test_mixed_devices_are_refused():
    torch = pytest.importorskip("torch")
    i = Inputs(_backend("torch"))
    s_meta = torch.ones(N, dtype=torch.float64, device="meta")
    with pytest.raises(TypeError, match=re.escape("logit_grad_sq_norms is on device meta")):
        ngdref.ief_update(i.g_rows, s_meta, damping=0.1)


# ---- the near-duplicate filter ---------------------------------------------------
def test_near_duplicate_mask_keeps_the_larger_norm_row_then_solves(backend):
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((5, 12))
    rows[3] = -2.0 * rows[1]  # exact duplicate direction (|cos| = 1), larger norm
    rows[4] = 0.5 * rows[0] + 1e-4 * rng.standard_normal(12)  # near duplicate, smaller norm
    cos = abs(rows[4] @ rows[0]) / np.linalg.norm(rows[4]) / np.linalg.norm(rows[0])
    assert 0.99 < cos < 1.0
    g = backend.asarray(rows)
    # undamped, the exact duplicate makes the Gram matrix singular
    with pytest.raises(ngdref.SingularMatrixError, match="dedup_threshold"):
        ngdref.ef_update(g, damping=0.0)
    mask = backend.to_numpy(ngdref.near_duplicate_mask(ngdref.gram_matrix(g), threshold=0.99))
    np.testing.assert_array_equal(mask, [True, False, True, True, False])
    # rows 1 and 4 dropped: EF on the kept rows, G_kept d = 1 exactly (to rounding)
    kept = rows[mask]
    expected = kept.T @ np.linalg.solve(kept @ kept.T, np.ones(3))
    d = backend.to_numpy(ngdref.ef_update(g, damping=0.0, dedup_threshold=0.99))
    # the kept system's solve (tests/cases.py: gram_rtol) and its residual G_kept d - b
    gram = kept @ kept.T
    c = np.linalg.solve(gram, np.ones(3))
    rtol = gram_rtol(kept, gram, c)
    assert_close_norm(d, expected, rtol)
    assert_close_norm(kept @ d, np.ones(3), rtol * np.linalg.cond(gram))
    s = backend.asarray(np.array([0.5, 1.0, 2.0, 3.0, 4.0]))
    d = backend.to_numpy(ngdref.ief_update(g, s, damping=0.0, dedup_threshold=0.99))
    assert_close_norm(kept @ d, np.array([0.5, 2.0, 3.0]), rtol * np.linalg.cond(gram))
    # a looser threshold keeps the near duplicate
    mask = backend.to_numpy(
        ngdref.near_duplicate_mask(ngdref.gram_matrix(g), threshold=0.999999999)
    )
    np.testing.assert_array_equal(mask, [True, False, True, True, True])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    "call",
    [
        lambda g, s: ngdref.sgd_update(g),
        lambda g, s: ngdref.ef_update(g, damping=0.1),
        lambda g, s: ngdref.ief_update(g, s, damping=0.1),
        lambda g, s: ngdref.ief_update(g, s, damping=0.1, damping_space="parameter"),
        lambda g, s: ngdref.gram_update(g, s, damping=0.1)[0],
        lambda g, s: ngdref.grad_norm_imbalance(g),
        lambda g, s: ngdref.loss_reductions(g, np.ones(g.shape[1])),
        lambda g, s: ngdref.projections(g, np.ones(g.shape[1])),
    ],
    ids=["sgd", "ef", "ief", "ief-parameter", "gram", "imbalance", "reductions", "projections"],
)
def test_non_finite_gradient_rows_are_caught_through_derived_quantities(call, bad) -> None:
    """These functions check finiteness on a derived quantity (the Gram matrix, the sum, the
    row norms) instead of scanning G: a single bad entry must still be reported under the
    argument's name, whatever its sign."""
    rng = np.random.default_rng(0)
    g = rng.standard_normal((4, 9))
    g[2, 5] = bad
    with pytest.raises(ngdref.NonFiniteError, match="per_sample_grads contains NaN"):
        call(g, rng.uniform(0.5, 1.0, 4))


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("num_rows", [3, 12], ids=["woodbury", "dense"])
def test_non_finite_sampled_grads_are_caught(bad, num_rows) -> None:
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((num_rows, 6))
    rows[1, 2] = bad
    with pytest.raises(ngdref.NonFiniteError, match="sampled_grads contains NaN"):
        ngdref.sf_update(rows, rng.standard_normal(6), damping=0.1)
