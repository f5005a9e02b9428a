"""``zero_grad()`` while gradients are taken as they arrive: what arrived since the last
``step()`` is discarded where that is exact (sums it began), and refused where it was added into
sums of earlier micro-batches; and what ``set_to_none=False`` means for parameters that get no
gradient in a window (torch steps them with zeros).

A mixin of :class:`fused_accum.accumulation.engine.GradBuffers`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .buckets import Bucket


class ZeroGrad:
    """Discarding what arrived since the last ``step()``."""

    def since_last_step(self) -> tuple[list[tuple[Bucket, int]], list[tuple[Bucket, int]]]:
        """What arrived since the last ``step()``: the sums that began since then (dense or
        sparse slots), and the sums of earlier micro-batches added into since then."""
        collector_added = (set(self.collector.added_slots()) if self.collector is not None
                           else set())
        began, added = [], []
        for bucket in self.buckets:
            slots = self.hooks.bucket_slots.get(bucket)
            for i, touched in enumerate(bucket.touched):
                if not touched:
                    continue
                if not bucket.settled[i]:
                    began.append((bucket, i))
                elif bucket.added[i] or (slots is not None and slots[i] in collector_added):
                    added.append((bucket, i))
        for key, entry in self.window.sparse.sums.items():
            if not entry.settled:
                began.append(key)
            elif entry.added:
                added.append(key)
        return began, added

    def holding(self) -> list[list[bool]]:
        """Per bucket, which slots hold a sum in this window, dense or sparse."""
        sparse = self.window.sparse.sums
        return [[t or (b, i) in sparse for i, t in enumerate(b.touched)] for b in self.buckets]

    def discard(self, params: list[Tensor] | None) -> bool:
        """``zero_grad()`` while gradients are taken as they arrive: discard what arrived for
        ``params`` (all by default) since the last ``step()``.  A sum that began since then is
        dropped exactly (its slot is untouched again); one that holds earlier micro-batches and
        got more since cannot be taken apart, and raises, naming the parameters, before anything
        changes, unless a failed backward pass discarded the window already (its step is
        skipped: what is left of it no longer matters).  Returns whether what arrived since the
        last step() is gone whole."""
        if self.passes:
            raise RuntimeError("fused_accum: zero_grad() was called during a backward pass")
        if not self.window.arrived:
            return False   # the usual loop: nothing arrived since the last step()
        began, added = self.since_last_step()
        if params is not None:
            wanted = set(params)
            began = [(b, i) for b, i in began if b.params[i] in wanted]
            refused = [b.labels[i] for b, i in added if b.params[i] in wanted]
        else:
            refused = [b.labels[i] for b, i in added]
        if refused and not self.window.discarded:
            raise RuntimeError(
                f"fused_accum: zero_grad() would discard what {len(refused)} parameters "
                f"({', '.join(refused[:3])}{', ...' if len(refused) > 3 else ''}) received since "
                "the last step(), but it was added into their sums of earlier micro-batches of "
                "this window, and cannot be taken out exactly (nothing was changed). Keep "
                "gradients you do not want out of backward(): detach the tensors, or freeze the "
                "parameters (requires_grad_(False)) for that pass; or use accumulation_steps=1, "
                "where zero_grad() works as in torch.optim")
        sparse = self.window.sparse
        for bucket, i in began:
            if (bucket, i) in sparse.sums:
                sparse.drop(bucket, i)
            else:
                bucket.untouch(i)
                bucket.added[i] = False
        if began:
            self._recheck_finite()
        began_left, added_left = self.since_last_step()
        if not began_left and not added_left:
            self.window.arrived = False
        return not began_left and not added_left

    def _recheck_finite(self) -> None:
        """The non-finite flags of the sums that are left (some were just discarded)."""
        for device, flag in self.window.found_inf.items():
            bad = [~torch.isfinite(b.acc_view(i)).all() for b in self.buckets
                   if b.device == device for i in b.touched_indices()]
            flag.copy_(torch.stack(bad).any().to(flag.dtype) if bad else torch.zeros_like(flag))

    def keep_zero_grads(self, params: list[Tensor] | None, set_to_none: bool,
                        touched: list[list[bool]] | None = None) -> None:
        """What ``zero_grad(set_to_none)`` means for the parameters that get no gradient in a
        window: after set_to_none=False torch steps those that held a .grad with zeros (see
        :meth:`Bucket.touch_zeroed`); set_to_none=True releases them.  ``touched``: per bucket,
        the slots that held a sum (:meth:`holding`) before this zero_grad discarded what arrived
        since the last step()."""
        if params is None and set_to_none:   # the usual loop: opt.zero_grad() each micro-batch
            for bucket in self.buckets:
                n = len(bucket.params)
                bucket.holds_grad, bucket.zeroed = [False] * n, [False] * n
            return
        wanted = None if params is None else set(params)
        for b, bucket in enumerate(self.buckets):
            was_touched = bucket.touched if touched is None else touched[b]
            for i, p in enumerate(bucket.params):
                if wanted is not None and p not in wanted:
                    continue
                if set_to_none:
                    bucket.holds_grad[i] = bucket.zeroed[i] = False
                elif bucket.holds_grad[i] or bucket.touched[i] or was_touched[i]:
                    bucket.zeroed[i] = True
