"""Benchmarks: measurements printed side by side, never asserted.

``python -m validation.bench.timing`` (the Gram-form iEF update against the dense solve),
``python -m validation.bench.steps`` (the torch optimisers' steps on its ``workloads``, with
the ``memory`` probes and the ``report`` helpers), ``python -m validation.bench.kfac`` (the
K-FAC family) and ``python -m validation.bench.distributed`` (data-parallel steps).
"""
