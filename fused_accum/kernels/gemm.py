"""``accumulate_linear`` through the library GEMM (oneDNN/MKL on CPUs, cuBLAS on GPUs): a Linear's
weight gradient written straight into its fp32 sum by ``addmm``'s beta, 0 on the window's first
touch (the sum is not read) and 1 after.  The extension and Triton backends share it; the
specification is :func:`fused_accum.kernels.reference.accumulate_linear`.

bf16 and fp16 operands are widened to fp32 first: torch 2.13 has no CPU GEMM that reads them and
writes fp32 (``addmm(out_dtype=)`` is CUDA only), and widening costs a pass over the activations
and output gradients, not over the weight.  A device weight (items, 1 / loss scale) multiplies
the smaller operand: GEMM's alpha is a host number, and reading it would synchronise.
"""
from __future__ import annotations

import torch
from torch import Tensor

_FP32 = torch.float32


# Widened operands are made this many bytes of rows at a time: the fp32 copies of an LM head's
# output gradient (tokens x vocabulary) would otherwise cost more memory than the gradient saved.
WIDEN_BYTES = 32 * 2**20


def accumulate_linear(grad_outputs: list[Tensor], inputs: list[Tensor], accs: list[Tensor],
                      first: list[bool], weight: Tensor | None, sumsq: Tensor | None = None) -> None:
    for g, x, acc, is_first in zip(grad_outputs, inputs, accs, first):
        rows = g.shape[0]
        step = rows
        if g.dtype is not _FP32 or x.dtype is not _FP32 or weight is not None:
            step = max(1, WIDEN_BYTES // (4 * (g.shape[1] + x.shape[1])))
        for start in range(0, max(rows, 1), step):
            gs, xs = g[start:start + step].to(_FP32), x[start:start + step].to(_FP32)
            if weight is not None:
                if gs.shape[1] <= xs.shape[1]:
                    gs = gs * weight
                else:
                    xs = xs * weight
            acc.addmm_(gs.t(), xs, beta=0 if is_first and start == 0 else 1)
        if sumsq is not None:
            flat = acc.view(-1)
            sumsq.add_(torch.dot(flat, flat))
