"""Flat fp32 buffers and the hooks that route gradients into them.

A :class:`Bucket` holds the parameters of one param group that share a device and a dtype.  Each
bucket owns one flat fp32 accumulator and the flat fp32 optimizer state (moments, masters), so that
a kernel stage is one backend call per bucket, never one per parameter.

:class:`GradBuffers` registers a post-accumulate-grad hook on every parameter.  The hook takes the
gradient, sets ``param.grad = None`` and queues it; at the end of the backward pass (an autograd
engine callback) each bucket's queued gradients are accumulated in one call.  Accumulation of a
backward pass is all or nothing: if the pass raises, nothing of it reaches the buffers.
"""
from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import torch
from torch import Tensor

from . import kernels

# The GradBuffers that currently owns a parameter.  The newest optimizer built over a parameter
# owns it; hooks of older (or dead) optimizers leave its gradient alone.
_OWNER_ATTR = "_fused_accum_owner"
ALIGN = 16   # elements
MASTER_STATES = ("master_param", "master_remainder")   # fp32 masters; int16 remainders (compact)


def param_label(group_index: int, index: int, names: list[str] | None) -> str:
    where = f"param_groups[{group_index}]['params'][{index}]"
    return f"'{names[index]}' ({where})" if names else where


class Bucket:
    """The parameters of one param group on one device with one dtype, and their flat buffers."""

    def __init__(self, group_index: int, params: list[Tensor], labels: list[str], backend_name: str):
        self.group_index = group_index
        self.params = params
        self.labels = labels
        self.device = params[0].device
        self.dtype = params[0].dtype
        self.backend = kernels.get_backend(backend_name, self.device)
        self.numels = [p.numel() for p in params]
        # Each slice starts on a multiple of ALIGN elements (64 bytes), so kernels can use vector
        # loads on every parameter's slice of every flat buffer.
        self.offsets = []
        total = 0
        for n in self.numels:
            self.offsets.append(total)
            total += -(-n // ALIGN) * ALIGN
        # Never zeroed: the first touch of a slice in a window overwrites it.
        self.acc = torch.empty(total, dtype=torch.float32, device=self.device)
        self.state: dict[str, Tensor] = {}          # flat fp32 optimizer state, by torch's names
        self.steps = torch.zeros(len(params), dtype=torch.float32, device=self.device)
        self.sumsq = torch.zeros((), dtype=torch.float32, device=self.device)
        self.touched = [False] * len(params)        # got a gradient in this window
        self.norm_counted = [False] * len(params)   # its final acc is already in sumsq
        self.norm_valid = True                      # False once a counted slice changed again
        self.rounding_seed = -1                     # >= 0: stochastic rounding of the parameters
        self._views: dict[int, tuple[Tensor, list[Tensor]]] = {}
        self._step_views: list[Tensor] | None = None

    def view(self, flat: Tensor, i: int) -> Tensor:
        """Parameter i's slice of a flat buffer, shaped like the parameter."""
        return flat[self.offsets[i]:self.offsets[i] + self.numels[i]].view(self.params[i].shape)

    def views(self, flat: Tensor, indices: list[int]) -> list[Tensor]:
        """Views of ``indices`` into a flat buffer of this bucket, built once per buffer (the
        buffers live as long as the bucket, so the views stay valid)."""
        cached = self._views.get(id(flat))
        if cached is None or cached[0] is not flat:
            cached = (flat, [self.view(flat, i) for i in range(len(self.params))])
            self._views[id(flat)] = cached
        every = cached[1]
        return [every[i] for i in indices]

    def step_views(self, indices: list[int]) -> list[Tensor]:
        """0-d views of the per-parameter step counts."""
        if self._step_views is None:
            self._step_views = [self.steps[i] for i in range(len(self.params))]
        return [self._step_views[i] for i in indices]

    def ensure_state(self, name: str, init: Tensor | None = None,
                     dtype: torch.dtype = torch.float32) -> Tensor:
        """The flat state buffer ``name`` (fp32 unless said), allocated (zeros, or ``init``) on
        first use."""
        if name not in self.state:
            if init is None:
                self.state[name] = torch.zeros_like(self.acc, dtype=dtype)
            else:
                self.state[name] = init.to(device=self.device, dtype=dtype).clone()
        return self.state[name]

    def master_views(self, indices: list[int]) -> list[Tensor] | None:
        """What the kernels take as masters: fp32 masters, int16 remainders (compact), or None."""
        for name in MASTER_STATES:
            if name in self.state:
                return self.views(self.state[name], indices)
        return None

    def flat_params(self) -> Tensor:
        """The parameters in fp32, laid out like the bucket's flat buffers (padding zeroed)."""
        flat = torch.zeros_like(self.acc)
        for i, p in enumerate(self.params):
            self.view(flat, i).copy_(p.detach())
        return flat

    def touched_indices(self) -> list[int]:
        return [i for i, t in enumerate(self.touched) if t]

    def reset_window(self) -> None:
        self.touched = [False] * len(self.params)
        self.norm_counted = [False] * len(self.params)
        self.norm_valid = True
        self.sumsq.zero_()


class GradBuffers:
    """All buckets of one optimizer, the per-device window flags, and the gradient hooks.

    ``micro_weight`` (per-device fp32 scalars, or None for weight 1), ``micro_kind`` and
    ``fold_norm`` are set by the optimizer before a micro-batch's backward;
    ``on_backward_start(kind, through_optimizer)``, a bound method of the optimizer, is called at
    the first gradient of every backward pass and may raise to refuse it.
    """

    def __init__(self, backend_name: str, on_backward_start: Callable[[bool], None]):
        self.backend_name = backend_name
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
        self.on_arrival: Callable[[Tensor, int], None] | None = None   # (param, backward task)
        self.fold_norm = False
        self.arrived = False                        # a gradient came since the last step()
        self._pending: dict[int, list[tuple[Tensor, Tensor]]] = {}   # graph task id -> grads
        self._lock = threading.Lock()
        self._self_ref = weakref.ref(self)

    # -- construction ------------------------------------------------------------------------

    def add_group(self, group_index: int, params: list[Tensor], names: list[str] | None) -> list[Bucket]:
        by_key: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(params):
            by_key.setdefault((p.device, p.dtype), []).append(i)
        new = [Bucket(group_index, [params[i] for i in idx],
                      [param_label(group_index, i, names) for i in idx], self.backend_name)
               for idx in by_key.values()]
        for bucket in new:
            self.buckets.append(bucket)
            for i, p in enumerate(bucket.params):
                self.slots[p] = (bucket, i)
                self._hook(p)
            for table, value in ((self.found_inf, 0.0), (self._ones, 1.0)):
                table.setdefault(bucket.device, torch.full((), value, device=bucket.device))
        return new

    def _hook(self, param: Tensor) -> None:
        setattr(param, _OWNER_ATTR, self._self_ref)
        if param.requires_grad:
            self._register_hook(param)
        else:
            self.unhooked.append(param)

    def _register_hook(self, param: Tensor) -> None:
        self_ref = self._self_ref

        def hook(p: Tensor) -> None:
            owner = self_ref()
            if owner is not None and getattr(p, _OWNER_ATTR, None) is self_ref:
                owner._on_grad(p)
        self._handles.append(param.register_post_accumulate_grad_hook(hook))

    def remove_hooks(self) -> None:
        """Stop taking gradients: parameters get plain ``.grad`` accumulation again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for p in self.slots:
            if getattr(p, _OWNER_ATTR, None) is self._self_ref:
                delattr(p, _OWNER_ATTR)
        self.unhooked.clear()

    def label(self, param: Tensor) -> str:
        bucket, i = self.slots[param]
        return bucket.labels[i]

    # -- gradients in ------------------------------------------------------------------------

    def _check_grad(self, param: Tensor, grad: Tensor) -> None:
        if (grad.layout == torch.strided and grad.shape == param.shape
                and grad.device == param.device and grad.is_floating_point()):
            return   # the hot path: nothing to say
        label = self.label(param)
        if grad.layout != torch.strided:
            raise RuntimeError(f"fused_accum: parameter {label} received a sparse gradient; "
                               "fused_accum accumulates dense gradients only (use a dense "
                               "embedding, e.g. nn.Embedding(sparse=False))")
        if grad.shape != param.shape or grad.device != param.device:
            raise RuntimeError(f"fused_accum: parameter {label} received a gradient of shape "
                               f"{tuple(grad.shape)} on {grad.device}; expected "
                               f"{tuple(param.shape)} on {param.device}")
        raise RuntimeError(f"fused_accum: parameter {label} received a {grad.dtype} gradient")

    def _on_grad(self, param: Tensor) -> None:
        grad = param.grad
        if grad is None:
            return
        param.grad = None
        task = torch._C._current_graph_task_id()
        with self._lock:
            if task not in self._pending:
                # First gradient of this backward pass: may be refused (e.g. mixing plain
                # backward() with opt.backward(num_items=) in one window).
                self._on_backward_start()(self.micro_kind or "plain", self.micro_kind is not None)
                self._pending[task] = []
                torch.autograd.Variable._execution_engine.queue_callback(
                    lambda: self.flush(task))
            try:
                self._check_grad(param, grad)
            except Exception:
                del self._pending[task]   # drop this whole backward pass, keep the window intact
                raise
            self._pending[task].append((param, grad))
        if self.on_arrival is not None:   # data parallel, last micro-batch: reduce what is ready
            self.on_arrival(param, task)

    def accumulate_now(self, task: int, params: set) -> None:
        """Accumulate the pending gradients of ``params`` from backward pass ``task`` now, before
        the pass ends (data parallel: their reduction can then start during the backward)."""
        with self._lock:
            entries = self._pending.get(task, [])
            now = [e for e in entries if e[0] in params]
            self._pending[task] = [e for e in entries if e[0] not in params]
        if now:
            self._accumulate(now)

    def take_stray_grads(self) -> None:
        """Accumulate gradients that bypassed the hooks (params unfrozen after construction, or
        ``.grad`` assigned by hand), and hook params that now require grad."""
        for p in list(self.unhooked):
            if p.requires_grad:
                self.unhooked.remove(p)
                self._register_hook(p)
            if p.grad is not None:
                grad, p.grad = p.grad, None
                self._check_grad(p, grad)
                self._accumulate([(p, grad)])

    def flush(self, task: int) -> None:
        with self._lock:
            entries = self._pending.pop(task, None)
        if entries:
            self._accumulate(entries)

    def discard_pending(self) -> int:
        """Drop gradients of backward passes that never finished; returns how many."""
        with self._lock:
            dropped = sum(len(v) for v in self._pending.values())
            self._pending.clear()
        return dropped

    def _accumulate(self, entries: list[tuple[Tensor, Tensor]]) -> None:
        per_bucket: dict[int, tuple[Bucket, list[int], list[Tensor]]] = {}
        for param, grad in entries:
            bucket, i = self.slots[param]
            per_bucket.setdefault(id(bucket), (bucket, [], []))
            per_bucket[id(bucket)][1].append(i)
            per_bucket[id(bucket)][2].append(grad)
        for bucket, indices, grads in per_bucket.values():
            device = bucket.device
            weight = self.micro_weight[device] if self.micro_weight is not None else self._ones[device]
            first = [not bucket.touched[i] for i in indices]
            sumsq = None
            if self.fold_norm and bucket.norm_valid:
                if any(bucket.norm_counted[i] for i in indices):
                    bucket.norm_valid = False   # a counted slice changes: recompute at the step
                else:
                    sumsq = bucket.sumsq
            bucket.backend.accumulate(grads, bucket.views(bucket.acc, indices), first, weight,
                                      self.found_inf[device], sumsq)
            self.arrived = True
            for i in indices:
                bucket.touched[i] = True
                bucket.norm_counted[i] = sumsq is not None

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
            bucket.backend.norm(bucket.views(bucket.acc, rest), bucket.sumsq)
        return bucket.sumsq

    def reset_window(self) -> None:
        for bucket in self.buckets:
            bucket.reset_window()
        for flag in self.found_inf.values():
            flag.zero_()
