"""SciPy ``LinearOperator`` s of the curvature matrices (``operators``), imported lazily by
:mod:`backends` so that ``import backends`` does not import SciPy."""
