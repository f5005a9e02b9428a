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
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import guards, holders
from ._warnings import warn
from .buffers import Bucket, param_label
from .sparse import SparseSums

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


COMPILED_AUTOGRAD_REFUSED = (   # the same words as csrc/autograd/collector.cpp's
    "fused_accum: compiled autograd cannot trace the hooks that take each gradient as it "
    "arrives (accumulation_steps > 1, data parallelism, or windows a framework drives). Turn "
    "compiled autograd off (torch._dynamo.config.compiled_autograd = False), or use "
    "accumulation_steps=1 in one process, where gradients stay in .grad and compiled autograd "
    "works")


def _compiled_autograd_on() -> bool:
    module = sys.modules.get("torch._dynamo.compiled_autograd")
    return bool(module is not None and (getattr(module, "compiled_autograd_enabled", False)
                                        or getattr(module, "in_compiled_autograd_region", False)))


def check_layout(bucket: Bucket, param: Tensor, label: str) -> None:
    """Refuse a parameter whose dtype or device changed since the optimizer was built (e.g.
    ``model.to(torch.bfloat16)`` afterwards): its buffers and state were made for the old ones."""
    if param.dtype is not bucket.dtype or param.device != bucket.device:
        raise RuntimeError(
            f"fused_accum: parameter {label} was {bucket.dtype} on {bucket.device} when the "
            f"optimizer was built and is {param.dtype} on {param.device} now (model.to(...), "
            ".half() or .cuda() after building the optimizer): its accumulators, masters and "
            "optimizer state were made for the old ones. Build the optimizer after changing "
            "the model's dtype or device")


class BackwardPass:
    """What one backward pass (an autograd graph task) has delivered so far."""

    __slots__ = ("task", "serial", "queue", "queued_bytes", "firsts", "added", "found_before",
                 "arrived_before", "sumsq_before", "sparse_firsts")

    def __init__(self, task: int, serial: int, found_before: dict[torch.device, Tensor],
                 arrived_before: bool, sumsq_before: dict[Bucket, Tensor]):
        self.task = task
        self.serial = serial
        self.arrived_before = arrived_before   # whether gradients had come since the last step()
        self.queue: dict[Bucket, tuple[list[int], list[Tensor]]] = {}   # not yet accumulated
        self.queued_bytes = 0
        self.firsts: list[tuple[Bucket, int]] = []   # slots this pass touched first in the window
        self.sparse_firsts: list[tuple[Bucket, int]] = []   # sparse sums it began
        self.added = False          # it added into an earlier sum: it can no longer be undone
        self.found_before = found_before   # the non-finite flags before it, to undo exactly
        # In a window's last micro-batch, the sums of squares before it: the collector folds
        # into them from C++, and what a failed pass folded is reported nowhere else.
        self.sumsq_before = sumsq_before


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
        if not getattr(self, "called", True):   # (made but never initialised: nothing to report)
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
        self.buckets: list[Bucket] = []
        self.slots: dict[Tensor, tuple[Bucket, int]] = {}
        # Parameters that did not require grad when hooked (a dict: tensors compare elementwise,
        # so `in` on a list of them is wrong; their hash is their identity)
        self.unhooked: dict[Tensor, None] = {}
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
        self._bucket_slots: dict[Bucket, list[int]] = {}   # bucket -> each hooked slot, or -1
        self._slot_ids: dict[Tensor, int] = {}      # parameter -> its collector slot
        self._collector = self._make_collector()
        # Whether gradients are taken as they arrive (hooks) or left in .grad until step(); set
        # by the optimizer through attach() and set_collecting().
        self.collecting = False
        self.attached = False                       # the parameters are held (see attach)
        self.lost: list[str] = []                   # labels of parameters a later optimizer took
        self._hooks: dict[Tensor, Any] = {}         # hooked parameter -> its handle
        self._hook_ids: dict[Tensor, int] = {}      # hooked parameter -> first hook id after ours
        self.on_zero_grad = None   # WeakMethod(params, set_to_none): nn.Module.zero_grad's call
        self.grads_scaled = False  # gradients in .grad carry the loss scale (opt.backward put it)
        self.sparse = SparseSums()  # the window's sums of sparse gradients (fused_accum.sparse)
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
        self.group_bytes = group_bytes({b.device.type for b in self.buckets + new} or {"cpu"})
        if self._collector is not None:
            self._collector.set_bound(self.group_bytes)
        for bucket in new:
            self.buckets.append(bucket)
            for i, p in enumerate(bucket.params):
                self.slots[p] = (bucket, i)
            for table, value in ((self.found_inf, 0.0), (self._ones, 1.0)):
                table.setdefault(bucket.device, torch.full((), value, device=bucket.device))
        return new

    # -- holding parameters --------------------------------------------------------------------

    def attach(self, collecting: bool) -> None:
        """Hold every parameter, taking its gradients as they arrive when ``collecting``.  Called
        once the optimizer is built: a construction that fails changes nothing."""
        self.collecting = collecting
        self.attached = True
        self.hold(self.buckets)

    def hold(self, buckets: list[Bucket]) -> None:
        """Register as a holder of the parameters of ``buckets``; earlier optimizers that cannot
        share them (see :mod:`fused_accum.holders`) lose them."""
        for bucket in buckets:
            for p in bucket.params:
                for rival in holders.rivals(p, self, self.collecting):
                    rival.lose(p)
                holders.add(p, self)
                if self.collecting:
                    self._take(p)
        if self.collecting:
            holders.install_torch_optimizer_check()

    def set_collecting(self, collecting: bool) -> None:
        """Switch between taking gradients as they arrive and leaving them in ``.grad``."""
        if collecting == self.collecting:
            return
        self.collecting = collecting
        if not self.attached:
            return
        if collecting:
            self.hold(self.buckets)
        else:
            for p in list(self._hooks):
                self._unregister_hook(p)
            self.unhooked.clear()

    def lose(self, param: Tensor) -> None:
        """A later optimizer took ``param``: stop taking its gradients, and remember it (the
        optimizer's step() raises, naming it)."""
        if param in self._hooks:
            self._unregister_hook(param)
        self.unhooked.pop(param, None)
        holders.remove(param, self)
        if param in self.slots:
            self.lost.append(self.label(param))

    def _take(self, param: Tensor) -> None:
        if param in self._hooks:
            return
        if param.requires_grad:
            self._register_hook(param)
        else:
            self.unhooked[param] = None

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
            slot = self._slot_ids.get(param)
            if slot is None:   # one slot per parameter, kept if its hook is registered again
                slot = self._slot_ids[param] = len(self._slot_list)
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
        self._hooks[param] = handle
        # A hook of the user's registered from now on would run after ours on an accelerator
        # (seeing .grad = None) but before it on a CPU, where ours is a node hook: see
        # check_foreign_hooks.
        self._hook_ids[param] = torch.utils.hooks.RemovableHandle.next_id

    def _unregister_hook(self, param: Tensor) -> None:
        self._hooks.pop(param).remove()
        self._hook_ids.pop(param, None)
        if self._collector is not None:
            bucket, i = self.slots[param]
            self._bucket_slots[bucket][i] = -1

    @staticmethod
    def _hook_on_node(param: Tensor) -> bool:
        """The collector's node hook (no Python per gradient) where there are no streams: it keeps
        the AccumulateGrad node, and with it the stream current at its making, alive."""
        return param.device.type == "cpu"

    def release(self) -> None:
        """Stop holding the parameters: they get plain ``.grad`` accumulation again."""
        for p in list(self._hooks):
            self._unregister_hook(p)
        for p in self.slots:
            holders.remove(p, self)
        self.unhooked.clear()
        self.attached = False

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

    def holds_sum(self, param: Tensor) -> bool:
        """Whether this window holds a sum for ``param``."""
        bucket, i = self.slots[param]
        return bucket.touched[i]

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
            if grad.layout is not _STRIDED:   # nn.Embedding(sparse=True): summed sparse
                self._add_sparse(bucket, i, grad, record)
                return
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
        if _compiled_autograd_on():
            raise RuntimeError(COMPILED_AUTOGRAD_REFUSED)
        # May raise, e.g. for a window mixing plain backward() with opt.backward(num_items=).
        self._on_backward_start()(self.micro_kind or "plain", self.micro_kind is not None)
        guards.install_accelerate()   # accelerate imported after this optimizer was built
        self._serial += 1
        record = BackwardPass(task, self._serial, {d: f.clone() for d, f in self.found_inf.items()},
                              self.arrived,
                              {b: b.sumsq.clone() for b in self.buckets} if self.fold_norm else {})
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
                groups = self._split_sparse(groups, record)
            if groups and self._accumulate(groups, record.firsts, adopt=True):
                record.added = True

    def _add_sparse(self, bucket: Bucket, i: int, grad: Tensor, record: BackwardPass | None) -> None:
        weight = None if self.micro_weight is None else self.micro_weight[bucket.device]
        first = self.sparse.add(bucket, i, grad, weight, bucket.labels[i], self.flat_fp32)
        if record is not None:
            if first:
                record.sparse_firsts.append((bucket, i))
            else:
                record.added = True
        self.arrived = True

    def _split_sparse(self, groups: list, record: BackwardPass) -> list:
        """The collector queues sparse gradients for Python: sum them here, return the rest."""
        dense = []
        for bucket, indices, grads in groups:
            if all(g.layout is _STRIDED for g in grads):
                dense.append((bucket, indices, grads))
                continue
            kept = ([], [])
            for i, g in zip(indices, grads):
                if g.layout is _STRIDED:
                    kept[0].append(i)
                    kept[1].append(g)
                else:
                    self._add_sparse(bucket, i, g, record)
            if kept[0]:
                dense.append((bucket, *kept))
        return dense

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
        for bucket, i in record.sparse_firsts:
            self.sparse.drop(bucket, i)
        for device, flag in record.found_before.items():
            self.found_inf[device].copy_(flag)
        for bucket, sumsq in record.sumsq_before.items():
            bucket.sumsq.copy_(sumsq)
        self.arrived = record.arrived_before

    def check_grads(self) -> None:
        """Before a micro-batch ends: hook parameters that were frozen when the optimizer was
        built and require grad now, accumulating what their ``.grad`` got meanwhile, and refuse a
        ``.grad`` anywhere else (set by hand, or delivered past the hooks), which the window would
        otherwise ignore.  Raises before anything changes."""
        for bucket in self.buckets:
            dtype = bucket.dtype
            for p in bucket.params:
                if p.grad is not None or p.dtype is not dtype:
                    self._check_param(bucket, p)
        for p in list(self.unhooked):
            if p.requires_grad:
                del self.unhooked[p]
                self._register_hook(p)
            if p.grad is not None:
                grad, p.grad = p.grad, None
                bucket, i = self.slots[p]
                with self._lock:   # the user's tensor: copied, never adopted
                    self._accumulate([(bucket, [i], [grad])])

    def take_grads(self, weight: dict[torch.device, Tensor] | None) -> bool:
        """Leaving gradients in ``.grad`` (``accumulation_steps=1`` in one process): take every
        parameter's ``.grad`` as the window's single micro-batch, times ``weight`` (per device,
        None for 1), leaving ``.grad`` as it is (an fp32 one is read where it is, never
        written).  Returns whether any parameter has a gradient."""
        saved, self.micro_weight = self.micro_weight, weight
        try:
            groups = []
            for bucket in self.buckets:
                dtype, on_cuda = bucket.dtype, bucket.device.type == "cuda"
                indices, grads = [], []
                for i, p in enumerate(bucket.params):
                    grad = p.grad
                    if grad is None:
                        continue
                    if p.dtype is not dtype or p.is_cuda is not on_cuda:
                        check_layout(bucket, p, bucket.labels[i])
                    if grad.layout is not _STRIDED:   # torch's own sparse .grad: summed as is
                        self._add_sparse(bucket, i, grad, None)
                        continue
                    indices.append(i)
                    grads.append(grad if grad.is_contiguous() else grad.contiguous())
                if indices:
                    groups.append((bucket, indices, grads))
            if groups:
                with self._lock:
                    self._accumulate(groups, adopt=weight is None)
        finally:
            self.micro_weight = saved
        return bool(groups) or bool(self.sparse)

    def check_foreign_hooks(self) -> None:
        """Refuse a post-accumulate-grad hook of the user's registered on a parameter after its
        gradients began to be taken here: it would run after this optimizer's hook on an
        accelerator (and see ``.grad = None``) but before it on a CPU (and see the gradient)."""
        for param, first_id in self._hook_ids.items():
            hooks = param._post_accumulate_grad_hooks
            if hooks and max(hooks) >= first_id:
                raise RuntimeError(
                    f"fused_accum: parameter {self.label(param)} got a post-accumulate-grad hook "
                    "(register_post_accumulate_grad_hook) after this optimizer began to take its "
                    "gradients as they arrive: on a GPU it would run after the optimizer's own "
                    "hook and see .grad = None, on a CPU before it. Register it before building "
                    "the optimizer (it then sees each gradient on every device), or use "
                    "accumulation_steps=1 in one process, where .grad works as in torch.optim")

    def _check_param(self, bucket: Bucket, param: Tensor) -> None:
        label = self.label(param)
        check_layout(bucket, param, label)
        if param.grad is None or param in self.unhooked:
            return
        if param.grad.layout == torch.strided:
            self._check_stray(param, param.grad)
        raise RuntimeError(
            f"fused_accum: parameter {label} has a .grad at step(), which was set by hand (or "
            "reached it past the optimizer's gradient hooks): with "
            "accumulation_steps > 1, under data parallelism or inside a framework's windows, the "
            "optimizer takes each gradient as backward() delivers it, so a .grad assigned or "
            "changed by hand would be ignored. Produce the gradient in backward() (a loss term, "
            "a tensor hook or an autograd.Function), or use accumulation_steps=1, where .grad "
            "works as in torch.optim. (Nothing was changed: set the .grad to None and call "
            "step() again)")

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
            marks = bucket.added
            if any_first:
                for i, f in zip(indices, first):
                    touched[i] = True
                    if not f:
                        marks[i] = True
                if firsts is not None:
                    firsts.extend((bucket, i) for i, f in zip(indices, first) if f)
                added = added or False in first
            else:
                for i in indices:
                    marks[i] = True
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

    # -- micro-batch end and zero_grad -------------------------------------------------------

    def end_micro_batch(self) -> None:
        """step() ended a micro-batch: what arrived until now belongs to earlier micro-batches."""
        self.sparse.end_micro_batch()
        for bucket in self.buckets:
            bucket.end_micro_batch()
        if self._collector is not None:
            self._collector.clear_added()
        self.arrived = False

    def since_last_step(self) -> tuple[list[tuple[Bucket, int]], list[tuple[Bucket, int]]]:
        """What arrived since the last ``step()``: the sums that began since then (dense or
        sparse slots), and the sums of earlier micro-batches added into since then."""
        collector_added = (set(self._collector.added_slots()) if self._collector is not None
                           else set())
        began, added = [], []
        for bucket in self.buckets:
            slots = self._bucket_slots.get(bucket)
            for i, touched in enumerate(bucket.touched):
                if not touched:
                    continue
                if not bucket.settled[i]:
                    began.append((bucket, i))
                elif bucket.added[i] or (slots is not None and slots[i] in collector_added):
                    added.append((bucket, i))
        for key, entry in self.sparse.sums.items():
            if not entry.settled:
                began.append(key)
            elif entry.added:
                added.append(key)
        return began, added

    def discard(self, params: list[Tensor] | None) -> bool:
        """``zero_grad()`` while gradients are taken as they arrive: discard what arrived for
        ``params`` (all by default) since the last ``step()``.  A sum that began since then is
        dropped exactly (its slot is untouched again); one that holds earlier micro-batches and
        got more since cannot be taken apart, and raises, naming the parameters, before anything
        changes.  Returns whether what arrived since the last step() is gone whole."""
        if self.passes:
            raise RuntimeError("fused_accum: zero_grad() was called during a backward pass")
        if not self.arrived:
            return False   # the usual loop: nothing arrived since the last step()
        began, added = self.since_last_step()
        if params is not None:
            wanted = set(params)
            began = [(b, i) for b, i in began if b.params[i] in wanted]
            refused = [b.labels[i] for b, i in added if b.params[i] in wanted]
        else:
            refused = [b.labels[i] for b, i in added]
        if refused:
            raise RuntimeError(
                f"fused_accum: zero_grad() would discard what {len(refused)} parameters "
                f"({', '.join(refused[:3])}{', ...' if len(refused) > 3 else ''}) received since "
                "the last step(), but it was added into their sums of earlier micro-batches of "
                "this window, and cannot be taken out exactly (nothing was changed). Keep "
                "gradients you do not want out of backward(): detach the tensors, or freeze the "
                "parameters (requires_grad_(False)) for that pass; or use accumulation_steps=1, "
                "where zero_grad() works as in torch.optim")
        for bucket, i in began:
            if (bucket, i) in self.sparse.sums:
                self.sparse.drop(bucket, i)
            else:
                bucket.untouch(i)
                bucket.added[i] = False
        if began:
            self._recheck_finite()
        began_left, added_left = self.since_last_step()
        if not began_left and not added_left:
            self.arrived = False
        return not began_left and not added_left

    def _recheck_finite(self) -> None:
        """The non-finite flags of the sums that are left (some were just discarded)."""
        for device, flag in self.found_inf.items():
            bad = [~torch.isfinite(b.acc_view(i)).all() for b in self.buckets
                   if b.device == device for i in b.touched_indices()]
            flag.copy_(torch.stack(bad).any().to(flag.dtype) if bad else torch.zeros_like(flag))

    def keep_zero_grads(self, params: list[Tensor] | None, set_to_none: bool) -> None:
        """What ``zero_grad(set_to_none)`` means for the parameters that get no gradient in a
        window: after set_to_none=False torch steps those that held a .grad with zeros (see
        :meth:`Bucket.touch_zeroed`); set_to_none=True releases them."""
        if params is None and set_to_none:   # the usual loop: opt.zero_grad() each micro-batch
            for bucket in self.buckets:
                n = len(bucket.params)
                bucket.holds_grad, bucket.zeroed = [False] * n, [False] * n
            return
        wanted = None if params is None else set(params)
        for bucket in self.buckets:
            for i, p in enumerate(bucket.params):
                if wanted is not None and p not in wanted:
                    continue
                if set_to_none:
                    bucket.holds_grad[i] = bucket.zeroed[i] = False
                elif bucket.holds_grad[i] or bucket.touched[i]:
                    bucket.zeroed[i] = True

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
        self.sparse.reset()
        for bucket in self.buckets:
            bucket.reset_window()
        for flag in self.found_inf.values():
            flag.zero_()
        self.discarded = False
