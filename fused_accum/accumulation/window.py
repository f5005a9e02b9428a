"""The window in progress: one record owns its state.

A window is the ``accumulation_steps`` micro-batches whose mean gradient one update applies.  Its
state is read and written by the optimizer (micro-batch counts, ``num_items``), the gradient engine
(what arrived, the non-finite flags, the norm folded into the last micro-batch), the reducers (the
weight of all ranks) and the checkpoint code; each of them is handed this record, and none keeps a
copy.  What is kept per parameter slot (first touches, what was added since the last ``step()``,
what the norm counts) lives in the bucket's slot arrays beside the accumulators it describes
(:class:`fused_accum.accumulation.buckets.Bucket`); the window-wide rest is here.

The window weight W has one home, :meth:`Window.weight`: the items of the window
(``backward(num_items=)``), else its micro-batches (:meth:`Window.local_weight`), or, once a
reducer has summed that over the ranks at the window's end, the sum.  The update applies
``acc / W``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .sparse import SparseSums

PLAIN, ITEMS = "plain", "items"


class Saved(NamedTuple):
    """What a backward pass can change in the window, taken when it begins (to undo a failed one)."""
    mode: str | None
    arrived: bool
    found_inf: dict[torch.device, Tensor]


class Window:
    """The accumulation window in progress."""

    def __init__(self) -> None:
        self.micro = 0                 # micro-batches ended (step() calls) in this window
        self.passes_begun = 0          # backward passes begun in it (a restored window counts one)
        self.mode: str | None = None   # PLAIN or ITEMS once a pass arrived: one or the other
        self.items: dict[torch.device, Tensor] = {}             # items of the window, per device
        self.items_since_step: dict[torch.device, Tensor] = {}  # of them, since the last step()
        self.found_inf: dict[torch.device, Tensor] = {}   # a non-finite gradient arrived
        self.ones: dict[torch.device, Tensor] = {}        # the accumulate weight of a plain pass
        self.arrived = False           # a gradient came since the last step()
        self.discarded = False         # a failed pass spoilt the sums: the update is skipped
        self.fold_norm = False         # the coming pass is the last: fold its sums of squares
        # Around a micro-batch's opt.backward: per-device accumulate weights (None: weight 1) and
        # the kind of pass (None: a plain loss.backward()).
        self.micro_weight: dict[torch.device, Tensor] | None = None
        self.micro_kind: str | None = None
        self.grads_scaled = False      # gradients in .grad carry the loss scale (k=1, one process)
        self.global_weight: Tensor | None = None   # W of all ranks (reducer.reduce), at the end
        self.sparse = SparseSums()     # sums of sparse gradients (fused_accum.accumulation.sparse)

    def add_device(self, device: torch.device) -> None:
        for table, value in ((self.items, 0.0), (self.items_since_step, 0.0),
                             (self.found_inf, 0.0), (self.ones, 1.0)):
            table.setdefault(device, torch.full((), value, device=device))

    # -- passes --------------------------------------------------------------------------------

    def begin_pass(self, kind: str) -> None:
        """A backward pass delivered its first gradient.  Raises, changing nothing, for a pass
        whose weighting differs from the window's."""
        if self.mode not in (None, kind):
            raise RuntimeError(
                "fused_accum: this window mixes opt.backward(loss, num_items=...) with a plain "
                "loss.backward(); call one or the other for every micro-batch of a window (the "
                "backward pass was refused; the window's accumulated gradients are intact)")
        self.mode = kind
        self.passes_begun += 1

    def save(self) -> Saved:
        return Saved(self.mode, self.arrived, {d: f.clone() for d, f in self.found_inf.items()})

    def restore(self, saved: Saved) -> None:
        """Undo a failed pass: the window as it was when the pass began."""
        self.mode, self.arrived = saved.mode, saved.arrived
        for device, flag in saved.found_inf.items():
            self.found_inf[device].copy_(flag)

    def add_items(self, items: Tensor) -> None:
        """A completed pass of ``items`` items (a 0-d tensor, never read on the host)."""
        self.mode = ITEMS
        for device, total in self.items.items():
            contribution = items.to(device, torch.float32, non_blocking=True)
            total.add_(contribution)
            self.items_since_step[device].add_(contribution)

    # -- micro-batches and the weight ----------------------------------------------------------

    def end_micro_batch(self) -> None:
        self.micro += 1
        if self.mode == ITEMS:   # (only passes with items add to them)
            for pending in self.items_since_step.values():
                pending.zero_()

    def drop_since_step(self, holds_sums: bool) -> None:
        """zero_grad() discarded whole what arrived since the last step().  With no sum left
        (``holds_sums`` False), no pass of the window is left either, so nothing is weighted by
        items: kept, a zero-item window would divide zero sums by zero and skip the step torch
        takes on zeroed ``.grad``\\ s."""
        for device, total in self.items.items():
            total.sub_(self.items_since_step[device])
            self.items_since_step[device].zero_()
        if not holds_sums:
            self.mode = None

    def weight(self, device: torch.device, collecting: bool = True) -> float | Tensor:
        """W on ``device``.  ``collecting``: the window sums gradients as they arrive; with
        gradients left in ``.grad`` they already hold the item-weighted mean, and W is 1."""
        if self.global_weight is not None:
            return self.global_weight.to(device)
        if self.mode == ITEMS and not collecting:
            return float(self.micro)
        return self.local_weight(device)

    def local_weight(self, device: torch.device) -> float | Tensor:
        """W of this rank alone: its items, else its micro-batches."""
        return self.items[device] if self.mode == ITEMS else float(self.micro)

    def inverse_weight(self, device: torch.device, collecting: bool = True) -> float | Tensor:
        w = self.weight(device, collecting)
        return w.reciprocal() if isinstance(w, Tensor) else 1.0 / w

    def forget_items(self) -> None:
        """zero_grad() with gradients in ``.grad``: what opt.backward recorded of them goes too."""
        self.mode = None
        for total in self.items.values():
            total.zero_()
        self.grads_scaled = False

    def nonfinite(self) -> Tensor:
        """The window's non-finite flag over every device, on the first."""
        flags = list(self.found_inf.values())
        return torch.stack([f.to(flags[0].device) for f in flags]).amax()

    def reset(self) -> None:
        """The window ended (or was dropped): the next one starts empty.  (``arrived`` is the
        micro-batch's: :meth:`end_micro_batch`'s caller clears it.)"""
        self.micro = self.passes_begun = 0
        self.mode = None
        for table in (self.items, self.items_since_step, self.found_inf):
            for value in table.values():
                value.zero_()
        self.discarded = False
        self.global_weight = None
        self.sparse.reset()
