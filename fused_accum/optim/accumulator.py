"""FusedAccumulator: accumulation windows around an existing optimizer."""
from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

from .. import holders
from ..accumulation.buckets import Bucket
from ._args import check_adam, refuse_differentiable
from .adam import ADAM_ALGORITHM
from .base import AccumulatingOptimizer, Algorithm
from .sgd import SGD, SGD_ALGORITHM

# Exact types only: a subclass of torch's SGD may change its maths.
_FUSED = {torch.optim.SGD: SGD_ALGORITHM, torch.optim.Adam: ADAM_ALGORITHM,
          torch.optim.AdamW: ADAM_ALGORITHM}


def _no_update(*_: Any) -> None:
    raise AssertionError("the wrapped optimizer's own step() applies the update")


class FusedAccumulator(AccumulatingOptimizer):
    """Gradient accumulation around ``optimizer``.

    ``torch.optim.SGD``, ``Adam`` and ``AdamW`` are stepped by fused_accum's own kernels, with
    their param groups shared (an LR scheduler on either object drives both) and their state
    taken over; use the wrapper from then on.  Any other optimizer gets fp32 accumulation: at the
    end of a window each parameter's ``.grad`` is set to the window's mean gradient (clipped, in
    the parameter's dtype) and ``optimizer.step()`` runs.  That path reads the non-finite flag on
    the host once per window and keeps no master weights (the wrapped optimizer owns the update).
    """

    def __init__(self, optimizer: Optimizer, accumulation_steps: int = 1,
                 max_grad_norm: float | None = None, master_weights: bool | None = None,
                 loss_scale: Any = "auto", nonfinite: str = "skip", stochastic_rounding: bool = False,
                 process_group: Any = "auto", shard_state: bool = False,
                 backend: str = "auto") -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        if isinstance(optimizer, AccumulatingOptimizer):
            raise TypeError("optimizer: already a fused_accum optimizer; set its "
                            "accumulation_steps instead of wrapping it")
        self.optimizer = optimizer
        fused = _FUSED.get(type(optimizer))
        self.fused = fused is not None
        if not self.fused and master_weights:
            raise ValueError(f"master_weights=True needs a fused optimizer (torch.optim.SGD, Adam "
                             f"or AdamW); {type(optimizer).__name__} updates the parameters itself")
        if not self.fused and shard_state:
            raise ValueError(f"shard_state=True needs a fused optimizer (torch.optim.SGD, Adam or "
                             f"AdamW); {type(optimizer).__name__} keeps its own state whole")
        self.algorithm = fused if fused is not None else Algorithm(lambda group: [], _no_update)
        for group in optimizer.param_groups:
            refuse_differentiable(group.get("differentiable", False))
        super().__init__(optimizer.param_groups, dict(optimizer.defaults),
                         accumulation_steps=accumulation_steps, max_grad_norm=max_grad_norm,
                         master_weights=self.fused if master_weights is None else master_weights,
                         loss_scale=loss_scale, nonfinite=nonfinite,
                         stochastic_rounding=stochastic_rounding, process_group=process_group,
                         shard_state=shard_state, backend=backend)
        self.param_groups = optimizer.param_groups   # shared: schedulers on either object agree
        if self.fused and optimizer.state:
            self.load_state_dict(optimizer.state_dict())

    def validate_group(self, group: dict[str, Any]) -> None:
        if self.algorithm is SGD_ALGORITHM:
            SGD.validate_group(self, group)
        elif self.algorithm is ADAM_ALGORITHM:
            check_adam(group)

    def _apply(self, buckets: list[Bucket], scales: dict, found: dict) -> None:
        if self.fused:
            super()._apply(buckets, scales, found)
            # The wrapped optimizer's update happened (through our kernels): tell LR schedulers
            # attached to it, which read this flag to warn about stepping out of order.
            self.optimizer._opt_called = True
            return
        if any(flag.item() != 0 for flag in found.values()):
            return   # a non-finite gradient in the window: skip the step
        collecting = self._buffers.collecting
        handed = []
        for bucket in buckets:
            for i in bucket.touched_indices():
                p = bucket.params[i]
                grad = (bucket.acc_view(i) * scales[bucket.device]).to(p.dtype)
                if collecting:
                    p.grad = grad
                    handed.append(p)
                else:   # in .grad already: unscaled and clipped in place, as torch's tools do
                    p.grad.copy_(grad)
        for (bucket, i), total in self._window.sparse.coalesced().items():
            p = bucket.params[i]   # a sparse .grad for the wrapped optimizer (SparseAdam)
            p.grad = total * scales[bucket.device]
            if collecting:
                handed.append(p)
        holders.stepping_inner.add(id(self.optimizer))
        try:
            self.optimizer.step()
        finally:
            holders.stepping_inner.discard(id(self.optimizer))
            for p in handed:
                p.grad = None

    def _steps_sparse(self) -> bool:
        return not self.fused or super()._steps_sparse()

    def _packed_state(self, whole: bool) -> dict[str, Any]:
        packed = super()._packed_state(whole)
        if not self.fused:
            packed["inner"] = self.optimizer.state_dict()
        return packed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self.fused and "inner" not in state_dict and "fused_accum" not in state_dict:
            # The wrapped optimizer's own dict (torch's format): its state, the window empty.
            state_dict = {"state": {}, "param_groups": state_dict["param_groups"],
                          "inner": state_dict}
        if not self.fused and "inner" not in state_dict:
            raise ValueError("state_dict: no 'inner' entry; expected a FusedAccumulator state "
                             f"dict around {type(self.optimizer).__name__}")
        super().load_state_dict(state_dict)
        if not self.fused:
            self.optimizer.load_state_dict(state_dict["inner"])
            # torch's load_state_dict gives the inner optimizer new param group dicts; share
            # ours again (loaded with the same values), or schedulers would drive a stale copy
            self.optimizer.param_groups = self.param_groups
