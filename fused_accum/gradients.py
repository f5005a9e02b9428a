"""Where gradients go: a hook per parameter takes each gradient the moment autograd delivers it.

The hook (``register_post_accumulate_grad_hook``) takes ``param.grad``, sets it to None and hands
it to its bucket at once:

- an fp32 parameter's first gradient of a window is adopted as its accumulator (no copy, see
  :mod:`fused_accum.buffers`);
- every other gradient is queued, and the queue is accumulated (one backend call per bucket) as
  soon as it holds ``FUSED_ACCUM_GROUP_MB`` (2 MB by default) and at the end of the backward pass.

So beyond what autograd itself holds, at most a couple of MB of gradients are alive at any moment,
and the allocator hands their memory to the next layer's weight gradients; many small gradients
still cost one backend call per group.

A backward pass that fails midway (an exception in a hook or an autograd Function, out of memory)
is undone when that is exact: its queued gradients are dropped and its first touches forgotten.
Once it has added gradients into sums of earlier micro-batches, which no subtraction restores
exactly, the window is discarded instead: its update is skipped on every rank (parameters and
optimizer state unchanged at its step), with a warning; micro-batches are still counted, so the
next window starts where it would have.  A pass refused at its first gradient (see
``on_backward_start``) takes nothing.
"""
from __future__ import annotations

import os
import threading
import warnings
import weakref
from collections.abc import Callable

import torch
from torch import Tensor

from .buffers import Bucket, param_label

# (owner, hook handle) of the GradBuffers that owns a parameter: the newest optimizer built over
# a parameter takes it over and removes the previous owner's hook.
_OWNER_ATTR = "_fused_accum_owner"
GROUP_ENV = "FUSED_ACCUM_GROUP_MB"
# Looked up once: the hook runs for every gradient of every backward pass.
_task_id = torch._C._current_graph_task_id
_STRIDED, _FP32 = torch.strided, torch.float32


def group_bytes() -> int:
    return int(float(os.environ.get(GROUP_ENV, "2")) * 2**20)


class BackwardPass:
    """What one backward pass (an autograd graph task) has delivered so far."""

    __slots__ = ("task", "serial", "queue", "queued_bytes", "firsts", "added", "found_before",
                 "arrived_before")

    def __init__(self, task: int, serial: int, found_before: dict[torch.device, Tensor],
                 arrived_before: bool):
        self.task = task
        self.serial = serial
        self.arrived_before = arrived_before   # whether gradients had come since the last step()
        self.queue: list[tuple[Bucket, int, Tensor]] = []   # not yet accumulated
        self.queued_bytes = 0
        self.firsts: list[tuple[Bucket, int]] = []   # slots this pass touched first in the window
        self.added = False          # it added into an earlier sum: it can no longer be undone
        self.found_before = found_before   # the non-finite flags before it, to undo exactly


class _PassEnd:
    """The engine's final callback of a pass.  Called when the pass completes; a pass that fails
    drops its callbacks uncalled, which ``__del__`` reports."""

    __slots__ = ("owner", "task", "called")

    def __init__(self, owner: weakref.ref, task: int):
        self.owner, self.task, self.called = owner, task, False

    def __call__(self) -> None:
        self.called = True
        owner = self.owner()
        if owner is not None:
            owner.end_pass(self.task)

    def __del__(self) -> None:
        if not self.called:
            owner = self.owner()
            if owner is not None:
                owner.fail_pass(self.task)


class GradBuffers:
    """All buckets of one optimizer, the per-device window flags, and the gradient hooks.

    ``micro_weight`` (per-device fp32 scalars, or None for weight 1) and ``micro_kind`` are set
    by the optimizer around a micro-batch's backward, ``fold_norm`` for the last micro-batch of a
    window; ``on_backward_start(kind, through_optimizer)``, a bound method of the optimizer, is
    called at the first gradient of every backward pass and may raise to refuse it.
    ``flat_fp32``: fp32 buckets keep flat accumulators too (data parallelism reduces those).
    """

    def __init__(self, backend_name: str, on_backward_start: Callable[[str, bool], None],
                 flat_fp32: bool = False):
        self.backend_name = backend_name
        self.flat_fp32 = flat_fp32
        # A weak reference: the optimizer owns this object, and the hooks must not keep the
        # optimizer alive (deleting it hands the parameters back to plain autograd at once).
        self._on_backward_start = weakref.WeakMethod(on_backward_start)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.buckets: list[Bucket] = []
        self.slots: dict[Tensor, tuple[Bucket, int]] = {}
        self.unhooked: list[Tensor] = []            # params that did not require grad when added
        self.found_inf: dict[torch.device, Tensor] = {}
        self._ones: dict[torch.device, Tensor] = {}
        self.micro_weight: dict[torch.device, Tensor] | None = None
        self.micro_kind: str | None = None          # set by opt.backward: "plain" or "items"
        self.on_arrival: Callable[[Tensor, BackwardPass], None] | None = None   # data parallel
        self.fold_norm = False
        self.arrived = False                        # a gradient came since the last step()
        self.discarded = False                      # a failed pass spoilt this window's sums
        self.group_bytes = group_bytes()
        self.passes: dict[int, BackwardPass] = {}   # graph task id -> its pass, while it runs
        self._serial = 0                            # passes started so far
        self._lock = threading.RLock()
        self._self_ref = weakref.ref(self)

    # -- construction ------------------------------------------------------------------------

    def add_group(self, group_index: int, params: list[Tensor], names: list[str] | None) -> list[Bucket]:
        by_key: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(params):
            by_key.setdefault((p.device, p.dtype), []).append(i)
        new = [Bucket(group_index, [params[i] for i in idx],
                      [param_label(group_index, i, names) for i in idx], self.backend_name,
                      flat=self.flat_fp32 or dtype != torch.float32)
               for (_, dtype), idx in by_key.items()]
        for bucket in new:
            self.buckets.append(bucket)
            for i, p in enumerate(bucket.params):
                self.slots[p] = (bucket, i)
                self._hook(p)
            for table, value in ((self.found_inf, 0.0), (self._ones, 1.0)):
                table.setdefault(bucket.device, torch.full((), value, device=bucket.device))
        return new

    def _hook(self, param: Tensor) -> None:
        previous = getattr(param, _OWNER_ATTR, None)
        if previous is not None and previous[1] is not None:
            previous[1].remove()   # an older optimizer over this parameter stops taking its grads
        setattr(param, _OWNER_ATTR, (self._self_ref, None))
        if param.requires_grad:
            self._register_hook(param)
        else:
            self.unhooked.append(param)

    def _owns(self, param: Tensor) -> bool:
        owner = getattr(param, _OWNER_ATTR, None)
        return owner is not None and owner[0] is self._self_ref

    def _register_hook(self, param: Tensor) -> None:
        self_ref = self._self_ref
        bucket, i = self.slots[param]

        def hook(p: Tensor) -> None:
            owner = self_ref()
            if owner is not None:   # a dead optimizer leaves the gradient to plain autograd
                owner._on_grad(p, bucket, i)
        handle = param.register_post_accumulate_grad_hook(hook)
        self._handles.append(handle)
        setattr(param, _OWNER_ATTR, (self_ref, handle))

    def remove_hooks(self) -> None:
        """Stop taking gradients: parameters get plain ``.grad`` accumulation again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for p in self.slots:
            if self._owns(p):
                delattr(p, _OWNER_ATTR)
        self.unhooked.clear()

    def label(self, param: Tensor) -> str:
        bucket, i = self.slots[param]
        return bucket.labels[i]

    # -- gradients in ------------------------------------------------------------------------

    def _on_grad(self, param: Tensor, bucket: Bucket, i: int) -> None:
        grad = param.grad
        if grad is None:
            return
        param.grad = None
        with self._lock:
            record = self.passes.get(_task_id())
            if record is None:
                record = self._start_pass(_task_id())   # may refuse the pass: nothing is taken
            if grad.layout is not _STRIDED:
                grad = grad.to_dense()   # e.g. nn.Embedding(sparse=True): accumulated densely
            if (not bucket.flat and not bucket.touched[i] and self.micro_weight is None
                    and grad.dtype is _FP32 and grad.is_contiguous()):
                bucket.adopted[i] = grad          # autograd's fresh fp32 gradient: no copy
                bucket.touched[i] = True
                record.firsts.append((bucket, i))
            else:
                record.queue.append((bucket, i, grad))
                record.queued_bytes += grad.nbytes
                if record.queued_bytes >= self.group_bytes:
                    self.drain(record)
            if self.on_arrival is not None:   # data parallel, last micro-batch
                self.on_arrival(param, record)

    def _start_pass(self, task: int) -> BackwardPass:
        # May raise, e.g. for a window mixing plain backward() with opt.backward(num_items=).
        self._on_backward_start()(self.micro_kind or "plain", self.micro_kind is not None)
        self._serial += 1
        record = BackwardPass(task, self._serial, {d: f.clone() for d, f in self.found_inf.items()},
                              self.arrived)
        self.passes[task] = record
        self.arrived = True
        torch.autograd.Variable._execution_engine.queue_callback(_PassEnd(self._self_ref, task))
        return record

    def drain(self, record: BackwardPass) -> None:
        """Accumulate what ``record`` has queued."""
        with self._lock:
            entries, record.queue, record.queued_bytes = record.queue, [], 0
            if entries and self._accumulate(entries, record.firsts):
                record.added = True

    def drain_all(self) -> None:
        with self._lock:
            for record in list(self.passes.values()):
                self.drain(record)

    def end_pass(self, task: int) -> None:
        """A backward pass completed: accumulate the rest of what it delivered."""
        with self._lock:
            record = self.passes.pop(task, None)
            if record is not None:
                self.drain(record)

    def fail_pass(self, task: int) -> None:
        """A backward pass raised: undo what it did, or discard the window."""
        with self._lock:
            record = self.passes.pop(task, None)
            if record is not None:
                self._undo(record)

    def settle_unfinished(self) -> None:
        """Passes still open here never completed (they raised): settle them as failed."""
        with self._lock:
            for task in list(self.passes):
                self.fail_pass(task)

    def _undo(self, record: BackwardPass) -> None:
        record.queue.clear()
        # A pass started since this one may have added into the slots this one touched first.
        exact = not record.added and record.serial == self._serial
        if not exact:
            if not self.discarded:
                warnings.warn(
                    "fused_accum: a backward pass failed after adding part of its gradients to "
                    "this window's sums, which cannot be undone exactly; the window is discarded: "
                    "its step will leave the parameters and optimizer state unchanged, and the "
                    "next window starts clean", RuntimeWarning, stacklevel=2)
            self.discarded = True
            return
        for bucket, i in record.firsts:
            bucket.untouch(i)
        for device, flag in record.found_before.items():
            self.found_inf[device].copy_(flag)
        self.arrived = record.arrived_before

    def take_stray_grads(self) -> None:
        """Accumulate gradients that bypassed the hooks (params unfrozen after construction, or
        ``.grad`` assigned by hand), and hook params that now require grad."""
        for p in list(self.unhooked):
            if not self._owns(p):   # taken over by a newer optimizer
                self.unhooked.remove(p)
                continue
            if p.requires_grad:
                self.unhooked.remove(p)
                self._register_hook(p)
            if p.grad is not None:
                grad, p.grad = p.grad, None
                self._check_stray(p, grad)
                bucket, i = self.slots[p]
                with self._lock:
                    self._accumulate([(bucket, i, grad)])

    def _check_stray(self, param: Tensor, grad: Tensor) -> None:
        label = self.label(param)
        if grad.layout != torch.strided:
            raise RuntimeError(f"fused_accum: parameter {label} was given a sparse .grad; "
                               "assign a dense gradient")
        if grad.shape != param.shape or grad.device != param.device:
            raise RuntimeError(f"fused_accum: parameter {label} was given a .grad of shape "
                               f"{tuple(grad.shape)} on {grad.device}; expected "
                               f"{tuple(param.shape)} on {param.device}")
        if not grad.is_floating_point():
            raise RuntimeError(f"fused_accum: parameter {label} was given a {grad.dtype} .grad")

    def _accumulate(self, entries: list[tuple[Bucket, int, Tensor]],
                    firsts: list[tuple[Bucket, int]] | None = None) -> bool:
        """Accumulate ``entries`` (one backend call per bucket); returns whether any of them was
        added into an earlier sum.  ``firsts`` collects the slots touched first."""
        per_bucket: dict[Bucket, tuple[list[int], list[Tensor]]] = {}
        for bucket, i, grad in entries:
            indices, grads = per_bucket.setdefault(bucket, ([], []))
            indices.append(i)
            grads.append(grad)
        added = False
        for bucket, (indices, grads) in per_bucket.items():
            device = bucket.device
            weight = self.micro_weight[device] if self.micro_weight is not None else self._ones[device]
            first = [not bucket.touched[i] for i in indices]
            if bucket.flat:
                accs = bucket.views(bucket.acc, indices)
            else:
                accs = [bucket.new_accumulator(i) if f else bucket.adopted[i]
                        for i, f in zip(indices, first)]
            sumsq = None
            if self.fold_norm and bucket.norm_valid:
                if any(bucket.norm_counted[i] for i in indices):
                    bucket.norm_valid = False   # a counted slice changes: recompute at the step
                else:
                    sumsq = bucket.sumsq
            bucket.backend.accumulate(grads, accs, first, weight, self.found_inf[device], sumsq)
            counted = sumsq is not None
            for i, is_first in zip(indices, first):
                bucket.touched[i] = True
                bucket.norm_counted[i] = counted
                if is_first and firsts is not None:
                    firsts.append((bucket, i))
            added = added or not all(first)
        self.arrived = True
        return added

    # -- window end ----------------------------------------------------------------------------

    def window_sumsq(self, bucket: Bucket) -> Tensor:
        """Sum of squares of the bucket's touched accumulators, finishing what the last
        micro-batch's accumulate folded in."""
        if bucket.norm_valid:
            rest = [i for i in bucket.touched_indices() if not bucket.norm_counted[i]]
        else:
            bucket.sumsq.zero_()
            rest = bucket.touched_indices()
        if rest:
            bucket.backend.norm(bucket.acc_views(rest), bucket.sumsq)
        return bucket.sumsq

    def reset_window(self) -> None:
        for bucket in self.buckets:
            bucket.reset_window()
        for flag in self.found_inf.values():
            flag.zero_()
        self.discarded = False
