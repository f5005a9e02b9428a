"""Guards against code around a fused optimizer that would silently train wrongly.

Where a fused optimizer takes every gradient the moment autograd delivers it (accumulation,
data parallelism, a framework's windows), ``.grad`` is empty between ``backward()`` and
``step()``.  Code written for plain PyTorch that reads gradients there would see nothing and carry
on: ``clip_grad_norm_`` would clip nothing and report a norm of 0, and accelerate's (or
transformers.Trainer's) own accumulation around an optimizer that also counts micro-batches would
count every window twice.  These guards turn both into clear errors that name what to use
instead, and make ``nn.Module.zero_grad`` discard what the optimizer took since its last step, as
it empties ``.grad`` under torch.optim.

``install()``, when the first fused optimizer is built, guards torch's clipping functions
(``clip_grad_norm_``, ``clip_grad_value_``, ``clip_grads_with_norm_``, and ``get_total_norm``
handed an empty ``.grad``) however they were imported,
``nn.Module.zero_grad``, and ``accelerate.Accelerator``'s clipping methods once accelerate is
imported (checked again at every backward pass): accelerate clips without calling torch's function
(it skips parameters whose ``.grad`` is None, then computes a norm of nothing), and
transformers.Trainer clips through it.  For parameters that no fused optimizer holds, the guards
only call through.
"""
from __future__ import annotations

import functools
import sys
from typing import Any

import torch

from . import holders
from .placeholders import grad_or_none, is_placeholder

# torch.nn.utils' clipping functions, by the name they have in torch.nn.utils.clip_grad; the
# last is what ``torch.nn.utils.clip_grads_with_norm_`` (after ``get_total_norm``) is.
_CLIP_FUNCTIONS = ("clip_grad_norm_", "clip_grad_value_", "_clip_grads_with_norm_")
_TOTAL_NORM = "_get_total_norm"   # torch.nn.utils.get_total_norm: its gradients must not be None
_GUARDED = "_fused_accum_guarded"


def holding(parameters: Any) -> list[str]:
    """Labels of the ``parameters`` whose gradients a fused optimizer holds instead of ``.grad``
    (taken as they arrived in this window), or keeps scaled by its loss scale in ``.grad``."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    labels = []
    for p in params:
        owner = holders.taker(p)
        if owner is not None:
            if grad_or_none(p) is None and (owner.window.arrived or owner.passes
                                            or owner.holds_sum(p)):
                labels.append(owner.label(p))
        elif p.grad is not None and any(h.window.grads_scaled for h in holders.holders(p)):
            labels.append(holders.holders(p)[0].label(p) + " (scaled by the loss scale)")
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
            f"holds ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}): .grad is empty "
            "(or, with loss scaling, scaled), so it would clip the wrong thing or nothing. Pass "
            "max_grad_norm= to the optimizer (it clips the window's global norm in its kernels), "
            "or, inside a framework, use its integration in fused_accum.integrations")
    return parameters


def _guard(clip, what: str):
    @functools.wraps(clip)
    def guarded(parameters, *args, **kwargs):
        return clip(_refuse_held(parameters, what), *args, **kwargs)
    setattr(guarded, _GUARDED, True)
    return guarded


def _guard_method(clip):
    @functools.wraps(clip)
    def guarded(self, parameters, *args, **kwargs):
        return clip(self, _refuse_held(parameters, f"accelerator.{clip.__name__}"), *args, **kwargs)
    setattr(guarded, _GUARDED, True)
    return guarded


def _guard_total_norm(total_norm, what: str):
    """``get_total_norm`` takes gradients, not parameters: a None among them is a ``.grad`` that
    is empty, as a fused optimizer leaves it.  torch would fail on it without saying why."""
    @functools.wraps(total_norm)
    def guarded(tensors, *args, **kwargs):
        if not isinstance(tensors, torch.Tensor):
            tensors = list(tensors)
            if any(t is None or is_placeholder(t) for t in tensors):
                raise RuntimeError(
                    f"fused_accum: {what} got None (or a placeholder) in place of a gradient: "
                    "where a fused optimizer takes gradients as they arrive (accumulation_steps > "
                    "1, data parallelism, a framework's windows), .grad holds no gradient between "
                    "backward() and step(). Pass max_grad_norm= to the optimizer (it clips the "
                    "window's global norm in its kernels) and read opt.grad_norm")
        return total_norm(tensors, *args, **kwargs)
    setattr(guarded, _GUARDED, True)
    return guarded


def _install_clip_guard(module: Any, name: str) -> None:
    """Guard torch's clipping function ``name`` wherever it was imported from: torch wraps each
    in a ``_no_grad`` closure, whose cell is replaced, so that a reference taken before fused_accum
    was imported (``from torch.nn.utils import clip_grad_norm_``) is guarded too.  Without such a
    closure, the module attributes are replaced."""
    public = getattr(module, name)
    if getattr(public, _GUARDED, False):
        return
    what = "torch.nn.utils." + name.lstrip("_")
    make_guard = _guard_total_norm if name == _TOTAL_NORM else _guard
    cells = getattr(public, "__closure__", None) or ()
    inner = getattr(public, "__wrapped__", None)
    cell = next((c for c in cells if inner is not None and c.cell_contents is inner), None)
    if cell is not None:
        cell.cell_contents = make_guard(inner, what)
        setattr(public, _GUARDED, True)
        return
    guarded = make_guard(public, what)
    for namespace in (module, torch.nn.utils):
        for attr in (name, name.lstrip("_")):
            if getattr(namespace, attr, None) is public:
                setattr(namespace, attr, guarded)


def _guard_module_zero_grad(zero_grad):
    """``nn.Module.zero_grad`` also discards what a fused optimizer took of the module's
    gradients since its last step(), as it empties ``.grad`` under torch.optim (GAN training:
    ``D.zero_grad()`` after the generator's backward pass reached D's parameters)."""
    @functools.wraps(zero_grad)
    def guarded(self, set_to_none: bool = True) -> None:
        taken: dict[Any, list[torch.Tensor]] = {}
        for p in self.parameters():
            owner = holders.taker(p)
            if owner is not None:
                taken.setdefault(owner, []).append(p)
        for owner, params in taken.items():   # torch's zero_grad would use their placeholders
            owner.placeholders.clear(False, params)
        zero_grad(self, set_to_none)
        for owner, params in taken.items():
            handler = owner.on_zero_grad() if owner.on_zero_grad is not None else None
            if handler is not None:
                handler(params, set_to_none)
    setattr(guarded, _GUARDED, True)
    return guarded


_accelerate_guarded = False


def install() -> None:
    """Wrap torch's gradient clipping functions, and accelerate's once it is imported
    (idempotent)."""
    from torch.nn.utils import clip_grad as module
    for name in (*_CLIP_FUNCTIONS, _TOTAL_NORM):
        if hasattr(module, name):
            _install_clip_guard(module, name)
    if not getattr(torch.nn.Module.zero_grad, _GUARDED, False):
        torch.nn.Module.zero_grad = _guard_module_zero_grad(torch.nn.Module.zero_grad)
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
