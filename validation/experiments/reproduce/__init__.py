"""The CPU reproductions (``python -m validation.experiments reproduce``): ``driver`` (train,
evaluate, report), ``plan`` (learning-rate grids, seeds, run configurations), ``report`` (the
numbers and the paper's claims), ``markdown`` (``results.md``), ``tasks`` (the process pool)
and ``lora_digits`` (the digits-LoRA experiment)."""
