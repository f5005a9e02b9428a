"""The reducer of a window in one process: nothing to communicate.

Every optimizer has a reducer, so the window's path never asks which kind it has: this one, the
all-reduce of :mod:`.all_reduce`, or the reduce-scatter of :mod:`.sharded`.  Each offers what the
optimizer calls at construction (broadcasts, agreement checks), during the last micro-batch
(``on_arrival``, whether the norm may be folded into the accumulate), at the window's end
(``reduce``, the norm, the update, the labels of non-finite sums, the gathers).  The all-reduce
reducer inherits what applies to sums that are whole on every rank once reduced (the norm, the
update, the labels); the sharded one overrides them.  Checkpoints still ask ``distributed``: only
one process records which sums began since the last ``step()``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..accumulation import GradBuffers, Window
from ..accumulation.buckets import Bucket


class LocalReducer:
    """One process: the window's own sums and weight are the global ones."""

    distributed = False   # reduces across ranks (their collectives must pair)
    sharded = False       # each rank holds a shard of the optimizer state (shard_state=True)
    folds_norm = True     # the last micro-batch may fold Σ acc² into its accumulate
    on_arrival = None     # called with each gradient of a window's last micro-batch
    rank, world_size = 0, 1

    def __init__(self) -> None:
        self.shards: dict = {}   # bucket -> this rank's shard of its state (sharded only)

    # -- construction: what every rank must share ----------------------------------------------

    def attach(self, buffers: GradBuffers) -> None:
        """(Re)plan the reduction over the buffers' buckets."""

    def broadcast_parameters(self, params: list[Tensor]) -> None:
        """Every rank starts from the same parameters."""

    def broadcast_seed(self, seed: int, device: torch.device) -> int:
        return seed

    def check_same(self, settings: dict[str, float], device: torch.device, remedy: str) -> None:
        """Raise on every rank when the ranks' ``settings`` differ."""

    # -- the window's end ---------------------------------------------------------------------

    def reduce(self, buffers: GradBuffers, window: Window, main: torch.device,
               accumulation_steps: int) -> Tensor | None:
        """Sum the window over the ranks; returns W over all of them, or None where the window's
        own (:meth:`Window.weight`) is the global one."""
        return None

    def window_sumsq(self, buffers: GradBuffers, buckets: list[Bucket], main: torch.device) -> Tensor:
        """Σ acc² of the window's sums (finishing what the last micro-batch folded in)."""
        if not buckets:
            return torch.zeros((), device=main)
        return torch.stack([buffers.window_sumsq(b).to(main) for b in buckets]).sum()

    def step(self, bucket: Bucket, algorithm, group: dict, grad_scale: float | Tensor,
             found_inf: Tensor) -> None:
        """The update of ``bucket`` (its holder of state: the bucket itself, whole here)."""
        algorithm.update(bucket, bucket.touched_indices(), group, grad_scale, found_inf)

    def nonfinite_labels(self, buckets: list[Bucket]) -> list[str]:
        """The parameters whose sums hold a non-finite element (reads them on the host)."""
        return [bucket.labels[i] for bucket in buckets for i in bucket.touched_indices()
                if not torch.isfinite(bucket.acc_view(i)).all()]

    def finish_gathers(self) -> None:
        """Wait for the updated parameters to reach every rank (sharded state)."""
