"""Where each bucket's optimizer state lives, how it starts, and what it costs.

The state of a bucket is held by the bucket itself, or with ``shard_state=True`` by this rank's
:class:`~fused_accum.distributed.sharded.BucketShard` of it; both offer the same flat-state methods
(:class:`fused_accum.accumulation.buckets.FlatState`), so the code below is written once for either.
"""
from __future__ import annotations

from typing import Any

import torch

from ..accumulation.buckets import Bucket


class BucketState:
    """State helpers of :class:`~fused_accum.optim.base.AccumulatingOptimizer`."""

    def _holder(self, bucket: Bucket) -> Any:
        """Where a bucket's optimizer state lives: the bucket, or with ``shard_state`` this rank's
        :class:`~fused_accum.distributed.sharded.BucketShard` (None until the bucket is laid out)."""
        if not self._sharding:
            return bucket
        return self._reducer.shards.get(bucket)

    def _init_bucket_state(self, bucket: Bucket, group: dict[str, Any]) -> None:
        bucket.rounding_seed = self._rounding_seed if bucket.dtype == torch.bfloat16 else -1
        holder = self._holder(bucket)
        if holder is None:
            return   # shard_state: made once the reducer has laid the bucket out
        for name in self.algorithm.state_names(group):
            holder.ensure_state(name)
        self._init_masters(holder)
        self._publish_state(bucket)

    def _init_masters(self, holder: Any) -> None:
        """Masters equal to the parameters (allocated on first use), in a bucket or its shard."""
        if self.master_weights == "compact" and holder.dtype == torch.bfloat16:
            holder.ensure_state("master_remainder", dtype=torch.int16).zero_()   # master = param
        elif self.master_weights and holder.dtype != torch.float32:
            holder.copy_params_to(holder.ensure_state("master_param"))

    def _publish_state(self, bucket: Bucket) -> None:
        """Point ``self.state[p]`` at live views of the state (with ``shard_state``, of this
        rank's part of it: flat segments)."""
        holder = self._holder(bucket)
        for i, p in enumerate(bucket.params):
            self.state[p] = {"step": bucket.steps[i], **holder.param_state(i)}

    def memory_bytes(self) -> dict[str, int]:
        """Bytes the optimizer holds, by kind: the fp32 accumulators, each optimizer state (fp32
        masters as "master_param"), step counts, and the parameters themselves."""
        held: dict[str, int] = {"accumulators": 0, "parameters": 0, "step": 0}
        for bucket in self._buffers.buckets:
            held["accumulators"] += bucket.accumulator_bytes()
            held["step"] += bucket.steps.nbytes
            held["parameters"] += sum(p.nbytes for p in bucket.params)
            for name, flat in self._holder(bucket).state.items():   # with shard_state: this rank's
                held[name] = held.get(name, 0) + flat.nbytes
        return held
