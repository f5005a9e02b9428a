"""Sparse gradients (``nn.Embedding(sparse=True)``): summed sparse, as autograd sums them.

A parameter whose gradient arrives sparse keeps its window's sum sparse, one entry per parameter
here, beside the bucket's dense accumulators (which it never touches): a large vocabulary costs
what torch's own sparse accumulation costs, in time and memory, not a dense pass per micro-batch.
At the window's end the sum is coalesced once; it joins the clipping norm and the non-finite
check, and is stepped by :func:`sgd_step`: SGD without momentum or weight decay touches the
gradient's rows only (what torch's SGD does with a sparse gradient); with either, the update runs
through the dense reference formulas, as torch's SGD then touches every row too.  Adam and AdamW
refuse sparse gradients as torch's do; :class:`~fused_accum.FusedAccumulator` hands the mean to the
optimizer it wraps (``torch.optim.SparseAdam``) as a sparse ``.grad``.  Sparse gradients of bf16 or
fp16 parameters, and under data parallelism, are refused.
"""
from __future__ import annotations

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

    def total(self) -> Tensor:
        """The sum, coalesced (kept so: the next call costs nothing)."""
        if not self.coalesced:
            total = torch.sparse_coo_tensor(torch.cat(self.indices, 1), torch.cat(self.values),
                                            self.size, check_invariants=False).coalesce()
            self.indices, self.values = [total._indices()], [total._values()]
            self.coalesced = True
        return torch.sparse_coo_tensor(self.indices[0], self.values[0], self.size,
                                       is_coalesced=True, check_invariants=False)


class SparseSums:
    """The window's sparse sums, by (bucket, parameter index)."""

    def __init__(self) -> None:
        self.sums: dict[tuple[Bucket, int], SparseSum] = {}

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
        entry = self.sums.get((bucket, i))
        first = entry is None
        if first:
            entry = self.sums[(bucket, i)] = SparseSum(grad.shape, [], [])
        else:
            entry.added = True
        entry.add(grad, weight)
        return first

    def drop(self, bucket: Bucket, i: int) -> None:
        self.sums.pop((bucket, i), None)

    def end_micro_batch(self) -> None:
        for entry in self.sums.values():
            entry.settled, entry.added = True, False

    def restore(self, bucket: Bucket, i: int, total: Tensor, settled: bool, added: bool) -> None:
        total = total.to(bucket.device).coalesce()
        self.sums[(bucket, i)] = SparseSum(total.shape, [total._indices()], [total._values()],
                                           settled=settled, added=added, coalesced=True)

    def reset(self) -> None:
        self.sums.clear()

    def coalesced(self) -> dict[tuple[Bucket, int], Tensor]:
        return {key: entry.total() for key, entry in self.sums.items()}

    def sumsq(self, device: torch.device) -> Tensor:
        """The sum of squares of every sum, on ``device`` (not finite if any element is not)."""
        return torch.stack([t.values().square().sum().to(device)
                            for t in self.coalesced().values()]).sum()


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


def sgd_step(param: Tensor, total: Tensor, momentum_buffer: Tensor | None, step: Tensor, *,
             lr: float | Tensor, momentum: float, dampening: float, weight_decay: float,
             nesterov: bool, maximize: bool, grad_scale: float | Tensor, found_inf: Tensor) -> None:
    """torch.optim.SGD's step of ``param`` with the coalesced sparse gradient ``total * grad_scale``
    (nothing changes where ``found_inf`` is set)."""
    if momentum != 0 or weight_decay != 0:   # every row moves, as in torch: the dense formulas
        reference.sgd_step([param], [total.to_dense()], [momentum_buffer] if momentum else None,
                           [step], None, lr=lr, momentum=momentum, dampening=dampening,
                           weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                           grad_scale=grad_scale, found_inf=found_inf)
        return
    keep = found_inf != 0
    if total.sparse_dim() != 1:   # index_add_ below moves whole rows (an embedding's layout)
        total = total.to_dense().to_sparse(1)
    # One pass over the rows for the factor, one for the skip (a 0-d factor of 0 would turn a
    # non-finite row into NaN where the skipped step must leave the parameter unchanged).
    factor = grad_scale * lr
    factor = factor if maximize else -factor
    update = torch.where(keep, 0.0, total.values() * factor)
    param.index_add_(0, total.indices()[0], update)
    step.add_(torch.where(keep, 0.0, 1.0))
