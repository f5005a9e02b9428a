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
Under data parallelism a mid-window ``state_dict()`` raises (on every rank, before any
collective of its window) between a window's last backward pass and its ``step()``.  Whether a
window is in progress, and whether it is being reduced, is decided on counts that every rank in
step shares (micro-batches ended, backward passes begun), never on what one rank touched.  A
window driven from outside (``final_micro_batch``, as the integrations do) counts no micro-batch
before its step: it resumes on as many ranks only, unless ``num_items`` weighs it.

``get_optimizer_state_dict`` (torch.distributed.checkpoint.state_dict) keeps only ``"state"`` and
``"param_groups"``, so the first parameter group also says whether a window was in progress
(:data:`MID_WINDOW`: False, or the largest step count when saved mid-window): loading such a dict
without its window raises instead of dropping it.  A torch optimizer that loads the dict copies
the key into its own group; once it has stepped, its step counts no longer match, and its dicts
load as torch's.  (``flatten_optimizer_state_dict=True`` rebuilds the groups from the loading
optimizer's keys, which drops the mark: through that option a mid-window window is lost.)

The entry is a pair ``(TAG, window)`` holding host tensors: DCP flattens dicts and lists but keeps
a tuple whole, as one item that every optimizer lists (a freshly built one lists ``None`` there,
and DCP's load puts the saved entry in its place: it loads only what the loading optimizer's
``state_dict()`` lists).  Each rank holds the whole window on the host while it is saved or
loaded (DCP writes one rank's copy): mid-window checkpoints cost a gradient set of host memory
per rank, which a checkpoint at a window boundary does not.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..accumulation import GradBuffers, Window
from ..accumulation.buckets import Bucket
from ..accumulation.window import ITEMS


TAG = "fused_accum.window/1"
MID_WINDOW = "fused_accum_mid_window"   # in the first saved parameter group


def pack(window: Window, buffers: GradBuffers, reducer: Any, main: torch.device,
         index: dict[Tensor, int]) -> tuple[str, dict[str, Any]] | None:
    """The window in progress as ``(TAG, window)`` (None between windows); ``index``: parameter
    -> state-dict id.  A collective under data parallelism (a distributed ``reducer``)."""
    if window.micro == 0 and window.passes_begun == 0:
        return None   # between windows: decided on counts every rank shares, so none enters
                      # the collectives below alone
    if reducer.distributed:
        _check_collectable(window, buffers)
    zero = torch.zeros((), device=main)
    items = window.items[main] if window.mode == ITEMS else zero
    pending_items = window.items_since_step[main] if window.mode == ITEMS else zero
    numbers = torch.stack([items, window.nonfinite().to(main),
                           torch.tensor(float(window.discarded), device=main), pending_items])
    since = None
    if reducer.distributed:
        flats, touched = reducer.sum_accumulators_to_host()   # a copy already
        numbers = reducer.sum_numbers(numbers)
        ranks = reducer.world_size
    else:
        flats, touched, ranks = None, [b.touched for b in buffers.buckets], 1
        # Which sums began or grew since the last step(), so that zero_grad() after a resume
        # drops or refuses exactly what it would have (one process: ranks would disagree).
        began, added = buffers.since_last_step()
        since = {"began": [index[b.params[i]] for b, i in began],
                 "added": [index[b.params[i]] for b, i in added]}
    items, found, discarded, pending_items = numbers.tolist()
    accumulated = {}
    for b, bucket in enumerate(buffers.buckets):
        for i, p in enumerate(bucket.params):
            if touched[b][i]:
                accumulated[index[p]] = (bucket.view(flats[b], i) if flats else
                                         bucket.acc_view(i).to("cpu", copy=True))
    for (bucket, i), total in window.sparse.coalesced().items():   # kept sparse
        accumulated[index[bucket.params[i]]] = total.to("cpu", copy=True)
    # A micro-batch whose gradients arrived and whose step() has not come yet is part of the
    # window too: restored, step() or flush() ends it as they would have.
    return TAG, {"ranks": ranks, "accumulated_grads": accumulated, "items": float(items),
                 "found_inf": float(found) > 0, "discarded": bool(discarded),
                 "since_last_step": since, "items_since_step": float(pending_items),
                 "pending": bool(window.arrived)}


def mid_window_mark(packed: dict[str, Any]) -> bool | float:
    """:data:`MID_WINDOW` of a packed state dict: False, or its largest step count."""
    if packed["fused_accum"]["window"] is None:
        return False
    return _largest_step(packed["state"])


def dropped_window(state_dict: dict[str, Any]) -> bool:
    """Whether ``state_dict`` was saved mid-window and has lost its window since."""
    groups = state_dict["param_groups"]
    mark = groups[0].get(MID_WINDOW) if groups else None
    return ("fused_accum" not in state_dict and isinstance(mark, float)
            and mark == _largest_step(state_dict["state"]))


def _largest_step(state: dict[Any, dict[str, Any]]) -> float:
    return max((float(entry["step"]) for entry in state.values() if "step" in entry), default=0.0)


def _check_collectable(window: Window, buffers: GradBuffers) -> None:
    """Under data parallelism, refuse (on every rank alike, before any collective) a window whose
    sums are being reduced across the ranks already: its last backward pass has run, its step()
    not yet."""
    if buffers.on_arrival is not None and window.arrived:
        raise RuntimeError(
            "state_dict: called between a window's last backward pass and its step(), while the "
            "window is being reduced across ranks; call it after step()")


def unpack(entry: tuple[str, dict[str, Any]] | None) -> dict[str, Any] | None:
    if entry is None:
        return None
    if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and entry[0] == TAG):
        raise ValueError("state_dict: the \"window\" entry was not written by this version of "
                         "fused_accum; save at a window boundary to move between versions")
    return dict(entry[1])


def resumed_position(micro_batches: int, saved_ranks: int, ranks: int,
                     accumulation_steps: int, mode: str | None) -> int:
    """Micro-batches each of ``ranks`` ranks counts as ended in a window saved after
    ``micro_batches`` on each of ``saved_ranks``; raises if they cannot."""
    if micro_batches == 0 and saved_ranks != ranks and mode != "items":
        # A window driven from outside (final_micro_batch) counts its micro-batches as one at its
        # step, on each rank: its weight is the number of ranks, which then changes under it.
        raise ValueError(
            f"state_dict: saved mid-window on {saved_ranks} ranks before any micro-batch was "
            f"counted (a window driven from outside with final_micro_batch, weighted by its "
            f"ranks), loaded on {ranks}; save at a window boundary to change the number of ranks")
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


def restore(target: Window, reducer: Any, window: dict[str, Any] | None,
            by_id: dict[int, tuple[Bucket, int]]) -> None:
    """Put a window saved by :func:`pack` (None: no window) into ``target``, which was reset:
    rank 0 takes the sums, the other ranks start empty."""
    first = reducer.rank == 0
    items = window["items"] if window and first else 0.0
    found = float(window["found_inf"]) if window and first else 0.0
    for total in target.items.values():
        total.fill_(items)
    for flag in target.found_inf.values():
        flag.fill_(found)
    target.discarded = bool(window and window["discarded"])
    if not (window and first):
        return
    for total in target.items_since_step.values():
        total.fill_(window.get("items_since_step", 0.0))
    for sid, value in window["accumulated_grads"].items():
        bucket, i = by_id[sid]
        settled, added = _since_last_step(window, sid)
        if value.layout != torch.strided:
            target.sparse.restore(bucket, i, value, settled=settled, added=added)
            continue
        bucket.load_accumulator(i, value)
        bucket.touched[i] = True
        bucket.settled[i], bucket.added[i] = settled, added


def _since_last_step(window: dict[str, Any], sid: int) -> tuple[bool, bool]:
    """(settled, added since the last step()) of a restored sum: as saved in one process; else a
    pending micro-batch is summed with earlier ones and cannot be taken apart by zero_grad(),
    unless no micro-batch had ended (then it can be dropped whole)."""
    since = window.get("since_last_step")
    if since is not None:
        return sid not in since["began"], sid in since["added"]
    pending = bool(window.get("pending", False))
    return window["position"] > 0 or not pending, pending and window["position"] > 0
