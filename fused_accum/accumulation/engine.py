"""The gradient engine: a hook per parameter takes each gradient the moment autograd delivers it.

The hook (:mod:`.hooks`), registered with ``param.register_post_accumulate_grad_hook``, takes
``param.grad``, sets it to None and hands it to its bucket at once.  Then:

- an fp32 parameter's first gradient of a window is adopted as its accumulator (no copy, see
  :mod:`.accumulate` and :mod:`.buckets`);
- every other gradient is queued, and the queue is accumulated (one backend call per bucket) as
  soon as it holds ``FUSED_ACCUM_GROUP_MB`` (by default 2 MB on CPUs, 32 MB where a bucket is on a
  GPU) and at the end of the backward pass;
- with the collector and the compiled backend, every gradient of a pass is planned
  (:mod:`.collector_bridge`).

So beyond what autograd itself holds, at most one group of gradients is alive at any moment,
and the allocator hands their memory to the next layer's weight gradients; many small gradients
still cost one backend call per group.

A backward pass that fails midway (an exception in a hook or an autograd Function, out of memory)
is undone when that is exact: its queued gradients are dropped, its first touches forgotten and
the window restored as the pass found it.  Once it has added gradients into sums of earlier
micro-batches, which no subtraction restores exactly, the window is discarded instead: its update
is skipped on every rank (parameters and optimizer state unchanged at its step), with a warning;
micro-batches are still counted, so the next window starts where it would have.  A pass refused
at its first gradient (see ``on_backward_start``) takes nothing.

The window's state is :class:`.window.Window`'s, handed to this engine at construction; the engine
keeps the buckets, the hooks and the passes in flight.
"""
from __future__ import annotations

import functools
import os
import threading
import weakref
from collections.abc import Callable

import torch
from torch import Tensor

from .. import guards, holders
from .._warnings import warn
from ..eager import eager
from . import collector_bridge
from .accumulate import accumulate, accumulate_linear
from .buckets import Bucket, param_label
from .grad_attribute import GradAttribute
from .hooks import COMPILED_AUTOGRAD_REFUSED, Hooks, compiled_autograd_on
from .passes import BackwardPass, queue_after_pass, queue_pass_end
from ..placeholders import Placeholders, clear_on_death
from .sparse import add_sparse, split_sparse
from .window import Window
from .zero_grad import ZeroGrad

GROUP_ENV = "FUSED_ACCUM_GROUP_MB"
# Looked up once: the hook runs for every gradient of every backward pass.
_task_id = torch._C._current_graph_task_id
_STRIDED = torch.strided


# A backend call costs the host tens of microseconds on a GPU (Python, the dispatcher, two
# launches): there a group must hold enough work to hide that, while on a CPU the call is cheap
# and a small group stays in cache.  On an H200, 2 MB groups made a bf16 GPT's window 1.22x
# torch's time, one call per 2 MB weight gradient.
DEFAULT_GROUP_MB = {"cpu": 2.0, "cuda": 32.0}


@functools.cache   # an import statement costs microseconds, and this runs at every pass
def _compiled_backend():
    from ..kernels import extension
    return extension


def group_bytes(device_types=("cpu",)) -> int:
    """The byte bound of a group of queued gradients: FUSED_ACCUM_GROUP_MB, else the largest
    default of the devices the buckets are on."""
    mb = os.environ.get(GROUP_ENV)
    if mb is None:
        mb = max(DEFAULT_GROUP_MB.get(t, DEFAULT_GROUP_MB["cpu"]) for t in device_types)
    return int(float(mb) * 2**20)


class GradBuffers(GradAttribute, ZeroGrad):
    """All buckets of one optimizer and the gradient hooks, over the optimizer's window.

    ``window.micro_weight`` and ``window.micro_kind`` are set by the optimizer around a
    micro-batch's backward, ``window.fold_norm`` for the last micro-batch of a window;
    ``on_backward_start(kind, through_optimizer)``, a bound method of the optimizer, is called at
    the first gradient of every backward pass and may raise to refuse it.  ``flat_fp32``: fp32
    buckets keep flat accumulators too (data parallelism reduces those).
    """

    def __init__(self, backend_name: str, window: Window,
                 on_backward_start: Callable[[str, bool], None], flat_fp32: bool = False):
        self.backend_name = backend_name
        self.window = window
        self.flat_fp32 = flat_fp32
        # A weak reference: the optimizer owns this object, and the hooks must not keep the
        # optimizer alive (deleting it hands the parameters back to plain autograd at once).
        self._on_backward_start = weakref.WeakMethod(on_backward_start)
        self.buckets: list[Bucket] = []
        self.slots: dict[Tensor, tuple[Bucket, int]] = {}
        # Parameters that did not require grad when hooked (a dict: tensors compare elementwise,
        # so `in` on a list of them is wrong; their hash is their identity)
        self.unhooked: dict[Tensor, None] = {}
        # Of them, those whose .grad a failed backward pass may have added to (see take_unfrozen)
        self.tainted: dict[Tensor, None] = {}
        self.group_bytes = group_bytes()
        self.passes: dict[int, BackwardPass] = {}   # graph task id -> its pass, while it runs
        self._serial = 0                            # passes started so far
        self._lock = threading.RLock()
        self._self_ref = weakref.ref(self)
        self._on_arrival = None
        self.hooks = Hooks(self._self_ref, self.group_bytes)
        # Whether gradients are taken as they arrive (hooks) or left in .grad until step(); set
        # by the optimizer through attach() and set_collecting().
        self.collecting = False
        self.attached = False                       # the parameters are held (see attach)
        self.lost: list[str] = []                   # labels of parameters a later optimizer took
        self.fused_linear: dict[Tensor, None] = {}  # weights of fused Linears (fused_accum.linear)
        self.on_zero_grad = None   # WeakMethod(params, set_to_none): nn.Module.zero_grad's call
        # What .grad holds between backward() and step(): see .placeholders
        self.on_grad_scaler = None   # WeakMethod(): the optimizer's refusal of torch's GradScaler
        self.placeholders = Placeholders(
            lambda params, ref=self._self_ref: ref() and ref().grads_removed(params),
            lambda ref=self._self_ref: ref() and ref().grad_scaler_unscales())
        clear_on_death(self, self.placeholders)
        guards.install()   # torch's clipping would see no .grad: make it say so

    @property
    def collector(self):
        return self.hooks.collector

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
        if self.collector is not None:
            self.collector.set_bound(self.group_bytes)
        for bucket in new:
            self.buckets.append(bucket)
            for i, p in enumerate(bucket.params):
                self.slots[p] = (bucket, i)
            self.window.add_device(bucket.device)
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
            self.placeholders.clear(False)
            for p in list(self.hooks.handles):
                self._unhook(p)
            self.unhooked.clear()

    def lose(self, param: Tensor) -> None:
        """A later optimizer took ``param``: stop taking its gradients, and remember it (the
        optimizer's step() raises, naming it)."""
        if param in self.hooks:
            self._unhook(param)
        self.placeholders.forget(param)
        self.unhooked.pop(param, None)
        holders.remove(param, self)
        if param in self.slots:
            self.lost.append(self.label(param))

    def _take(self, param: Tensor) -> None:
        if param in self.hooks:
            return
        if param.requires_grad:
            self._hook(param)
        else:
            self.unhooked[param] = None

    def _hook(self, param: Tensor) -> None:
        bucket, i = self.slots[param]
        self.hooks.register(param, bucket, i, self.buckets.index(bucket))

    def _unhook(self, param: Tensor) -> None:
        self.hooks.unregister(param, *self.slots[param])

    def release(self) -> None:
        """Stop holding the parameters: they get plain ``.grad`` accumulation again."""
        self.placeholders.clear(False)
        for p in list(self.hooks.handles):
            self._unhook(p)
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
        if self.collector is not None:
            ref = self._self_ref
            self.collector.set_on_each(
                None if callback is None else
                lambda slot, task: ref() and ref().collected_each(slot, task))

    def holds_sum(self, param: Tensor) -> bool:
        """Whether this window holds a sum for ``param``."""
        bucket, i = self.slots[param]
        return bucket.touched[i]

    def holds_sums(self) -> bool:
        """Whether this window holds any sum, dense or sparse."""
        return bool(self.window.sparse) or any(True in b.touched for b in self.buckets)

    def check_foreign_hooks(self) -> None:
        self.hooks.check_foreign(self.label)

    def label(self, param: Tensor) -> str:
        bucket, i = self.slots[param]
        return bucket.labels[i]

    # -- gradients in ------------------------------------------------------------------------

    def current_pass(self, task: int | None = None) -> BackwardPass:
        """The backward pass ``task`` (by default the one running on this thread), opened at its
        first gradient, which may refuse it (see ``on_backward_start``: then nothing is taken);
        with the collector, a pass opened here is planned for it."""
        task = _task_id() if task is None else task
        record = self.passes.get(task)
        if record is None:
            record = self._start_pass(task)
            if self.collector is not None:
                self._plan(task)
        return record

    @eager
    def on_grad(self, param: Tensor, bucket: Bucket, i: int) -> None:
        """The Python hook: one call per gradient."""
        grad = param.grad
        if grad is None:
            return
        param.grad = None
        with self._lock:
            record = self.current_pass()
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

    @eager
    def take_linear_grad(self, param: Tensor, grad_output: Tensor, input: Tensor) -> bool:
        """A fused Linear's weight gradient (:mod:`fused_accum.linear`), accumulated from its GEMM
        operands with no gradient tensor made.  False: ``param``'s gradients are not taken now
        (k = 1, or a parameter this optimizer lost), and the caller hands autograd the gradient."""
        if not self.collecting or param not in self.hooks:
            return False
        with self._lock:
            record = self.current_pass()
            bucket, i = self.slots[param]
            # Marked before the GEMM: one that raises after writing into an earlier sum must not
            # leave its pass looking undoable.
            record.added = record.added or bucket.touched[i]
            accumulate_linear(self.window, bucket, i, grad_output, input, record.firsts)
            if self._on_arrival is not None:   # data parallel, last micro-batch
                self._on_arrival(param, record)
        return True

    # The collector's calls (from autograd threads, holding the GIL).

    @eager
    def collected_start(self, task: int) -> None:
        with self._lock:
            self.current_pass(task)

    def _plan(self, task: int) -> None:
        """Give the collector this pass's slots of compiled-backend buckets, to adopt or accumulate
        without Python (see :mod:`.collector_bridge`)."""
        entries = collector_bridge.plan_entries(self.hooks.bucket_slots, self.window,
                                                _compiled_backend(), self.fused_linear)
        if entries:
            self.collector.plan(task, entries)

    def _settle_planned(self, record: BackwardPass, final: bool) -> None:
        """Launch what the collector holds of ``record``'s plan, and record what it did."""
        try:
            report = self.collector.flush(record.task, final)
        except BaseException:
            # A launch failed partway, and what it wrote is unknown: the pass is settled as a
            # failed one that added (its window discarded, with the warning) and its plan dropped.
            self.collector.forget(record.task)
            self.passes.pop(record.task, None)
            record.added = True
            self._undo(record)
            raise
        collector_bridge.record_settled(record, report, self.hooks.slot_list)

    @eager
    def collected_full(self, task: int) -> None:
        with self._lock:
            record = self.passes.get(task)
            if record is not None:
                self.drain(record)

    @eager
    def collected_each(self, slot: int, task: int) -> None:
        with self._lock:
            record = self.passes.get(task)
            if record is not None and self._on_arrival is not None:
                self._on_arrival(self.hooks.slot_list[slot][2], record)

    def _start_pass(self, task: int) -> BackwardPass:
        if compiled_autograd_on():
            raise RuntimeError(COMPILED_AUTOGRAD_REFUSED)
        self.refuse_grads_before_pass()
        window = self.window
        before = window.save()
        # May raise, e.g. for a window mixing plain backward() with opt.backward(num_items=).
        self._on_backward_start()(window.micro_kind or "plain", window.micro_kind is not None)
        guards.install_accelerate()   # accelerate imported after this optimizer was built
        self._serial += 1
        record = BackwardPass(task, self._serial, before,
                              {b: b.sumsq.clone() for b in self.buckets} if window.fold_norm else {})
        self.passes[task] = record
        window.arrived = True
        queue_pass_end(self._self_ref, task)
        return record

    def drain(self, record: BackwardPass, final: bool = False) -> None:
        """Accumulate what ``record``'s pass has delivered so far (``final``: all of it)."""
        with self._lock:
            groups = [(bucket, *queued) for bucket, queued in record.queue.items()]
            record.queue, record.queued_bytes = {}, 0
            if self.collector is not None:
                groups += [(self.buckets[b], indices, grads)
                           for b, indices, grads in self.collector.take(record.task)]
                self._settle_planned(record, final)
                groups = split_sparse(groups, record, self._add_sparse)
            try:
                if groups and accumulate(self.window, groups, record.firsts, adopt_firsts=True):
                    record.added = True
            except BaseException:
                # What a raising backend call wrote is unknown: the pass is not undoable (its
                # window is discarded), as for the collector's launches.
                record.added = True
                raise

    def _add_sparse(self, bucket: Bucket, i: int, grad: Tensor, record: BackwardPass | None) -> None:
        add_sparse(self.window, bucket, i, grad, record, self.flat_fp32)

    def drain_all(self) -> None:
        with self._lock:
            for record in list(self.passes.values()):
                self.drain(record)

    @eager
    def end_pass(self, task: int) -> None:
        """A backward pass completed: accumulate the rest of what it delivered."""
        with self._lock:
            record = self.passes.pop(task, None)
            if record is not None:
                try:
                    self.drain(record, final=True)
                except BaseException:
                    self._undo(record)   # the pass is no longer open for fail_pass to settle
                    raise
                # After the pass's other final callbacks: DistributedDataParallel's, until the
                # first step() switches it off, writes its reduction into .grad.
                queue_after_pass(self._self_ref)

    @eager
    def place_placeholders(self) -> None:
        """A pass ended: each parameter that got a gradient in the window holds a placeholder in
        its empty ``.grad`` until the next call or pass (see :mod:`..placeholders`)."""
        handles, fused, sparse = self.hooks.handles, self.fused_linear, self.window.sparse.sums
        self.placeholders.place(
            (p, bucket.labels[i]) for bucket in self.buckets
            for i, p in enumerate(bucket.params)
            if (bucket.touched[i] or (bucket, i) in sparse) and (p in handles or p in fused))

    def grad_scaler_unscales(self) -> None:
        """``torch.amp.GradScaler.unscale_`` reached a placeholder: the optimizer refuses it."""
        refuse = self.on_grad_scaler() if self.on_grad_scaler is not None else None
        if refuse is not None:
            refuse()

    def grads_removed(self, params: list[Tensor]) -> None:
        """Placeholders removed by someone else (``p.grad = None`` by hand, a torch optimizer's
        ``zero_grad()``): as in torch, what those parameters received since the last ``step()``
        is dropped, as ``zero_grad()`` drops it, or refused where it cannot be."""
        handler = self.on_zero_grad() if self.on_zero_grad is not None else None
        if handler is None:
            return
        try:
            handler(params, True)
        except RuntimeError as error:
            raise RuntimeError(
                f"fused_accum: the .grad of {len(params)} parameters ({self.label(params[0])}"
                f"{', ...' if len(params) > 1 else ''}) was set to None between backward() and "
                "step(), which drops their gradients as zero_grad() does, and: "
                + str(error)) from None

    @eager
    def fail_pass(self, task: int) -> None:
        """A backward pass raised: undo what it did, or discard the window."""
        with self._lock:
            record = self.passes.pop(task, None)
            # Its gradients still queued are dropped; what the collector launched is reported.
            added = self.collector is not None and self.collector.forget(task)
            if record is not None:
                record.added = record.added or added
                self._undo(record)

    def forget_passes(self) -> None:
        """Drop every open pass without settling it (a state dict replaces the window)."""
        with self._lock:
            for task in list(self.passes):
                if self.collector is not None:
                    self.collector.forget(task)
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
            if not self.window.discarded:
                warn("fused_accum: a backward pass failed after adding part of its gradients to "
                     "this window's sums, which cannot be undone exactly; the window is discarded: "
                     "its step will leave the parameters and optimizer state unchanged, and the "
                     "next window starts clean")
            self.window.discarded = True
            return
        # Autograd fills the .grad of a parameter unfrozen since the optimizer was built until
        # take_unfrozen hooks it: what this pass may have left there cannot be taken out.
        self.tainted.update((p, None) for p in self.unhooked
                            if p.requires_grad and p.grad is not None)
        for bucket, i in record.firsts:
            bucket.untouch(i)
        for bucket, i in record.sparse_firsts:
            self.window.sparse.drop(bucket, i)
        for bucket, sumsq in record.sumsq_before.items():
            bucket.sumsq.copy_(sumsq)
        self.window.restore(record.before)

    # -- micro-batch end and zero_grad -------------------------------------------------------

    def end_micro_batch(self) -> None:
        """step() ended a micro-batch: what arrived until now belongs to earlier micro-batches."""
        self.window.sparse.end_micro_batch()
        for bucket in self.buckets:
            bucket.end_micro_batch()
        if self.collector is not None:
            self.collector.clear_added()
        self.window.arrived = False

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
        """The window ended: the buckets' marks and sums, and the window record, start empty."""
        for bucket in self.buckets:
            bucket.reset_window()
        for bucket, i in self.window.sparse.sums:   # held a sparse .grad, as torch would see it
            bucket.holds_grad[i] = True
        self.window.reset()
