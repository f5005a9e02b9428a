"""What is found in ``.grad``: a gradient left there (``accumulation_steps=1`` in one process,
taken at ``step()``), or one that should not be there (set by hand, or delivered past the hooks),
which is refused; and a parameter whose dtype or device changed since the optimizer was built.

A mixin of :class:`fused_accum.accumulation.engine.GradBuffers`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._warnings import warn
from .accumulate import accumulate
from .buckets import Bucket
from ..placeholders import is_placeholder

_STRIDED = torch.strided


def check_layout(bucket: Bucket, param: Tensor, label: str) -> None:
    """Refuse a parameter whose dtype or device changed since the optimizer was built (e.g.
    ``model.to(torch.bfloat16)`` afterwards): its buffers and state were made for the old ones."""
    if param.dtype is not bucket.dtype or param.device != bucket.device:
        raise RuntimeError(
            f"fused_accum: parameter {label} was {bucket.dtype} on {bucket.device} when the "
            f"optimizer was built and is {param.dtype} on {param.device} now (model.to(...), "
            ".half() or .cuda() after building the optimizer): its accumulators, masters and "
            "optimizer state were made for the old ones. Build the optimizer after changing "
            "the model's dtype or device")


class GradAttribute:
    """``.grad`` as the engine reads and checks it."""

    def check_grads(self) -> None:
        """Before a micro-batch ends: refuse a ``.grad`` (set by hand, or delivered past the
        hooks), which the window would otherwise ignore, then :meth:`take_unfrozen` (which
        settles the backward passes that raised first).  Raises before anything changes."""
        self.placeholders.clear()
        for bucket in self.buckets:
            dtype = bucket.dtype
            for p in bucket.params:
                if p.grad is not None or p.dtype is not dtype:
                    self._check_param(bucket, p)
        self.take_unfrozen()

    def refuse_grads_before_pass(self) -> None:
        """A backward pass begins: a hooked parameter holding a ``.grad`` had it set by hand
        since the last micro-batch; autograd would add this pass's gradient into it and the
        hook would take the sum.  (The parameter whose gradient opened the pass is past this
        check; its hooks' pre-hook refused it before autograd added into it:
        :meth:`refuse_hand_set`.)"""
        self.placeholders.clear()
        for p in self.hooks.handles:
            if p.grad is not None:
                self.refuse_hand_set(p)

    def refuse_hand_set(self, p: Tensor) -> None:
        """Raise for a ``.grad`` of ``p`` set by hand, found when a backward pass begins (before
        anything of the pass is taken) or as its gradient arrives, before autograd adds into
        it.  A placeholder the pass before left (see :mod:`.placeholders`) is no such
        ``.grad``: the placeholders leave, and the pass goes on."""
        if is_placeholder(p.grad):
            self.placeholders.clear()
            if p.grad is None:
                return
        raise RuntimeError(
            f"fused_accum: parameter {self.label(p)} has a .grad when a backward pass begins, "
            "set by hand: with accumulation_steps > 1, under data parallelism or inside a "
            "framework's windows, autograd would add the pass's gradient into it and the window "
            "would take the hand-set part as gradient. Produce the gradient in backward() (a "
            "loss term, a tensor hook or an autograd.Function), or use accumulation_steps=1, "
            "where .grad works as in torch.optim. (The backward pass was refused and nothing of "
            "it taken: set the .grad to None and run it again)")

    def refuse_hand_set_slot(self, slot: int) -> None:
        """The collector's pre-hook found a hand-set ``.grad`` on the parameter of ``slot``."""
        self.refuse_hand_set(self.hooks.slot_list[slot][2])

    def take_unfrozen(self) -> None:
        """Hook the parameters that were frozen when the optimizer was built and require grad
        now, accumulating what their ``.grad`` got meanwhile from plain ``loss.backward()``
        passes (weight 1).  Called at every micro-batch's end, and before whatever must see every
        gradient in the window: ``opt.backward``'s pass (whose weight, a loss scale or items, a
        gradient left in ``.grad`` would miss) and a state dict."""
        self.placeholders.clear()
        self.settle_unfinished()   # a failed pass still open taints what it left (engine._undo)
        unfrozen = [p for p in self.unhooked if p.requires_grad]
        for p in unfrozen:   # all checked before any is taken
            if p.grad is not None:
                self._check_param(self.slots[p][0], p)
        tainted = [p for p in unfrozen if p.grad is not None and p in self.tainted]
        self.tainted.clear()
        if tainted and not self.window.discarded:
            warn(f"fused_accum: a backward pass failed while parameter {self.label(tainted[0])}, "
                 "unfrozen after the optimizer was built, held gradients in its .grad (autograd "
                 "fills it until step() hooks the parameter): what the failed pass may have left "
                 "there cannot be told apart, so the window is discarded: its step will "
                 "leave the parameters and optimizer state unchanged. (opt.zero_grad() before "
                 "retrying a failed micro-batch clears that .grad and keeps the window.)")
            self.window.discarded = True
        for p in unfrozen:
            bucket, i = self.slots[p]
            if p.grad is not None:
                grad = p.grad
                with self._lock:   # the user's tensor: copied, never adopted
                    if grad.layout is torch.strided:
                        accumulate(self.window, [(bucket, [i], [grad])])
                    else:
                        self._add_sparse(bucket, i, grad, None)
                p.grad = None
            del self.unhooked[p]
            self._hook(p)

    def zero_unhooked(self, params: list[Tensor] | None, set_to_none: bool) -> None:
        """``zero_grad()`` of the parameters frozen when the optimizer was built: their ``.grad``
        (from plain backward passes once unfrozen) is cleared as torch clears it, before
        :meth:`take_unfrozen` could take it."""
        wanted = None if params is None else set(params)
        for p in self.unhooked:
            if p.grad is None or (wanted is not None and p not in wanted):
                continue
            self.tainted.pop(p, None)
            if set_to_none:
                p.grad = None
            else:
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                p.grad.zero_()

    def take_grads(self, weight: dict[torch.device, Tensor] | None) -> bool:
        """Leaving gradients in ``.grad`` (``accumulation_steps=1`` in one process): take every
        parameter's ``.grad`` as the window's single micro-batch, times ``weight`` (per device,
        None for 1), leaving ``.grad`` as it is (an fp32 one is read where it is, never
        written).  Returns whether any parameter has a gradient."""
        window = self.window
        saved, window.micro_weight = window.micro_weight, weight
        try:
            groups = []
            for bucket in self.buckets:
                dtype, on_cuda = bucket.dtype, bucket.device.type == "cuda"
                indices, grads = [], []
                for i, p in enumerate(bucket.params):
                    grad = p.grad
                    if grad is None:
                        continue
                    if p.dtype is not dtype or p.is_cuda is not on_cuda:
                        check_layout(bucket, p, bucket.labels[i])
                    if grad.layout is not _STRIDED:   # torch's own sparse .grad: summed as is
                        self._add_sparse(bucket, i, grad, None)
                        continue
                    indices.append(i)
                    grads.append(grad if grad.is_contiguous() else grad.contiguous())
                if indices:
                    groups.append((bucket, indices, grads))
            if groups:
                with self._lock:
                    accumulate(window, groups, adopt_firsts=weight is None)
        finally:
            window.micro_weight = saved
        return bool(groups) or bool(window.sparse)

    def _check_param(self, bucket: Bucket, param: Tensor) -> None:
        label = self.label(param)
        check_layout(bucket, param, label)
        # A parameter hooked late (unfrozen since the optimizer was built) gets .grad from
        # autograd until then; a frozen one cannot.
        if param.grad is None or (param in self.unhooked and param.requires_grad):
            if param.grad is not None:   # autograd's, sparse ones included
                self._check_stray(param, param.grad, sparse=True)
            return
        if param.grad.layout == torch.strided:
            self._check_stray(param, param.grad)
        if param in self.unhooked:   # frozen when built, frozen now
            raise RuntimeError(
                f"fused_accum: parameter {label} has a .grad at step() but does not require "
                "grad: it was set by hand, or the parameter was unfrozen after the optimizer was "
                "built, reached by backward() and frozen again before step(), which the "
                "optimizer cannot tell apart. Freeze it again only after step() (which takes its "
                "gradient into the window); nothing was changed: set the .grad to None and call "
                "step() again to drop it")
        raise RuntimeError(
            f"fused_accum: parameter {label} has a .grad at step(), which was set by hand (or "
            "reached it past the optimizer's gradient hooks): with "
            "accumulation_steps > 1, under data parallelism or inside a framework's windows, the "
            "optimizer takes each gradient as backward() delivers it, so a .grad assigned or "
            "changed by hand would be ignored. Produce the gradient in backward() (a loss term, "
            "a tensor hook or an autograd.Function), or use accumulation_steps=1, where .grad "
            "works as in torch.optim. (Nothing was changed: set the .grad to None and call "
            "step() again)")

    def _check_stray(self, param: Tensor, grad: Tensor, sparse: bool = False) -> None:
        label = self.label(param)
        if grad.layout != torch.strided and not sparse:
            raise RuntimeError(f"fused_accum: parameter {label} was given a sparse .grad; "
                               "assign a dense gradient")
        if grad.shape != param.shape or grad.device != param.device:
            raise RuntimeError(f"fused_accum: parameter {label} was given a .grad of shape "
                               f"{tuple(grad.shape)} on {grad.device}; expected "
                               f"{tuple(param.shape)} on {param.device}")
        if not grad.is_floating_point():
            raise RuntimeError(f"fused_accum: parameter {label} was given a {grad.dtype} .grad")
