"""Guards against code around a fused optimizer that would silently train wrongly.

A fused optimizer takes every gradient the moment autograd delivers it, so ``.grad`` is empty
between ``backward()`` and ``step()``.  Code written for plain PyTorch that reads gradients there
would see nothing and carry on: ``clip_grad_norm_`` would clip nothing and report a norm of 0, and
accelerate's (or transformers.Trainer's) own accumulation around an optimizer that also counts
micro-batches would count every window twice.  These guards turn both into clear errors that name
what to use instead.

``install()`` wraps ``torch.nn.utils.clip_grad_norm_`` and ``clip_grad_value_`` once, when the
first fused optimizer is built: for parameters that no fused optimizer holds, the wrappers only
call through.
"""
from __future__ import annotations

import functools
import sys
from typing import Any

import torch

OWNER_ATTR = "_fused_accum_owner"   # set on every parameter a fused optimizer holds
_CLIP_FUNCTIONS = ("clip_grad_norm_", "clip_grad_value_")
_GUARDED = "_fused_accum_guarded"


def holding(parameters: Any) -> list[str]:
    """Labels of the ``parameters`` whose gradients a fused optimizer holds in this window."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    labels = []
    for p in params:
        owner = getattr(p, OWNER_ATTR, None)
        buffers = owner[0]() if owner is not None else None
        if buffers is not None and p.grad is None and (buffers.arrived or buffers.passes):
            labels.append(buffers.label(p))
    return labels


def _guard(clip):
    @functools.wraps(clip)
    def guarded(parameters, *args, **kwargs):
        if not isinstance(parameters, torch.Tensor):
            parameters = list(parameters)   # a generator would be spent by the check
        held = holding(parameters)
        if held:
            raise RuntimeError(
                f"fused_accum: torch.nn.utils.{clip.__name__} was called on parameters whose "
                f"gradients a fused optimizer holds ({', '.join(held[:3])}"
                f"{', ...' if len(held) > 3 else ''}): .grad is empty, so it would clip nothing. "
                "Pass max_grad_norm= to the optimizer (it clips the window's global norm in its "
                "kernels), or, inside a framework, use its integration in "
                "fused_accum.integrations")
        return clip(parameters, *args, **kwargs)
    setattr(guarded, _GUARDED, True)
    return guarded


def install() -> None:
    """Wrap torch's gradient clipping functions (idempotent)."""
    from torch.nn.utils import clip_grad as module
    for name in _CLIP_FUNCTIONS:
        for namespace in (torch.nn.utils, module):
            original = getattr(namespace, name)
            if not getattr(original, _GUARDED, False):
                setattr(namespace, name, _guard(original))


def accelerate_accumulating() -> bool:
    """Whether accelerate (directly, or under transformers.Trainer) is forming accumulation
    windows right now: inside ``accumulate()`` on a micro-batch that does not end its window."""
    state = sys.modules.get("accelerate.state")
    if state is None:
        return False
    shared = getattr(getattr(state, "GradientState", None), "_shared_state", None) or {}
    return shared.get("sync_gradients", True) is False
