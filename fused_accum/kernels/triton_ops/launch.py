"""Multi-tensor launches for the Triton kernels: one launch per group of tensors, not per tensor.

A launch gets two device tables:

* ``ptrs`` (int64, rows of ``n``): one row per tensor list holding each tensor's address (0 where
  a list is absent), then rows of per-tensor integers (element count, first-touch flag, position
  in the call).  Kernels cast the addresses to typed pointers.
* ``pmap`` (int64, one entry per program): ``tensor << 32 | chunk``, program ``i`` handling
  elements ``[chunk * BLOCK, (chunk + 1) * BLOCK)`` of that tensor.

Both are built on the host and uploaded without synchronising (pinned memory, non-blocking copy).
They are cached by content: parameters, state and buffer slices keep their addresses from step to
step, and the caching allocator tends to hand gradients the same addresses every micro-batch, so
most launches upload nothing.  A table uploaded during CUDA-graph capture stays cached for good,
since a replay copies from its pinned host memory again.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

# Tensors whose every element list is 16-byte aligned take the vectorised kernel specialisation.
ALIGNMENT = 16
_CACHE_SIZE = 512


@dataclass(frozen=True)
class Group:
    """Tensors of one launch: indices into the call's lists, their dtype and alignment."""
    indices: tuple[int, ...]
    dtype: torch.dtype
    aligned: bool


def addresses(lists: list[list[Tensor] | None]) -> list[list[int] | None]:
    """Each list's tensor addresses (None for an absent list), read once per call for both the
    grouping and the tables."""
    return [[t.data_ptr() for t in lst] if lst else None for lst in lists]


def groups(addresses: list[list[int] | None], dtype_of: list[Tensor]) -> list[Group]:
    """Indices grouped by ``dtype_of[i].dtype`` and by whether every list's address at i is
    16-byte aligned (the kernels' vector loads need both to be uniform within a launch)."""
    present = [a for a in addresses if a]
    keyed: dict[tuple[torch.dtype, bool], list[int]] = {}
    for i, t in enumerate(dtype_of):
        aligned = all(a[i] % ALIGNMENT == 0 for a in present)
        keyed.setdefault((t.dtype, aligned), []).append(i)
    return [Group(tuple(ix), dtype, aligned) for (dtype, aligned), ix in keyed.items()]


class _TableCache:
    def __init__(self, size: int) -> None:
        self._entries: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()
        self._pinned: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._size = size

    def get(self, key: tuple, device: torch.device, values=None) -> Tensor:
        """The device table cached under ``key``; on a miss, ``values()`` (or the key itself)
        gives its contents."""
        key = (device, key)
        hit = self._pinned.get(key) or self._entries.get(key)
        if hit is not None:
            if key in self._entries:
                self._entries.move_to_end(key)
            return hit[1]
        entry = _upload(key[1] if values is None else values(), device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            self._pinned[key] = entry
        else:
            self._entries[key] = entry
            if len(self._entries) > self._size:
                self._entries.popitem(last=False)
        return entry[1]


def _upload(values, device: torch.device) -> tuple[Tensor, Tensor]:
    if device.type != "cuda":
        table = torch.tensor(values, dtype=torch.int64, device=device)
        return table, table
    host = torch.tensor(values, dtype=torch.int64).pin_memory()
    return host, host.to(device, non_blocking=True)


_cache = _TableCache(_CACHE_SIZE)


def pointer_table(addresses: list[list[int] | None], group: Group, device: torch.device,
                  int_rows: list[list[int]] = ()) -> Tensor:
    """The ``ptrs`` table of ``group``: a row of addresses per list (zeros for an absent one),
    then ``int_rows`` (each a full-length per-tensor list of the call, indexed by the group's
    indices)."""
    values: list[int] = []
    for row in addresses:
        values += [row[i] for i in group.indices] if row else [0] * len(group.indices)
    for row in int_rows:
        values += [int(row[i]) for i in group.indices]
    return _cache.get(tuple(values), device)


def program_map(numels: list[int], block: int, device: torch.device) -> tuple[Tensor, int]:
    """The ``pmap`` table for tensors of ``numels`` elements in chunks of ``block``, and its
    length (the grid size)."""
    programs = sum(-(-numel // block) for numel in numels)
    if programs == 0:
        return torch.empty(0, dtype=torch.int64, device=device), 0

    def values() -> list[int]:
        return [(t << 32) | c for t, numel in enumerate(numels) for c in range(-(-numel // block))]

    return _cache.get(("pmap", block, tuple(numels)), device, values), programs
