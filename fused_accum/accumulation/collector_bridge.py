"""What the C++ gradient collector is told and what it reports (``csrc/autograd/collector.h``).

With the collector and the compiled backend, every gradient of a pass is planned: the collector
adopts fp32 first gradients itself, groups and accumulates the rest with no Python, and reports at
the pass's end which slots it touched first, adopted or folded into the norm.
"""
from __future__ import annotations

from collections.abc import Container
from typing import NamedTuple

from torch import Tensor

from .accumulate import may_adopt
from .buckets import Bucket
from .passes import BackwardPass
from .window import Window


class PlanEntry(NamedTuple):
    """One bucket's share of a pass's plan; the collector reads it by position, in this order."""
    slots: list[int]                     # the collector slots of its hooked parameters
    accumulators: list[Tensor | None]    # None: an fp32 first touch, adopted or made in C++
    first: list[bool]                    # the slot's first touch in the window
    weight: Tensor                       # the accumulate weight (items, 1 / loss scale, or 1)
    found_inf: Tensor                    # the device's non-finite flag
    sumsq: Tensor | None                 # the norm's sum of squares to fold into, or None
    adopt: bool                          # may_adopt: first fp32 gradients become accumulators


def plan_entries(bucket_slots: dict[Bucket, list[int]], window: Window, compiled,
                 unplanned: Container[Tensor] = ()) -> list[PlanEntry]:
    """The plan of a pass: every bucket of the ``compiled`` backend whose slots it can take
    without Python.  ``unplanned``: parameters whose gradients go through Python's queue (fused
    Linear weights, which :mod:`fused_accum.linear` may touch first in the same pass: a plan made
    at the pass's start would overwrite that)."""
    entries = []
    for bucket, slots in bucket_slots.items():
        if bucket.backend is not compiled:
            continue
        sumsq = None
        if bucket.norm_valid:
            if True in bucket.norm_counted:
                continue   # adding to a folded slice invalidates the fold: Python's path
            if window.fold_norm:
                sumsq = bucket.sumsq
        indices = [i for i, s in enumerate(slots) if s >= 0]
        if unplanned:   # (a tensor's hash is a Python call: only where there is something to find)
            indices = [i for i in indices if bucket.params[i] not in unplanned]
        if not indices:
            continue
        touched = bucket.touched
        if bucket.flat:   # untouched slices too: their first touch overwrites them
            accs = bucket.views(bucket.acc, indices)
        else:             # None: adopted, or made, by the collector
            accs = [bucket.adopted[i] if touched[i] else None for i in indices]
        device = bucket.device
        weight = (window.micro_weight[device] if window.micro_weight is not None
                  else window.ones[device])
        entries.append(PlanEntry([slots[i] for i in indices], accs,
                                 [not touched[i] for i in indices], weight,
                                 window.found_inf[device], sumsq, may_adopt(bucket, window)))
    return entries


class FlushReport(NamedTuple):
    """What the collector's ``flush`` reports it did, in its order."""
    added: bool                          # planned gradients were added into earlier sums
    firsts: list[int]                    # slots touched first
    folded: list[int]                    # slots whose squares were folded into the norm
    adopted: list[tuple[int, Tensor]]    # (slot, accumulator) adopted or made


def record_settled(record: BackwardPass, flushed: tuple, slot_list: list) -> None:
    """Record in the buckets and in ``record`` what the collector's ``flush`` did."""
    report = FlushReport(*flushed)
    if report.added:
        record.added = True
    for slot, acc in report.adopted:
        bucket, i, _ = slot_list[slot]
        bucket.adopted[i] = acc
        bucket.touched[i] = True
        record.firsts.append((bucket, i))
    for slot in report.firsts:
        bucket, i, _ = slot_list[slot]
        if not bucket.touched[i]:   # an fp32 accumulator made by the collector came above
            bucket.touched[i] = True
            record.firsts.append((bucket, i))
    for slot in report.folded:
        bucket, i, _ = slot_list[slot]
        bucket.norm_counted[i] = True
