"""Guards against code around a fused optimizer that would silently train wrongly.

A fused optimizer takes every gradient the moment autograd delivers it, so ``.grad`` is empty
between ``backward()`` and ``step()``.  Code written for plain PyTorch that reads gradients there
would see nothing and carry on: ``clip_grad_norm_`` would clip nothing and report a norm of 0, and
accelerate's (or transformers.Trainer's) own accumulation around an optimizer that also counts
micro-batches would count every window twice.  These guards turn both into clear errors that name
what to use instead.

``install()`` wraps ``torch.nn.utils.clip_grad_norm_`` and ``clip_grad_value_`` once, when the
first fused optimizer is built, and ``accelerate.Accelerator``'s methods of the same names once
accelerate is imported (checked again at every backward pass): accelerate clips without calling
torch's function (it skips parameters whose ``.grad`` is None, then computes a norm of nothing),
and transformers.Trainer clips through it.  For parameters that no fused optimizer holds, the
wrappers only call through.
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


def _refuse_held(parameters: Any, what: str) -> Any:
    """``parameters`` as a list (a generator would be spent by the check), or raise if a fused
    optimizer holds their gradients."""
    if not isinstance(parameters, torch.Tensor):
        parameters = list(parameters)
    held = holding(parameters)
    if held:
        raise RuntimeError(
            f"fused_accum: {what} was called on parameters whose gradients a fused optimizer "
            f"holds ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}): .grad is empty, "
            "so it would clip nothing. Pass max_grad_norm= to the optimizer (it clips the "
            "window's global norm in its kernels), or, inside a framework, use its integration "
            "in fused_accum.integrations")
    return parameters


def _guard(clip):
    @functools.wraps(clip)
    def guarded(parameters, *args, **kwargs):
        return clip(_refuse_held(parameters, f"torch.nn.utils.{clip.__name__}"), *args, **kwargs)
    setattr(guarded, _GUARDED, True)
    return guarded


def _guard_method(clip):
    @functools.wraps(clip)
    def guarded(self, parameters, *args, **kwargs):
        return clip(self, _refuse_held(parameters, f"accelerator.{clip.__name__}"), *args, **kwargs)
    setattr(guarded, _GUARDED, True)
    return guarded


_accelerate_guarded = False


def install() -> None:
    """Wrap torch's gradient clipping functions, and accelerate's once it is imported
    (idempotent)."""
    from torch.nn.utils import clip_grad as module
    for name in _CLIP_FUNCTIONS:
        for namespace in (torch.nn.utils, module):
            original = getattr(namespace, name)
            if not getattr(original, _GUARDED, False):
                setattr(namespace, name, _guard(original))
    install_accelerate()


def install_accelerate() -> None:
    """Wrap ``accelerate.Accelerator.clip_grad_norm_`` / ``clip_grad_value_`` if accelerate is
    imported (one dictionary lookup once done or while it is not)."""
    global _accelerate_guarded
    if _accelerate_guarded:
        return
    module = sys.modules.get("accelerate.accelerator")
    accelerator = getattr(module, "Accelerator", None)
    if accelerator is None:
        return
    for name in _CLIP_FUNCTIONS:
        original = accelerator.__dict__.get(name)
        if original is not None and not getattr(original, _GUARDED, False):
            setattr(accelerator, name, _guard_method(original))
    _accelerate_guarded = True


def accelerate_accumulating() -> bool:
    """Whether accelerate (directly, or under transformers.Trainer) is forming accumulation
    windows right now: inside ``accumulate()`` on a micro-batch that does not end its window."""
    state = sys.modules.get("accelerate.state")
    if state is None:
        return False
    shared = getattr(getattr(state, "GradientState", None), "_shared_state", None) or {}
    return shared.get("sync_gradients", True) is False
