"""``opt.backward(loss, num_items=...)``: one micro-batch's backward pass, its loss scaled and its
items counted in the window (:class:`fused_accum.accumulation.window.Window`).

A mixin of :class:`fused_accum.optim.base.AccumulatingOptimizer`.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..accumulation.window import ITEMS, PLAIN
from .checkpoint import index_params


def as_items(num_items: int | float | Tensor) -> Tensor:
    """``num_items`` as a 0-d tensor (a device tensor stays where it is, never read)."""
    if isinstance(num_items, Tensor):
        if num_items.numel() != 1:
            raise ValueError(f"num_items must be a number or a one-element tensor, got a "
                             f"tensor of shape {tuple(num_items.shape)}")
        return num_items.detach().reshape(())
    if isinstance(num_items, (int, float)) and not isinstance(num_items, bool):
        if not (math.isfinite(num_items) and num_items >= 0):
            raise ValueError(f"num_items must be a finite number >= 0, got {num_items!r}")
        return torch.tensor(float(num_items))
    raise TypeError(f"num_items must be a number or a tensor, got {type(num_items).__name__}")


class MicroBatches:
    """``backward()`` of one micro-batch."""

    def backward(self, loss: Tensor, num_items: int | float | Tensor | None = None,
                 **backward_kwargs: Any) -> None:
        """``loss.backward()`` for one micro-batch, with the loss scaled when loss scaling is on.

        With ``num_items=n`` (``loss`` being the mean over the micro-batch's n items), the window's
        update uses the exact mean over all items of the window.  ``n`` may be a device tensor,
        e.g. ``(labels != -100).sum()``; it is never read on the host.
        """
        window = self._window
        if num_items is not None and window.mode == PLAIN:
            raise ValueError(
                "num_items: this window already has micro-batches from a plain backward(); call "
                "opt.backward(loss, num_items=...) for every micro-batch of a window or for none")
        items = None if num_items is None else as_items(num_items)
        if not self._buffers.collecting:
            self._backward_into_grads(loss, items, backward_kwargs)
            return
        # A parameter unfrozen since the optimizer was built is hooked before this pass: its
        # gradient must get the pass's weight, which a .grad taken at step() would not.
        self._buffers.take_unfrozen()
        weights = None
        if items is not None and self._scaler is None and not self._has_fp16():
            # fp32 and bf16 gradients have fp32's range, so the item weight rides on the loss: the
            # accumulate weight stays 1, and fp32 first gradients are adopted without a copy.
            loss = loss * items.to(loss.device, torch.float32, non_blocking=True)
        elif items is not None or self._scaler is not None:
            weights = {}
            for device in window.items:
                weight = None if items is None else items.to(device, torch.float32, non_blocking=True)
                if self._scaler is not None:   # the accumulate weight carries 1 / scale
                    inverse = self._scaler.inverse(device)
                    weight = inverse if weight is None else weight * inverse
                weights[device] = weight
            if self._scaler is not None:
                loss = loss * self._scaler.scale.to(loss.device, non_blocking=True)
        window.micro_weight = weights
        window.micro_kind = PLAIN if items is None else ITEMS
        try:
            loss.backward(**backward_kwargs)
        except BaseException:
            self._buffers.settle_unfinished()   # undo the failed pass, or discard the window
            raise
        finally:
            window.micro_weight = None
            window.micro_kind = None
        if items is not None:
            window.add_items(items)

    def _backward_into_grads(self, loss: Tensor, items: Tensor | None,
                             backward_kwargs: dict[str, Any]) -> None:
        """``opt.backward`` with gradients left in ``.grad``: ``.grad`` stays the item-weighted
        mean of the passes since the last step() or zero_grad() (the gradients already there are
        reweighed when a pass adds items), so that code reading or clipping it sees the mean;
        with loss scaling it holds the scaled gradients, as torch.amp.GradScaler leaves them,
        and step() unscales them."""
        window = self._window
        if items is None and window.mode == ITEMS:
            raise ValueError("num_items: the gradients in .grad come from passes with num_items; "
                             "pass num_items to every opt.backward until step() or zero_grad()")
        main = self._skipped.device
        if window.mode is not None and all(p.grad is None for p in index_params(self.param_groups)):
            window.forget_items()   # .grad was emptied meanwhile (nn.Module.zero_grad, by hand)
        if items is not None:
            total = window.items[main]
            new_total = total + items.to(main, torch.float32)
            positive = new_total > 0
            if window.mode == ITEMS:   # .grad holds the mean of earlier passes: reweigh it
                keep = torch.where(positive, total / new_total, 1.0)
                for p in index_params(self.param_groups):
                    if p.grad is not None:
                        p.grad.mul_(keep.to(p.grad.device, p.grad.dtype))
            share = torch.where(positive, items.to(main, torch.float32) / new_total, 0.0)
            loss = loss * share.to(loss.device)
        if self._scaler is not None:
            loss = loss * self._scaler.scale.to(loss.device, non_blocking=True)
        loss.backward(**backward_kwargs)
        window.grads_scaled = self._scaler is not None
        window.mode = PLAIN if items is None else ITEMS
        if items is not None:
            for total in window.items.values():
                total.copy_(new_total)

    def _has_fp16(self) -> bool:
        return any(b.dtype == torch.float16 for b in self._buffers.buckets)
