"""JAX: per-sample Jacobians of any ``apply_fn(params, inputs)`` for :mod:`ngdref`, and the
exact optimisers iEF, EF and SF as optax transformations.

- :class:`JaxProvider` (:mod:`backends.jax.provider`): the provider contract on JAX arrays,
  theta = ``jax.flatten_util.ravel_pytree(params)[0]``; needs ``jax_enable_x64``;
- :func:`ief`, :func:`ef`, :func:`sf` (:mod:`backends.jax.transforms`): optax
  ``GradientTransformationExtraArgs`` with the torch optimisers' conventions, usable inside
  ``jax.jit``, with or without ``jax_enable_x64``; :class:`ExactState` their state;
- :func:`sampling_key` (:mod:`backends.jax.steps`): SF's per-step sampling key.

Importing this package imports jax and optax (``pip install 'ngdref[jax]'``).
"""

from .provider import JaxProvider
from .steps import sampling_key
from .transforms import ExactState, ef, ief, sf

__all__ = ["ExactState", "JaxProvider", "ef", "ief", "sampling_key", "sf"]
