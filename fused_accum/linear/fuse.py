"""Switching Linear modules to the fused weight gradient, and back.

A fused module's ``forward`` is an instance attribute (a ``functools.partial`` of
:func:`fused_forward`, so the module still pickles and deep-copies); its class, parameters and
state dict are unchanged.  Each forward decides afresh: the fused Function runs only where the
weight gradient can go straight into an accumulator with the same result as autograd's hooks,
and plain ``F.linear`` runs otherwise:

- the weight is held by an optimizer that takes gradients as they arrive (k > 1, data
  parallelism, a framework's windows) and was fused by it;
- no hook of the user's would miss the gradient (``register_hook`` on the weight, or a
  post-accumulate-grad hook other than the optimizer's own);
- not under ``torch.compile`` tracing (the compiled graph keeps autograd's gradient and the
  optimizer's hook), autocast (the GEMMs' dtypes are autocast's), or CUDA graph capture (the
  engine's bookkeeping is Python, which a replay does not run).
"""
from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import holders
from .function import LinearWithFusedWeightGrad, foreign_hooks

_LINEAR_FORWARD = nn.Linear.forward


def fusable(module: nn.Module) -> bool:
    """An ``nn.Linear`` (or a subclass keeping its forward, like MultiheadAttention's
    ``out_proj``, whose forward MultiheadAttention never calls)."""
    return isinstance(module, nn.Linear) and type(module).forward is _LINEAR_FORWARD


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _widened_gemm_pays(weight: Tensor) -> bool:
    """bf16/fp16 operands are widened to fp32 for the GEMM (see fused_accum/kernels/gemm.py):
    on a CPU that costs less than a bf16 GEMM; on a GPU it would give up the tensor cores, so
    there only fp32 weights are fused until a GEMM that writes fp32 from bf16 is wired in."""
    return weight.dtype is torch.float32 or weight.device.type == "cpu"


def fused_forward(module: nn.Linear, input: Tensor) -> Tensor:
    weight, bias = module.weight, module.bias
    if (torch.is_grad_enabled() and weight.requires_grad and _widened_gemm_pays(weight)
            and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled(input.device.type) and not _capturing(input.device)):
        engine = holders.taker(weight)
        if (engine is not None and weight in engine.fused_linear and weight in engine.hooks
                and not foreign_hooks(weight, engine)):
            return LinearWithFusedWeightGrad.apply(input, weight, bias, weakref.ref(engine))
    return F.linear(input, weight, bias)


def fuse_linear(engine: Any, model: nn.Module) -> list[str]:
    """Fuse every Linear of ``model`` whose weight ``engine`` holds; returns their names."""
    names = []
    for name, module in model.named_modules():
        if fusable(module) and module.weight in engine.slots:
            engine.fused_linear[module.weight] = None
            if not isinstance(module.__dict__.get("forward"), functools.partial):
                module.forward = functools.partial(fused_forward, module)
            names.append(name)
    return names


def unfuse_linear(model: nn.Module) -> None:
    """Give every fused Linear of ``model`` back its class's forward (and its weight back to the
    collector's plan)."""
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if isinstance(forward, functools.partial) and forward.func is fused_forward:
            del module.forward
            for holder in holders.holders(module.weight):
                holder.fused_linear.pop(module.weight, None)


def fused_modules(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules()
            if getattr(module.__dict__.get("forward"), "func", None) is fused_forward]
