"""The toy problems' figures: direction fields and trajectories of SGD, NGD, iEF, EF.

The toy problems and their closed forms are on the conventions page, :ref:`conv-toys`.

Re-exported by :mod:`validation.experiments.figures.plots`, whose docstring lists the figures.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from validation.experiments.figures.style import OPTIMIZER_COLORS, PathLike, _figure, _save


# ---- the toy problems (conventions page, The toy problems in closed form) ------------------------
def least_squares_toy_updates(theta: Sequence[float]) -> dict[str, np.ndarray]:
    r"""SGD, NGD, iEF and EF updates of the least-squares toy at ``theta`` (undamped, sum).

    .. math::
        g = G^\top 1, \quad d_{NGD} = F^{-1} g, \quad d_{iEF} = G^\top (G G^\top)^{-1} s,
        \quad d_{EF} = G^\top (G G^\top)^{-1} 1

    computed with :mod:`ngdref` on :func:`backends.arrays.analytic.least_squares_toy`. The closed
    forms (:ref:`conv-toys`) are NGD = iEF = theta and EF = (1/r_1, 1/r_2 - 1/r_1).

    Parameters
    ----------
    theta : sequence of 2 floats
        (theta_0, theta_1); both residuals r_1 = theta_0 and r_2 = theta_0 + theta_1 must be
        non-zero (EF is undefined otherwise).

    Returns
    -------
    dict of str to ndarray, shape (2,)
        Keys "sgd", "ngd", "ief", "ef" (directions d; the step is -lr d).

    Raises
    ------
    ngdref.SingularMatrixError
        A zero residual.
    """
    import ngdref
    from backends.arrays.analytic import least_squares_toy

    provider, loss, targets = least_squares_toy(theta, np)
    return _toy_updates(provider, loss, targets, ngdref)


def logistic_toy_updates(theta: Sequence[float]) -> dict[str, np.ndarray]:
    r"""SGD, NGD, iEF and EF updates of the logistic toy at ``theta`` (undamped, sum).

    Computed with :mod:`ngdref` on :func:`backends.arrays.analytic.logistic_toy`. For this
    scalar-output model iEF equals the Gauss-Newton update :math:`\hat G^{-1} g` (Eq. 18) and
    differs from NGD :math:`F^{-1} g`.

    Parameters
    ----------
    theta : sequence of 2 floats

    Returns
    -------
    dict of str to ndarray, shape (2,)
        Keys "sgd", "ngd", "ief", "ef".
    """
    import ngdref
    from backends.arrays.analytic import logistic_toy

    provider, loss, targets = logistic_toy(theta, np)
    return _toy_updates(provider, loss, targets, ngdref)


def _toy_updates(provider: Any, loss: Any, targets: Any, ngdref: Any) -> dict[str, np.ndarray]:
    q = ngdref.batch_quantities(provider, loss, targets)
    return {
        "sgd": np.asarray(q.grad),
        "ngd": np.asarray(
            ngdref.ngd_update(
                provider.jacobian(), loss.hessian_sqrt(q.logits, targets), q.grad, damping=0.0
            )
        ),
        "ief": np.asarray(
            ngdref.ief_update(q.per_sample_grads, q.logit_grad_sq_norms, damping=0.0)
        ),
        "ef": np.asarray(ngdref.ef_update(q.per_sample_grads, damping=0.0)),
    }


def field(
    updates: Callable[[Sequence[float]], Mapping[str, np.ndarray]],
    theta0: Sequence[float],
    theta1: Sequence[float],
) -> dict[str, np.ndarray]:
    """Every method's update over the grid ``theta0 x theta1``.

    Parameters
    ----------
    updates : callable
        :func:`least_squares_toy_updates` or :func:`logistic_toy_updates`.
    theta0, theta1 : sequence of float
        The grid's axes (n0 and n1 values).

    Returns
    -------
    dict of str to ndarray, shape (n1, n0, 2)
        Entry [i, j] is the update at (theta0[j], theta1[i]) (matplotlib's quiver layout); NaN
        where the update is undefined (a singular Gram matrix).
    """
    import ngdref

    out: dict[str, np.ndarray] = {}
    for i, t1 in enumerate(theta1):
        for j, t0 in enumerate(theta0):
            try:
                here = updates((float(t0), float(t1)))
            except (ngdref.SingularMatrixError, ValueError):
                continue
            for name, vec in here.items():
                if name not in out:
                    out[name] = np.full((len(theta1), len(theta0), 2), np.nan)
                out[name][i, j] = vec
    return out


def toy_trajectory(
    updates: Callable[[Sequence[float]], Mapping[str, np.ndarray]],
    method: str,
    start: Sequence[float],
    *,
    step_length: float,
    num_steps: int,
    optimum: Sequence[float] | None = None,
) -> np.ndarray:
    r"""Follow one method's direction field with steps of fixed length.

    .. math:: \theta_{k+1} = \theta_k - h\, d(\theta_k) / \|d(\theta_k)\|

    Fixed-length steps trace the shape of the path a method takes (its integral curve)
    independently of the update's scale (EF's 1/r_n blows up near the optimum of the least-squares
    toy; the paper's EF optimiser normalises its update for the same reason).

    Parameters
    ----------
    updates : callable
        :func:`least_squares_toy_updates` or :func:`logistic_toy_updates`.
    method : str
        A key of ``updates``' result.
    start : (2,)
    step_length : float
        h.
    num_steps : int
        At most this many steps.
    optimum : (2,), optional
        Stop (and end exactly there) once within ``step_length`` of it.

    Returns
    -------
    ndarray, shape (K + 1, 2)
        The iterates, ``start`` first; it ends early where the update is undefined.
    """
    import ngdref

    theta = np.asarray(start, dtype=float)
    path = [theta.copy()]
    for _ in range(num_steps):
        if optimum is not None and np.linalg.norm(theta - np.asarray(optimum)) <= step_length:
            path.append(np.asarray(optimum, dtype=float))
            break
        try:
            d = np.asarray(updates(tuple(theta))[method], dtype=float)
        except (ngdref.SingularMatrixError, ValueError):
            break
        norm = float(np.linalg.norm(d))
        if not math.isfinite(norm) or norm == 0.0:
            break
        theta = theta - step_length * d / norm
        path.append(theta.copy())
    return np.asarray(path)


def _loss_grid(
    loss_at: Callable[[tuple[float, float]], float], theta0: np.ndarray, theta1: np.ndarray
) -> np.ndarray:
    return np.array([[loss_at((float(a), float(b))) for a in theta0] for b in theta1])


def _plot_toy(
    updates: Callable[[Sequence[float]], Mapping[str, np.ndarray]],
    loss_at: Callable[[tuple[float, float]], float],
    methods: Sequence[tuple[str, str]],
    *,
    limits: tuple[float, float, float, float],
    start: Sequence[float],
    optimum: Sequence[float] | None,
    step_length: float,
    num_steps: int,
    title: str,
    out: PathLike,
) -> list[Path]:
    lo0, hi0, lo1, hi1 = limits
    # an even number of arrows per axis, offset from the grid lines through 0, keeps the arrows
    # off the lines where a residual vanishes (EF undefined there)
    a0 = np.linspace(lo0, hi0, 16) + 0.37 * (hi0 - lo0) / 16
    a1 = np.linspace(lo1, hi1, 16) + 0.21 * (hi1 - lo1) / 16
    arrows = field(updates, a0[:-1], a1[:-1])
    c0, c1 = np.linspace(lo0, hi0, 121), np.linspace(lo1, hi1, 121)
    levels_of = _loss_grid(loss_at, c0, c1)
    fig, axes = _figure(len(methods), width=3.6, height=3.6)
    for ax, (method, label) in zip(axes[0], methods, strict=True):
        ax.contour(c0, c1, levels_of, levels=14, colors="0.75", linewidths=0.6)
        d = arrows[method]
        norm = np.linalg.norm(d, axis=-1, keepdims=True)
        unit = -d / np.where(norm > 0, norm, np.nan)  # the step direction is -d
        ax.quiver(
            a0[:-1], a1[:-1], unit[..., 0], unit[..., 1], color=OPTIMIZER_COLORS.get(method, "k"),
            angles="xy", scale_units="xy", scale=1.0 / (0.6 * (hi0 - lo0) / 16), width=0.006,
        )
        path = toy_trajectory(
            updates, method, start, step_length=step_length, num_steps=num_steps,
            optimum=optimum,
        )
        ax.plot(path[:, 0], path[:, 1], "-", color="k", lw=1.4)
        ax.plot(*start, "o", color="k", ms=5)
        if optimum is not None:
            ax.plot(*optimum, "*", color="gold", mec="k", ms=12)
        ax.set_xlim(lo0, hi0)
        ax.set_ylim(lo1, hi1)
        ax.set_aspect("equal")
        ax.set_title(label)
        ax.set_xlabel(r"$\theta_0$")
    axes[0][0].set_ylabel(r"$\theta_1$")
    return _save(fig, out, title)


def plot_least_squares_toy(
    out: PathLike,
    *,
    start: Sequence[float] = (1.5, -0.7),
    limits: tuple[float, float, float, float] = (-2.0, 2.0, -2.0, 2.0),
    step_length: float = 0.05,
    num_steps: int = 400,
) -> list[Path]:
    """The least-squares toy (:ref:`conv-toys`): SGD, NGD (= iEF) and EF direction fields.

    Arrows are the unit step directions -d/||d|| over a 15 x 15 grid on the loss contours;
    the black line follows each field from ``start`` (:func:`toy_trajectory`) to the optimum
    theta* = (0, 0). NGD = iEF goes straight to it; EF is distorted by its 1/r_n weights.

    Parameters
    ----------
    out : path
        Output prefix: writes ``out.png`` and ``out.pdf``.
    start : (2,)
        Start of the trajectories (default (1.5, -0.7), the point the closed forms are checked at).
    limits : (theta0_min, theta0_max, theta1_min, theta1_max)
    step_length, num_steps
        See :func:`toy_trajectory`.

    Returns
    -------
    list of Path
        The PNG and the PDF.
    """
    from backends.arrays.analytic import least_squares_toy_closed_form

    def loss_at(theta: tuple[float, float]) -> float:
        r1, r2 = theta[0], theta[0] + theta[1]
        return 0.5 * (r1 * r1 + r2 * r2)

    # the loss does not need the EF closed form (undefined on two lines): check start only
    least_squares_toy_closed_form(start)
    return _plot_toy(
        least_squares_toy_updates,
        loss_at,
        [("sgd", "SGD"), ("ngd", "NGD = iEF"), ("ef", "EF")],
        limits=limits,
        start=start,
        optimum=(0.0, 0.0),
        step_length=step_length,
        num_steps=num_steps,
        title=r"least squares $z = \theta_0 + \theta_1 x$, data (0,0), (1,0): "
        "unit step directions and fixed-length-step paths",
        out=out,
    )


def plot_logistic_toy(
    out: PathLike,
    *,
    start: Sequence[float] = (1.0, 3.0),
    limits: tuple[float, float, float, float] = (-4.0, 4.0, -4.0, 4.0),
    step_length: float = 0.1,
    num_steps: int = 60,
) -> list[Path]:
    """The logistic toy (:ref:`conv-toys`): SGD, NGD, iEF (= Gauss-Newton, Eq. 18) and EF.

    The data are separable (the loss decreases towards theta_0 -> +inf, theta_0 + 2 theta_1
    -> -inf), so the paths run for ``num_steps`` steps. Here iEF and NGD differ.

    Parameters
    ----------
    out : path
        Output prefix: writes ``out.png`` and ``out.pdf``.
    start, limits, step_length, num_steps
        As :func:`plot_least_squares_toy`.

    Returns
    -------
    list of Path
    """
    from backends.arrays.analytic import logistic_toy_closed_form

    def loss_at(theta: tuple[float, float]) -> float:
        return logistic_toy_closed_form(theta).loss

    return _plot_toy(
        logistic_toy_updates,
        loss_at,
        [("sgd", "SGD"), ("ngd", "NGD"), ("ief", "iEF = GN"), ("ef", "EF")],
        limits=limits,
        start=start,
        optimum=None,
        step_length=step_length,
        num_steps=num_steps,
        title=r"logistic $p = \sigma(\theta_0 + \theta_1 x)$, data (0,1), (2,0): "
        "unit step directions and fixed-length-step paths",
        out=out,
    )
