"""The paper's experiments (Wu et al. 2024, App. H): data sets, models, runs, evaluation, figures.

Packages, each importing only those listed after it (and ``io``): ``reproduce`` (the CPU
reproductions), ``evaluate`` (the evaluation framework: gamma ratios and damping sweeps),
``train`` (the training runner) and ``figures``, ``models`` (the networks and a
configuration's :class:`~validation.experiments.models.setup.Setup`), ``config`` (run
configurations and where each value comes from), ``data`` (GLUE for T5, CIFAR-100 for ViT,
scikit-learn's digits for CPU runs, and the runner's splits); the modules ``metrics``
(accuracy, F1, MCC, the selection score, T5 label-word predictions) and ``io`` (atomic files,
JSON lines). The command line is ``python -m validation.experiments``.
"""
