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
most launches upload nothing.  An entry is keyed by everything its validity depends on:

- the device and the stream: the upload is ordered before kernels on the stream that made it,
  and only those use it (so an evicted table also returns to the pool of the only stream that
  read it);
- whether it was made during CUDA-graph capture: such a table's copy runs at every replay and
  never before the first one, so eager calls never receive it.  Tables a capture uses, made then
  or found in the cache, are pinned: never evicted, since the graph reads them at every replay,
  until :func:`release_captured_tables` (call it once those graphs are deleted).
"""
from __future__ import annotations

import contextlib
import threading
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


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


class _TableCache:
    def __init__(self, size: int) -> None:
        self._entries: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()   # eager, LRU
        self._pinned: dict[tuple, tuple[Tensor, Tensor]] = {}   # read by captured graphs
        self._size = size
        self._lock = threading.Lock()   # autograd threads of several devices may call at once

    def get(self, key: tuple, device: torch.device, values=None) -> Tensor:
        """The device table cached under ``key``; on a miss, ``values()`` (or the key itself)
        gives its contents."""
        capturing = _capturing(device)
        place = (device, _stream(device))
        eager, captured = (*place, False, key), (*place, True, key)
        with self._lock:
            hit = self._pinned.get(eager) or self._entries.get(eager)
            if capturing:
                if hit is not None:
                    self._pinned[eager] = hit   # the graph will read it at every replay
                    return hit[1]
                hit = self._pinned.get(captured)
                if hit is None:   # its copy runs at replay only: kept apart from eager entries
                    hit = self._pinned[captured] = _upload(key if values is None else values(), device)
                return hit[1]
            if hit is None:
                hit = self._entries[eager] = _upload(key if values is None else values(), device)
                if len(self._entries) > self._size:
                    self._entries.popitem(last=False)
            elif eager in self._entries:
                self._entries.move_to_end(eager)
            return hit[1]

    def release_captured(self) -> None:
        with self._lock:
            self._pinned.clear()


def _upload(values, device: torch.device) -> tuple[Tensor, Tensor]:
    host = values if isinstance(values, Tensor) else torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        table = host.to(device)
        return table, table
    host = host.pin_memory()
    return host, host.to(device, non_blocking=True)


_cache = _TableCache(_CACHE_SIZE)


def release_captured_tables() -> None:
    """Free the tables kept for CUDA graphs that captured Triton-backend ops; call it after
    deleting those graphs (a graph replayed afterwards would read freed memory)."""
    _cache.release_captured()


def on_device(device: torch.device):
    """A context making ``device`` current: Triton launches on the current device and stream,
    not on the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


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

    def values() -> Tensor:   # vectorised: a 7B-parameter bucket has millions of programs
        counts = torch.tensor([-(-n // block) for n in numels], dtype=torch.int64)
        tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
        starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        return (tensor << 32) | (torch.arange(programs, dtype=torch.int64) - starts)

    return _cache.get(("pmap", block, tuple(numels)), device, values), programs
