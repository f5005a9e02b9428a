"""accelerate: ``follow(accelerator, optimizer)`` for loops that accumulate with
``with accelerator.accumulate(model):``.

The recipe, one changed line (the optimizer) and one added (``follow``)::

    accelerator = Accelerator(gradient_accumulation_steps=8)
    optimizer = fused_accum.AdamW(model.parameters(), lr=3e-4)   # accumulation_steps=1
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    fused_accum.integrations.accelerate.follow(accelerator, optimizer)
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)   # now clips in the kernels
            optimizer.step()        # accelerate calls it at each window's end only
            scheduler.step()
            optimizer.zero_grad()

accelerate keeps forming the windows (and their short last window, divided by k as accelerate
does); ``follow`` tells the fused optimizer which backward pass ends each window, makes
``accelerator.clip_grad_norm_`` on its parameters set the optimizer's ``max_grad_norm`` and
return the window's pre-clip norm (a tensor the step fills in: read it after ``step()``),
switches off a DDP wrapper ``prepare`` made (the optimizer reduces once per window), and with
``mixed_precision="fp16"`` replaces accelerate's GradScaler by the optimizer's own loss scaling
(build it with ``loss_scale="dynamic"``), and fuses the prepared models' ``nn.Linear`` weight
gradients into the window's sums (``fuse_linear=False``: not).  It returns the fused optimizer,
for ``grad_norm`` and the rest of its attributes, which accelerate's wrapper does not forward.
"""
from __future__ import annotations

from typing import Any

from ..optim._args import check_max_grad_norm
from ..optim.base import AccumulatingOptimizer
from ._common import fused, unwrap


def follow(accelerator: Any, optimizer: Any, fuse_linear: bool = True) -> AccumulatingOptimizer:
    """Let ``accelerator.accumulate()`` drive the windows of the fused ``optimizer`` (as returned
    by ``accelerator.prepare``, or before).  With ``fuse_linear`` (the default) every
    ``nn.Linear`` of the models ``accelerator.prepare`` has seen whose weight the optimizer holds
    computes its weight gradient into the window's sum (docs/fused-linear.md)."""
    inner = unwrap(optimizer)
    if not isinstance(inner, AccumulatingOptimizer):
        raise TypeError(f"fused_accum: follow() needs a fused_accum optimizer, got "
                        f"{type(inner).__name__}; build it with fused_accum (or wrap it in "
                        "fused_accum.FusedAccumulator) before accelerator.prepare()")
    fused(inner, accumulation_setting="Accelerator(gradient_accumulation_steps=...)",
          max_grad_norm=None, clip_setting="accelerator.clip_grad_norm_")
    inner.final_micro_batch = lambda: accelerator.sync_gradients
    _route_clipping(accelerator, inner)
    if accelerator.scaler is not None:
        _take_over_fp16(accelerator, optimizer, inner)
    inner._check_wrappers()   # a DDP wrapper made by prepare(): off before the first backward
    if fuse_linear:
        for model in accelerator._models:
            inner.fuse_linear(model)
    return inner


def _route_clipping(accelerator: Any, inner: AccumulatingOptimizer) -> None:
    clip_elsewhere = accelerator.clip_grad_norm_
    preset = inner.max_grad_norm   # the optimizer's own clipping, if it was built with one

    def clip_grad_norm_(parameters: Any, max_norm: float, norm_type: float = 2, **kwargs: Any):
        parameters = [parameters] if hasattr(parameters, "grad") else list(parameters)
        if not any(p in inner._buffers.slots for p in parameters):
            return clip_elsewhere(parameters, max_norm, norm_type, **kwargs)
        if float(norm_type) != 2.0:
            raise ValueError(f"fused_accum: clip_grad_norm_(norm_type={norm_type}): the kernels "
                             "clip the global 2-norm")
        if preset is not None and float(max_norm) != preset:
            raise ValueError(f"fused_accum: the optimizer clips to max_grad_norm={preset} and "
                             f"accelerator.clip_grad_norm_ asks for {max_norm}; set one")
        # The optimizer's parameters: those of the call it does not hold have no gradient.
        inner.max_grad_norm = check_max_grad_norm(max_norm)
        return inner.live_grad_norm()
    accelerator.clip_grad_norm_ = clip_grad_norm_


def _take_over_fp16(accelerator: Any, optimizer: Any, inner: AccumulatingOptimizer) -> None:
    if inner._scaler is None:
        raise ValueError("fused_accum: mixed_precision='fp16' makes accelerate scale the loss "
                         "with torch.amp.GradScaler, which cannot see fused_accum's gradients; "
                         "build the optimizer with loss_scale='dynamic' (follow() then hands "
                         "the scaling to it), or use mixed_precision='bf16'")
    accelerator.scaler = None
    wrapper = optimizer
    while wrapper is not inner and wrapper is not None:   # AcceleratedOptimizer keeps a copy
        if hasattr(wrapper, "scaler"):
            wrapper.scaler = None
        wrapper = getattr(wrapper, "optimizer", None)

    def backward(loss: Any, **kwargs: Any) -> None:
        kwargs.pop("learning_rate", None)
        inner.backward(loss / accelerator.gradient_accumulation_steps, **kwargs)
    accelerator.backward = backward
