"""What every framework integration does to the optimizer it is given."""
from __future__ import annotations

from typing import Any

import torch

from ..optim import FusedAccumulator
from ..optim.base import AccumulatingOptimizer


def unwrap(optimizer: Any) -> Any:
    """The optimizer inside a framework's wrappers (accelerate's AcceleratedOptimizer,
    Lightning's LightningOptimizer)."""
    seen = set()
    while not isinstance(optimizer, AccumulatingOptimizer) and id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None:
            break
        optimizer = inner
    return optimizer


def fused(optimizer: Any, *, accumulation_setting: str, max_grad_norm: float | None,
          clip_setting: str, **wrapper_args: Any) -> AccumulatingOptimizer:
    """``optimizer`` made fit for windows the framework counts: a torch optimizer is wrapped in
    :class:`~fused_accum.FusedAccumulator` (its param groups and state shared, so schedulers
    attached to it keep working); a fused one must not count windows itself.  The framework's
    clipping (``max_grad_norm``, from its setting ``clip_setting``) moves into the optimizer."""
    inner = unwrap(optimizer)
    if not isinstance(inner, AccumulatingOptimizer):
        if not isinstance(inner, torch.optim.Optimizer):
            raise TypeError(f"fused_accum: expected a torch.optim.Optimizer, got "
                            f"{type(inner).__name__}")
        return FusedAccumulator(inner, accumulation_steps=1, max_grad_norm=max_grad_norm,
                                **wrapper_args)
    if inner.accumulation_steps != 1:
        raise ValueError(
            f"fused_accum: the optimizer has accumulation_steps={inner.accumulation_steps} while "
            f"{accumulation_setting} already forms the windows: they would be counted twice, "
            f"once by each (an update every {inner.accumulation_steps} of its windows). Leave "
            f"accumulation_steps=1 and let {accumulation_setting} set the window")
    if max_grad_norm is not None:
        if inner.max_grad_norm is None:
            inner.max_grad_norm = max_grad_norm
        elif inner.max_grad_norm != max_grad_norm:
            raise ValueError(f"fused_accum: the optimizer clips to max_grad_norm="
                             f"{inner.max_grad_norm} and {clip_setting}={max_grad_norm}; set one")
    return inner
