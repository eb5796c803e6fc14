r"""Data-parallel exact Gram-form steps on ``torch.distributed``: one step on R ranks, as on one.

When ``torch.distributed`` is initialised, :class:`backends.IEF`, ``EF``, ``SF`` and ``NGD``
read the batch as the union of the R ranks' shards (rank r holds N_r samples, any sizes,
N = sum_r N_r; rank order = sample order) and take exactly the single-process step on the
concatenated batch: the same N x N Gram matrix, solve, near-duplicate filter, sampled labels
(SF: uniforms drawn for the GLOBAL sample index), diagnostics and loss. The update is reduced
to the same bytes on every rank, so the parameters stay identical.

What is sent per step (bytes sent by one rank, payload only; b = bytes per float of the rows,
N_r = this rank's samples, K = SF's labels per sample; an all-reduce of S bytes counts
2 (R - 1) S / R, a ring all-gather of S bytes per rank (R - 1) S; control messages of a few
hundred bytes -- the error/size agreements, the layout, the shapes -- are not counted):

=======================  ==================================================================
quantity                 collective and volume per rank
=======================  ==================================================================
s (IEF, EF)              all-gather, (R - 1) N_r b
Gram matrix G G^T        every parameter block (a layer) has an owner rank; each rank sends
                         its piece of the blocks it does not own to their owners (one
                         packed gather per owner), about (R - 1) / R of: N_r T (d_in +
                         d_out) b per layer whose factors are the smaller, else
                         N_r size b (its materialised rows) (vmap's dense rows: N_r P b in R
                         column slices); then an all-reduce of the owners' N x N partial
                         sums, 2 (R - 1) N^2 8 / R
G^T w (update, g)        all-reduce, 2 (R - 1) P b / R: IEF and EF once; SF twice (g and
                         the Woodbury back-substitution); NGD once for g
G v (SF's Woodbury rhs)  all-gather, (R - 1) K N_r b
F v (NGD)                an all-reduce of 2 (R - 1) P b / R per CG iteration
SF's sampled rows        their Gram matrix as above, with K N_r rows per rank
=======================  ==================================================================

So the bytes of an iEF step are those of one DDP gradient all-reduce (the G^T w term) plus
the layer quantities of the Gram matrix, which the ghost route keeps at N_r T (d_in + d_out)
per layer instead of N_r d_in d_out. The owners' Gram work is split by layer, the weighted
sum by sample; the N x N solve is repeated on every rank on identical bytes (O(N^3), small
next to the rest for N << P). :attr:`ProcessGroupComm.bytes_sent` is the counted total of a
step, reported as ``diagnostics["bytes_sent"]``.

Failure protocol: the step's local phases (closure, forward, backward, loss) run inside
:meth:`ProcessGroupComm.agree`, which exchanges an ok/error flag (and the shard's size) on
every rank before any data collective; an error on one rank makes every rank raise the same
exception type and message ("rank r of R at step t: ...") with the parameters untouched.
Everything after the agreement runs on identical bytes, so a deterministic error (a singular
Gram matrix at zero damping, a non-finite update) is raised by every rank at the same point;
a last exchange compares the update norms and step sizes before anything is applied. A
rank that fails outside these phases (e.g. out of memory inside a collective's computation)
cannot be agreed on: the others wait until the process group's timeout
(``init_process_group(timeout=...)``), which bounds every collective.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import array_api_compat
import torch
import torch.distributed as dist

from .rows import DistributedRows, pad

__all__ = [
    "DistributedRows",
    "IgnoredShardLoss",
    "LocalComm",
    "ProcessGroupComm",
    "communicator",
]


def communicator(distributed: bool | None, process_group: Any) -> LocalComm | ProcessGroupComm:
    """The optimisers' communicator: ``distributed`` None = on when torch.distributed is up."""
    if distributed not in (None, True, False):
        raise TypeError(f"distributed must be None, True or False, got {distributed!r}")
    up = dist.is_available() and dist.is_initialized()
    if distributed is False:
        if process_group is not None:
            raise ValueError("process_group was given but distributed=False: pass one of them")
        return LocalComm()
    if not up:
        if distributed or process_group is not None:
            raise ValueError(
                "distributed=True (or a process_group) but torch.distributed is not "
                "initialised: call torch.distributed.init_process_group first"
            )
        return LocalComm()
    return ProcessGroupComm(process_group)


class LocalComm:
    """The single-process communicator: every method is the identity."""

    sharded = False

    def __init__(self) -> None:
        self.num_samples = 0

    @contextlib.contextmanager
    def agree(self, step: int) -> Iterator[LocalComm]:
        yield self

    def declare(self, num_samples: int, labelled: bool, params: Sequence[Any],
                names: Sequence[str]) -> None:
        self.num_samples = num_samples

    def share(self, batch: Any) -> Any:
        return batch

    def rows(self, rows: Any) -> Any:
        return rows

    def sampling_input(self, loss: Any, logits: torch.Tensor, key: int, k: int) -> Any:
        return key

    def fisher_vp(self, fvp: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
        return fvp

    def check_update(self, norm: float, lr: float) -> None:
        return None

    def diagnostics(self) -> dict[str, Any]:
        return {}


class IgnoredShardLoss:
    """The loss of a shard whose every label is ignored: zero loss, gradients and curvature.

    Such a shard is legal (the global batch has labels elsewhere) but ngdref's sequence
    losses refuse all-ignored targets; everything else is delegated to ``loss``.
    """

    def __init__(self, loss: Any) -> None:
        self._loss = loss

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loss, name)

    def check(self, logits: torch.Tensor, targets: torch.Tensor) -> Any:
        return array_api_compat.array_namespace(logits)

    def value(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return logits.new_zeros(logits.shape[0])

    def grad(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(logits)

    def value_and_grad(self, logits: torch.Tensor, targets: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.value(logits, targets), self.grad(logits, targets)

    def hessian_vp(self, logits: torch.Tensor, targets: torch.Tensor,
                   vectors: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(vectors)

    def sample(self, logits: torch.Tensor, key: Any, *, num_samples: int = 1,
               targets: torch.Tensor) -> torch.Tensor:
        return targets.expand(num_samples, *targets.shape)  # every draw stays ignored


def _rebuild_error(module: str, name: str, message: str) -> Exception:
    """An exception of the named class with ``message`` (RuntimeError if it cannot be made)."""
    try:
        cls = importlib.import_module(module)
        for part in name.split("."):
            cls = getattr(cls, part)
        if isinstance(cls, type) and issubclass(cls, Exception):
            return cls(message)
    except Exception:
        pass
    return RuntimeError(f"{module}.{name}: {message}")


class ProcessGroupComm:
    """Collectives of one step over a process group (None: the default group)."""

    sharded = True

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise ValueError("process_group: this process is not a member of the group")
        self.world = dist.get_world_size(group)
        self.sizes: list[int] = []
        self.bytes_sent = 0
        self._declared: tuple[int, bool, Any] | None = None
        self._checked = False
        self.device = torch.device("cpu")  # of the model's parameters (NCCL: a GPU)

    # ---- control: agreement on errors and shard sizes -------------------------------------
    @contextlib.contextmanager
    def agree(self, step: int) -> Iterator[ProcessGroupComm]:
        """Run a local phase; then every rank learns whether any rank raised, and raises too."""
        error: Exception | None = None
        try:
            yield self
        except Exception as exc:
            error = exc
        mine = None if error is None else (
            type(error).__module__, type(error).__qualname__, str(error))
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, (mine, self._declared), group=self.group)
        self._declared = None
        for rank, (failure, _) in enumerate(gathered):
            if failure is not None:
                message = f"rank {rank} of {self.world} at step {step}: {failure[2]}"
                raise _rebuild_error(failure[0], failure[1], message) from error
        declared = [d for _, d in gathered]
        if all(d is not None for d in declared):
            self._settle(declared)

    def declare(self, num_samples: int, labelled: bool, params: Sequence[torch.Tensor],
                names: Sequence[str]) -> None:
        """This rank's shard size, whether it has a label, and (first step) its model."""
        self.bytes_sent = 0
        self.device = params[0].device
        signature = None if self._checked else [
            (name, tuple(p.shape), str(p.dtype)) for name, p in zip(names, params, strict=True)
        ]
        self._declared = (int(num_samples), bool(labelled), signature)

    def _settle(self, declared: list[tuple[int, bool, Any]]) -> None:
        if not self._checked:
            first = declared[0][2]
            for rank, (_, _, signature) in enumerate(declared):
                if signature != first:
                    raise ValueError(_model_mismatch(first, signature, rank))
            self._checked = True
        if not any(labelled for _, labelled, _ in declared):
            raise ValueError(
                "targets: every label on every rank equals ignore_index, so the global batch "
                "has no loss and no gradient; the parameters were not changed"
            )
        self.sizes = [n for n, _, _ in declared]

    @property
    def num_samples(self) -> int:
        """N = sum of the shards' sizes (after the first agreement of the step)."""
        return sum(self.sizes)

    @property
    def offset(self) -> int:
        return sum(self.sizes[: self.rank])

    # ---- data collectives -----------------------------------------------------------------
    def gather(self, tensor: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` along axis 0 (rank r's has ``sizes[r]`` rows)."""
        sizes = list(self.sizes if sizes is None else sizes)
        longest = max(sizes)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        self.bytes_sent += (self.world - 1) * padded.numel() * padded.element_size()
        return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])

    def gather_to(
        self, owner: int, flat: torch.Tensor, lengths: Sequence[int]
    ) -> list[torch.Tensor] | None:
        """Every rank's 1-d ``flat`` (rank r's of ``lengths[r]`` entries) at rank ``owner``,
        one tensor per rank (None elsewhere)."""
        padded = pad(flat, [], max(lengths))
        parts = [torch.empty_like(padded) for _ in range(self.world)] if self.rank == owner \
            else None
        dst = owner if self.group is None else dist.get_global_rank(self.group, owner)
        dist.gather(padded, parts, dst=dst, group=self.group)
        if parts is None:
            self.bytes_sent += padded.numel() * padded.element_size()
            return None
        return [part[:n] for part, n in zip(parts, lengths, strict=True)]

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, group=self.group)
        self.bytes_sent += 2 * (self.world - 1) * out.numel() * out.element_size() // self.world
        return out

    def gather_objects(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    # ---- the optimiser's hooks ------------------------------------------------------------
    def share(self, batch: Any) -> Any:
        """The batch of the whole group: global rows, s (N,) and loss (the shards' sum)."""
        loss = self.all_sum(torch.tensor([batch.loss], dtype=torch.float64, device=self.device))
        return dataclasses.replace(
            batch,
            rows=self.rows(batch.rows),
            logit_grad_sq_norms=self.gather(batch.logit_grad_sq_norms),
            loss=float(loss[0]),
        )

    def rows(self, rows: Any) -> DistributedRows:
        return DistributedRows(rows, self)

    def sampling_input(self, loss: Any, logits: torch.Tensor, key: int, k: int) -> torch.Tensor:
        """This shard's slice of the uniforms the single process would draw from ``key``.

        Must match :meth:`ngdref.LogitLoss.sample`'s int-key route: Mersenne Twister floats
        in row-major order of ``uniforms_shape`` (K, N, ...), cast, kept below 1.
        """
        shape = loss.uniforms_shape(logits, k)
        full = (k, self.num_samples, *shape[2:])
        rng = random.Random(key)
        flat = [rng.random() for _ in range(int(torch.Size(full).numel()))]
        uniforms = torch.tensor(flat, dtype=logits.dtype, device=logits.device).reshape(full)
        uniforms = uniforms.clamp(max=1.0 - torch.finfo(logits.dtype).eps / 2)
        return uniforms[:, self.offset:self.offset + shape[1]].contiguous()

    def fisher_vp(self, fvp: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
        """v -> sum over ranks of the shards' F_r v (one all-reduce of P per product)."""
        return lambda v: self.all_sum(fvp(v))

    def check_update(self, norm: float, lr: float) -> None:
        """Before applying: every rank must hold the same update norm and step size."""
        mine = torch.tensor([[norm, lr]], dtype=torch.float64, device=self.device)
        seen = self.gather(mine, [1] * self.world)
        agree = (seen == seen[0]) | (torch.isnan(seen) & torch.isnan(seen[0]))
        if not bool(torch.all(agree)):
            raise RuntimeError(
                f"the ranks computed different updates or step sizes ((norm, lr) per rank: "
                f"{seen.tolist()}): the model, its inputs or the hyperparameters are not "
                "replicated; the parameters were not changed"
            )

    def diagnostics(self) -> dict[str, Any]:
        return {"world_size": self.world, "num_samples": self.num_samples,
                "bytes_sent": self.bytes_sent}


def _model_mismatch(first: list, other: list, rank: int) -> str:
    if len(first) != len(other):
        return (f"model: rank {rank} has {len(other)} trainable parameters, rank 0 has "
                f"{len(first)}; every rank must hold the same model")
    for mine, theirs in zip(first, other, strict=True):
        if mine != theirs:
            return (f"model: rank {rank}'s trainable parameter {theirs} differs from rank 0's "
                    f"{mine} (name, shape, dtype); every rank must hold the same model")
    return "model: the ranks' models differ"
