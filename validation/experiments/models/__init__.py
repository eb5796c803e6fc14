"""The experiments' networks (``builders``: T5 + LoRA or prompt tuning, ViT + LoRA, an MLP)
and what a run and the evaluation share of one configuration (``setup``: model, losses,
splits, metrics)."""
