"""Per-sample gradients of a torch model from one forward and one backward pass with hooks.

``layer_pass``: the hooked pass (:class:`~backends.torch.per_sample.layer_pass.LayerPass`);
``watch``: what the hooks cannot see (parameters broadcast over the batch, tied weights);
``rows``: the result, per-layer factors or rows
(:class:`~backends.torch.per_sample.rows.GhostRows`); ``linear_hooks``: the provider's
``nn.Linear`` route to a dense G.
"""
