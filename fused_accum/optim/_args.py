"""Argument checks shared by the optimizers; each error names the argument."""
from __future__ import annotations

import math
import numbers
from typing import Any

from torch import Tensor


def check_accumulation_steps(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"accumulation_steps must be an integer >= 1, got {value!r}")
    return value


def check_max_grad_norm(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"max_grad_norm must be None or a finite number > 0, got {value!r}")
    return float(value)


def scalar(value: float | Tensor) -> float:
    """A hyper-parameter as a Python float (tensors other than ``lr`` are read once per step)."""
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def refuse_differentiable(differentiable: bool) -> None:
    if differentiable:
        raise ValueError("differentiable=True is not supported: fused_accum updates parameters "
                         "in place outside autograd")


def _check_number(name: str, value: Any, low: float, high: float = math.inf,
                  low_open: bool = False, high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    v = scalar(value)
    ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok or math.isnan(v):
        raise ValueError(f"{name} is out of range: got {value!r}")


def check_common(group: dict[str, Any]) -> None:
    lr = group["lr"]
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"lr as a Tensor must have 1 element, got shape {tuple(lr.shape)}")
    _check_number("lr", lr, 0.0)
    _check_number("weight_decay", group["weight_decay"], 0.0)


def check_adam(group: dict[str, Any]) -> None:
    check_common(group)
    _check_number("eps", group["eps"], 0.0)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    _check_number("betas[0]", betas[0], 0.0, 1.0, high_open=True)
    _check_number("betas[1]", betas[1], 0.0, 1.0, high_open=True)


def _is_number(value: Any) -> bool:
    return isinstance(value, (numbers.Real, Tensor)) and not isinstance(value, bool)


def numeric_hypers(defaults: dict[str, Any]) -> list[str]:
    """The numeric hyper-parameters of an optimizer: those whose default is a number, a tensor
    or a tuple of them (lr, betas, eps, weight_decay, momentum, dampening), not its flags."""
    return [key for key, default in defaults.items()
            if _is_number(default) or (isinstance(default, (tuple, list)) and default
                                       and all(map(_is_number, default)))]


def check_hyper_types(group: dict[str, Any], defaults: dict[str, Any], where: str) -> None:
    """Each numeric hyper-parameter of ``group`` (see :func:`numeric_hypers`) is a number or a
    tensor, or a tuple of as many: a type check only, so a tensor is never read on the host.
    Run before a window's step changes anything (an lr edited into a string would otherwise
    fail inside the update, with the window consumed)."""
    for key in numeric_hypers(defaults):
        if key not in group:
            continue
        value, default = group[key], defaults[key]
        if isinstance(default, (tuple, list)):
            ok = (isinstance(value, (tuple, list)) and len(value) == len(default)
                  and all(map(_is_number, value)))
        else:
            ok = _is_number(value)
        if not ok:
            raise TypeError(f"{where}: {key} must be a number or a tensor, got {value!r} "
                            "(nothing was changed: set it and call step() again)")
