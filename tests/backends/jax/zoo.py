"""The JAX layer zoo as data, and the independent per-sample reference of each case.

Each :class:`Case` builds a small model (Flax linen Dense, Conv, Embed with a tied output,
LayerNorm, attention with a per-sample mask, a layer used twice, a frozen layer, a
sequence-first model, Flax nnx, Equinox) as ``apply_fn(params, inputs)`` with its batch,
targets and loss. Deliberate coincidences: width == batch size ("dense"), sequence length ==
batch size ("embed-tied", "attention").

:func:`loop_reference` is the independent route: a Python loop over samples, each a batch of
one through the model's own ``apply_fn``, with the per-sample loss written here in
``jax.numpy`` (not ngdref's), differentiated by ``jax.grad`` (per-sample gradients),
``jax.jacfwd`` (forward-mode Jacobians, another mode than the provider's ``jacrev``) and
``jax.grad`` / ``jax.hessian`` of the loss in the logits (e_n, H_n). Everything in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.flatten_util import ravel_pytree

import ngdref

IGNORE = -100
VOCAB = 5


@dataclass(frozen=True)
class Built:
    """A model on one batch: ``apply_fn(params, inputs)`` -> logits (N, C) or (N, T, V)."""

    apply_fn: Callable[[Any, Any], Any]
    params: Any
    inputs: Any
    targets: Any
    kind: str  # "ce", "mse", "bce" or "seq"

    @property
    def loss(self) -> ngdref.LogitLoss:
        return {
            "ce": ngdref.SoftmaxCrossEntropy,
            "mse": ngdref.SquaredError,
            "bce": ngdref.SigmoidBinaryCrossEntropy,
            "seq": lambda: ngdref.SequenceSoftmaxCrossEntropy(VOCAB, ignore_index=IGNORE),
        }[self.kind]()


def _cast(tree: Any, dtype: Any) -> Any:
    return jax.tree.map(lambda a: jnp.asarray(a, dtype) if jnp.issubdtype(
        a.dtype, jnp.floating) else a, tree)


def _linen(module: nn.Module, inputs: Any, dtype: Any, *extra: Any) -> tuple[Callable, Any]:
    """(apply_fn over the "params" collection, params in ``dtype``) of a linen module."""
    variables = jax.jit(module.init)(jax.random.key(0), inputs, *extra)  # one compile
    return (lambda p, x: module.apply({"params": p}, x, *extra)), _cast(variables["params"], dtype)


class DenseNet(nn.Module):
    @nn.compact
    def __call__(self, x: Any) -> Any:
        return nn.Dense(3)(jnp.tanh(nn.Dense(4)(x)))


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x: Any) -> Any:
        h = jnp.tanh(nn.Conv(3, (3, 3), padding="SAME")(x))
        return nn.Dense(3)(h.reshape(h.shape[0], -1))


class TiedEmbedding(nn.Module):
    """Embed, LayerNorm, Dense, then logits through the same embedding (tied weights)."""

    @nn.compact
    def __call__(self, tokens: Any) -> Any:
        embed = nn.Embed(VOCAB, 4)
        h = jnp.tanh(nn.Dense(4)(nn.LayerNorm()(embed(tokens))))
        return embed.attend(h)  # (N, T, V)


class NormNet(nn.Module):
    @nn.compact
    def __call__(self, x: Any) -> Any:
        return nn.Dense(2)(jnp.tanh(nn.LayerNorm()(nn.Dense(5)(x))))


class AttentionNet(nn.Module):
    """Self-attention over T positions with a per-sample padding mask, mean-pooled."""

    @nn.compact
    def __call__(self, batch: Any) -> Any:
        x, keep = batch["x"], batch["keep"]
        mask = nn.make_attention_mask(keep, keep)
        h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4)(x, x, mask=mask)
        pooled = jnp.sum(h * keep[..., None], axis=1) / jnp.sum(keep, axis=1, keepdims=True)
        return nn.Dense(3)(pooled)


class SharedDense(nn.Module):
    """One Dense layer applied twice: its parameters are shared by two uses."""

    @nn.compact
    def __call__(self, x: Any) -> Any:
        dense = nn.Dense(3)
        return dense(jnp.tanh(dense(x)))


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _dense(dtype: Any) -> Built:
    x = jnp.asarray(_rng(1).standard_normal((4, 3)), dtype)
    apply_fn, params = _linen(DenseNet(), x, dtype)
    return Built(apply_fn, params, x, jnp.asarray([0, 2, 1, 2]), "ce")


def _conv(dtype: Any) -> Built:
    x = jnp.asarray(_rng(2).standard_normal((3, 5, 5, 2)), dtype)
    apply_fn, params = _linen(ConvNet(), x, dtype)
    return Built(apply_fn, params, x, jnp.asarray([1, 0, 2]), "ce")


def _embed_tied(dtype: Any) -> Built:
    tokens = jnp.asarray(_rng(3).integers(0, VOCAB, (3, 3)))
    apply_fn, params = _linen(TiedEmbedding(), tokens, dtype)
    targets = np.asarray(_rng(4).integers(0, VOCAB, (3, 3)))
    targets[0, 2] = targets[2, 0] = IGNORE
    return Built(apply_fn, params, tokens, jnp.asarray(targets), "seq")


def _layernorm(dtype: Any) -> Built:
    x = jnp.asarray(_rng(5).standard_normal((4, 3)), dtype)
    apply_fn, params = _linen(NormNet(), x, dtype)
    return Built(apply_fn, params, x, jnp.asarray(_rng(6).standard_normal((4, 2)), dtype), "mse")


def _attention(dtype: Any) -> Built:
    keep = jnp.asarray([[1, 1, 1], [1, 1, 0], [1, 0, 0]], dtype)
    batch = {"x": jnp.asarray(_rng(7).standard_normal((3, 3, 4)), dtype), "keep": keep}
    apply_fn, params = _linen(AttentionNet(), batch, dtype)
    targets = jnp.asarray(_rng(8).integers(0, 2, (3, 3)), dtype)
    return Built(apply_fn, params, batch, targets, "bce")


def _shared(dtype: Any) -> Built:
    x = jnp.asarray(_rng(9).standard_normal((3, 3)), dtype)
    apply_fn, params = _linen(SharedDense(), x, dtype)
    return Built(apply_fn, params, x, jnp.asarray([2, 0, 1]), "ce")


def _frozen(dtype: Any) -> Built:
    """DenseNet with its first layer frozen: closed over by apply_fn, not in params."""
    x = jnp.asarray(_rng(10).standard_normal((3, 3)), dtype)
    model = DenseNet()
    variables = _cast(jax.jit(model.init)(jax.random.key(1), x)["params"], dtype)
    frozen = {"Dense_0": variables["Dense_0"]}
    params = {"Dense_1": variables["Dense_1"]}

    def apply_fn(p: Any, inputs: Any) -> Any:
        return model.apply({"params": {**frozen, **p}}, inputs)

    return Built(apply_fn, params, x, jnp.asarray([0, 1, 1]), "ce")


def _sequence_first(dtype: Any) -> Built:
    """A model written for (T, N, D) inputs; apply_fn moves the samples first and back."""
    x = jnp.asarray(_rng(11).standard_normal((3, 2, 4)), dtype)  # (N, T, D) given here
    apply_fn_sf, params = _linen(nn.Dense(VOCAB), jnp.swapaxes(x, 0, 1), dtype)

    def apply_fn(p: Any, inputs: Any) -> Any:
        return jnp.swapaxes(apply_fn_sf(p, jnp.swapaxes(inputs, 0, 1)), 0, 1)  # (N, T, V)

    targets = jnp.asarray([[1, 4], [IGNORE, 0], [3, 3]])
    return Built(apply_fn, params, x, targets, "seq")


def _nnx(dtype: Any) -> Built:
    model = nnx.Sequential(
        nnx.Linear(3, 4, rngs=nnx.Rngs(0), param_dtype=dtype), nnx.tanh,
        nnx.Linear(4, 2, rngs=nnx.Rngs(1), param_dtype=dtype),
    )
    graphdef, params = nnx.split(model, nnx.Param)
    x = jnp.asarray(_rng(12).standard_normal((4, 3)), dtype)
    return Built(lambda p, xs: nnx.merge(graphdef, p)(xs), params, x,
                 jnp.asarray(_rng(13).standard_normal((4, 2)), dtype), "mse")


def _equinox(dtype: Any) -> Built:
    mlp = eqx.nn.MLP(3, 3, 4, 1, activation=jnp.tanh, key=jax.random.key(2), dtype=dtype)
    params, static = eqx.partition(mlp, eqx.is_inexact_array)
    x = jnp.asarray(_rng(14).standard_normal((3, 3)), dtype)
    return Built(lambda p, xs: jax.vmap(eqx.combine(p, static))(xs), params, x,
                 jnp.asarray([2, 2, 0]), "ce")


#: case name -> builder(dtype)
CASES: dict[str, Callable[[Any], Built]] = {
    "dense": _dense,
    "conv": _conv,
    "embed-tied": _embed_tied,
    "layernorm": _layernorm,
    "attention": _attention,
    "shared": _shared,
    "frozen": _frozen,
    "sequence-first": _sequence_first,
    "nnx": _nnx,
    "equinox": _equinox,
}


@cache
def case(name: str, dtype: str = "float64") -> Built:
    """The built case (build it with 64-bit types on for float64)."""
    return CASES[name](jnp.dtype(dtype))


# ---- the independent per-sample route ------------------------------------------------------------
def sample_loss(kind: str, z: Any, y: Any) -> Any:
    """l_n of one sample's flattened logits z (C,), written here in jax.numpy."""
    if kind == "ce":
        return jax.nn.logsumexp(z) - z[y]
    if kind == "mse":
        return 0.5 * jnp.sum((z - y) ** 2)
    if kind == "bce":
        return jnp.sum(jax.nn.softplus(z) - y * z)
    rows = z.reshape(-1, VOCAB)
    kept = y != IGNORE
    picked = jnp.take_along_axis(rows, jnp.where(kept, y, 0)[:, None], axis=1)[:, 0]
    return jnp.sum(jnp.where(kept, jax.nn.logsumexp(rows, axis=1) - picked, 0.0))


@dataclass(frozen=True)
class Reference:
    """Per-sample quantities from the loop, NumPy float64 (sum convention)."""

    logits: np.ndarray  # (N, C)
    per_sample_grads: np.ndarray  # (N, P)
    jacobians: np.ndarray  # (N, C, P)
    logit_grads: np.ndarray  # (N, C)
    logit_hessians: np.ndarray  # (N, C, C)


@cache
def loop_reference(name: str) -> Reference:
    """The loop of single-sample passes of the float64 case ``name`` (64-bit types on).

    Each pass is jitted once (every sample has one shape) and called sample by sample.
    """
    c = case(name)
    theta, unravel = ravel_pytree(c.params)

    def logits_of(t: Any, one: Any) -> Any:
        return c.apply_fn(unravel(t), one).reshape(-1)

    def loss_of(t: Any, one: Any, y: Any) -> Any:
        return sample_loss(c.kind, logits_of(t, one), y)

    passes = {
        "logits": jax.jit(logits_of),
        "per_sample_grads": jax.jit(jax.grad(loss_of)),
        "jacobians": jax.jit(jax.jacfwd(logits_of)),
        "logit_grads": jax.jit(jax.grad(partial(sample_loss, c.kind))),
        "logit_hessians": jax.jit(jax.hessian(partial(sample_loss, c.kind))),
    }
    out: dict[str, list] = {k: [] for k in passes}
    for n in range(c.targets.shape[0]):
        one = jax.tree.map(lambda leaf, n=n: leaf[n:n + 1], c.inputs)
        y = c.targets[n]
        z = passes["logits"](theta, one)
        out["logits"].append(z)
        out["per_sample_grads"].append(passes["per_sample_grads"](theta, one, y))
        out["jacobians"].append(passes["jacobians"](theta, one))
        out["logit_grads"].append(passes["logit_grads"](z, y))
        out["logit_hessians"].append(passes["logit_hessians"](z, y))
    return Reference(**{k: np.stack([np.asarray(a) for a in v]) for k, v in out.items()})
