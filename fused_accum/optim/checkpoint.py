"""State dicts of the accumulating optimizers: torch.optim's format, plus the window in progress.

``state_dict()`` is loadable into the torch optimizer of the same name (its ``"state"`` and
``"param_groups"`` are torch's); the ``"fused_accum"`` entry holds what a mid-window checkpoint
needs to resume bit-identically: the accumulated gradients, the micro-batch count and mode, the
item and non-finite flags, skip counts, the loss scaler and the rounding seed.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..buffers import Bucket
from ..kernels import reference


def index_params(groups: list[dict[str, Any]]) -> list[Tensor]:
    """The parameters of ``groups`` in torch's state-dict order."""
    return [p for g in groups for p in g["params"]]


class WindowStateDict:
    """``state_dict`` / ``load_state_dict`` for :class:`~fused_accum.optim.base.AccumulatingOptimizer`."""

    def _stepped_mask(self, bucket: Bucket) -> list[bool]:
        return (bucket.steps > 0).tolist()

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's format (loadable into the torch optimizer of the same name) plus a
        ``"fused_accum"`` entry with the window in progress."""
        packed = super().state_dict()
        index = {p: i for i, p in enumerate(index_params(self.param_groups))}
        state: dict[int, dict[str, Tensor]] = {}
        accumulated: dict[int, Tensor] = {}
        for bucket in self._buffers.buckets:
            stepped = self._stepped_mask(bucket)
            for i, p in enumerate(bucket.params):
                if stepped[i]:
                    entry = {"step": bucket.steps[i].detach().to("cpu", copy=True)}
                    entry.update({n: bucket.view(f, i) for n, f in bucket.state.items()})
                    state[index[p]] = entry
                if bucket.touched[i]:
                    accumulated[index[p]] = bucket.acc_view(i)
        packed["state"] = state
        packed["fused_accum"] = {
            "accumulation_steps": self.accumulation_steps,
            "micro_batches": self._micro,
            "mode": self._mode,
            "weight_sum": {str(d): w for d, w in self._weight_sum.items()},
            "found_inf": {str(d): f for d, f in self._buffers.found_inf.items()},
            "accumulated_grads": accumulated,
            "skipped_steps": self._skipped,
            "rounding_seed": self._rounding_seed,
            "loss_scaler": None if self._scaler is None else self._scaler.state_dict(),
            "discarded": self._buffers.discarded,
        }
        return packed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of the torch optimizer of the same name.

        Everything is checked before anything changes, so a bad state dict leaves the optimizer
        as it was.  Without a ``"fused_accum"`` entry (a torch optimizer's dict) the window
        restarts empty; low-precision masters absent from the dict are taken from the parameters.
        """
        params = index_params(self.param_groups)
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict: has {len(saved_groups)} param groups, this optimizer "
                             f"has {len(self.param_groups)}")
        for g, (ours, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(ours["params"]) != len(saved["params"]):
                raise ValueError(f"state_dict: param group {g} has {len(saved['params'])} "
                                 f"parameters, this optimizer's has {len(ours['params'])}")
        saved_ids = [i for g in saved_groups for i in g["params"]]
        by_param = {p: (state_dict["state"].get(sid, {}), sid) for p, sid in zip(params, saved_ids)}
        window = state_dict.get("fused_accum")
        accumulated = window["accumulated_grads"] if window else {}
        for p, (entry, sid) in by_param.items():
            label = self._buffers.label(p)
            for name, value in entry.items():
                if name != "step" and isinstance(value, Tensor) and value.shape != p.shape:
                    raise ValueError(f"state_dict: state {name!r} of parameter {label} has "
                                     f"shape {tuple(value.shape)}, expected {tuple(p.shape)}")
            if sid in accumulated and accumulated[sid].shape != p.shape:
                raise ValueError(f"state_dict: accumulated gradient of parameter {label} has "
                                 f"shape {tuple(accumulated[sid].shape)}, expected {tuple(p.shape)}")
        for ours, saved in zip(self.param_groups, saved_groups):
            for key, value in saved.items():
                if key != "params":
                    ours[key] = value
            for key, value in self.defaults.items():
                ours.setdefault(key, value)
        for bucket in self._buffers.buckets:
            group = self.param_groups[bucket.group_index]
            for name in self.algorithm.state_names(group):
                bucket.ensure_state(name)
            bucket.reset_window()
            for i, p in enumerate(bucket.params):
                entry, sid = by_param[p]
                self._load_param_state(bucket, i, entry)
                if sid in accumulated:
                    bucket.load_accumulator(i, accumulated[sid])
            bucket.touched = [by_param[p][1] in accumulated for p in bucket.params]
            self._publish_state(bucket)
        self._load_window(window)

    def _load_param_state(self, bucket: Bucket, i: int, entry: dict[str, Any]) -> None:
        step = entry.get("step", self._implied_step(entry))
        bucket.steps[i].fill_(float(step))
        param = bucket.params[i].detach()
        for name, flat in bucket.state.items():
            view = bucket.view(flat, i)
            if name in entry:
                view.copy_(entry[name])
            elif name == "master_param" and "master_remainder" in entry:   # compact -> full
                view.copy_(reference.compact_master(param, entry["master_remainder"].to(param.device)))
            elif name == "master_remainder" and "master_param" in entry:   # full -> compact
                high, remainder = reference.split_master(entry["master_param"].to(param.device, torch.float32))
                param.view(torch.int16).copy_(high)
                view.copy_(remainder)
            elif name == "master_param":
                view.copy_(param)
            else:
                view.zero_()   # moments start at zero; a zero remainder makes the master the parameter

    def _implied_step(self, entry: dict[str, Any]) -> int:
        """The step count of a saved entry without one (torch's SGD keeps none)."""
        return 1 if entry else 0

    def _load_window(self, window: dict[str, Any] | None) -> None:
        if window and window.get("rounding_seed", -1) >= 0 and self.stochastic_rounding:
            self._rounding_seed = window["rounding_seed"]
            for bucket in self._buffers.buckets:
                if bucket.dtype == torch.bfloat16:
                    bucket.rounding_seed = self._rounding_seed
        if window and window.get("skipped_steps") is not None:
            self._skipped.copy_(window["skipped_steps"])
        if window and window.get("loss_scaler") is not None and self._scaler is not None:
            self._scaler.load_state_dict(window["loss_scaler"])
        self._micro = window["micro_batches"] if window else 0
        self._mode = window["mode"] if window else None
        for table, saved in ((self._weight_sum, window and window["weight_sum"]),
                             (self._buffers.found_inf, window and window["found_inf"])):
            for device, value in table.items():
                value.copy_(saved[str(device)]) if saved and str(device) in saved else value.zero_()
        self._buffers.forget_passes()   # a pass that raised before the load belongs to no window
        self._buffers.discarded = bool(window and window.get("discarded", False))
        self._buffers.arrived = False
        self._arm()
