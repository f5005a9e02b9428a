"""Which fused optimizers hold a parameter, and which one takes its gradients.

Every fused optimizer registers itself on each of its parameters (weakly: a deleted optimizer
holds nothing).  Optimizers that leave gradients in ``.grad`` (``accumulation_steps=1`` in one
process, see :mod:`fused_accum.accumulation`) may share a parameter, as torch.optim optimizers do:
each steps it from the same ``.grad``.  An optimizer that takes gradients as they arrive cannot
share: the others would never see them.  So when one of the two is a taker, the optimizer that
came last keeps the parameter and the earlier one loses it, and says so (its ``step()`` raises,
naming the parameters) instead of training silently without them.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor

from .placeholders import grad_or_none

HOLDERS_ATTR = "_fused_accum_holders"   # on each parameter: [weakref to GradBuffers, ...]


class _Refs(list):
    """A parameter's holders.  A pickled or deep-copied parameter is held by no one (and weak
    references do not pickle: ``torch.save(model)`` must work beside a fused optimizer)."""

    def __reduce__(self):
        return (_Refs, ())


def holders(param: Tensor) -> list[Any]:
    """The live gradient buffers (one per fused optimizer) that hold ``param``."""
    refs = getattr(param, HOLDERS_ATTR, None)
    if not refs:
        return []
    live = [ref() for ref in refs]
    return [h for h in live if h is not None]


def taker(param: Tensor) -> Any | None:
    """The buffers that take ``param``'s gradients as they arrive, or None."""
    for holder in holders(param):
        if holder.collecting:
            return holder
    return None


def add(param: Tensor, holder: Any) -> None:
    refs = _Refs(ref for ref in getattr(param, HOLDERS_ATTR, ()) if ref() is not None and ref() is not holder)
    refs.append(weakref.ref(holder))
    setattr(param, HOLDERS_ATTR, refs)


def remove(param: Tensor, holder: Any) -> None:
    refs = _Refs(ref for ref in getattr(param, HOLDERS_ATTR, ()) if ref() is not None and ref() is not holder)
    if refs:
        setattr(param, HOLDERS_ATTR, refs)
    elif hasattr(param, HOLDERS_ATTR):
        delattr(param, HOLDERS_ATTR)


def rivals(param: Tensor, holder: Any, collecting: bool) -> list[Any]:
    """The other holders of ``param`` that cannot keep it beside ``holder``: all of them when
    ``holder`` takes gradients as they arrive, else those that do."""
    return [h for h in holders(param) if h is not holder and (collecting or h.collecting)]


def held_by_torch_optimizer_check(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """A global step pre-hook of torch.optim: a torch optimizer stepping parameters whose
    gradients a fused optimizer takes would find no ``.grad`` and skip them silently."""
    if getattr(optimizer, "_fused_accum_optimizer", False) or id(optimizer) in stepping_inner:
        return   # a fused optimizer, or one FusedAccumulator steps on the window's gradients
    for group in optimizer.param_groups:
        for p in group["params"]:
            owner = taker(p) if isinstance(p, Tensor) else None
            if owner is not None and grad_or_none(p) is None:
                raise RuntimeError(
                    f"fused_accum: {type(optimizer).__name__}.step() was called on parameter "
                    f"{owner.label(p)}, whose gradients a fused_accum optimizer takes as they "
                    "arrive (accumulation_steps > 1, data parallelism, or a framework driving its "
                    "windows): this optimizer would see no .grad and skip it. Let one optimizer "
                    "hold each parameter (param groups for different settings), or wrap this one "
                    "in fused_accum.FusedAccumulator")


stepping_inner: set[int] = set()   # ids of wrapped optimizers FusedAccumulator is stepping
_installed: list[Any] = []


def install_torch_optimizer_check() -> None:
    """Register :func:`held_by_torch_optimizer_check` once (idempotent)."""
    if not _installed:
        from torch.optim.optimizer import register_optimizer_step_pre_hook
        _installed.append(register_optimizer_step_pre_hook(held_by_torch_optimizer_check))
