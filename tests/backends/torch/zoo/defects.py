"""The open defects of the per-sample engine on the zoo: ONE table (case, route, quantity) ->
why today's code fails that run. Each entry marks its test ``xfail(strict=True)``, so a fix
turns it into an XPASS failure until the entry is deleted: the table can only shrink.

Routes: "auto", "ghost", "hooks", "vmap", "loop" (:mod:`.test_zoo`), and "-" for the K-FAC
family, which has none (:mod:`.test_kfac_zoo`). Quantities: gram, gv, gtw (the rows),
ief, ef, sf (optimiser steps), kfac, ekfac, iekfac (the K-FAC optimisers' steps; "ekfac" also
marks the eKFAC curvature's blocks against the per-sample gradients).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pytest
from torch import nn

from .models import CASES

ROUTES = ("auto", "ghost", "hooks", "vmap", "loop")
ROW_QUANTITIES = ("gram", "gv", "gtw")
STEP_QUANTITIES = ("ief", "ef", "sf")
KFAC_METHODS = ("kfac", "ekfac", "iekfac")
NO_ROUTE = "-"

_RUNS = (*ROW_QUANTITIES, *STEP_QUANTITIES)
#: every run of one case but "loop" (skipped while it does not exist) and the provider's
#: nn.Linear-hooks rows (their own entry below: on a model that is not all nn.Linear they
#: refuse without naming anything)
_ROUTES = tuple(
    (route, quantity) for route in ROUTES if route != "loop" for quantity in _RUNS
    if not (route == "hooks" and quantity in ROW_QUANTITIES)
)
#: ... and the K-FAC family's runs
_EVERY = _ROUTES + tuple((NO_ROUTE, method) for method in KFAC_METHODS)
#: the optimisers' routes through the layer pass (one forward and one backward pass)
_LAYER_PASS_STEPS = tuple((route, q) for route in ("auto", "ghost", "hooks")
                          for q in STEP_QUANTITIES)


def _family(cases: Iterable[str], runs: Iterable[tuple[str, str]], reason: str
            ) -> dict[tuple[str, str, str], str]:
    return {(case, route, quantity): reason for case in cases for route, quantity in runs}


def _all_linear(name: str) -> bool:
    """Every trainable parameter is the weight or bias of an exact nn.Linear."""
    model, _, _ = CASES[name].build()
    owners = {id(p): (m, attr) for m in model.modules()
              for attr, p in m.named_parameters(recurse=False)}
    return all(type(owners[id(p)][0]) is nn.Linear and owners[id(p)][1] in ("weight", "bias")
               for p in model.parameters() if p.requires_grad)


def _defects() -> dict[tuple[str, str, str], str]:
    seq_first = "silent wrong: (T, N, d) with T == N taken as batch-first (issue 16.1)"
    rnn = "torch-internal: torch.func cannot run {} (needs per_sample='loop', issue 16.2)"
    coupled = "silently ran {}, no per-sample meaning: must refuse by name (issue 16.4)"
    internal = "torch-internal error on {} instead of exact rows or a named refusal"
    return {
        # the batch axis is found by its length (t.shape[0] == N in the watch and in
        # LayerPass._features); the provider's nn.Linear hooks get it wrong as well
        **_family(("linear_seq_first", "linear_tagger_seq_first"),
                  [(r, q) for r in ("auto", "ghost", "hooks") for q in _RUNS], seq_first),
        # Embedding, LayerNorm, RMSNorm and the transformer layers' Linears: only the layer
        # pass (the provider's "ghost", every optimiser route but "vmap")
        **_family(("embedding_seq_first", "layer_norm_seq_first", "rms_norm_seq_first",
                   "encoder_layer_seq_first", "decoder_layer_seq_first",
                   "decoder_stack_seq_first", "transformer_seq2seq_seq_first"),
                  [("ghost", q) for q in ROW_QUANTITIES] + list(_LAYER_PASS_STEPS), seq_first),
        # the optimisers and the provider force eval mode: running statistics, silently
        **_family(("batch_norm1d_train", "batch_norm2d_train"), _EVERY,
                  coupled.format("BatchNorm in train mode")),
        **_family(("embedding_scale_grad_by_freq",), _ROUTES,
                  coupled.format("Embedding(scale_grad_by_freq=True)")),
        # vmap: "output with shape [1, H] doesn't match the broadcast shape [N, 1, H]" (an
        # in-place update of a batch-of-one state); GRUCell's zero state in the layer pass's
        # module vmap: "Input batch size 1 doesn't match hidden0 batch size 4";
        # pack_padded_sequence: "stack expects each tensor to be equal size"
        **_family(("rnn_batch_first", "rnn_seq_first_bidirectional", "gru_batch_first",
                   "gru_seq_first_bidirectional", "lstm_batch_first",
                   "lstm_seq_first_bidirectional", "lstm_proj", "rnn_cell",
                   "gru_cell_zero_state", "lstm_cell_zero_state"), _ROUTES,
                  rnn.format("nn.RNN, nn.GRU, nn.LSTM or their cells")),
        **_family(("lstm_packed",), _ROUTES, rnn.format("packed sequences")),
        # vmap: "embedding_renorm_ is not possible"; layer pass: "a view ... has been
        # modified inplace" (the forward renormalises the weight in place)
        **_family(("embedding_max_norm",), _ROUTES, internal.format("Embedding(max_norm=...)")),
        # "Could not run aten::view with arguments from the SparseCPU backend"
        **_family(("embedding_sparse",), _ROUTES, internal.format("Embedding(sparse=True)")),
        # vmap: "operators that can support dynamic shape"; layer pass: "offsets[0] has to
        # be 0" (offsets built in the forward pass from the batch)
        **_family(("embedding_bag_offsets",), _ROUTES, internal.format("EmbeddingBag offsets")),
        **{
            (name, "hooks", q): "provider per_sample_method='hooks' refuses a model that is "
                                "not all nn.Linear without naming a parameter or layer"
            for name in CASES if not _all_linear(name) for q in ROW_QUANTITIES
        },
    }


DEFECTS: dict[tuple[str, str, str], str] = _defects()


def params(cases: Mapping[str, Any] | Iterable[str], quantities: Iterable[str],
           routes: Iterable[str] = ROUTES) -> list[Any]:
    """pytest params (name, route, quantity), those in :data:`DEFECTS` marked xfail(strict)."""
    out = []
    for name in cases:
        for route in routes:
            for quantity in quantities:
                reason = DEFECTS.get((name, route, quantity))
                marks = () if reason is None else pytest.mark.xfail(strict=True, reason=reason)
                out.append(pytest.param(name, route, quantity, marks=marks,
                                        id=f"{name}-{route}-{quantity}"))
    return out
