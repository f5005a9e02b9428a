"""The autograd Function of a fused Linear: input and bias gradients as autograd's, the weight
gradient handed to the optimizer's gradient engine as the GEMM's operands."""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor


class LinearWithFusedWeightGrad(torch.autograd.Function):
    """``F.linear(input, weight, bias)``; in backward the weight's gradient goes to ``engine``
    (:meth:`fused_accum.accumulation.GradBuffers.take_linear_grad`) when it takes it, else to
    autograd as usual (k = 1, a parameter it lost, ``create_graph=True``)."""

    @staticmethod
    def forward(ctx, input: Tensor, weight: Tensor, bias: Tensor | None,
                engine: weakref.ref) -> Tensor:
        ctx.save_for_backward(input, weight)
        # The parameter itself, for the engine to find it: a saved tensor may come back as
        # another tensor object (non-reentrant checkpointing recomputes what it saved).
        ctx.param = weight
        ctx.engine = engine
        return F.linear(input, weight, bias)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        input, weight = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = grad_output.matmul(weight)
        rows = grad_output.reshape(-1, grad_output.shape[-1])
        if ctx.needs_input_grad[2]:
            grad_bias = rows.sum(0)
        if ctx.needs_input_grad[1]:
            inputs = input.reshape(-1, input.shape[-1])
            engine = ctx.engine()
            # With create_graph=True the weight gradient must be a differentiable tensor.
            taken = (engine is not None and not torch.is_grad_enabled()
                     and engine.take_linear_grad(ctx.param, rows, inputs))
            if not taken:
                grad_weight = rows.t().mm(inputs)
        return grad_input, grad_weight, grad_bias, None
