"""The end of a window: the reduction over ranks, the weight, the norm and clipping, the
non-finite check, and one update per bucket.

A mixin of :class:`fused_accum.optim.base.AccumulatingOptimizer`; the window's state is
:class:`fused_accum.accumulation.window.Window`'s.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..accumulation.buckets import Bucket
from ..accumulation.sparse import DeferredNorm
from ..accumulation.window import ITEMS


class WindowEnd:
    """Applying the window's mean."""

    def _end_window(self) -> None:
        window = self._window
        if window.sparse and not self._steps_sparse():
            name = type(self).__name__
            labels = [b.labels[i] for b, i in window.sparse.sums]
            raise RuntimeError(   # torch's own words, and the parameters: nothing has changed
                f"{name} does not support sparse gradients, please consider SparseAdam instead "
                f"(fused_accum.FusedAccumulator(torch.optim.SparseAdam(...))); sparse: "
                f"{', '.join(labels[:3])}")
        for bucket in self._buffers.buckets:
            if True in bucket.zeroed:
                bucket.touch_zeroed(window.sparse.touch_zeroed(bucket))
        try:
            # Every rank, touched or not, joins the collectives (one process: nothing to do).
            window.global_weight = self._reducer.reduce(
                self._buffers, window, self._skipped.device, self.accumulation_steps)
            buckets = [b for b in self._buffers.buckets if any(b.touched)]
            if buckets or window.sparse:
                scales, found = self._window_scales(buckets)
                if self.nonfinite == "raise" and not (self._scaler and self._scaler.dynamic):
                    self._raise_if_not_finite(buckets, found)
                skip = found
                if window.discarded:   # a failed backward pass spoilt the sums (warned)
                    skip = {d: torch.ones_like(f) for d, f in found.items()}
                    self._grad_norm = torch.full_like(self._live_norm, float("nan"))
                    self._live_norm.copy_(self._grad_norm)
                self._apply(buckets, scales, skip)
                self.stepped = True
                self._after_apply(found, skip)
        finally:
            self._reset_window()

    def _after_apply(self, found: dict[torch.device, Tensor], skip: dict[torch.device, Tensor]) -> None:
        """Count a skipped window, update the loss scale, and warn once about non-finite skips."""
        main = self._skipped.device
        self._skipped.add_(skip[main])
        if self._scaler is not None:
            self._scaler.update(found[self._scaler.scale.device])
        if self._scaler is None or not self._scaler.dynamic:   # dynamic scaling expects skips
            self._skip_monitor.record(found[main])
            if self._skip_monitor.poll():
                self._warn_once("skipped", "fused_accum: a window had non-finite gradients and "
                                "its step was skipped (see opt.skipped_steps; nonfinite='raise' "
                                "names the parameters)")

    def _raise_if_not_finite(self, buckets: list[Bucket], found: dict[torch.device, Tensor]) -> None:
        """nonfinite='raise': read the flag on the host and name the parameters concerned."""
        if not any(flag.item() != 0 for flag in found.values()):
            return
        names = self._reducer.nonfinite_labels(buckets)   # sharded: of this rank's pieces
        raise FloatingPointError(
            "fused_accum: non-finite gradients in this window, in "
            + (", ".join(names) if names else "no single parameter (zero items in the window)")
            + "; the window was discarded and the parameters left unchanged")

    def _reset_window(self) -> None:
        self._window_lrs = None
        if not callable(self._final_hint):
            self._final_hint = None
        self._buffers.reset_window()   # and the window record

    def _window_scales(self, buckets: list[Bucket]) -> tuple[dict[torch.device, float | Tensor],
                                                              dict[torch.device, Tensor]]:
        """Per device: grad_scale (clip / W) and the non-finite flag of the whole window.
        Sets ``grad_norm``.  Nothing here reads a device value on the host."""
        window = self._window
        sparse = window.sparse
        devices = {b.device for b in buckets} | {b.device for b, _ in sparse.sums}
        main = buckets[0].device if buckets else next(iter(sparse.sums))[0].device
        total = self._reducer.window_sumsq(self._buffers, buckets, main)
        scale = window.inverse_weight(main, self._buffers.collecting)
        norm_now = self.max_grad_norm is not None or self._live_norm_wanted
        if sparse and norm_now:
            total = total + sparse.sumsq(main)
        # The norm covers what no accumulate kernel has checked (adopted first gradients): a
        # non-finite norm (non-finite elements, or a sum of squares beyond fp32) skips the window,
        # as does a non-finite sparse gradient.  (0 * x is NaN exactly for non-finite x.)
        poison = total * 0.0
        if sparse:
            poison = poison + sparse.nonfinite(main)
            if not norm_now:   # its sparse part when grad_norm is read: coalescing is the cost
                self._grad_norm = DeferredNorm(total, sparse, scale)
        norm_flag = torch.isnan(poison).to(torch.float32)
        if norm_now or not sparse:
            self._grad_norm = total.sqrt() * scale
            self._live_norm.copy_(self._grad_norm)
        clip = None
        if self.max_grad_norm is not None:
            clip = (self.max_grad_norm / (self._grad_norm + 1e-6)).clamp(max=1.0)
        found = {d: torch.maximum(f, norm_flag.to(d)) for d, f in window.found_inf.items()}
        if window.mode == ITEMS:   # a window of zero items has no mean: skip it like an inf
            found = {d: torch.maximum(f, (window.weight(d) == 0).to(f.dtype))
                     for d, f in found.items()}
        if len(found) > 1:   # a non-finite gradient anywhere skips the step everywhere
            any_inf = torch.stack([f.to(main) for f in found.values()]).amax()
            found = {d: any_inf.to(d) for d in found}
        scales = {}
        for device in devices:
            scale = window.inverse_weight(device, self._buffers.collecting)
            scales[device] = scale if clip is None else clip.to(device) * scale
        return scales, found

    def _apply(self, buckets: list[Bucket], scales: dict[torch.device, float | Tensor],
               found: dict[torch.device, Tensor]) -> None:
        for bucket in buckets:
            holder = self._holder(bucket)
            allocated = len(holder.state)
            self._reducer.step(holder, self.algorithm, self.param_groups[bucket.group_index],
                               scales[bucket.device], found[bucket.device])
            if len(holder.state) != allocated:   # state allocated lazily (e.g. momentum set later)
                self._publish_state(bucket)
        self._reducer.finish_gathers()
        for bucket, i, grad in self._window.sparse:
            allocated = len(bucket.state)
            self.algorithm.sparse_update(bucket, i, grad, self.param_groups[bucket.group_index],
                                         scales[bucket.device], found[bucket.device])
            if len(bucket.state) != allocated:
                self._publish_state(bucket)

    def _steps_sparse(self) -> bool:
        """Whether this optimizer steps sparse gradients (torch's SGD does, Adam does not)."""
        return self.algorithm.sparse_update is not None
