"""Where gradients go: a hook per parameter takes each gradient the moment autograd delivers it.

The hook, registered with ``param.register_post_accumulate_grad_hook``, takes ``param.grad``, sets
it to None and hands it to its bucket at once.  It is the C++ gradient collector
(``csrc/autograd/collector.cpp``, which runs Python once per pass and once per group of gradients,
not once per gradient) where it builds, else a Python function (``FUSED_ACCUM_HOOKS=python`` asks
for that one).  On accelerators neither holds the parameter's AccumulateGrad node, which would
keep the CUDA stream current at its making and tie backward passes on other streams (CUDA graph
capture) to it; on CPUs the collector hooks the node itself, which costs no Python at all.
Then:

- an fp32 parameter's first gradient of a window is adopted as its accumulator (no copy, see
  :mod:`fused_accum.buffers`);
- every other gradient is queued, and the queue is accumulated (one backend call per bucket) as
  soon as it holds ``FUSED_ACCUM_GROUP_MB`` (by default 2 MB on CPUs, 32 MB where a bucket is on a
  GPU) and at the end of the backward pass;
- with the collector and the compiled backend, every gradient of a pass is planned
  (:meth:`GradBuffers._plan`): the collector adopts fp32 first gradients itself, groups and
  accumulates the rest with no Python, and reports at the pass's end which slots it touched
  first, adopted or folded into the norm.

So beyond what autograd itself holds, at most one group of gradients is alive at any moment,
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
import weakref
from collections.abc import Callable

import torch
from torch import Tensor

from . import guards
from ._warnings import warn
from .buffers import Bucket, param_label

# (owner, hook handle) of the GradBuffers that owns a parameter: the newest optimizer built over
# a parameter takes it over and removes the previous owner's hook.
_OWNER_ATTR = guards.OWNER_ATTR
GROUP_ENV = "FUSED_ACCUM_GROUP_MB"
HOOKS_ENV = "FUSED_ACCUM_HOOKS"   # "auto" (the C++ collector when it builds) or "python"
# Looked up once: the hook runs for every gradient of every backward pass.
_task_id = torch._C._current_graph_task_id
_STRIDED, _FP32 = torch.strided, torch.float32


# A backend call costs the host tens of microseconds on a GPU (Python, the dispatcher, two
# launches): there a group must hold enough work to hide that, while on a CPU the call is cheap
# and a small group stays in cache.  On an H200, 2 MB groups made a bf16 GPT's window 1.22x
# torch's time, one call per 2 MB weight gradient.
DEFAULT_GROUP_MB = {"cpu": 2.0, "cuda": 32.0}


def _compiled_backend():
    from .kernels import extension
    return extension


def group_bytes(device_types=("cpu",)) -> int:
    """The byte bound of a group of queued gradients: FUSED_ACCUM_GROUP_MB, else the largest
    default of the devices the buckets are on."""
    mb = os.environ.get(GROUP_ENV)
    if mb is None:
        mb = max(DEFAULT_GROUP_MB.get(t, DEFAULT_GROUP_MB["cpu"]) for t in device_types)
    return int(float(mb) * 2**20)


class BackwardPass:
    """What one backward pass (an autograd graph task) has delivered so far."""

    __slots__ = ("task", "serial", "queue", "queued_bytes", "firsts", "added", "found_before",
                 "arrived_before")

    def __init__(self, task: int, serial: int, found_before: dict[torch.device, Tensor],
                 arrived_before: bool):
        self.task = task
        self.serial = serial
        self.arrived_before = arrived_before   # whether gradients had come since the last step()
        self.queue: dict[Bucket, tuple[list[int], list[Tensor]]] = {}   # not yet accumulated
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


class _CollectorHandle:
    """Removes one parameter's node hook (what RemovableHandle is for a tensor hook)."""

    __slots__ = ("owner", "slot")

    def __init__(self, owner: weakref.ref, slot: int):
        self.owner, self.slot = owner, slot

    def remove(self) -> None:
        owner = self.owner()
        if owner is not None and owner._collector is not None:
            owner._collector.remove(self.slot)


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
        self.fold_norm = False
        self.arrived = False                        # a gradient came since the last step()
        self.discarded = False                      # a failed pass spoilt this window's sums
        self.group_bytes = group_bytes()
        self.passes: dict[int, BackwardPass] = {}   # graph task id -> its pass, while it runs
        self._serial = 0                            # passes started so far
        self._lock = threading.RLock()
        self._self_ref = weakref.ref(self)
        self._on_arrival = None
        self._slot_list: list[tuple[Bucket, int, Tensor]] = []   # collector slot -> parameter
        self._bucket_slots: dict[Bucket, list[int]] = {}   # bucket -> each parameter's slot or -1
        self._collector = self._make_collector()
        guards.install()   # torch's clipping would see no .grad: make it say so

    # -- construction ------------------------------------------------------------------------

    def add_group(self, group_index: int, params: list[Tensor], names: list[str] | None) -> list[Bucket]:
        by_key: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(params):
            by_key.setdefault((p.device, p.dtype), []).append(i)
        new = [Bucket(group_index, [params[i] for i in idx],
                      [param_label(group_index, i, names) for i in idx], self.backend_name,
                      flat=self.flat_fp32 or dtype != torch.float32)
               for (_, dtype), idx in by_key.items()]
        self.group_bytes = group_bytes({b.device.type for b in self.buckets + new})
        if self._collector is not None:
            self._collector.set_bound(self.group_bytes)
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

    def _make_collector(self):
        kind = os.environ.get(HOOKS_ENV, "auto")
        if kind not in ("auto", "python"):
            raise ValueError(f"{HOOKS_ENV}={kind!r}: expected 'auto' or 'python'")
        if kind == "python":
            return None
        from .kernels import build
        module, _ = build.load_collector()
        if module is None:
            return None   # the Python hooks do the same, a Python call per gradient
        ref = self._self_ref   # weak: the collector must not keep these buffers alive
        return module.Collector(lambda task: ref() and ref()._collected_start(task),
                                lambda task: ref() and ref()._collected_full(task),
                                self.group_bytes)

    def _register_hook(self, param: Tensor) -> None:
        self_ref = self._self_ref
        bucket, i = self.slots[param]
        if self._collector is not None:
            slot = len(self._slot_list)
            self._slot_list.append((bucket, i, param))
            self._bucket_slots.setdefault(bucket, [-1] * len(bucket.params))[i] = slot
            where = (slot, self.buckets.index(bucket), i)
            if self._hook_on_node(param):
                self._collector.add(param, *where)
                handle = _CollectorHandle(self_ref, slot)
            else:
                handle = param.register_post_accumulate_grad_hook(self._collector.hook(*where))
        else:
            def hook(p: Tensor) -> None:
                owner = self_ref()
                if owner is not None:   # a dead optimizer leaves the gradient to plain autograd
                    owner._on_grad(p, bucket, i)
            handle = param.register_post_accumulate_grad_hook(hook)
        self._handles.append(handle)
        setattr(param, _OWNER_ATTR, (self_ref, handle))

    @staticmethod
    def _hook_on_node(param: Tensor) -> bool:
        """The collector's node hook (no Python per gradient) where there are no streams: it keeps
        the AccumulateGrad node, and with it the stream current at its making, alive."""
        return param.device.type == "cpu"

    def remove_hooks(self) -> None:
        """Stop taking gradients: parameters get plain ``.grad`` accumulation again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for p in self.slots:
            if self._owns(p):
                delattr(p, _OWNER_ATTR)
        self.unhooked.clear()

    @property
    def on_arrival(self) -> Callable[[Tensor, BackwardPass], None] | None:
        """Called with every gradient as it arrives (data parallelism, in a window's last
        micro-batch), or None."""
        return self._on_arrival

    @on_arrival.setter
    def on_arrival(self, callback: Callable[[Tensor, BackwardPass], None] | None) -> None:
        self._on_arrival = callback
        if self._collector is not None:
            ref = self._self_ref
            self._collector.set_on_each(
                None if callback is None else
                lambda slot, task: ref() and ref()._collected_each(slot, task))

    def label(self, param: Tensor) -> str:
        bucket, i = self.slots[param]
        return bucket.labels[i]

    # -- gradients in ------------------------------------------------------------------------

    def _on_grad(self, param: Tensor, bucket: Bucket, i: int) -> None:
        """The Python hook: one call per gradient."""
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
            indices, grads = record.queue.setdefault(bucket, ([], []))
            indices.append(i)
            grads.append(grad)
            record.queued_bytes += grad.nbytes
            if record.queued_bytes >= self.group_bytes:
                self.drain(record)
            if self._on_arrival is not None:   # data parallel, last micro-batch
                self._on_arrival(param, record)

    # The collector's calls (from autograd threads, holding the GIL).

    def _collected_start(self, task: int) -> None:
        with self._lock:
            if task not in self.passes:
                self._start_pass(task)
                self._plan(task)

    def _plan(self, task: int) -> None:
        """Give the collector this pass's slots of compiled-backend buckets, to adopt or accumulate
        without Python: each with its accumulator, or None for an fp32 first touch (the collector
        adopts the gradient, or makes one); see csrc/autograd/collector.cpp."""
        entries = []
        for bucket, slots in self._bucket_slots.items():
            if bucket.backend is not _compiled_backend():
                continue
            sumsq = None
            if bucket.norm_valid:
                if True in bucket.norm_counted:
                    continue   # adding to a folded slice invalidates the fold: Python's path
                if self.fold_norm:
                    sumsq = bucket.sumsq
            indices = [i for i, s in enumerate(slots) if s >= 0]
            if not indices:
                continue
            touched = bucket.touched
            if bucket.flat:   # untouched slices too: their first touch overwrites them
                accs = bucket.views(bucket.acc, indices)
            else:             # None: adopted, or made, by the collector (as _adopt does)
                accs = [bucket.adopted[i] if touched[i] else None for i in indices]
            device = bucket.device
            weight = self.micro_weight[device] if self.micro_weight is not None else self._ones[device]
            entries.append(([slots[i] for i in indices], accs, [not touched[i] for i in indices],
                            weight, self.found_inf[device], sumsq, self.micro_weight is None))
        if entries:
            self._collector.plan(task, entries)

    def _settle_planned(self, record: BackwardPass, final: bool) -> None:
        """Launch what the collector holds of ``record``'s plan, and record what it did."""
        try:
            added, firsts, folded, adopted = self._collector.flush(record.task, final)
        except BaseException:
            # A launch failed partway, and what it wrote is unknown: the pass is settled as a
            # failed one that added (its window discarded, with the warning) and its plan dropped.
            self._collector.forget(record.task)
            self.passes.pop(record.task, None)
            record.added = True
            self._undo(record)
            raise
        if added:
            record.added = True
        slot_list = self._slot_list
        for slot, acc in adopted:
            bucket, i, _ = slot_list[slot]
            bucket.adopted[i] = acc
            bucket.touched[i] = True
            record.firsts.append((bucket, i))
        for slot in firsts:
            bucket, i, _ = slot_list[slot]
            if not bucket.touched[i]:   # an fp32 accumulator made by the collector came above
                bucket.touched[i] = True
                record.firsts.append((bucket, i))
        for slot in folded:
            bucket, i, _ = slot_list[slot]
            bucket.norm_counted[i] = True

    def _collected_full(self, task: int) -> None:
        with self._lock:
            record = self.passes.get(task)
            if record is not None:
                self.drain(record)

    def _collected_each(self, slot: int, task: int) -> None:
        with self._lock:
            record = self.passes.get(task)
            if record is not None and self._on_arrival is not None:
                self._on_arrival(self._slot_list[slot][2], record)

    def _start_pass(self, task: int) -> BackwardPass:
        # May raise, e.g. for a window mixing plain backward() with opt.backward(num_items=).
        self._on_backward_start()(self.micro_kind or "plain", self.micro_kind is not None)
        guards.install_accelerate()   # accelerate imported after this optimizer was built
        self._serial += 1
        record = BackwardPass(task, self._serial, {d: f.clone() for d, f in self.found_inf.items()},
                              self.arrived)
        self.passes[task] = record
        self.arrived = True
        torch.autograd.Variable._execution_engine.queue_callback(_PassEnd(self._self_ref, task))
        return record

    def drain(self, record: BackwardPass, final: bool = False) -> None:
        """Accumulate what ``record``'s pass has delivered so far (``final``: all of it)."""
        with self._lock:
            groups = [(bucket, *queued) for bucket, queued in record.queue.items()]
            record.queue, record.queued_bytes = {}, 0
            if self._collector is not None:
                groups += [(self.buckets[b], indices, grads)
                           for b, indices, grads in self._collector.take(record.task)]
                self._settle_planned(record, final)
            if groups and self._accumulate(groups, record.firsts, adopt=True):
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
                self.drain(record, final=True)

    def fail_pass(self, task: int) -> None:
        """A backward pass raised: undo what it did, or discard the window."""
        with self._lock:
            record = self.passes.pop(task, None)
            # Its gradients still queued are dropped; what the collector launched is reported.
            added = self._collector is not None and self._collector.forget(task)
            if record is not None:
                record.added = record.added or added
                self._undo(record)

    def forget_passes(self) -> None:
        """Drop every open pass without settling it (a state dict replaces the window)."""
        with self._lock:
            for task in list(self.passes):
                if self._collector is not None:
                    self._collector.forget(task)
            self.passes.clear()

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
                warn("fused_accum: a backward pass failed after adding part of its gradients to "
                     "this window's sums, which cannot be undone exactly; the window is discarded: "
                     "its step will leave the parameters and optimizer state unchanged, and the "
                     "next window starts clean")
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
                with self._lock:   # the user's tensor: copied, never adopted
                    self._accumulate([(bucket, [i], [grad])])

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

    def _accumulate(self, groups: list[tuple[Bucket, list[int], list[Tensor]]],
                    firsts: list[tuple[Bucket, int]] | None = None, adopt: bool = False) -> bool:
        """Accumulate ``groups`` of (bucket, indices, gradients), one backend call per group;
        returns whether any gradient was added into an earlier sum.  With ``adopt`` (gradients
        autograd made, no one else holds), an fp32 bucket's first gradients become its
        accumulators.  ``firsts`` collects the slots touched first."""
        added = False
        stream = None   # the current CUDA stream, looked up once per call and device
        for bucket, indices, grads in groups:
            touched = bucket.touched
            first = [not touched[i] for i in indices]
            any_first = True in first   # False in a window's later micro-batches: the fast path
            if any_first and adopt and not bucket.flat and self.micro_weight is None:
                indices, grads, first = self._adopt(bucket, indices, grads, first, firsts)
                if not indices:
                    continue
                any_first = True in first
            device = bucket.device
            weight = self.micro_weight[device] if self.micro_weight is not None else self._ones[device]
            if bucket.flat or not any_first:
                accs = bucket.acc_views(indices)
            else:
                accs = [bucket.new_accumulator(i) if f else bucket.adopted[i]
                        for i, f in zip(indices, first)]
            sumsq = None
            if bucket.norm_valid:
                norm_counted = bucket.norm_counted
                if True in map(norm_counted.__getitem__, indices):
                    bucket.norm_valid = False   # a counted slice changes: recompute at the step
                elif self.fold_norm:
                    sumsq = bucket.sumsq
            bucket.backend.accumulate(grads, accs, first, weight, self.found_inf[device], sumsq)
            if device.type == "cuda":
                # The gradients are freed right after this launch; if autograd made them on
                # another stream (a forward under torch.cuda.stream(s)), that stream must not
                # reuse their memory before this stream's kernel has read it.
                if stream is None or stream.device != device:
                    stream = torch.cuda.current_stream(device)
                for grad in grads:
                    grad.record_stream(stream)
            if sumsq is not None:
                norm_counted = bucket.norm_counted
                for i in indices:
                    norm_counted[i] = True
            if any_first:
                for i in indices:
                    touched[i] = True
                if firsts is not None:
                    firsts.extend((bucket, i) for i, f in zip(indices, first) if f)
                added = added or False in first
            else:
                added = True
        self.arrived = True
        return added

    @staticmethod
    def _adopt(bucket: Bucket, indices: list[int], grads: list[Tensor], first: list[bool],
               firsts: list[tuple[Bucket, int]] | None) -> tuple[list, list, list]:
        """Adopt fp32 first gradients as their accumulators (no copy); return the rest."""
        rest: tuple[list, list, list] = ([], [], [])
        touched, adopted = bucket.touched, bucket.adopted
        for i, grad, is_first in zip(indices, grads, first):
            if is_first and grad.dtype is _FP32 and grad.is_contiguous():
                adopted[i] = grad
                touched[i] = True
                if firsts is not None:
                    firsts.append((bucket, i))
            else:
                rest[0].append(i)
                rest[1].append(grad)
                rest[2].append(is_first)
        return rest

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
