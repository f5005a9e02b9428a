"""The autograd Function of a fused Linear: input and bias gradients as autograd's, the weight
gradient handed to the optimizer's gradient engine as the GEMM's operands."""
from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def foreign_hooks(weight: Tensor, engine: Any) -> bool:
    """Whether a hook of the user's on ``weight`` must see its gradient: ``register_hook``, or a
    post-accumulate-grad hook other than the optimizer's own.  (Hooks on the weight's
    AccumulateGrad node cannot be seen from Python: a fused weight's never run.)"""
    own = getattr(engine.hooks.handles.get(weight), "ids", ())
    return any(key not in own for hooks in (weight._backward_hooks,
                                            weight._post_accumulate_grad_hooks) if hooks
               for key in hooks)


def _accumulates(node: Any) -> bool:
    """Whether this backward pass accumulates into the weight (not ``backward(inputs=[x])`` or
    ``torch.autograd.grad``, which leave ``.grad`` alone)."""
    try:
        return torch._C._will_engine_execute_node(node)
    except RuntimeError:   # inside torch.autograd.grad
        return False


class LinearWithFusedWeightGrad(torch.autograd.Function):
    """``F.linear(input, weight, bias)``; in backward the weight's gradient goes to ``engine``
    (:meth:`fused_accum.accumulation.GradBuffers.take_linear_grad`) where autograd would
    accumulate it into the weight and no hook of the user's must see it, else to autograd as
    usual (k = 1, a parameter the engine lost, ``create_graph=True``, ``torch.autograd.grad``)."""

    @staticmethod
    def forward(ctx, input: Tensor, weight: Tensor, bias: Tensor | None,
                engine: weakref.ref) -> Tensor:
        ctx.save_for_backward(input, weight)
        # The parameter itself, for the engine to find it: a saved tensor may come back as
        # another tensor object (non-reentrant checkpointing recomputes what it saved).
        ctx.param = weight
        ctx.node = torch.autograd.graph.get_gradient_edge(weight).node
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
                     and _accumulates(ctx.node) and not foreign_hooks(ctx.param, engine)
                     and engine.take_linear_grad(ctx.param, rows, inputs))
            if not taken:
                grad_weight = rows.t().mm(inputs)
        return grad_input, grad_weight, grad_bias, None
