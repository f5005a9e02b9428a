"""Argument adaptation shared by the backends that launch their own kernels (extension, triton):
device scalars and contiguous working copies of the rare non-contiguous tensor."""
from __future__ import annotations

import torch
from torch import Tensor


def scalar(value: float | Tensor, like: Tensor) -> Tensor:
    """A 0-d fp32 tensor on ``like``'s device (no host read of a device value)."""
    if isinstance(value, Tensor):
        if value.dtype is torch.float32 and value.dim() == 0 and value.device == like.device:
            return value   # the usual case, without the two dispatcher calls below
        return value.to(device=like.device, dtype=torch.float32).reshape(())
    return torch.full((), float(value), dtype=torch.float32, device=like.device)


def contiguous_inputs(tensors: list[Tensor]) -> list[Tensor]:
    """``tensors`` made contiguous where they are not (inputs: nothing to write back)."""
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


def contiguous(tensors: list[Tensor]) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]]]:
    """Contiguous versions of ``tensors`` and the (original, copy) pairs to write back."""
    out, write_back = [], []
    for t in tensors:
        if t.is_contiguous():
            out.append(t)
        else:
            c = t.contiguous()
            out.append(c)
            write_back.append((t, c))
    return out, write_back


def write_back(pairs: list[tuple[Tensor, Tensor]]) -> None:
    for original, copy in pairs:
        original.copy_(copy)
