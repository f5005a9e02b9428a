"""SGD with accumulation: the functional update of one bucket and the thin optimizer class."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from ..accumulation import sparse
from ..accumulation.buckets import Bucket
from ._args import check_common, refuse_differentiable, scalar
from .base import AccumulatingOptimizer, Algorithm


def sgd_state_names(group: dict[str, Any]) -> list[str]:
    return ["momentum_buffer"] if group["momentum"] != 0 else []


def sgd_update(bucket: Bucket, indices: list[int], group: dict[str, Any],
               grad_scale: float | Tensor, found_inf: Tensor) -> None:
    """One SGD step of ``indices`` of ``bucket`` with grad = acc * grad_scale."""
    momentum = scalar(group["momentum"])
    buffers = None
    if momentum != 0:
        buffers = bucket.views(bucket.ensure_state("momentum_buffer"), indices)
    masters = bucket.master_views(indices)
    bucket.backend.sgd_step(
        [bucket.params[i] for i in indices], bucket.acc_views(indices), buffers,
        bucket.step_views(indices), masters,
        lr=group["lr"], momentum=momentum, dampening=scalar(group["dampening"]),
        weight_decay=scalar(group["weight_decay"]), nesterov=bool(group["nesterov"]),
        maximize=bool(group["maximize"]), grad_scale=grad_scale, found_inf=found_inf,
        rounding_seed=bucket.rounding_seed)


def sgd_sparse_update(bucket: Bucket, i: int, grad: sparse.SparseSum, group: dict[str, Any],
                      grad_scale: float | Tensor, found_inf: Tensor) -> None:
    """One SGD step of parameter ``i`` of ``bucket`` from its sum of sparse gradients."""
    momentum = scalar(group["momentum"])
    buffer = bucket.view(bucket.ensure_state("momentum_buffer"), i) if momentum != 0 else None
    sparse.sgd_step(bucket.params[i].detach(), grad, buffer, bucket.step_views([i])[0],
                    lr=group["lr"], momentum=momentum, dampening=scalar(group["dampening"]),
                    weight_decay=scalar(group["weight_decay"]), nesterov=bool(group["nesterov"]),
                    maximize=bool(group["maximize"]), grad_scale=grad_scale, found_inf=found_inf)


SGD_ALGORITHM = Algorithm(sgd_state_names, sgd_update, known_state=("momentum_buffer",),
                          sparse_update=sgd_sparse_update)


class SGD(AccumulatingOptimizer):
    """``torch.optim.SGD`` with gradient accumulation in fp32 buffers.

    Takes every argument of ``torch.optim.SGD`` (``foreach`` and ``fused`` are accepted and have no
    effect: the kernels are always fused; ``differentiable=True`` is refused), plus
    ``accumulation_steps``, ``max_grad_norm``, ``master_weights``, ``loss_scale``, ``nonfinite``
    and ``backend`` (see :class:`fused_accum.AccumulatingOptimizer`).
    """

    algorithm = SGD_ALGORITHM

    def __init__(self, params: Any, lr: float | Tensor = 1e-3, momentum: float = 0,
                 dampening: float = 0, weight_decay: float | Tensor = 0, nesterov: bool = False,
                 *, maximize: bool = False, foreach: bool | None = None,
                 differentiable: bool = False, fused: bool | None = None,
                 accumulation_steps: int = 1, max_grad_norm: float | None = None,
                 master_weights: bool | str = True, loss_scale: Any = "auto", nonfinite: str = "skip",
                 stochastic_rounding: bool = False, process_group: Any = "auto",
                 shard_state: bool = False, backend: str = "auto",
                 fuse_linear: bool = True) -> None:
        refuse_differentiable(differentiable)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach,
                        differentiable=differentiable, fused=fused)
        super().__init__(params, defaults, accumulation_steps=accumulation_steps,
                         max_grad_norm=max_grad_norm, master_weights=master_weights,
                         loss_scale=loss_scale, nonfinite=nonfinite,
                         stochastic_rounding=stochastic_rounding, process_group=process_group,
                         shard_state=shard_state, backend=backend,
                         fuse_linear=fuse_linear)

    def validate_group(self, group: dict[str, Any]) -> None:
        check_common(group)
        if scalar(group["momentum"]) < 0:
            raise ValueError(f"momentum must be >= 0, got {group['momentum']!r}")
        if group["nesterov"] and (scalar(group["momentum"]) <= 0 or scalar(group["dampening"]) != 0):
            raise ValueError("nesterov=True requires momentum > 0 and dampening = 0")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)

    def _implied_step(self, entry: dict[str, Any]) -> int:
        # torch's SGD keeps no step count: a momentum buffer means the parameter has stepped.
        return 1 if "momentum_buffer" in entry and entry["momentum_buffer"] is not None else 0


