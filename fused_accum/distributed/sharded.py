"""Sharded optimizer state (``shard_state=True``): each of d ranks keeps 1/d of the fp32 state.

Layout.  Each bucket's flat buffers are cut into the chunks that data parallelism reduces (see
:mod:`fused_accum.distributed.all_reduce`), each padded to a whole multiple of d * ALIGN elements, and
rank r owns piece r of every chunk.  Its shard of the optimizer state (moments, fp32 masters or
compact remainders) is its pieces end to end: 1/d of each state buffer.  The accumulators stay
whole on every rank, since each rank sums its own micro-batches into them (Megatron-LM's
distributed optimizer keeps its gradient buffer the same way): a bf16 model with AdamW then holds
2 (parameter) + 4 (accumulator) + 12/d (master, moments) bytes a parameter on each rank.

Per window, the only communication besides the window's small summary:

1. During the last backward pass each chunk is reduce-scattered as soon as its gradients are in
   (in place: a rank's piece of the accumulator then holds the sum over all ranks).
2. The global sum of squares, for clipping, is one scalar all-reduce of each rank's pieces' part.
3. Each rank steps the parameter segments inside its pieces; the window weight W and the
   non-finite flag are already global, so a skip is a skip on every rank.
4. The pieces are stepped chunk by chunk, and each chunk's updated parameters are all-gathered
   as soon as it is stepped (overlapping the next chunk's step) into the accumulator's own
   memory (dead until the next window's first touches overwrite it) viewed in the parameters'
   dtype, so no buffer is allocated for it; once all have arrived, before ``step()`` returns,
   they are copied into the parameters.

A parameter cut by a piece boundary is stepped in parts by two ranks; its step count is kept on
every rank.  Stochastic rounding draws its bits with a seed of its own for each rank's piece of
each chunk, so a sharded run rounds differently (as unbiased) from an unsharded one.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..accumulation.buckets import ALIGN, Bucket, FlatState
from .all_reduce import Chunk, WindowReducer, chunk_bounds
from .sharded_checkpoint import ShardedTensor, load_sharded, sharded_entries

# torch 2.13 renamed the tensor collectives; the GPU machines run 2.11.
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _mix(seed: int, *values: int) -> int:
    """A 31-bit seed from ``seed`` and ``values`` (a multiplicative hash)."""
    h = seed
    for value in values:
        h = ((h ^ (h >> 15)) * 0x2C1B3C6D + value * 0x297A2D39 + 0x9E3779B9) & 0xFFFFFFFF
    return (h ^ (h >> 16)) & 0x7FFFFFFF


def sharded_layout(numels: list[int], chunk_bytes: int, ranks: int) -> tuple[list[int], int]:
    """Offsets and size of a bucket's flat buffers whose chunks are whole multiples of
    ``ranks`` * ALIGN elements (each slice starts on ALIGN, as in the plain layout)."""
    ends = {last for _, last in chunk_bounds(numels, chunk_bytes)}
    unit = ranks * ALIGN
    offsets, total = [], 0
    for i, n in enumerate(numels):
        offsets.append(total)
        total += -(-n // ALIGN) * ALIGN
        if i in ends:
            total = -(-total // unit) * unit
    return offsets, total


class Segment(NamedTuple):
    """The part of a parameter inside this rank's pieces."""
    param: int   # index in the bucket
    start: int   # flat position in the bucket's buffers
    stop: int
    local: int   # position in this rank's shard of the state


class BucketShard(FlatState):
    """This rank's part of a bucket: its pieces, its shard of the state, and the parameter
    segments in them.  The algorithms' update functions take it as they take a bucket, with
    segment indices in place of parameter indices."""

    def __init__(self, bucket: Bucket, pieces: list[tuple[int, int]], reducer: ShardedReducer):
        self.bucket = bucket
        self.pieces = pieces
        self.reducer = reducer
        self.backend, self.device, self.dtype = bucket.backend, bucket.device, bucket.dtype
        self.group_index = bucket.group_index
        self.segments: list[Segment] = []
        self.in_piece: list[list[int]] = []   # per piece, the indices of its segments
        local = 0
        for start, stop in pieces:
            self.in_piece.append([])
            for i, (offset, numel) in enumerate(zip(bucket.offsets, bucket.numels)):
                lo, hi = max(start, offset), min(stop, offset + numel)
                if lo < hi:
                    self.in_piece[-1].append(len(self.segments))
                    self.segments.append(Segment(i, lo, hi, local + lo - start))
            local += stop - start
        self.size = local
        self.of_param = {s.param: k for k, s in enumerate(self.segments)}
        self.params: list[Tensor] = []
        self.refresh_params()
        self.state: dict[str, Tensor] = {}
        self._views: dict[int, tuple[Tensor, list[Tensor]]] = {}
        self.rounding_seed = bucket.rounding_seed   # per stepped chunk: see ShardedReducer.step_shard

    def refresh_params(self) -> None:
        """The parameters' segments, as the kernels write them (parameters are contiguous);
        taken again at every step, in case a parameter's ``.data`` was replaced."""
        bucket = self.bucket
        self.params = [bucket.params[s.param].detach().view(-1)[s.start - bucket.offsets[s.param]:
                                                                 s.stop - bucket.offsets[s.param]]
                       for s in self.segments]

    # -- what an update function reads --------------------------------------------------------

    def views(self, flat: Tensor, indices: list[int]) -> list[Tensor]:
        """Segments ``indices`` of a shard-sized state buffer."""
        cached = self._views.get(id(flat))
        if cached is None or cached[0] is not flat:
            cached = (flat, [flat[s.local:s.local + s.stop - s.start] for s in self.segments])
            self._views[id(flat)] = cached
        return [cached[1][k] for k in indices]

    def acc_views(self, indices: list[int]) -> list[Tensor]:
        acc = self.bucket.acc
        return [acc[self.segments[k].start:self.segments[k].stop] for k in indices]

    def step_views(self, indices: list[int]) -> list[Tensor]:
        return self.bucket.step_views([self.segments[k].param for k in indices])

    def touched_indices(self) -> list[int]:
        touched = self.bucket.touched
        return [k for k, s in enumerate(self.segments) if touched[s.param]]

    # -- state ----------------------------------------------------------------------------------

    def copy_params_to(self, flat: Tensor) -> None:
        if self.segments:
            torch._foreach_copy_(self.views(flat, list(range(len(self.segments)))), self.params)

    def param_state(self, i: int) -> dict[str, Tensor]:
        """This rank's part of parameter i's state: flat segments (empty if it has none)."""
        k = self.of_param.get(i)
        return {} if k is None else {name: self.views(flat, [k])[0] for name, flat in self.state.items()}

    def state_entries(self, whole: bool) -> list[dict[str, Tensor]]:
        """Per parameter, its state: whole (gathered from every rank, in torch's format) or as
        ShardedTensors of this rank's blocks (see :mod:`.sharded_checkpoint`).  Both are
        collectives: every rank calls this."""
        if not whole:
            return sharded_entries(self)
        gathered = {name: self.reducer.gather_state(self, flat) for name, flat in self.state.items()}
        return [{name: self.bucket.view(flat, i) for name, flat in gathered.items()}
                for i in range(len(self.bucket.params))]

    def load_param_state(self, flat: Tensor, i: int, value: Tensor | None) -> None:
        """Parameter i's part of ``flat`` from its saved value: whole, sharded, or None (zeros)."""
        k = self.of_param.get(i)
        if k is None:
            return
        view = self.views(flat, [k])[0]
        s = self.segments[k]
        offset = self.bucket.offsets[i]
        if value is None:
            view.zero_()
        elif isinstance(value, ShardedTensor):
            load_sharded(view, s.start - offset, s.stop - offset, value, self.bucket.labels[i])
        else:
            view.copy_(value.reshape(-1)[s.start - offset:s.stop - offset])

    def count_steps_elsewhere(self, found_inf: Tensor) -> None:
        """Step counts of the touched parameters stepped on other ranks only, as their kernels
        counted them (not on a skipped window)."""
        others = [i for i in self.bucket.touched_indices() if i not in self.of_param]
        if others:
            index = torch.tensor(others, device=self.device)
            counted = (found_inf == 0).to(torch.float32).expand(len(others))
            self.bucket.steps.index_add_(0, index, counted)

    def gather_buffer(self) -> Tensor:
        """The accumulator's memory as a flat buffer of the parameters' dtype (bucket.size long)."""
        acc = self.bucket.acc
        return acc if self.dtype == torch.float32 else acc.view(self.dtype)[:self.bucket.size]


class ShardedReducer(WindowReducer):
    """The window's reduction for ``shard_state=True``: reduce-scatter, sharded step, all-gather."""

    sharded = True

    def __init__(self, process_group: object):
        super().__init__(process_group)
        self.shards: dict[Bucket, BucketShard] = {}
        self._ascending: dict[Bucket, list[Chunk]] = {}   # each bucket's chunks, lowest first
        self._gathers: list = []    # this window's all-gathers in flight
        self._gathered: list[tuple[Bucket, Tensor]] = []
        self.gathered_during_step = 0   # all-gathers complete before the step's last chunk

    def attach(self, buffers) -> None:
        for bucket in buffers.buckets:
            if bucket not in self.shards:
                check_shardable(bucket.params, bucket.labels)
                bucket.place(*sharded_layout(bucket.numels, self.chunk_bytes, self.world_size))
        super().attach(buffers)
        self._ascending = {bucket: sorted((c for c in self.chunks if c.bucket is bucket),
                                          key=lambda c: c.start) for bucket in buffers.buckets}
        for bucket in buffers.buckets:
            if bucket not in self.shards:
                pieces = [self._piece(c) for c in self._ascending[bucket]]
                self.shards[bucket] = BucketShard(bucket, pieces, self)

    def _piece(self, chunk: Chunk, rank: int | None = None) -> tuple[int, int]:
        """The flat range of ``chunk`` that ``rank`` (this one by default) owns."""
        rank = self.rank if rank is None else rank
        n = (chunk.end - chunk.start) // self.world_size
        return chunk.start + rank * n, chunk.start + (rank + 1) * n

    def _launch(self, chunk: Chunk) -> None:
        start, stop = self._piece(chunk)
        own = chunk.bucket.acc[start:stop]
        self._works.append(self._collective("reduce-scatter of the accumulators", _REDUCE_SCATTER,
                                            own, chunk.region, async_op=True))
        self._next += 1

    def window_sumsq(self, buffers, buckets: list[Bucket], main: torch.device) -> Tensor:
        """The sum of squares of the whole window's sums over all ranks (one scalar all-reduce)."""
        parts = []
        for bucket in buckets:
            shard = self.shards[bucket]
            bucket.sumsq.zero_()
            indices = shard.touched_indices()
            if indices:
                bucket.backend.norm(shard.acc_views(indices), bucket.sumsq)
            parts.append(bucket.sumsq.to(main))
        total = torch.stack(parts).sum()
        self._collective("all-reduce of the gradient norm", dist.all_reduce, total)
        return total

    def step(self, shard: BucketShard, algorithm, group: dict, grad_scale, found_inf: Tensor) -> None:
        """This rank's shard of a bucket; every rank's updates are gathered in
        :meth:`finish_gathers`."""
        for name in algorithm.state_names(group):   # on every rank, stepped or not
            shard.ensure_state(name)
        self.step_shard(shard, algorithm.update, group, grad_scale, found_inf)

    def step_shard(self, shard: BucketShard, update, group: dict, grad_scale, found_inf: Tensor) -> None:
        """Step this rank's pieces of a bucket chunk by chunk, each chunk's all-gather of the
        updated parameters starting as soon as it is stepped, so that it overlaps the next
        chunk's step; :meth:`finish_gathers` then waits and writes the parameters.

        The gathers go through the accumulator's memory viewed in the parameters' dtype, the
        chunks in ascending order: a chunk's bf16 region lies in the fp32 bytes of itself and
        of chunks below it, all stepped already."""
        touched = shard.bucket.touched
        gathered = shard.gather_buffer()
        shard.refresh_params()
        seed = shard.bucket.rounding_seed
        for chunk, (start, stop), segments in zip(self._ascending[shard.bucket], shard.pieces,
                                                  shard.in_piece):
            stepped = [k for k in segments if touched[shard.segments[k].param]]
            if stepped:
                # Stochastic rounding keys its bits on the position in the call: a seed of each
                # rank's piece of each chunk keeps the calls' first segments from sharing bits.
                shard.rounding_seed = seed if seed < 0 else _mix(seed, chunk.position, self.rank)
                update(shard, stepped, group, grad_scale, found_inf)
            if segments:
                torch._foreach_copy_([gathered[shard.segments[k].start:shard.segments[k].stop]
                                      for k in segments], [shard.params[k] for k in segments])
            work = self._collective("all-gather of the parameters", _ALL_GATHER,
                                    gathered[chunk.start:chunk.end], gathered[start:stop],
                                    async_op=True)
            self._gathers.append(work)
        shard.count_steps_elsewhere(found_inf)
        self._gathered.append((shard.bucket, gathered))

    def finish_gathers(self) -> None:
        """Wait for the window's all-gathers and write every rank's updates into the parameters."""
        works, self._gathers = self._gathers, []
        buffers, self._gathered = self._gathered, []
        # Overlap, measured: gathers already complete when the last chunk had been stepped.
        self.gathered_during_step += sum(work.is_completed() for work in works[:-1])
        for work in works:
            self._collective("all-gather of the parameters", lambda group: work.wait())
        for bucket, gathered in buffers:
            torch._foreach_copy_([p.detach() for p in bucket.params],
                                 [bucket.view(gathered, i) for i in range(len(bucket.params))])

    def nonfinite_labels(self, buckets: list[Bucket]) -> list[str]:
        """The parameters with a non-finite sum anywhere, from every rank's pieces (for
        ``nonfinite="raise"``, which reads the device anyway)."""
        found = set()
        for bucket in buckets:
            shard = self.shards[bucket]
            indices = shard.touched_indices()
            for k, acc in zip(indices, shard.acc_views(indices)):
                if not torch.isfinite(acc).all():
                    found.add(bucket.labels[shard.segments[k].param])
        everyone: list = [None] * self.world_size
        self._collective("all-gather of the non-finite parameters", dist.all_gather_object,
                         everyone, sorted(found))
        union = set().union(*everyone)
        return [label for bucket in buckets for label in bucket.labels if label in union]

    def param_ranges(self, bucket: Bucket, i: int) -> list[tuple[int, int, int]]:
        """(rank, start, stop): which elements of parameter i each rank owns."""
        chunk = self._chunk_of[bucket.params[i]]
        offset, numel = bucket.offsets[i], bucket.numels[i]
        ranges = []
        for rank in range(self.world_size):
            start, stop = self._piece(chunk, rank)
            lo, hi = max(offset, start), min(offset + numel, stop)
            if lo < hi:
                ranges.append((rank, lo - offset, hi - offset))
        return ranges

    def from_owner(self, shard: BucketShard, flat: Tensor, i: int, owner: int) -> Tensor:
        """Parameter i's part of ``flat`` as its owner holds it, on every rank (a broadcast)."""
        k = shard.of_param.get(i)
        value = shard.views(flat, [k])[0].clone() if owner == self.rank else \
            torch.empty(shard.bucket.numels[i], dtype=flat.dtype, device=flat.device)
        sent = value.view(torch.float16) if value.dtype == torch.int16 else value   # see gather_state
        self._collective("broadcast of the optimizer state", dist.broadcast, sent,
                         src=self.global_rank(owner))
        return value

    def gather_state(self, shard: BucketShard, flat: Tensor) -> Tensor:
        """A shard-sized state buffer made whole, in the bucket's layout."""
        whole = torch.zeros(shard.bucket.size, dtype=flat.dtype, device=flat.device)
        # gloo gathers no int16 (compact remainders): move their bits as fp16, which it does
        sent, into = (flat.view(torch.float16), whole.view(torch.float16)) if flat.dtype == torch.int16 \
            else (flat, whole)
        local = 0
        for chunk, (start, stop) in zip(self._ascending[shard.bucket], shard.pieces):
            self._collective("all-gather of the optimizer state", _ALL_GATHER,
                             into[chunk.start:chunk.end], sent[local:local + stop - start])
            local += stop - start
        return whole


def check_shardable(params: list[Tensor], labels: list[str]) -> None:
    """Sharding steps flat segments of parameters: each must be contiguous."""
    for p, label in zip(params, labels):
        if not p.is_contiguous():
            raise ValueError(f"shard_state=True: parameter {label} is not contiguous (e.g. "
                             "channels_last); sharding steps flat segments of each parameter")

