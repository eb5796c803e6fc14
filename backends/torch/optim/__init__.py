"""``torch.optim`` optimisers: the paper's (``methods``: IEF, EF, SF, NGD, on the shared step of
``base`` and ``common``, SF's paired rows in ``sf_rows``) and the K-FAC family (``kfac``); every
keyword option's check, kind and documentation, and their way to the provider, in ``options``."""
