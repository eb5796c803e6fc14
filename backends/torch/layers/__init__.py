r"""The layer registry: one :class:`LayerKind` per kind of torch layer, keyed by module type.

Each kind (one module per kind below) holds what the per-sample routes and K-FAC need from
its layer: refusals (``refuse``, ``refuse_call``), per-sample input features (``inputs``),
per-sample gradient parts (``factors``: :class:`Outer` factors or materialised
:class:`Rows`), and a cost entry (``cost``). :func:`assemble` turns the parts of every use of
a parameter into one block of :class:`backends.torch.per_sample.rows.GhostRows`;
:mod:`.kronecker` turns them into K-FAC factors; :class:`Recorder` is a reference engine
driving the contract.

================================  ===============================  =========================
module                            per-sample gradient              kind
================================  ===============================  =========================
``nn.Linear`` (any leading axes)  weight b^T a, bias sum_t b       ``Linear``
``nn.Conv1d/2d/3d``               per group b^T patches            ``Convolution``
``nn.ConvTranspose1d/2d/3d``      per group x^T (b patches)        ``TransposedConvolution``
``nn.Embedding``                  sum_t e_i b^T                    ``Embedding``
``nn.EmbeddingBag``               sum_p e_i (w_p b_bag)^T; rows    ``EmbeddingBag``
``nn.LayerNorm``, ``nn.RMSNorm``  rows sum_t b xhat, sum_t b       ``LastAxesNorm``
``nn.GroupNorm``                  rows per channel                 ``GroupNorm``
``nn.InstanceNorm1d/2d/3d``       rows per channel                 ``InstanceNorm``
``nn.(Sync)BatchNorm*`` (eval)    rows per channel                 ``BatchNorm``
``nn.MultiheadAttention``         q, k, v row blocks (decomposed)  ``Attention``
================================  ===============================  =========================
"""

from __future__ import annotations

from .attention import Attention
from .blocks import ROUTES, DenseBlock, FactorBlock, SplitBlock, TiedBlock, assemble, shapes_of
from .capture import Call, Recorder
from .channel_norm import BatchNorm, GroupNorm, InstanceNorm
from .conv_transpose import TransposedConvolution
from .convolution import Convolution
from .cost import BALANCE, Cost, PartShape, Work, factor_cost, tied_cost
from .embedding import Embedding
from .embedding_bag import EmbeddingBag
from .kronecker import (
    KroneckerPart,
    diagonal,
    grad_factors,
    input_factors,
    joint,
    kronecker,
    kronecker_ready,
)
from .layer_norm import LastAxesNorm
from .linear import Linear
from .parts import Grad, Outer, Part, Rows, materialise
from .registry import (
    MODES,
    Captured,
    LayerKind,
    Tap,
    describe,
    kind_of,
    register,
    table,
    unregistered,
)

__all__ = [
    "BALANCE",
    "MODES",
    "ROUTES",
    "Attention",
    "BatchNorm",
    "Call",
    "Captured",
    "Convolution",
    "Cost",
    "DenseBlock",
    "Embedding",
    "EmbeddingBag",
    "FactorBlock",
    "Grad",
    "GroupNorm",
    "InstanceNorm",
    "KroneckerPart",
    "LastAxesNorm",
    "LayerKind",
    "Linear",
    "Outer",
    "Part",
    "PartShape",
    "Recorder",
    "Rows",
    "SplitBlock",
    "Tap",
    "TiedBlock",
    "TransposedConvolution",
    "Work",
    "assemble",
    "describe",
    "diagonal",
    "factor_cost",
    "grad_factors",
    "input_factors",
    "joint",
    "kind_of",
    "kronecker",
    "kronecker_ready",
    "materialise",
    "register",
    "shapes_of",
    "table",
    "tied_cost",
    "unregistered",
]
