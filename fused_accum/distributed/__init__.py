"""Windows over several processes: one reduction per window, and optionally sharded state.

- :mod:`.local`: the reducer of one process (nothing to communicate), so that the optimizer's
  window path never branches on which reducer it has;
- :mod:`.all_reduce`: the all-reduce of the window's sums, overlapping the last backward pass;
- :mod:`.sharded`, :mod:`.sharded_checkpoint`: ``shard_state=True``: reduce-scatter, a sharded
  step, all-gather; the state as ShardedTensors for torch.distributed.checkpoint;
- :mod:`.data_parallel`: process groups, and DistributedDataParallel wrappers switched off.
"""
from __future__ import annotations

from typing import Any

from .all_reduce import WindowReducer
from .local import LocalReducer
from .sharded import ShardedReducer


def make_reducer(process_group: Any, sharded: bool) -> LocalReducer:
    """The reducer for ``process_group`` (None: one process), sharding the state if ``sharded``."""
    if process_group is None:
        return LocalReducer()
    return (ShardedReducer if sharded else WindowReducer)(process_group)


__all__ = ["LocalReducer", "ShardedReducer", "WindowReducer", "make_reducer"]
