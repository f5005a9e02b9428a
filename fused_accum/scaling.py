"""Loss scaling for fp16 training, folded into accumulation.

``opt.backward(loss)`` backpropagates ``loss * scale``; the accumulate weight carries
``1 / scale``, so no unscale pass exists.  A non-finite gradient anywhere in a window skips that
window's step and, with dynamic scaling, backs the scale off; ``growth_interval`` windows in a
row without one grow it: torch.amp.GradScaler's rule, applied once per window with its kernel
(``torch._amp_update_scale_``), on device tensors, without host synchronisation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class DynamicLossScale:
    """Dynamic loss scaling with torch.amp.GradScaler's defaults and semantics.

    ``fused_accum.AdamW(..., loss_scale=DynamicLossScale(init_scale=2.0**12))``;
    ``loss_scale="dynamic"`` means ``DynamicLossScale()``.
    """

    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000

    def __post_init__(self) -> None:
        if not (math.isfinite(self.init_scale) and self.init_scale > 0):
            raise ValueError(f"init_scale must be a finite number > 0, got {self.init_scale!r}")
        if not self.growth_factor > 1.0:
            raise ValueError(f"growth_factor must be > 1, got {self.growth_factor!r}")
        if not 0.0 < self.backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {self.backoff_factor!r}")
        if isinstance(self.growth_interval, bool) or not isinstance(self.growth_interval, int) \
                or self.growth_interval < 1:
            raise ValueError(f"growth_interval must be an integer >= 1, got {self.growth_interval!r}")


class LossScaler:
    """The current scale (a device tensor) and its update rule; static when ``rule`` is None."""

    def __init__(self, scale: float, rule: DynamicLossScale | None, device: torch.device):
        self.rule = rule
        self.scale = torch.full((), float(scale), dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)

    @property
    def dynamic(self) -> bool:
        return self.rule is not None

    def inverse(self, device: torch.device) -> Tensor:
        return self.scale.to(device, non_blocking=True).reciprocal()

    def update(self, found_inf: Tensor) -> None:
        """One window ended; ``found_inf`` (on the scale's device) says whether it overflowed."""
        if self.rule is not None:
            torch._amp_update_scale_(self.scale, self.growth_tracker, found_inf,
                                     self.rule.growth_factor, self.rule.backoff_factor,
                                     self.rule.growth_interval)

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker}

    def load_state_dict(self, state: dict) -> None:
        self.scale.copy_(state["scale"])
        self.growth_tracker.copy_(state["growth_tracker"])


def resolve(loss_scale: object, params: list[Tensor], device: torch.device) -> LossScaler | None:
    """The scaler that ``loss_scale`` asks for: "auto" is dynamic when any parameter is fp16."""
    if isinstance(loss_scale, str):
        if loss_scale == "auto":
            loss_scale = "dynamic" if any(p.dtype == torch.float16 for p in params) else None
        elif loss_scale != "dynamic":
            raise ValueError(f"loss_scale must be 'auto', 'dynamic', a number, a DynamicLossScale "
                             f"or None, got {loss_scale!r}")
    if loss_scale is None:
        return None
    if loss_scale == "dynamic":
        loss_scale = DynamicLossScale()
    if isinstance(loss_scale, DynamicLossScale):
        return LossScaler(loss_scale.init_scale, loss_scale, device)
    if isinstance(loss_scale, (int, float)) and not isinstance(loss_scale, bool):
        if not (math.isfinite(loss_scale) and loss_scale > 0):
            raise ValueError(f"loss_scale must be a finite number > 0, got {loss_scale!r}")
        return LossScaler(float(loss_scale), None, device)
    raise TypeError(f"loss_scale must be 'auto', 'dynamic', a number, a DynamicLossScale or "
                    f"None, got {type(loss_scale).__name__}")
