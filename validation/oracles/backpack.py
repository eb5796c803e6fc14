"""BackPACK's per-sample gradients and GGN products against ngdref's.

``BatchGrad`` against the reference per-sample gradients G;
``ggn_vector_product`` (BackPACK's R-op, loss Hessian, L-op) and
``SqrtGGNExact`` (as V_bp^T (V_bp v)) against :func:`ngdref.fisher_vp`.
BackPACK runs on the models it supports (``nn.Linear``, ``nn.Conv2d``,
``nn.Tanh``, ``nn.Flatten`` stacks) on deep copies (``extend`` installs
hooks for good). Conventions: the docstring of :mod:`validation.oracles.peers`.
"""

from __future__ import annotations

import copy
import math

import numpy as np

from validation.independent.references import relative
from validation.oracles.conversions import TorchLoss, batch_size, logits_of, torch_loss, trainable
from validation.oracles.setup import OracleCheck, OracleSetup

__all__ = ["backpack_checks"]

_SQRT_GGN = "backpack.SqrtGGNExact"
_SQRT_GGN_QUANTITY = "V^T V v vs ngdref.fisher_vp"


def backpack_checks(
    setup: OracleSetup, vectors: np.ndarray, fisher: np.ndarray
) -> list[OracleCheck]:
    """BatchGrad, GGN-vector product and SqrtGGNExact rows; ``fisher`` is F ``vectors``."""
    spec = torch_loss(setup.loss)
    return [
        _batch_grad_check(setup, spec),
        _ggn_product_check(setup, spec, vectors, fisher),
        _sqrt_ggn_check(setup, spec, vectors, fisher),
    ]


def _batch_grad_check(setup: OracleSetup, spec: TorchLoss) -> OracleCheck:
    """Per-sample gradients by BatchGrad on an extended copy of the model against G."""
    import torch
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad

    net = extend(copy.deepcopy(setup.module))
    n = batch_size(setup.inputs)
    loss = spec.module(spec.to_loss_input(logits_of(net, setup.inputs)), setup.targets)
    with backpack(BatchGrad()):
        loss.backward()
    grads = torch.cat([p.grad_batch.reshape(n, -1) for p in trainable(net)], dim=1)
    return OracleCheck(
        "backpack.BatchGrad", "per-sample grads vs reference G",
        relative(grads.detach().numpy() / spec.scale, setup.per_sample_grads), setup.tolerance,
    )


def _ggn_product_check(
    setup: OracleSetup, spec: TorchLoss, vectors: np.ndarray, fisher: np.ndarray
) -> OracleCheck:
    """GGN-vector products by BackPACK's autodiff (R-op, loss Hessian, L-op) against F V."""
    import torch
    from backpack.hessianfree.ggnvp import ggn_vector_product

    output = logits_of(setup.module, setup.inputs)
    loss = spec.module(spec.to_loss_input(output), setup.targets)
    plain = trainable(setup.module)
    columns = []
    for k in range(vectors.shape[1]):
        pieces = torch.split(torch.from_numpy(vectors[:, k]), [p.numel() for p in plain])
        v = [x.reshape(p.shape) for x, p in zip(pieces, plain, strict=True)]
        product = ggn_vector_product(loss, output, setup.module, v)
        columns.append(torch.cat([x.reshape(-1) for x in product]).detach().numpy())
    return OracleCheck(
        "backpack.ggn_vector_product", "F v vs ngdref.fisher_vp",
        relative(np.stack(columns, axis=1) / spec.scale, fisher), setup.tolerance,
    )


def _sqrt_ggn_check(
    setup: OracleSetup, spec: TorchLoss, vectors: np.ndarray, fisher: np.ndarray
) -> OracleCheck:
    """The GGN's square root backpropagated by BackPACK's module extensions, V^T (V V)."""
    import torch
    from backpack import backpack, extend
    from backpack.extensions import SqrtGGNExact

    if setup.sequence:
        return OracleCheck(
            _SQRT_GGN, _SQRT_GGN_QUANTITY, math.nan, math.nan,
            skipped="needs the loss applied to the model output itself (no reshape)",
        )
    net = extend(copy.deepcopy(setup.module))
    loss_module = extend(copy.deepcopy(spec.module))
    loss = loss_module(logits_of(net, setup.inputs), setup.targets)
    try:
        with backpack(SqrtGGNExact()):
            loss.backward()
    except NotImplementedError as err:  # BackPACK declines, e.g. BCE with C > 1
        return OracleCheck(_SQRT_GGN, _SQRT_GGN_QUANTITY, math.nan, math.nan,
                           skipped=f"BackPACK: {err}")
    factors = [p.sqrt_ggn_exact for p in trainable(net)]
    root = torch.cat([f.reshape(f.shape[0] * f.shape[1], -1) for f in factors], dim=1)
    root = root.detach().numpy()
    product = root.T @ (root @ vectors) / spec.scale
    return OracleCheck(_SQRT_GGN, _SQRT_GGN_QUANTITY, relative(product, fisher), setup.tolerance)
