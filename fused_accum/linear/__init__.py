"""Linear layers whose weight gradient is accumulated inside its GEMM (``opt.fuse_linear(model)``).

A fused ``nn.Linear`` computes its weight gradient ``grad_output^T @ input`` straight into the
window's fp32 sum for that weight (beta = 0 on the window's first touch, 1 after, see
:func:`fused_accum.kernels.reference.accumulate_linear`): no gradient tensor in the model's dtype
is made, nothing is rounded to it per micro-batch, and no accumulate call is spent on the weight.
:mod:`.function` is the autograd Function, :mod:`.fuse` the switch per module.
"""
from .fuse import fuse_linear, fused_modules, unfuse_linear

__all__ = ["fuse_linear", "fused_modules", "unfuse_linear"]
