"""Per-sample gradients of a torch model: exact, or refused by name.

``routes``: the ``per_sample`` routes by name; ``layer_pass`` (with ``layer_rows``): one
hooked forward and one backward pass on the layer registry
(:class:`~backends.torch.per_sample.layer_pass.LayerPass`); ``watch``: what the layer kinds
cannot see (parameters broadcast over the batch, uses outside their module), driving
``provenance`` (the batch axis of every tensor of the pass, by how it was computed);
``rows``: the result, per-parameter factors or rows
(:class:`~backends.torch.per_sample.rows.GhostRows`); ``vmap`` and ``loop``: the whole-model
routes; ``certify`` and ``policy``: the certificate of a step's rows and when it runs;
``semantics``: the modules without per-sample gradients, and the mode policy.
"""
