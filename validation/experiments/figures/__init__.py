"""The experiments' figures: ``plots`` (training curves, gamma ratios, damping sweeps, the
``figures`` command), ``toy`` (the toy problems' direction fields) and ``style``."""
