"""Adam and AdamW with accumulation: the functional update of one bucket and the thin classes."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from ..accumulation.buckets import Bucket
from ._args import check_adam, refuse_differentiable, scalar
from .base import AccumulatingOptimizer, Algorithm


def adam_state_names(group: dict[str, Any]) -> list[str]:
    return ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])


def adam_update(bucket: Bucket, indices: list[int], group: dict[str, Any],
                grad_scale: float | Tensor, found_inf: Tensor) -> None:
    """One Adam/AdamW step of ``indices`` of ``bucket`` with grad = acc * grad_scale."""
    views = {name: bucket.views(bucket.ensure_state(name), indices)
             for name in adam_state_names(group)}
    masters = bucket.master_views(indices)
    beta1, beta2 = group["betas"]
    bucket.backend.adam_step(
        [bucket.params[i] for i in indices], bucket.acc_views(indices),
        views["exp_avg"], views["exp_avg_sq"], views.get("max_exp_avg_sq"),
        bucket.step_views(indices), masters,
        lr=group["lr"], beta1=scalar(beta1), beta2=scalar(beta2), eps=scalar(group["eps"]),
        weight_decay=scalar(group["weight_decay"]), amsgrad=bool(group["amsgrad"]),
        maximize=bool(group["maximize"]),
        decoupled_weight_decay=bool(group["decoupled_weight_decay"]),
        grad_scale=grad_scale, found_inf=found_inf, rounding_seed=bucket.rounding_seed)


ADAM_ALGORITHM = Algorithm(adam_state_names, adam_update,
                           known_state=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
                           required_state=adam_state_names)


class Adam(AccumulatingOptimizer):
    """``torch.optim.Adam`` with gradient accumulation in fp32 buffers.

    Takes every argument of ``torch.optim.Adam`` (``foreach``, ``fused`` and ``capturable`` are
    accepted and have no effect: the kernels are always fused and never sync; ``differentiable=True``
    is refused), plus ``accumulation_steps``, ``max_grad_norm``, ``master_weights``, ``loss_scale``,
    ``nonfinite`` and ``backend`` (see :class:`fused_accum.AccumulatingOptimizer`).
    """

    algorithm = ADAM_ALGORITHM

    def __init__(self, params: Any, lr: float | Tensor = 1e-3,
                 betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, amsgrad: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, decoupled_weight_decay: bool = False,
                 accumulation_steps: int = 1, max_grad_norm: float | None = None,
                 master_weights: bool | str = True, loss_scale: Any = "auto", nonfinite: str = "skip",
                 stochastic_rounding: bool = False, process_group: Any = "auto",
                 shard_state: bool = False, backend: str = "auto",
                 fuse_linear: bool = True) -> None:
        refuse_differentiable(differentiable)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults, accumulation_steps=accumulation_steps,
                         max_grad_norm=max_grad_norm, master_weights=master_weights,
                         loss_scale=loss_scale, nonfinite=nonfinite,
                         stochastic_rounding=stochastic_rounding, process_group=process_group,
                         shard_state=shard_state, backend=backend,
                         fuse_linear=fuse_linear)

    def validate_group(self, group: dict[str, Any]) -> None:
        check_adam(group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key in ("amsgrad", "maximize", "capturable", "differentiable",
                        "decoupled_weight_decay"):
                group.setdefault(key, self.defaults.get(key, False))


class AdamW(Adam):
    """``torch.optim.AdamW`` (Adam with decoupled weight decay, default 1e-2) with accumulation."""

    def __init__(self, params: Any, lr: float | Tensor = 1e-3,
                 betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None,
                 accumulation_steps: int = 1, max_grad_norm: float | None = None,
                 master_weights: bool | str = True, loss_scale: Any = "auto", nonfinite: str = "skip",
                 stochastic_rounding: bool = False, process_group: Any = "auto",
                 shard_state: bool = False, backend: str = "auto",
                 fuse_linear: bool = True) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable, differentiable=differentiable,
                         fused=fused, decoupled_weight_decay=True,
                         accumulation_steps=accumulation_steps, max_grad_norm=max_grad_norm,
                         master_weights=master_weights, loss_scale=loss_scale,
                         nonfinite=nonfinite, stochastic_rounding=stochastic_rounding,
                         process_group=process_group, shard_state=shard_state,
                         backend=backend, fuse_linear=fuse_linear)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:   # as torch.optim.AdamW: an Adam dict keeps AdamW's decay
            group["decoupled_weight_decay"] = True
