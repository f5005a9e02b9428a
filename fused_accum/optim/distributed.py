"""Data parallelism: one reduction of the fp32 buffers per window, through torch.distributed.

At the end of a window every rank runs the same two collectives: a small all-reduce of (which
parameters got a gradient, the window weight W, the non-finite flag) and one all-reduce of each
bucket's accumulator, in which a rank contributes zeros for the parameters it did not touch.
Every rank then steps with the same global mean, W being the total micro-batch or item count of
all ranks, so the update is the exact (item-weighted) mean of the whole distributed window.
Nothing is communicated during the other micro-batches.  Reading which parameters were touched
anywhere costs one host synchronisation per window.

Every rank must end its windows together (the same ``accumulation_steps``, ``flush()`` on all
ranks) and use ``opt.backward(num_items=)`` alike.  A rank that fails makes the others' collective
fail after the process group's timeout (``init_process_group(timeout=...)``): they raise.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..buffers import GradBuffers


class WindowReducer:
    def __init__(self, process_group: object):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("process_group: torch.distributed is not initialized; call "
                               "torch.distributed.init_process_group first")
        self.group = None if process_group is True else process_group
        self.rank = dist.get_rank(self.group)
        self.source = dist.get_global_rank(self.group, 0) if self.group is not None else 0

    def _collective(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, group=self.group, **kwargs)
        except Exception as exc:   # name what failed; the process group's error follows
            raise RuntimeError(
                f"fused_accum: the {what} failed on rank {self.rank} (did another rank fail, or end "
                f"its window at a different step?): {type(exc).__name__}: {exc}") from exc

    def broadcast_parameters(self, params: list[Tensor]) -> None:
        """Every rank starts from rank 0's parameters."""
        for p in params:
            self._collective("broadcast of the parameters", dist.broadcast, p.detach(), src=self.source)

    def reduce(self, buffers: GradBuffers, micro_batches: int, items: dict[torch.device, Tensor] | None,
               main: torch.device) -> Tensor:
        """Sum the window over all ranks in place; returns the global window weight W (on ``main``).

        ``items``: the item counts of the window per device (``num_items`` mode), else None and W
        counts micro-batches.
        """
        buckets = buffers.buckets
        touched = [float(t) for b in buckets for t in b.touched]
        weight = items[main] if items is not None else torch.tensor(float(micro_batches), device=main)
        found = torch.stack([f.to(main) for f in buffers.found_inf.values()]).amax()
        summary = torch.cat([torch.tensor(touched, device=main), weight.reshape(1).float(),
                             found.reshape(1)])
        self._collective("all-reduce of the window's summary", dist.all_reduce, summary)
        anywhere = (summary[:len(touched)] > 0).tolist()   # the window's one host synchronisation
        start = 0
        for bucket in buckets:
            untouched = [i for i, t in enumerate(bucket.touched) if not t]
            if untouched:   # contribute zeros, not stale values, for what this rank did not touch
                torch._foreach_zero_(bucket.views(bucket.acc, untouched))
            bucket.touched = anywhere[start:start + len(bucket.touched)]
            bucket.norm_valid = False   # the folded sum of squares was this rank's alone
            start += len(bucket.touched)
        works = [self._collective("all-reduce of the accumulators", dist.all_reduce, b.acc,
                                  async_op=True) for b in buckets if any(b.touched)]
        for work in works:
            work.wait()
        global_found = (summary[-1] > 0).float()
        for device, flag in buffers.found_inf.items():
            flag.copy_(global_found.to(device))
        return summary[-2]
