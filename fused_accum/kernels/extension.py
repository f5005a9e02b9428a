"""The ``extension`` backend: the compiled ops of csrc/ (C++ on CPU, CUDA on NVIDIA GPUs).

Same contract as :mod:`fused_accum.kernels.reference`; this module adapts the reference's
Python-level arguments (None for absent lists, floats or tensors for scalars) to the op schemas
of :mod:`fused_accum.kernels.schemas`.  The kernels need contiguous tensors: the rare
non-contiguous parameter or gradient goes through a contiguous copy.
"""
from __future__ import annotations

import torch

from . import build
from ._adapt import contiguous, contiguous_inputs, scalar, write_back
from .gemm import accumulate_linear  # noqa: F401  (the library GEMM; see gemm.py)

name = "extension"


def available(device: torch.device) -> tuple[bool, str]:
    error = build.load(torch.device(device).type)
    return (True, "compiled C++/CUDA ops") if error is None else (False, error)


def _ops():
    return torch.ops.fused_accum


def accumulate(grads, accs, first, weight, found_inf, sumsq=None) -> None:
    if not accs:
        return
    grads = contiguous_inputs(grads)
    _ops().accumulate(grads, accs, [int(f) for f in first], scalar(weight, accs[0]), found_inf,
                      sumsq)


def norm(accs, sumsq) -> None:
    if accs:
        _ops().norm(accs, sumsq)


def sgd_step(params, accs, momentum_buffers, steps, masters, *, lr, momentum, dampening,
             weight_decay, nesterov, maximize, grad_scale, found_inf, rounding_seed=-1) -> None:
    if not params:
        return
    params, pending = contiguous(params)
    _ops().sgd_step(params, accs, momentum_buffers or [], steps, masters or [],
                    scalar(lr, accs[0]), momentum, dampening, weight_decay, nesterov, maximize,
                    scalar(grad_scale, accs[0]), found_inf, rounding_seed)
    write_back(pending)


def adam_step(params, accs, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, masters, *, lr, beta1,
              beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_scale,
              found_inf, rounding_seed=-1) -> None:
    if not params:
        return
    params, pending = contiguous(params)
    _ops().adam_step(params, accs, exp_avgs, exp_avg_sqs, max_exp_avg_sqs or [], steps,
                     masters or [], scalar(lr, accs[0]), beta1, beta2, eps, weight_decay, amsgrad,
                     maximize, decoupled_weight_decay, scalar(grad_scale, accs[0]), found_inf,
                     rounding_seed)
    write_back(pending)
