r"""The certificate's policy over a step: which rows route runs, and when it is certified.

:func:`certified_rows` runs the routes a caller orders (e.g. ghost, then vmap, then loop)
under the options below, certifying rows with
:func:`backends.torch.per_sample.certify.certify_rows`.

Options for ``TorchProvider`` and the optimisers:

``certify="first" | "always" | "never"`` (default ``"first"``)
    ``"first"``: certify the rows of the first step of each model structure and input shapes
    (:func:`structure_key`), recorded in a :class:`Ledger` keyed weakly by the model (the
    process-wide :data:`LEDGER` by default: providers are built anew at every step, the
    model lives on); later steps with the same key take the route that passed, uncertified.
    ``"always"``: every step. ``"never"``: no certificate.
``on_mismatch="raise" | "fallback"`` (default ``"raise"``)
    ``"raise"``: :class:`ngdref.certificate.RowsCertificateError` (the step changes nothing);
    ``"fallback"``: the rows are redone by the next exact route (ghost -> vmap -> loop, as
    the caller orders them), certified in turn, and the failed route is reported in
    :attr:`CertifiedRows.fallbacks` (an optimiser's ``diagnostics["fallbacks"]``).
``certify_samples=None | k`` (default None: all N)
    certify a seeded window of k samples per step, the reference pass over them alone:
    what makes ``"always"`` affordable (a route wrong for the model is wrong on every
    sample; a single wrong row outside the window goes unseen that step).

:func:`certified_rows` runs that policy over a caller's routes.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ngdref.certificate import Certificate, RowsCertificateError
from ngdref.checks import check_choice, check_int

from .certify import REFERENCES, CertificateUnavailableError, certify_rows
from .loop import BatchModel

__all__ = [
    "CERTIFY",
    "LEDGER",
    "ON_MISMATCH",
    "CertifiedRows",
    "Ledger",
    "certified_rows",
    "structure_key",
]

CERTIFY = ("first", "always", "never")
ON_MISMATCH = ("raise", "fallback")


class Ledger:
    """Which rows route passed its certificate, per model and :func:`structure_key`.

    Keyed weakly by the ``nn.Module``: an entry goes when the model does, and a provider
    (built anew at every step) need not live on.
    """

    def __init__(self) -> None:
        self._routes: weakref.WeakKeyDictionary[
            nn.Module, dict[Hashable, tuple[str, str | None]]] = weakref.WeakKeyDictionary()

    def route(self, model: nn.Module, key: Hashable) -> str | None:
        """The route certified for ``key`` on ``model``, or None."""
        entry = self._routes.get(model, {}).get(key)
        return None if entry is None else entry[0]

    def note(self, model: nn.Module, key: Hashable) -> str | None:
        """Why the entry of ``key`` is not the first route asked for (None: it is, or none)."""
        entry = self._routes.get(model, {}).get(key)
        return None if entry is None else entry[1]

    def record(self, model: nn.Module, key: Hashable, route: str, note: str | None = None
               ) -> None:
        """Remember that ``route`` passed for ``key`` on ``model`` (``note``: why an earlier
        route was passed over)."""
        self._routes.setdefault(model, {})[key] = (route, note)

    def forget(self, model: nn.Module) -> None:
        """Drop every entry of ``model`` (its next step is certified again)."""
        self._routes.pop(model, None)

    def __len__(self) -> int:
        """The number of live models with an entry."""
        return len(self._routes)


#: the process-wide ledger of ``certify="first"``
LEDGER = Ledger()


def _signature(value: Any) -> Hashable:
    """Shapes, dtypes and devices of tensors (recursively in containers); functions by their
    code; other values as (type, value) when hashable (a flag such as
    ``output_hidden_states=True`` can change the forward pass), else their type."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device.type)
    if isinstance(value, nn.utils.rnn.PackedSequence):
        return ("packed", _signature(value.data), tuple(value.batch_sizes.tolist()))
    if isinstance(value, Mapping):
        return ("mapping", tuple((k, _signature(v)) for k, v in value.items()))
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_signature(v) for v in value))
    if callable(value) and hasattr(value, "__code__"):  # a function by its code: a lambda
        return ("function", value.__code__)  # built anew at every step is the same function
    try:
        hash(value)
    except TypeError:
        return ("value", type(value).__qualname__)
    return ("value", type(value).__qualname__, value)


def structure_key(model: nn.Module, inputs: Any, *options: Hashable) -> Hashable:
    """The key of ``certify="first"``: the model's structure and the inputs' shapes.

    Structure: every submodule's path and class, every parameter's name, shape, dtype,
    device and ``requires_grad`` (a toggled adapter, a swapped head or a cast model is a new
    structure; tied parameters appear once). Inputs: :func:`_signature` (shapes, dtypes,
    devices; hashable static values). ``options``: whatever else selects the passes (the
    mode policy, ``output_fn``, the configured route). Data values are not part of it: a
    model whose Python control flow depends on the data needs ``certify="always"``.
    """
    modules = tuple((name, type(m).__module__, type(m).__qualname__)
                    for name, m in model.named_modules())
    params = tuple((name, tuple(p.shape), p.dtype, p.device.type, p.requires_grad)
                   for name, p in model.named_parameters())
    return (modules, params, _signature(inputs), _signature(options))


@dataclass(frozen=True)
class CertifiedRows:
    """The rows a step uses and how they were vouched for.

    Attributes
    ----------
    rows : ngdref.PerSampleRows or torch.Tensor
    route : str
        The name of the route that made them (a key of ``routes``).
    certificate : ngdref.certificate.Certificate or None
        None where no certificate ran this step ("never", or "first" after the first).
    fallbacks : tuple of str
        Routes whose rows failed their certificate, and why (``diagnostics["fallbacks"]``).
    """

    rows: Any
    route: str
    certificate: Certificate | None
    fallbacks: tuple[str, ...]


def _failed(route: str, err: RowsCertificateError) -> str:
    return (f"per_sample={route!r}: rows failed their certificate (|G_rows v - G v| = "
            f"{err.error:.2e} > {err.bound:.2e} at sample {err.sample}); next exact route")


def certified_rows(
    model: BatchModel,
    cotangents: torch.Tensor,
    routes: Mapping[str, Callable[[], Any]],
    *,
    owner: nn.Module,
    key: Hashable,
    certify: str = "first",
    on_mismatch: str = "raise",
    ledger: Ledger = LEDGER,
    seed: int = 0,
    reference: str = "auto",
    samples: int | None = None,
    exact: str | None = "loop",
) -> CertifiedRows:
    """The rows of a step under the ``certify`` / ``on_mismatch`` policy (module docstring).

    Parameters
    ----------
    model : BatchModel
        The provider of the step (its batch, theta and mode).
    cotangents : torch.Tensor, shape (N, C)
        u, the cotangents every route computes the rows with.
    routes : mapping of str to callable () -> rows
        The exact routes in fallback order, the configured one first (e.g. "ghost", then
        "vmap", then "loop"); each builds its rows when called.
    owner : torch.nn.Module
        The model the :class:`Ledger` entry belongs to.
    key : hashable
        :func:`structure_key` of this step.
    certify : {"first", "always", "never"}
    on_mismatch : {"raise", "fallback"}
    ledger : Ledger
        Default :data:`LEDGER`.
    seed : int >= 0
        Seed of the certificate's v (an optimiser may pass its step counter).
    reference : {"auto", "forward", "double-backward"}
        Route of the reference G v.
    samples : int >= 1, optional
        Certify a seeded window of this many samples (:func:`certify_rows`); default all N.
    exact : str or None
        The route exact by construction (the loop of single-sample passes: it computes what
        the rows are defined as), taken, uncertified and reported, where the certificate
        cannot run at all (no forward-mode rule and no double backward); None: raise.

    Raises
    ------
    ngdref.certificate.RowsCertificateError
        On a mismatch with ``on_mismatch="raise"``, or when every route failed.
    CertificateUnavailableError
        The certificate cannot run and ``exact`` is not one of ``routes``.
    """
    check_choice(certify, "certify", CERTIFY)
    check_choice(on_mismatch, "on_mismatch", ON_MISMATCH)
    check_int(seed, "seed", minimum=0)
    check_choice(reference, "reference", REFERENCES)
    check_int(samples, "samples", optional=True)
    names = list(routes)
    if not names:
        raise ValueError("routes must hold at least one route")
    known = ledger.route(owner, key)
    start = names.index(known) if known in names else 0
    skipped = tuple(f"per_sample={name!r}: not taken since an earlier step of this model "
                    f"structure ({ledger.note(owner, key)})" for name in names[:start])
    if certify == "never" or (certify == "first" and known is not None):
        name = names[start] if certify == "first" else names[0]
        return CertifiedRows(routes[name](), name, None, skipped if certify == "first" else ())
    fallbacks: list[str] = list(skipped)
    for name in names[start:]:
        rows = routes[name]()
        try:
            result = certify_rows(model, rows, cotangents, seed=seed, route=reference,
                                  samples=samples)
        except RowsCertificateError as err:
            if on_mismatch == "raise":
                raise
            fallbacks.append(_failed(name, err))
            last = err
            continue
        except CertificateUnavailableError as err:
            if exact not in routes:
                raise
            note = (f"the certificate cannot run on this model ({err}): rows by "
                    f"per_sample={exact!r}, exact by construction")
            ledger.record(owner, key, exact, note)
            rows = rows if name == exact else routes[exact]()
            return CertifiedRows(rows, exact, None, (*fallbacks, note))
        ledger.record(owner, key, name, "; ".join(fallbacks) or None)
        return CertifiedRows(rows, name, result, tuple(fallbacks))
    raise RowsCertificateError(
        f"the rows of every route {names[start:]} failed their certificate: "
        + "; ".join(fallbacks), error=last.error, bound=last.bound, sample=last.sample,
        route=last.route,
    ) from last
