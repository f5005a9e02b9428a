"""State dicts of the accumulating optimizers: torch.optim's format, plus the window in progress.

``state_dict()`` is loadable into the torch optimizer of the same name (its ``"state"`` and
``"param_groups"`` are torch's, the first group with one key added: whether a window was in
progress, see :mod:`~fused_accum.optim.window_checkpoint`).  ``"state"`` lists every parameter, also before its first step
(step 0, zero moments, masters equal to the parameters), as torch's own DCP helpers
(``torch.distributed.checkpoint.state_dict``) make a fresh torch optimizer's: DCP loads only what
the loading optimizer's ``state_dict()`` lists, so a freshly built optimizer must list everything.
The tensors are the optimizer's own (DCP loads into them in place).

The ``"fused_accum"`` entry holds what is the same on every rank (micro-batch count and mode,
skip counts, loss scaler, rounding seed) and ``"window"``: None between windows, else the window
in progress summed over the ranks (:mod:`fused_accum.optim.window_checkpoint`), which resumes on
any number of ranks.  Under data parallelism a mid-window ``state_dict()`` is a collective.

With ``shard_state=True``, ``state_dict()`` holds each parameter's state as a ShardedTensor of
this rank's part (:mod:`fused_accum.distributed.sharded_checkpoint`), which DCP saves without gathering
and reshards on load; ``full_state_dict()`` gathers torch's whole format.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..accumulation.buckets import MASTER_STATES, Bucket
from ..kernels import reference
from . import window_checkpoint
from ._args import numeric_hypers


ZERO_GRADS_TAG = "fused_accum.zero_grads/1"


def index_params(groups: list[dict[str, Any]]) -> list[Tensor]:
    """The parameters of ``groups`` in torch's state-dict order."""
    return [p for g in groups for p in g["params"]]


class WindowStateDict:
    """``state_dict`` / ``load_state_dict`` for :class:`~fused_accum.optim.base.AccumulatingOptimizer`."""

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's format (loadable into the torch optimizer of the same name) plus a
        ``"fused_accum"`` entry with the window in progress (a collective mid-window under data
        parallelism: call it on every rank).  With ``shard_state=True`` each
        parameter's state is a ShardedTensor holding this rank's part (what
        torch.distributed.checkpoint saves and reshards); see :meth:`full_state_dict`."""
        return self._packed_state(whole=False)

    def full_state_dict(self) -> dict[str, Any]:
        """:meth:`state_dict` with every parameter's state whole, in torch's format.  With
        ``shard_state=True`` it is gathered from every rank (call it on every rank), so it
        holds the whole state for the moment: for models whose state fits on one rank."""
        return self._packed_state(whole=True)

    def _packed_state(self, whole: bool) -> dict[str, Any]:
        if self._buffers.collecting:   # a gradient still in .grad belongs to the window saved
            self._buffers.take_unfrozen()
        packed = super().state_dict()
        index = {p: i for i, p in enumerate(index_params(self.param_groups))}
        state: dict[int, dict[str, Tensor]] = {}
        for bucket in self._buffers.buckets:
            steps = bucket.step_views(range(len(bucket.params)))
            entries = self._holder(bucket).state_entries(whole)
            for i, p in enumerate(bucket.params):
                state[index[p]] = {"step": steps[i], **entries[i]}
        packed["state"] = state
        packed["fused_accum"] = {
            "accumulation_steps": self.accumulation_steps,
            "micro_batches": self._window.micro,
            "mode": self._window.mode,
            "skipped_steps": self._skipped,
            "rounding_seed": self._rounding_seed,
            "loss_scaler": None if self._scaler is None else self._scaler.state_dict(),
            "window": window_checkpoint.pack(self._window, self._buffers, self._reducer,
                                             self._skipped.device, index),
            "zero_grads": self._pack_zero_grads(index),
        }
        if packed["param_groups"]:
            packed["param_groups"][0][window_checkpoint.MID_WINDOW] = \
                window_checkpoint.mid_window_mark(packed)
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
        if self.algorithm.known_state is not None:   # SGD, Adam, AdamW: their hyper-parameters
            needed = numeric_hypers(self.defaults)
            for g, saved in enumerate(saved_groups):
                missing = [k for k in needed if k not in saved]
                if missing:
                    raise ValueError(
                        f"state_dict: param group {g} has no {missing[0]!r}, which "
                        f"{type(self).__name__} needs: a state dict of another optimizer? "
                        "(nothing was changed)")
        saved_ids = [i for g in saved_groups for i in g["params"]]
        by_param = {p: (state_dict["state"].get(sid, {}), sid) for p, sid in zip(params, saved_ids)}
        common = state_dict.get("fused_accum")
        if window_checkpoint.dropped_window(state_dict):
            raise ValueError(
                "state_dict: saved mid-window, but without its \"fused_accum\" entry, which holds "
                "the window's sums (torch.distributed.checkpoint.state_dict's "
                "get_optimizer_state_dict keeps only \"state\" and \"param_groups\"); save at a "
                "window boundary, or save the optimizer itself (dcp.save({\"optim\": opt}))")
        window = self._saved_window(common)
        accumulated = window["accumulated_grads"] if window else {}
        for p, (entry, sid) in by_param.items():
            label = self._buffers.label(p)
            self._check_state_names(entry, label, saved_groups, p)
            for name, value in entry.items():
                if name != "step" and isinstance(value, Tensor) and value.shape != p.shape:
                    raise ValueError(f"state_dict: state {name!r} of parameter {label} has "
                                     f"shape {tuple(value.shape)}, expected {tuple(p.shape)}")
            saved_masters = [n for n in MASTER_STATES if n in entry]
            bucket, _ = self._buffers.slots[p]
            holder = self._holder(bucket)
            ours = [n for n in MASTER_STATES if holder is not None and n in holder.state]
            if (saved_masters and ours and saved_masters != ours
                    and type(entry[saved_masters[0]]) not in (Tensor, torch.nn.Parameter)):
                raise ValueError(f"state_dict: parameter {label} was saved sharded with other "
                                 "masters (fp32 or compact) than this optimizer's; converting "
                                 "needs its whole state: save it with full_state_dict()")
            if sid in accumulated and accumulated[sid].shape != p.shape:
                raise ValueError(f"state_dict: accumulated gradient of parameter {label} has "
                                 f"shape {tuple(accumulated[sid].shape)}, expected {tuple(p.shape)}")
        for ours, saved in zip(self.param_groups, saved_groups):
            for key, value in saved.items():
                if key not in ("params", window_checkpoint.MID_WINDOW):
                    ours[key] = value
            for key, value in self.defaults.items():
                ours.setdefault(key, value)
        for bucket in self._buffers.buckets:
            group = self.param_groups[bucket.group_index]
            for name in self.algorithm.state_names(group):
                self._holder(bucket).ensure_state(name)
            bucket.reset_window()
            for i, p in enumerate(bucket.params):
                self._load_param_state(bucket, i, by_param[p][0])
            self._publish_state(bucket)
        by_id = {by_param[p][1]: self._buffers.slots[p] for p in params}
        self._window.reset()   # sparse sums too: the saved window replaces the one in progress
        window_checkpoint.restore(self._window, self._reducer, window, by_id)
        self._load_zero_grads(common, by_id)
        self._load_common(common, window)

    def _check_state_names(self, entry: dict[str, Any], label: str,
                           saved_groups: list[dict[str, Any]], param: Tensor) -> None:
        """Refuse the state of another algorithm (a torch SGD dict into AdamW), or a stepped
        parameter's state without what the step needs, as torch's own step would."""
        known = self.algorithm.known_state
        if known is None or not entry:
            return
        name = type(self).__name__
        for key in entry:
            if key != "step" and key not in MASTER_STATES and key not in known:
                raise ValueError(f"state_dict: parameter {label} has state {key!r}, which {name} "
                                 "does not keep: a state dict of another optimizer?")
        bucket, _ = self._buffers.slots[param]
        group = {**self.defaults, **self.param_groups[bucket.group_index]}
        if float(entry.get("step", 0)) > 0:
            missing = [n for n in self.algorithm.required_state(group) if entry.get(n) is None]
            if missing:
                raise ValueError(f"state_dict: parameter {label} has stepped but has no "
                                 f"{', '.join(map(repr, missing))}, which {name} needs")

    def _pack_zero_grads(self, index: dict[Tensor, int]) -> tuple[str, dict[str, list[int]]]:
        """Which parameters torch would hold a .grad for, and which of them a
        zero_grad(set_to_none=False) zeroed (stepped with zeros where no gradient comes: see
        :meth:`fused_accum.accumulation.buckets.Bucket.touch_zeroed`).  torch keeps that on the parameters;
        here it goes with the state dict.  A tuple, which DCP keeps whole, as the window."""
        holds, zeroed = [], []
        for bucket in self._buffers.buckets:
            for i, p in enumerate(bucket.params):
                if bucket.holds_grad[i]:
                    holds.append(index[p])
                if bucket.zeroed[i]:
                    zeroed.append(index[p])
        return ZERO_GRADS_TAG, {"holds": holds, "zeroed": zeroed}

    def _load_zero_grads(self, common: dict[str, Any] | None,
                         by_id: dict[int, tuple[Bucket, int]]) -> None:
        entry = (common or {}).get("zero_grads")
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and entry[0] == ZERO_GRADS_TAG):
            return   # a torch state dict, or an earlier fused_accum's: nothing to say
        holds, zeroed = set(entry[1]["holds"]), set(entry[1]["zeroed"])
        for sid, (bucket, i) in by_id.items():
            bucket.holds_grad[i], bucket.zeroed[i] = sid in holds, sid in zeroed

    def _saved_window(self, common: dict[str, Any] | None) -> dict[str, Any] | None:
        """The saved window in progress (None: none, or a torch state dict), with the position
        this rank resumes it at; raises if it cannot be resumed here."""
        if not common:
            return None
        if "window" not in common:
            if common["micro_batches"] > 0:
                raise ValueError("state_dict: saved mid-window by an earlier fused_accum, whose "
                                 "window this one cannot read; save at a window boundary")
            return None
        window = window_checkpoint.unpack(common["window"])
        if window is not None:
            ranks = self._reducer.world_size
            window["position"] = window_checkpoint.resumed_position(
                common["micro_batches"], window["ranks"], ranks, self.accumulation_steps,
                common["mode"])
        return window

    def _load_param_state(self, bucket: Bucket, i: int, entry: dict[str, Any]) -> None:
        step = entry.get("step", self._implied_step(entry))
        bucket.steps[i].fill_(float(step))
        param = bucket.params[i].detach()
        holder = self._holder(bucket)   # with shard_state, it keeps this rank's part
        for name, flat in holder.state.items():
            holder.load_param_state(flat, i, self._saved_value(name, entry, param))

    @staticmethod
    def _saved_value(name: str, entry: dict[str, Any], param: Tensor) -> Tensor | None:
        """State ``name`` of ``param`` from its saved ``entry`` (None: zeros)."""
        if name in entry:
            return entry[name]
        if name == "master_param" and "master_remainder" in entry:   # compact -> full
            return reference.compact_master(param, entry["master_remainder"].to(param.device))
        if name == "master_remainder" and "master_param" in entry:   # full -> compact
            high, remainder = reference.split_master(entry["master_param"].to(param.device, torch.float32))
            param.view(torch.int16).copy_(high)
            return remainder
        if name == "master_param":
            return param
        return None   # moments start at zero; a zero remainder makes the master the parameter

    def _implied_step(self, entry: dict[str, Any]) -> int:
        """The step count of a saved entry without one (torch's SGD keeps none)."""
        return 1 if entry else 0

    def _load_common(self, common: dict[str, Any] | None, window: dict[str, Any] | None) -> None:
        if common and common.get("rounding_seed", -1) >= 0 and self.stochastic_rounding:
            self._rounding_seed = common["rounding_seed"]
            for bucket in self._buffers.buckets:
                if bucket.dtype == torch.bfloat16:
                    bucket.rounding_seed = self._rounding_seed
        if common and common.get("skipped_steps") is not None:
            self._skipped.copy_(common["skipped_steps"])
        if common and common.get("loss_scaler") is not None and self._scaler is not None:
            self._scaler.load_state_dict(common["loss_scaler"])
        self._window.micro = window["position"] if window else 0
        self._window.passes_begun = 1 if window else 0
        self._window.mode = common["mode"] if window else None
        self._buffers.forget_passes()   # a pass that raised before the load belongs to no window
        self._window.arrived = bool(window and window.get("pending", False))
        self._arm()
