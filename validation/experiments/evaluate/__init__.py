"""The evaluation framework (gamma ratios of the updates over a run's checkpoints, damping
sweeps): ``framework`` (:func:`~validation.experiments.evaluate.framework.evaluate_run`,
``sweep_run``), ``checkpoint`` (one checkpoint's scores), ``protocols`` (one batch under the
"ngdref" or the authors' protocol), ``kfac`` (the K-FAC family), ``settings`` (defaults,
checks, files), ``rounds`` (the resumable pass over checkpoints) and ``cli`` (the
``evaluate`` and ``sweep`` commands)."""
