"""A sharded optimizer's state as torch.distributed.checkpoint (DCP) reads and writes it.

Each rank owns a contiguous flat segment of some parameters (see :mod:`fused_accum.distributed.sharded`).
``state_dict()`` gives each parameter's state as a ``ShardedTensor`` of the parameter's shape,
whose local shards are views of this rank's shard buffers: the rectangular blocks its segment
covers (a flat range of a tensor is a few blocks, each contiguous in memory), with the blocks of
every rank in its metadata (each rank computes them; no communication).  DCP saves each rank's
blocks once, and loads whatever blocks the loading ranks own, in place, whatever the number of
ranks or whether the loader is sharded: it reshards by overlapping blocks.  Nothing is gathered,
so saving costs no memory beyond the state.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

Block = tuple[list[int], list[int]]   # offsets, sizes


def blocks(shape: list[int], start: int, stop: int) -> list[Block]:
    """The flat range [start, stop) of a contiguous tensor of ``shape`` as rectangular blocks, in
    order; each is contiguous in memory."""
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [([start], [stop - start])]
    inner = math.prod(shape[1:])
    first, last = start // inner, (stop - 1) // inner
    if first == last:
        return [([first] + o, [1] + s) for o, s in blocks(shape[1:], start - first * inner,
                                                          stop - first * inner)]
    out, row = [], first
    if start % inner:
        out += [([row] + o, [1] + s) for o, s in blocks(shape[1:], start % inner, inner)]
        row += 1
    full_end = stop // inner
    if full_end > row:
        out.append(([row] + [0] * (len(shape) - 1), [full_end - row] + list(shape[1:])))
    if stop % inner:
        out += [([full_end] + o, [1] + s) for o, s in blocks(shape[1:], 0, stop % inner)]
    return out


def _flat_index(shape: list[int], offsets: list[int]) -> int:
    index = 0
    for size, offset in zip(shape, offsets):
        index = index * size + offset
    return index


def _placement(reducer, rank: int, device: torch.device) -> str:
    """ShardedTensor places blocks by global rank.  Other ranks' devices are not known here: on
    GPUs each is assumed to be the one of this rank's index (DCP reads local blocks only)."""
    return f"rank:{reducer.global_rank(rank)}/{device}"


def sharded_entries(shard) -> list[dict[str, Tensor]]:
    """Per parameter of ``shard``'s bucket: its state as ShardedTensors (this rank's blocks are
    views of the shard's buffers)."""
    bucket, reducer = shard.bucket, shard.reducer
    entries = []
    for i, param in enumerate(bucket.params):
        shape = list(param.shape)
        ranges = reducer.param_ranges(bucket, i)   # (rank, start, stop) in the parameter's elements
        entry = {}
        for name, flat in shard.state.items():
            if not shape:   # a 0-d parameter has no blocks: its one owner sends its state to all
                entry[name] = reducer.from_owner(shard, flat, i, ranges[0][0]).reshape(())
                continue
            props = TensorProperties(dtype=flat.dtype, layout=torch.strided, requires_grad=False,
                                     memory_format=torch.contiguous_format, pin_memory=False)
            metadata, local = [], []
            owners = {rank for rank, _, _ in ranges}
            for rank in range(reducer.world_size):
                if rank not in owners:   # an empty block: DCP drops a key without local shards.
                    # It sits past the last row: DCP deduplicates blocks by offset across ranks.
                    empty = ShardMetadata(shard_offsets=[shape[0]] + [0] * (len(shape) - 1),
                                          shard_sizes=[0] * len(shape),
                                          placement=_placement(reducer, rank, flat.device))
                    metadata.append(empty)
                    if rank == reducer.rank:
                        local.append(Shard(flat.new_empty([0] * len(shape)), empty))
            for rank, start, stop in ranges:
                for offsets, sizes in blocks(shape, start, stop):
                    placement = _placement(reducer, rank, flat.device)
                    block = ShardMetadata(shard_offsets=offsets, shard_sizes=sizes, placement=placement)
                    metadata.append(block)
                    if rank == reducer.rank:
                        k = shard.of_param[i]
                        segment = shard.views(flat, [k])[0]
                        begin = _flat_index(shape, offsets) - start
                        local.append(Shard(segment[begin:begin + math.prod(sizes)].view(sizes), block))
            global_metadata = ShardedTensorMetadata(shards_metadata=metadata, size=torch.Size(shape),
                                                    tensor_properties=props)
            entry[name] = ShardedTensor._init_from_local_shards_and_global_metadata(
                local, global_metadata, process_group=reducer.group)
        entries.append(entry)
    return entries


def load_sharded(view: Tensor, start: int, stop: int, value: ShardedTensor, label: str) -> None:
    """This rank's segment [start, stop) of a parameter's state from a ShardedTensor: DCP loads
    into the shard's own views (nothing to copy); a dict loaded otherwise must have been saved
    by this rank with this layout."""
    shape = list(value.size())
    covered = 0
    for local in value.local_shards():
        offsets, sizes = local.metadata.shard_offsets, local.metadata.shard_sizes
        begin = _flat_index(shape, offsets)
        end = begin + math.prod(sizes)
        if begin < start or end > stop:
            raise ValueError(f"state_dict: the sharded state of parameter {label} was saved with "
                             "another layout (number of ranks or chunk size); load it through "
                             "torch.distributed.checkpoint, which reshards, or save with "
                             "full_state_dict()")
        target = view[begin - start:end - start]
        if target.data_ptr() != local.tensor.data_ptr():
            target.copy_(local.tensor.reshape(-1))
        covered += end - begin
    if covered != stop - start:
        raise ValueError(f"state_dict: the sharded state of parameter {label} lacks part of this "
                         "rank's segment; load it through torch.distributed.checkpoint")
