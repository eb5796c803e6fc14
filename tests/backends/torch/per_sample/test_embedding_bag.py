"""``nn.EmbeddingBag`` through the layer pass's EmbeddingBag kind, by provenance.

The batch-axis tracker's rule for ``embedding_bag`` makes a bag model's logits per sample, so
the bag's weight takes a layer route ("ghost" factors or "materialised" rows of the registry's
kind), not the whole-model vmap or the loop, and the certificate runs (its forward-mode
tangent of ``embedding_bag`` is the certificate's own: torch has none). Cases: 2-D indices
(N, L) in modes sum, mean (with ``padding_idx``), max (with an empty bag) and sum with
``per_sample_weights``, and flat indices with sample-free offsets (one or two bags per
sample). The bag length is the
batch size (L == N == 4), so that an axis found by its length would be found wrongly.

Expected rows: the zoo's loop of single-sample backward passes in float64
(:func:`tests.backends.torch.zoo.reference.loop_reference`), within its bound
||G_route - G||_F <= gamma ||G||_F, gamma = c eps sqrt(P) (:func:`~.reference.rows_gamma`).
Offsets computed from the batch (the zoo's ``embedding_bag_offsets``) prove no layout: the
weight falls back, and the fallbacks name ``embedding_bag`` and the offsets.

The certificate's forward-mode tangent of ``embedding_bag`` is checked on its own against J v
from ``torch.func.jacrev`` (reverse mode, torch's rules) in float64. Bound: the bag sums at
most L terms and the head's dot products 4, so each route's tangent errs by at most
gamma_{L + 4 + 3} ||J|| ||v||, twice that between the two; a dropped or misplaced tangent
(the wrong winner of a max, the padding row's) is O(||J v||), orders of magnitude above.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from backends.torch.per_sample.certify import reference_tangents
from backends.torch.provider import TorchProvider
from tests.backends.torch.per_sample.models import Adapter
from tests.backends.torch.zoo.blocks import Keywords, WeightedBag
from tests.backends.torch.zoo.case import VOCAB, Case, N, keywords, lazy, seq, tokens, x
from tests.backends.torch.zoo.reference import loop_reference, reference, rows_gamma

pytestmark = pytest.mark.usefixtures("torch_one_thread")

L = N  # the deliberate coincidence: bag length == batch size
LAYER_ROUTES = frozenset({"ghost", "materialised"})


class FlatBag(nn.Module):
    """tokens (N, L) flattened to one index vector, ``bags`` bags per sample cut by sample-free
    offsets (``torch.arange``), the sample's bag vectors side by side (N, bags d)."""

    def __init__(self, bag: nn.EmbeddingBag, bags: int) -> None:
        super().__init__()
        self.bag, self.bags = bag, bags

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        offsets = torch.arange(0, ids.numel(), ids.shape[1] // self.bags)
        return self.bag(ids.reshape(-1), offsets).reshape(ids.shape[0], -1)


def _bag(**kw: Any) -> Any:
    return seq(lazy(nn.EmbeddingBag, VOCAB, 4, **kw), lazy(nn.Tanh), lazy(nn.Linear, 4, 4))


def _empty_second_bag() -> torch.Tensor:
    """Padded tokens (N, L) whose second sample is all padding: an empty bag."""
    ids = tokens(L, padded=True)()
    ids[1] = 0
    return ids


def _flat(bags: int) -> Any:
    return seq(lambda: FlatBag(nn.EmbeddingBag(VOCAB, 4, mode="sum"), bags), lazy(nn.Tanh),
               lazy(nn.Linear, 4 * bags, 4))


#: (case, the bag's weight)
CASES: dict[str, tuple[Case, str]] = {case.name: (case, weight) for case, weight in [
    (Case("bag_sum", _bag(mode="sum"), tokens(L), 4, ("EmbeddingBag",)), "0.weight"),
    (Case("bag_mean", _bag(mode="mean"), tokens(L), 4, ("EmbeddingBag",)), "0.weight"),
    (Case("bag_mean_padding", _bag(mode="mean", padding_idx=0), tokens(L, padded=True), 4,
          ("EmbeddingBag",)), "0.weight"),
    (Case("bag_max", _bag(mode="max"), tokens(L), 4, ("EmbeddingBag",)), "0.weight"),
    (Case("bag_max_padding_empty_bag", _bag(mode="max", padding_idx=0), _empty_second_bag, 4,
          ("EmbeddingBag",)), "0.weight"),
    (Case("bag_weights",
          lambda: Keywords(WeightedBag(nn.EmbeddingBag(VOCAB, 4, mode="sum")), nn.Tanh(),
                           nn.Linear(4, 4)),
          keywords(tokens=tokens(L), weights=x(L)), 4, ("EmbeddingBag",)), "body.bag.weight"),
    (Case("flat_one_bag_each", _flat(1), tokens(L), 4, ("EmbeddingBag",)), "0.bag.weight"),
    (Case("flat_two_bags_each", _flat(2), tokens(L), 4, ("EmbeddingBag",)), "0.bag.weight"),
]}


def _rows(provider: TorchProvider, cotangents: np.ndarray) -> np.ndarray:
    """G (N, P) of the provider's rows, row n as G^T e_n."""
    rows = provider.per_sample_rows(torch.from_numpy(cotangents))
    return np.stack([rows.rmatvec(torch.from_numpy(e)).numpy() for e in np.eye(N)])


def _assert_exact(g: np.ndarray, expected: np.ndarray) -> None:
    bound = rows_gamma(expected.shape[1]) * np.linalg.norm(expected)
    assert np.linalg.norm(g - expected) <= bound


@pytest.mark.parametrize("route", ["auto", "ghost", "hooks"])
@pytest.mark.parametrize("name", list(CASES))
def test_the_bag_takes_its_layer_route_and_its_rows_equal_the_loop(name: str, route: str
                                                                   ) -> None:
    case, weight = CASES[name]
    ref = loop_reference(case)
    model, inputs, _ = case.build()
    model.eval()
    provider = TorchProvider(model, inputs, per_sample=route)
    g = _rows(provider, ref.logit_grads)
    assert provider.routes[weight] in LAYER_ROUTES, provider.fallbacks
    assert provider.fallbacks == ()
    assert provider.certified.certificate is not None  # certified, not redone by the loop
    _assert_exact(g, ref.grads)


def test_offsets_computed_from_the_batch_fall_back_by_name() -> None:
    ref = reference("embedding_bag_offsets")
    model, inputs, _ = ref.case.build()
    model.eval()
    provider = TorchProvider(model, inputs, per_sample="auto")
    g = _rows(provider, ref.logit_grads)
    assert provider.routes["body.bag.weight"] not in LAYER_ROUTES
    assert any("body.bag.weight" in f and "embedding_bag: offsets" in f
               for f in provider.fallbacks), provider.fallbacks
    _assert_exact(g, ref.grads)


@pytest.mark.parametrize("name", list(CASES))
def test_the_certificates_tangent_equals_reverse_mode(name: str) -> None:
    model, inputs, _ = CASES[name][0].build()
    model.eval()
    adapter = Adapter(model, (), (), kwargs=inputs) if isinstance(inputs, dict) else \
        Adapter(model, (inputs,), (0,))
    theta = adapter.params_vector()
    v = torch.randn(theta.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def logits(th: torch.Tensor) -> torch.Tensor:
        return adapter.sub_batch_logits(adapter.unflatten(th), slice(None))

    got, route, _ = reference_tangents(adapter, v, route="forward")
    jac = torch.func.jacrev(logits)(theta)
    want = jac @ v
    bound = 2 * (L + 4 + 3) * torch.finfo(torch.float64).eps / 2 * float(
        torch.linalg.vector_norm(jac) * torch.linalg.vector_norm(v))
    assert route == "forward"
    assert float(torch.linalg.vector_norm(got - want.reshape(got.shape))) <= bound
    assert float(torch.linalg.vector_norm(want)) > 1e3 * bound  # the test can fail
