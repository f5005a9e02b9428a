"""Data parallelism: one reduction of the fp32 buffers per window, through torch.distributed.

Each bucket's accumulator is cut into contiguous chunks (about ``FUSED_ACCUM_REDUCE_CHUNK_MB``,
25 MB by default), ordered as the backward pass delivers them (last parameters first).  During
the last micro-batch of a window, a chunk whose parameters have all delivered their gradient is
accumulated at once and its all-reduce starts, overlapping the rest of the backward pass.  Chunks
are launched in the same order on every rank, so the collectives always match; a chunk that is
not complete (a parameter unused on this rank) waits for the end of the window, where the
remaining chunks are reduced, a rank contributing zeros for the parameters it did not touch.
A small all-reduce then gives every rank (which parameters got a gradient anywhere, the window
weight W, the non-finite flag).
Every rank then steps with the same global mean, W being the total micro-batch or item count of
all ranks, so the update is the exact (item-weighted) mean of the whole distributed window.
Nothing is communicated during the other micro-batches.  Reading which parameters were touched
anywhere costs one host synchronisation per window.

Every rank must end its windows together (the same ``accumulation_steps``, ``flush()`` on all
ranks) and use ``opt.backward(num_items=)`` alike; the last micro-batch of a window must be a
single backward pass (as with DistributedDataParallel).  A rank that fails makes the others' collective
fail after the process group's timeout (``init_process_group(timeout=...)``): they raise.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor

from ..accumulation import BackwardPass, GradBuffers, Window
from ..accumulation.buckets import Bucket
from ..accumulation.window import ITEMS
from .local import LocalReducer


class Chunk:
    """Parameters [first, last] of a bucket, reduced as one contiguous region of its buffer.

    ``padded``: the region runs on to where the next chunk starts (sharding lays chunks out as
    whole multiples of the ranks, so that each rank owns one equal piece of each)."""

    def __init__(self, bucket: Bucket, first: int, last: int, position: int, padded: bool = False):
        assert bucket.flat, "data parallelism reduces flat accumulators"
        self.bucket, self.first, self.last, self.position = bucket, first, last, position
        end = bucket.offsets[last] + bucket.numels[last]
        if padded:
            end = bucket.offsets[last + 1] if last + 1 < len(bucket.params) else bucket.size
        self.start, self.end = bucket.offsets[first], end
        self.region = bucket.acc[self.start:end]
        self.params = set(bucket.params[first:last + 1])


def chunk_bounds(numels: list[int], chunk_bytes: int) -> list[tuple[int, int]]:
    """(first, last) parameters of each chunk of a bucket, from its last parameter to its first:
    the order in which a backward pass delivers them."""
    bounds = []
    last, size = len(numels) - 1, 0
    for i in range(last, -1, -1):
        size += numels[i] * 4
        if size >= chunk_bytes or i == 0:
            bounds.append((i, last))
            last, size = i - 1, 0
    return bounds


def make_chunks(buckets: list[Bucket], chunk_bytes: int, padded: bool = False) -> list[Chunk]:
    """Chunks in launch order: buckets in reverse, parameters from last to first."""
    chunks = []
    for bucket in reversed(buckets):
        for first, last in chunk_bounds(bucket.numels, chunk_bytes):
            chunks.append(Chunk(bucket, first, last, len(chunks), padded))
    return chunks


class WindowReducer(LocalReducer):
    """The window's sums all-reduced over the ranks of ``process_group``."""

    distributed = True
    folds_norm = False   # a folded norm, of this rank's sums only, would be thrown away

    def __init__(self, process_group: object):
        super().__init__()
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("process_group: torch.distributed is not initialized; call "
                               "torch.distributed.init_process_group first")
        self.group = None if process_group is True else process_group
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.source = self.global_rank(0)
        self.chunk_bytes = int(float(os.environ.get("FUSED_ACCUM_REDUCE_CHUNK_MB", "25")) * 2**20)
        self.buffers: GradBuffers | None = None
        self.chunks: list[Chunk] = []
        self.launched_during_backward = 0   # chunks whose reduction overlapped a backward pass
        self._reset()

    def attach(self, buffers: GradBuffers) -> None:
        """(Re)plan the chunks over the buffers' buckets (after param groups change)."""
        self.buffers = buffers
        self.chunks = make_chunks(buffers.buckets, self.chunk_bytes, padded=self.sharded)
        self._chunk_of = {p: c for c in self.chunks for p in c.params}
        self._reset()

    def _reset(self) -> None:
        self._missing: list[int] | None = None   # per chunk: parameters still to arrive
        self._arrived: set = set()
        self._next = 0            # position of the next chunk to launch
        self._works: list = []

    def on_arrival(self, param: Tensor, record: BackwardPass) -> None:
        """A gradient arrived during the last micro-batch: launch every chunk now complete."""
        if param in self.buffers.fused_linear:
            # A fused Linear weight's gradient may come in parts (a Linear called twice, a weight
            # tied to another module): its chunk, and those after it, wait for the window's end.
            return
        chunk = self._chunk_of[param]
        if chunk.position < self._next:
            raise RuntimeError(
                "fused_accum: a gradient arrived for a parameter whose window was already being "
                "reduced across ranks: with data parallelism the last micro-batch of a window must "
                "be a single backward pass.  A loop that forms its windows itself (loss / k, "
                "step() every k-th micro-batch) should pass accumulation_steps=k and call backward() "
                "and step() for every micro-batch")
        if self._missing is None:   # first arrival of the pass: what each chunk waits for
            self._missing = [sum(p.requires_grad for p in c.params) for c in self.chunks]
        if param not in self._arrived:   # a second pass may deliver a parameter again
            self._arrived.add(param)
            self._missing[chunk.position] -= 1
        while self._next < len(self.chunks) and self._missing[self._next] <= 0:
            ready = self.chunks[self._next]
            self.buffers.drain_all()
            self._launch(ready)
            record.added = True   # its contribution is on the wire: a failure can't undo it
            self.launched_during_backward += 1

    def _launch(self, chunk: Chunk) -> None:
        self._works.append(self._collective("all-reduce of the accumulators", dist.all_reduce,
                                            chunk.region, async_op=True))
        self._next += 1

    def _collective(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, group=self.group, **kwargs)
        except Exception as exc:   # name what failed; the process group's error follows
            raise RuntimeError(
                f"fused_accum: the {what} failed on rank {self.rank} (did another rank fail, or end "
                f"its window at a different step?): {type(exc).__name__}: {exc}") from exc

    def global_rank(self, rank: int) -> int:
        """The global rank of ``rank`` of the group (what torch.distributed's ``src=`` and
        ShardedTensor placements name)."""
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def broadcast_seed(self, seed: int, device: torch.device) -> int:
        """Rank 0's ``seed`` on every rank (read on the host: at construction only)."""
        tensor = torch.tensor([seed], dtype=torch.int64, device=device)
        self._collective("broadcast of the rounding seed", dist.broadcast, tensor, src=self.source)
        return int(tensor.item())

    def broadcast_parameters(self, params: list[Tensor]) -> None:
        """Every rank starts from rank 0's parameters."""
        for p in params:
            self._collective("broadcast of the parameters", dist.broadcast, p.detach(), src=self.source)

    def reduce(self, buffers: GradBuffers, window: Window, main: torch.device,
               accumulation_steps: int) -> Tensor:
        """Sum the window over all ranks in place; returns the global window weight W (on ``main``):
        the sum of each rank's :meth:`Window.local_weight` (items in ``num_items`` mode, else
        micro-batches).  Raises on every rank, before any update, when the ranks disagree on
        ``accumulation_steps`` (their collectives would pair one rank's window with part of
        another's) or on the weighting mode (W would add micro-batches to items).
        """
        buckets = buffers.buckets
        touched = [float(t) for b in buckets for t in b.touched]
        for chunk in self.chunks[self._next:]:   # what the last backward pass did not launch
            _zero_untouched(chunk)
            self._launch(chunk)
        works, self._works = self._works, []
        self._reset()
        for work in works:
            self._collective("all-reduce of the accumulators", lambda group: work.wait())
        weight = torch.as_tensor(window.local_weight(main), dtype=torch.float32, device=main)
        found = window.nonfinite().to(main)
        # What every rank must agree on, with its square (see _check_agreement); float64 keeps the
        # sums exact.
        agreed = [float(accumulation_steps), float(window.mode == ITEMS)]
        summary = torch.tensor(touched + [float(window.discarded)] + agreed + [a * a for a in agreed],
                               dtype=torch.float64, device=main)
        summary = torch.cat([summary, weight.reshape(1).double(), found.reshape(1).double()])
        self._collective("all-reduce of the window's summary", dist.all_reduce, summary)
        totals = summary[:-2].tolist()   # the window's one host synchronisation
        self._check_agreement(totals[len(touched) + 1:], agreed, _AGREED,
                              "Every rank must use the same accumulation_steps, and num_items for "
                              "all micro-batches or for none; this window's update was not applied")
        anywhere = [t > 0 for t in totals[:len(touched) + 1]]
        window.discarded = anywhere.pop()   # a failed pass on any rank discards the window on all
        start = 0
        for bucket in buckets:
            bucket.touched = anywhere[start:start + len(bucket.touched)]
            bucket.norm_valid = False   # the folded sum of squares was this rank's alone
            start += len(bucket.touched)
        global_found = (summary[-1] > 0).float()
        for device, flag in window.found_inf.items():
            flag.copy_(global_found.to(device))
        return summary[-2].float()

    def sum_accumulators_to_host(self) -> tuple[list[Tensor], list[list[bool]]]:
        """For a checkpoint: each bucket's accumulators summed over the ranks, as a flat host
        tensor, and which parameters any rank touched.  One chunk at a time goes through a device
        copy, so the live sums stay as they are and little memory is added."""
        buckets = self.buffers.buckets
        flags = torch.tensor([float(t) for b in buckets for t in b.touched], dtype=torch.float64,
                             device=buckets[0].device)
        self._collective("all-reduce of the window's touched parameters", dist.all_reduce, flags)
        anywhere = iter(flags.tolist())
        touched = [[next(anywhere) > 0 for _ in b.params] for b in buckets]
        flats = {id(b): torch.zeros(b.size, dtype=torch.float32) for b in buckets}
        for chunk in self.chunks:
            _zero_untouched(chunk)
            region = chunk.region.clone()
            self._collective("all-reduce of the accumulators", dist.all_reduce, region)
            flats[id(chunk.bucket)][chunk.start:chunk.end].copy_(region)
        return [flats[id(b)] for b in buckets], touched

    def sum_numbers(self, numbers: Tensor) -> Tensor:
        """``numbers`` summed over the ranks (in float64)."""
        total = numbers.double()
        self._collective("all-reduce of the window's summary", dist.all_reduce, total)
        return total

    def check_same(self, settings: dict[str, float], device: torch.device, remedy: str) -> None:
        """Raise on every rank if the ranks' ``settings`` differ (one small all-reduce)."""
        ours = list(settings.values())
        summary = torch.tensor(ours + [v * v for v in ours], dtype=torch.float64, device=device)
        self._collective("all-reduce of the ranks' settings", dist.all_reduce, summary)
        self._check_agreement(summary.tolist(), ours, list(settings), remedy)

    def _check_agreement(self, sums: list[float], ours: list[float], names, remedy: str) -> None:
        """``sums``: each value, then its square, summed over the ranks; these equal d * value
        and d * value**2 exactly when all d ranks hold the same value."""
        ranks = self.world_size
        n = len(ours)
        for what, value, total, squares in zip(names, ours, sums[:n], sums[n:]):
            if ranks * squares != total * total:
                raise RuntimeError(
                    f"fused_accum: the ranks disagree on {what}: this rank (rank {self.rank}) has "
                    f"{value:g}, the mean over the {ranks} ranks is {total / ranks:g}.  {remedy}")


def _zero_untouched(chunk: Chunk) -> None:
    """Zeros, not stale values, in the accumulators of the chunk's parameters this rank has not
    touched in the window: its part of a sum over the ranks.  (A first touch overwrites them.)"""
    bucket = chunk.bucket
    untouched = [i for i in range(chunk.first, chunk.last + 1) if not bucket.touched[i]]
    if untouched:
        torch._foreach_zero_(bucket.views(bucket.acc, untouched))


_AGREED = ("accumulation_steps", "opt.backward(num_items=) (1: used in this window, 0: not)")
