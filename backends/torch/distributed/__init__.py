"""Data parallel over ``torch.distributed``: ``comm`` (what the optimisers exchange),
``rows`` (the per-sample rows of the whole group) and ``launch`` (process groups, torchrun
and local launches)."""
