"""The window in progress in a checkpoint: one entry, resumable on any number of ranks.

A window's partial sums matter only through their sum over the ranks, which the window's end
takes anyway.  So a mid-window ``state_dict()`` saves that sum once, with the window's item count,
its non-finite flag and the number of ranks that summed it.  Under data parallelism that is a
collective: each chunk of the accumulators is all-reduced into a copy and moved to the host (the
live sums stay as they are), so every rank calls ``state_dict()`` mid-window, as DCP's
``dcp.save`` does.

Loaded on d' ranks, rank 0 takes the sums and item count and the other ranks go on with empty
ones; the window resumes at (micro-batches ended over all ranks) / d', so it ends after as many
micro-batches over all ranks as it would have.  A window that d' ranks cannot split evenly raises.

The entry is bytes (``torch.save`` of host tensors), so that torch.distributed.checkpoint sees one
item, listed by every optimizer: a freshly built one lists ``None`` there, and DCP's load puts the
saved entry in its place (it loads only what the loading optimizer's ``state_dict()`` lists).
"""
from __future__ import annotations

import io
from typing import Any

import torch
from torch import Tensor

from ..buffers import Bucket


def pack(opt: Any, index: dict[Tensor, int]) -> bytes | None:
    """The window in progress of ``opt`` (None between windows); ``index``: parameter -> state-dict
    id.  A collective under data parallelism."""
    buffers, reducer, main = opt._buffers, opt._reducer, opt._skipped.device
    if not (opt._micro > 0 or buffers.discarded or any(True in b.touched for b in buffers.buckets)):
        return None   # ranks in step agree, so no rank enters the collectives below alone
    items = opt._weight_sum[main] if opt._mode == "items" else torch.zeros((), device=main)
    found = torch.stack([f.to(main) for f in buffers.found_inf.values()]).amax()
    numbers = torch.stack([items, found, torch.tensor(float(buffers.discarded), device=main)])
    if reducer is not None:
        flats, touched = reducer.sum_accumulators_to_host()
        numbers = reducer.sum_numbers(numbers)
        ranks = reducer.world_size
    else:
        flats, touched, ranks = None, [b.touched for b in buffers.buckets], 1
    items, found, discarded = numbers.tolist()
    accumulated = {}
    for b, bucket in enumerate(buffers.buckets):
        for i, p in enumerate(bucket.params):
            if touched[b][i]:
                value = bucket.view(flats[b], i) if flats else bucket.acc_view(i)
                accumulated[index[p]] = value.to("cpu", copy=True)
    window = {"ranks": ranks, "accumulated_grads": accumulated, "items": float(items),
              "found_inf": float(found) > 0, "discarded": bool(discarded)}
    blob = io.BytesIO()
    torch.save(window, blob)
    return blob.getvalue()


def unpack(blob: bytes | None) -> dict[str, Any] | None:
    if blob is None:
        return None
    return torch.load(io.BytesIO(blob), weights_only=True)


def resumed_position(micro_batches: int, saved_ranks: int, ranks: int,
                     accumulation_steps: int) -> int:
    """Micro-batches each of ``ranks`` ranks counts as ended in a window saved after
    ``micro_batches`` on each of ``saved_ranks``; raises if they cannot."""
    done = micro_batches * saved_ranks
    if done % ranks:
        raise ValueError(
            f"state_dict: saved mid-window after {micro_batches} micro-batches on each of "
            f"{saved_ranks} ranks ({done} in all), which {ranks} ranks cannot continue evenly; "
            "save at a window boundary (after the step) to change the number of ranks")
    position = done // ranks
    if position >= accumulation_steps:
        raise ValueError(
            f"state_dict: saved mid-window after {done} micro-batches over all ranks, which is "
            f"{position} per rank here: the window of accumulation_steps={accumulation_steps} "
            "would be over already")
    return position


def restore(opt: Any, window: dict[str, Any] | None, by_id: dict[int, tuple[Bucket, int]]) -> None:
    """Put a window saved by :func:`pack` (None: no window) into ``opt``, whose window was reset:
    rank 0 takes the sums, the other ranks start empty."""
    first = opt._reducer is None or opt._reducer.rank == 0
    items = window["items"] if window and first else 0.0
    found = float(window["found_inf"]) if window and first else 0.0
    for total in opt._weight_sum.values():
        total.fill_(items)
    for flag in opt._buffers.found_inf.values():
        flag.fill_(found)
    opt._buffers.discarded = bool(window and window["discarded"])
    if not (window and first):
        return
    for sid, value in window["accumulated_grads"].items():
        bucket, i = by_id[sid]
        bucket.load_accumulator(i, value)
        bucket.touched[i] = True
