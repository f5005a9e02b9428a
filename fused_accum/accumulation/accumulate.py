"""Accumulating groups of gradients into a window's sums: one backend call per group.

The fp32 adoption rule, stated once: in a window whose accumulate weight is 1 (no ``num_items``
weight or loss scale to apply), the first gradient of an fp32 parameter held in a per-parameter
(not flat) accumulator, if it is fp32 and contiguous and was made by autograd (no one else holds
it), becomes that accumulator without a copy.  :func:`may_adopt` is the per-bucket half of the
rule, which planned passes hand the C++ collector as their plan's ``adopt``
(:class:`fused_accum.accumulation.collector_bridge.PlanEntry`); the per-gradient half is
:func:`adopt` here and its one-line twin in csrc/autograd/collector.cpp (``p.adopt && ...``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .buckets import Bucket
from .window import Window

_FP32 = torch.float32

Group = tuple[Bucket, list[int], list[Tensor]]   # a bucket, parameter indices, their gradients


def may_adopt(bucket: Bucket, window: Window) -> bool:
    """Whether first gradients of ``bucket`` may become its accumulators in this micro-batch."""
    return not bucket.flat and window.micro_weight is None


def adopt(bucket: Bucket, indices: list[int], grads: list[Tensor], first: list[bool],
          firsts: list[tuple[Bucket, int]] | None) -> tuple[list, list, list]:
    """Adopt fp32 first gradients as their accumulators (no copy); return the rest."""
    rest: tuple[list, list, list] = ([], [], [])
    touched, adopted = bucket.touched, bucket.adopted
    for i, grad, is_first in zip(indices, grads, first):
        if is_first and grad.dtype is _FP32 and grad.is_contiguous():
            adopted[i] = grad
            touched[i] = True
            if firsts is not None:
                firsts.append((bucket, i))
        else:
            rest[0].append(i)
            rest[1].append(grad)
            rest[2].append(is_first)
    return rest


def accumulate(window: Window, groups: list[Group], firsts: list[tuple[Bucket, int]] | None = None,
               adopt_firsts: bool = False) -> bool:
    """Accumulate ``groups`` into the window's sums, one backend call per group; returns whether
    any gradient was added into an earlier sum.  ``adopt_firsts``: the gradients are autograd's
    (see the module's rule).  ``firsts`` collects the slots touched first."""
    added = False
    stream = None   # the current CUDA stream, looked up once per call and device
    for bucket, indices, grads in groups:
        touched = bucket.touched
        first = [not touched[i] for i in indices]
        any_first = True in first   # False in a window's later micro-batches: the fast path
        if any_first and adopt_firsts and may_adopt(bucket, window):
            indices, grads, first = adopt(bucket, indices, grads, first, firsts)
            if not indices:
                continue
            any_first = True in first
        device = bucket.device
        weight = window.micro_weight[device] if window.micro_weight is not None else window.ones[device]
        if bucket.flat or not any_first:
            accs = bucket.acc_views(indices)
        else:
            accs = [bucket.new_accumulator(i) if f else bucket.adopted[i]
                    for i, f in zip(indices, first)]
        sumsq = fold_target(bucket, indices, window)
        bucket.backend.accumulate(grads, accs, first, weight, window.found_inf[device], sumsq)
        if device.type == "cuda":
            # The gradients are freed right after this launch; if autograd made them on
            # another stream (a forward under torch.cuda.stream(s)), that stream must not
            # reuse their memory before this stream's kernel has read it.
            if stream is None or stream.device != device:
                stream = torch.cuda.current_stream(device)
            for grad in grads:
                grad.record_stream(stream)
        added = mark(bucket, indices, first, any_first, sumsq is not None, firsts) or added
    window.arrived = True
    return added


def fold_target(bucket: Bucket, indices: list[int], window: Window) -> Tensor | None:
    """The sum of squares an accumulate of ``indices`` folds its results into (the last
    micro-batch of a window), or None; an add into an already counted slice voids the fold."""
    if not bucket.norm_valid:
        return None
    if True in map(bucket.norm_counted.__getitem__, indices):
        bucket.norm_valid = False   # a counted slice changes: recompute at the step
        return None
    return bucket.sumsq if window.fold_norm else None


def mark(bucket: Bucket, indices: list[int], first: list[bool], any_first: bool, folded: bool,
         firsts: list[tuple[Bucket, int]] | None) -> bool:
    """Record an accumulate of ``indices`` in the bucket's slot marks (and the first touches in
    ``firsts``); returns whether it added into an earlier sum."""
    if folded:
        norm_counted = bucket.norm_counted
        for i in indices:
            norm_counted[i] = True
    marks = bucket.added
    if not any_first:
        for i in indices:
            marks[i] = True
        return True
    touched = bucket.touched
    for i, f in zip(indices, first):
        touched[i] = True
        if not f:
            marks[i] = True
    if firsts is not None:
        firsts.extend((bucket, i) for i, f in zip(indices, first) if f)
    return False in first


def accumulate_linear(window: Window, bucket: Bucket, i: int, grad_output: Tensor, input: Tensor,
                      firsts: list[tuple[Bucket, int]]) -> bool:
    """Accumulate slot ``i``'s weight gradient from a Linear's GEMM operands
    (``grad_output^T @ input``, see :mod:`fused_accum.linear`), as :func:`accumulate` would the
    gradient itself; returns whether it added into an earlier sum."""
    first = not bucket.touched[i]
    acc = bucket.new_accumulator(i) if first else bucket.acc_view(i)
    weight = None if window.micro_weight is None else window.micro_weight[bucket.device]
    sumsq = fold_target(bucket, [i], window)
    bucket.backend.accumulate_linear([grad_output], [input], [acc], [first], weight, sumsq)
    window.arrived = True
    return mark(bucket, [i], [first], first, sumsq is not None, firsts)
