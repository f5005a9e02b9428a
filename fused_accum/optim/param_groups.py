"""Param groups: added at construction or later, every parameter checked before anything changes
(listed twice, not a leaf, a dtype fused_accum does not accumulate, a DTensor), and its bucket,
state and hooks made.

A mixin of :class:`fused_accum.optim.base.AccumulatingOptimizer`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..accumulation.buckets import param_label
from ..distributed import data_parallel


class ParamGroups:
    """``add_param_group`` and the checks of new parameters."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        param_group = dict(param_group)
        params = param_group.get("params")
        if isinstance(params, (Tensor, set)) or params is None:
            params = [params] if isinstance(params, Tensor) else params
        else:
            params = list(params)
        param_group["params"] = params
        self._check_new_params(params, len(self.param_groups))
        self.validate_group({**self.defaults, **param_group})
        super().add_param_group(param_group)
        group_index = len(self.param_groups) - 1
        group = self.param_groups[group_index]
        try:
            buckets = self._buffers.add_group(group_index, group["params"], group.get("param_names"))
        except Exception:
            self.param_groups.pop()   # e.g. no backend for the device: leave the optimizer as it was
            raise
        # A group added after construction: on every rank (one process: nothing to do)
        self._reducer.broadcast_parameters([p for b in buckets for p in b.params])
        self._reducer.attach(self._buffers)
        for bucket in buckets:
            self._init_bucket_state(bucket, group)
        if self._buffers.attached:   # a group added after construction; else see __init__
            self._buffers.hold(buckets)

    def _check_new_params(self, params: Any, group_index: int) -> None:
        if not isinstance(params, list):
            return   # torch's own check names the problem (a set, a missing list)
        seen: dict[int, str] = {}
        for i, item in enumerate(params):
            name, p = item if isinstance(item, tuple) else (None, item)
            if not isinstance(p, Tensor):
                continue
            label = param_label(group_index, i, None) if name is None else f"'{name}'"
            if id(p) in seen:
                raise ValueError(f"fused_accum: parameter {label} is {seen[id(p)]} again: each "
                                 "parameter may appear once (torch.optim would step it twice, "
                                 "and warns that this will become an error)")
            seen[id(p)] = label
            if not p.is_leaf:
                raise ValueError(f"fused_accum: parameter {label} is not a leaf tensor (it was "
                                 "computed from other tensors); pass the leaf nn.Parameter instead")
            data_parallel.check_parameter(p, label)
            if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise TypeError(f"fused_accum: parameter {label} is {p.dtype}; fused_accum "
                                "accumulates in fp32 and takes float32, bfloat16 or float16 "
                                "parameters")

    def validate_group(self, group: dict[str, Any]) -> None:
        """Raise ValueError naming a bad hyper-parameter (subclasses extend)."""
