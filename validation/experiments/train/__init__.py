"""The training runner: ``runner`` (:func:`~validation.experiments.train.runner.train`),
``optimizers`` (optimisers, schedules, per-epoch randomness), ``state`` (one run's mutable
state) and ``checkpoints`` (the run's files and resuming)."""
