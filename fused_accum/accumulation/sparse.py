"""Sparse gradients (``nn.Embedding(sparse=True)``): summed sparse, as autograd sums them.

A parameter whose gradient arrives sparse keeps its window's sum sparse, one entry per parameter
here, beside the bucket's dense accumulators (which it never touches): a large vocabulary costs
what torch's own sparse accumulation costs, in time and memory, not a dense pass per micro-batch.
At the window's end the gradients, as they came, join the non-finite check and are stepped by
:func:`sgd_step`: SGD without momentum or weight decay adds them into the gradient's rows (what
torch's SGD does with its sparse ``.grad``, which autograd sums by concatenation, never
coalescing); with either, the sum is coalesced and the update runs through the dense reference
formulas, as torch's SGD then touches every row too.  The norm needs the coalesced sum (a sum of
squares per row): with ``max_grad_norm`` it is computed at the window's end, otherwise when
``grad_norm`` is first read (:class:`DeferredNorm`), so that a window pays for coalescing only
where torch's own clipping would.  Adam and AdamW
refuse sparse gradients as torch's do; :class:`~fused_accum.FusedAccumulator` hands the mean to the
optimizer it wraps (``torch.optim.SparseAdam``) as a sparse ``.grad``.  Sparse gradients of bf16 or
fp16 parameters, and under data parallelism, are refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .buckets import Bucket
from ..kernels import reference


@dataclass
class SparseSum:
    """A parameter's sum of sparse gradients: the (indices, values) of every gradient, concatenated
    into one COO tensor when the window ends (``a + b`` of sparse tensors costs tens of
    milliseconds for a large vocabulary; the concatenation it amounts to, a fraction of one)."""
    size: torch.Size
    indices: list[Tensor]
    values: list[Tensor]
    settled: bool = False  # began before the last step(): zero_grad() cannot drop it whole
    added: bool = False    # grew since the last step()
    coalesced: bool = False   # indices and values hold one coalesced tensor

    def add(self, grad: Tensor, weight: Tensor | None) -> None:
        values = grad._values()
        self.coalesced = False
        self.indices.append(grad._indices())
        self.values.append(values if weight is None else values * weight.to(values.device))

    def joined(self) -> tuple[Tensor, Tensor]:
        """The (indices, values) of every gradient concatenated, uncoalesced (kept so; one
        ``index_add_`` of all rows is several times faster than one per gradient)."""
        if len(self.indices) > 1:
            self.indices, self.values = [torch.cat(self.indices, 1)], [torch.cat(self.values)]
        return self.indices[0], self.values[0]

    def nonfinite(self) -> Tensor:
        """0-d: NaN if any element of any gradient is not finite, else 0 (``x * 0`` is NaN
        exactly for non-finite ``x``; min and max are non-finite if any element is)."""
        values = self.joined()[1]
        if values.numel() == 0:   # no rows (a micro-batch without tokens, a zeroed .grad)
            return values.new_zeros(())
        low, high = torch.aminmax(values)
        return low * 0 + high * 0

    def total(self) -> Tensor:
        """The sum, coalesced (kept so: the next call costs nothing)."""
        if not self.coalesced:
            total = torch.sparse_coo_tensor(*self.joined(), self.size,
                                            check_invariants=False).coalesce()
            self.indices, self.values = [total._indices()], [total._values()]
            self.coalesced = True
        return torch.sparse_coo_tensor(self.indices[0], self.values[0], self.size,
                                       is_coalesced=True, check_invariants=False)


class SparseSums:
    """The window's sparse sums, by (bucket, parameter index)."""

    def __init__(self) -> None:
        self.sums: dict[tuple[Bucket, int], SparseSum] = {}
        self.known: set[tuple[Bucket, int]] = set()   # slots that ever got a sparse gradient

    def __bool__(self) -> bool:
        return bool(self.sums)

    def add(self, bucket: Bucket, i: int, grad: Tensor, weight: Tensor | None,
            label: str, data_parallel: bool) -> bool:
        """Add a sparse gradient; returns whether it began this parameter's sum."""
        if data_parallel:
            raise RuntimeError(f"fused_accum: parameter {label} has a sparse gradient, which "
                               "fused_accum does not reduce across ranks; use a dense embedding "
                               "(sparse=False) under data parallelism")
        if bucket.dtype != torch.float32:
            raise RuntimeError(f"fused_accum: parameter {label} is {bucket.dtype} with a sparse "
                               "gradient; fused_accum steps sparse gradients of float32 "
                               "parameters only (use sparse=False, or keep the embedding fp32)")
        self.known.add((bucket, i))
        entry = self.sums.get((bucket, i))
        first = entry is None
        if first:
            entry = self.sums[(bucket, i)] = SparseSum(grad.shape, [], [])
        else:
            entry.added = True
        entry.add(grad, weight)
        return first

    def touch_zeroed(self, bucket: Bucket) -> set[int]:
        """zero_grad(set_to_none=False) left the sparse parameters of ``bucket`` that held a
        gradient with a zeroed sparse ``.grad`` in torch: one with no gradient in this window
        gets an empty sum, which the step takes as torch takes that ``.grad``.  Returns the
        indices of ``bucket``'s sparse slots (whose zeros are not dense accumulators)."""
        sparse = {i for b, i in self.known.union(self.sums) if b is bucket}
        for i in sparse:
            if bucket.zeroed[i] and (bucket, i) not in self.sums:
                param = bucket.params[i]
                self.sums[(bucket, i)] = SparseSum(
                    param.shape, [torch.empty(1, 0, dtype=torch.long, device=param.device)],
                    [param.new_empty((0, *param.shape[1:]))])
        return sparse

    def drop(self, bucket: Bucket, i: int) -> None:
        self.sums.pop((bucket, i), None)

    def end_micro_batch(self) -> None:
        for entry in self.sums.values():
            entry.settled, entry.added = True, False

    def restore(self, bucket: Bucket, i: int, total: Tensor, settled: bool, added: bool) -> None:
        total = total.to(bucket.device).coalesce()
        self.known.add((bucket, i))
        self.sums[(bucket, i)] = SparseSum(total.shape, [total._indices()], [total._values()],
                                           settled=settled, added=added, coalesced=True)

    def reset(self) -> None:
        self.sums.clear()

    def __iter__(self):
        """(bucket, index, SparseSum) of every sum."""
        return ((bucket, i, entry) for (bucket, i), entry in self.sums.items())

    def coalesced(self) -> dict[tuple[Bucket, int], Tensor]:
        return {key: entry.total() for key, entry in self.sums.items()}

    def nonfinite(self, device: torch.device) -> Tensor:
        """0-d on ``device``: NaN if any gradient has a non-finite element, else 0."""
        flags = [entry.nonfinite().to(device) for entry in self.sums.values()]
        return flags[0] if len(flags) == 1 else torch.stack(flags).sum()

    def sumsq(self, device: torch.device) -> Tensor:
        """The sum of squares of every sum, on ``device`` (not finite if any element is not)."""
        return _sumsq(self.sums.values(), device)


def _sumsq(sums, device: torch.device) -> Tensor:
    return torch.stack([entry.total().values().square().sum().to(device)
                        for entry in sums]).sum()


class DeferredNorm:
    """A window's gradient norm whose sparse part is computed when first read: it keeps the
    window's sparse sums (what torch's ``.grad`` would hold) until then, or until the next window
    ends and replaces it."""

    def __init__(self, dense_sumsq: Tensor, sums: SparseSums, scale: float | Tensor) -> None:
        self.dense_sumsq, self.scale = dense_sumsq, scale
        self.sums = list(sums.sums.values())

    def value(self) -> Tensor:
        device = self.dense_sumsq.device
        return (self.dense_sumsq + _sumsq(self.sums, device)).sqrt() * self.scale


def add_sparse(window, bucket: Bucket, i: int, grad: Tensor, record, data_parallel: bool) -> None:
    """A sparse gradient into ``window``'s sums, recorded in its backward pass ``record`` (a
    :class:`fused_accum.accumulation.passes.BackwardPass`, or None outside a pass)."""
    weight = None if window.micro_weight is None else window.micro_weight[bucket.device]
    first = window.sparse.add(bucket, i, grad, weight, bucket.labels[i], data_parallel)
    if record is not None:
        if first:
            record.sparse_firsts.append((bucket, i))
        else:
            record.added = True
    window.arrived = True


def split_sparse(groups: list, record, add) -> list:
    """The collector queues sparse gradients for Python: ``add`` them (bucket, index, gradient,
    record), return the dense rest of ``groups``."""
    dense = []
    for bucket, indices, grads in groups:
        if all(g.layout is torch.strided for g in grads):
            dense.append((bucket, indices, grads))
            continue
        kept = ([], [])
        for i, g in zip(indices, grads):
            if g.layout is torch.strided:
                kept[0].append(i)
                kept[1].append(g)
            else:
                add(bucket, i, g, record)
        if kept[0]:
            dense.append((bucket, *kept))
    return dense


def sgd_step(param: Tensor, grad: SparseSum, momentum_buffer: Tensor | None, step: Tensor, *,
             lr: float | Tensor, momentum: float, dampening: float, weight_decay: float,
             nesterov: bool, maximize: bool, grad_scale: float | Tensor, found_inf: Tensor) -> None:
    """torch.optim.SGD's step of ``param`` with the sparse gradient ``grad``'s sum times
    ``grad_scale`` (nothing changes where ``found_inf`` is set)."""
    if momentum != 0 or weight_decay != 0:   # every row moves, as in torch: the dense formulas
        reference.sgd_step([param], [grad.total().to_dense()],
                           [momentum_buffer] if momentum else None, [step], None, lr=lr,
                           momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                           nesterov=nesterov, maximize=maximize, grad_scale=grad_scale,
                           found_inf=found_inf)
        return
    live = (found_inf == 0).to(found_inf.dtype)   # (GradScaler hands a sum of flags: 2 is set too)
    factor = grad_scale * lr
    factor = live * (factor if maximize else -factor)
    indices, values = grad.joined()
    if indices.shape[0] != 1:   # index_add_ below moves whole rows (an embedding's layout)
        total = grad.total().to_dense().to_sparse(1)
        indices, values = total.indices(), total.values()
    # A skipped step's factor of 0 makes a non-finite value NaN, and only then: NaN -> 0.
    update = (values * factor).nan_to_num_(0.0, math.inf, -math.inf)
    param.index_add_(0, indices[0], update)
    step.add_(live)
