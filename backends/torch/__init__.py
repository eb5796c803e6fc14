"""ngdref on ``torch.nn.Module`` s.

``provider``: :class:`~backends.torch.provider.TorchProvider` (with ``inputs``, the batch's
tensors, and ``params``, theta's layout); ``axes``: the batch axis of a tensor;
``per_sample``: per-sample gradients from hooked passes; ``optim``: the ``torch.optim``
optimisers; ``kfac``: the K-FAC curvature; ``distributed``: data parallel over
``torch.distributed``. The public names are re-exported lazily by :mod:`backends`.
"""
