"""Array-API providers and the array libraries they run on (no torch needed).

``adapters``: the array libraries (NumPy, array_api_strict, torch, CuPy) and the moves between
them; ``analytic``: closed-form providers and the toy problems; ``finite_difference``: central
differences of any model function; ``mlp``: the tanh MLP and its exact provider. The providers
are re-exported by :mod:`backends`.
"""
