"""The ``extension`` backend: the compiled ops of csrc/ (C++ on CPU, CUDA on NVIDIA GPUs).

Same contract as :mod:`fused_accum.kernels.reference`; this module adapts the reference's
Python-level arguments (None for absent lists, floats or tensors for scalars) to the op schemas
of :mod:`fused_accum.kernels.schemas`.  The kernels need contiguous tensors: the rare
non-contiguous parameter or gradient goes through a contiguous copy.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import build

name = "extension"


def available(device: torch.device) -> tuple[bool, str]:
    error = build.load(torch.device(device).type)
    return (True, "compiled C++/CUDA ops") if error is None else (False, error)


def _ops():
    return torch.ops.fused_accum


def _scalar(value: float | Tensor, like: Tensor) -> Tensor:
    """A 0-d fp32 tensor on ``like``'s device (no host read of a device value)."""
    if isinstance(value, Tensor):
        return value.to(device=like.device, dtype=torch.float32).reshape(())
    return torch.full((), float(value), dtype=torch.float32, device=like.device)


def _contiguous(tensors: list[Tensor]) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]]]:
    """Contiguous versions of ``tensors`` and the (original, copy) pairs to write back."""
    out, write_back = [], []
    for t in tensors:
        if t.is_contiguous():
            out.append(t)
        else:
            c = t.contiguous()
            out.append(c)
            write_back.append((t, c))
    return out, write_back


def _write_back(pairs: list[tuple[Tensor, Tensor]]) -> None:
    for original, copy in pairs:
        original.copy_(copy)


def accumulate(grads, accs, first, weight, found_inf, sumsq=None) -> None:
    if not accs:
        return
    grads = [g.contiguous() for g in grads]
    _ops().accumulate(grads, accs, [int(f) for f in first], _scalar(weight, accs[0]), found_inf,
                      sumsq)


def norm(accs, sumsq) -> None:
    if accs:
        _ops().norm(accs, sumsq)


def sgd_step(params, accs, momentum_buffers, steps, masters, *, lr, momentum, dampening,
             weight_decay, nesterov, maximize, grad_scale, found_inf, rounding_seed=-1) -> None:
    if not params:
        return
    params, write_back = _contiguous(params)
    _ops().sgd_step(params, accs, momentum_buffers or [], steps, masters or [],
                    _scalar(lr, accs[0]), momentum, dampening, weight_decay, nesterov, maximize,
                    _scalar(grad_scale, accs[0]), found_inf, rounding_seed)
    _write_back(write_back)


def adam_step(params, accs, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, masters, *, lr, beta1,
              beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_scale,
              found_inf, rounding_seed=-1) -> None:
    if not params:
        return
    params, write_back = _contiguous(params)
    _ops().adam_step(params, accs, exp_avgs, exp_avg_sqs, max_exp_avg_sqs or [], steps,
                     masters or [], _scalar(lr, accs[0]), beta1, beta2, eps, weight_decay, amsgrad,
                     maximize, decoupled_weight_decay, _scalar(grad_scale, accs[0]), found_inf,
                     rounding_seed)
    _write_back(write_back)
