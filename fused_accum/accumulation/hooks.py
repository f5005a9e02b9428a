"""The per-parameter hooks that hand each gradient to the gradient engine as autograd delivers it.

Each is the C++ gradient collector's (``csrc/autograd/collector.cpp``, which runs Python once per
pass and once per group of gradients, not once per gradient) where it builds, else a Python
function (``FUSED_ACCUM_HOOKS=python`` asks for that one).  On accelerators neither holds the
parameter's AccumulateGrad node, which would keep the CUDA stream current at its making and tie
backward passes on other streams (CUDA graph capture) to it; on CPUs the collector hooks the node
itself, which costs no Python at all.
"""
from __future__ import annotations

import os
import sys
import weakref
from typing import Any

import torch
from torch import Tensor

from .buckets import Bucket

HOOKS_ENV = "FUSED_ACCUM_HOOKS"   # "auto" (the C++ collector when it builds) or "python"

COMPILED_AUTOGRAD_REFUSED = (   # the same words as csrc/autograd/collector.cpp's
    "fused_accum: compiled autograd cannot trace the hooks that take each gradient as it "
    "arrives (accumulation_steps > 1, data parallelism, or windows a framework drives). Turn "
    "compiled autograd off (torch._dynamo.config.compiled_autograd = False), or use "
    "accumulation_steps=1 in one process, where gradients stay in .grad and compiled autograd "
    "works")


def compiled_autograd_on() -> bool:
    module = sys.modules.get("torch._dynamo.compiled_autograd")
    return bool(module is not None and (getattr(module, "compiled_autograd_enabled", False)
                                        or getattr(module, "in_compiled_autograd_region", False)))


def make_collector(engine: weakref.ref, group_bytes: int):
    """The C++ collector calling back into ``engine`` (weakly: it must not keep it alive), or
    None for the Python hooks."""
    kind = os.environ.get(HOOKS_ENV, "auto")
    if kind not in ("auto", "python"):
        raise ValueError(f"{HOOKS_ENV}={kind!r}: expected 'auto' or 'python'")
    if kind == "python":
        return None
    from ..kernels import build
    module, _ = build.load_collector()
    if module is None:
        return None   # the Python hooks do the same, a Python call per gradient
    return module.Collector(lambda task: engine() and engine().collected_start(task),
                            lambda task: engine() and engine().collected_full(task),
                            group_bytes,
                            lambda slot: engine() and engine().refuse_hand_set_slot(slot))


class _CollectorHandle:
    """Removes one parameter's hooks: the collector's node hook (which guards the node itself),
    or its tensor hook (``hook``: its RemovableHandle) and the tensor pre-hook that refuses a
    hand-set ``.grad``."""

    __slots__ = ("collector", "slot", "param", "guard", "hook")

    def __init__(self, collector, slot: int, param: Tensor, hook=None):
        self.collector, self.slot, self.hook = collector, slot, hook
        self.param = weakref.ref(param)
        self.guard = None if hook is None else collector.guard(param, slot)

    @property
    def on_node(self) -> bool:
        """Whether the collector hooks the parameter's AccumulateGrad node (not the tensor)."""
        return self.hook is None

    @property
    def ids(self) -> tuple[int, ...]:
        """The ids of its hooks among the parameter's Python-visible ones."""
        return () if self.on_node else (self.hook.id,)

    def remove(self) -> None:
        if self.on_node:
            self.collector.remove(self.slot)
            return
        self.hook.remove()
        param = self.param()
        if param is not None:
            self.collector.unguard(param, self.guard)


class _PythonHandles:
    __slots__ = ("handles",)

    def __init__(self, *handles):
        self.handles = handles

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(h.id for h in self.handles)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _python_hooks(engine: weakref.ref, param: Tensor, bucket: Bucket, i: int) -> _PythonHandles:
    """The Python hooks of ``param``: one takes its gradient, one refuses a hand-set ``.grad``
    before autograd adds into it (as the collector's do)."""
    param_ref = weakref.ref(param)

    def take(p: Tensor) -> None:
        owner = engine()
        if owner is not None:   # a dead optimizer leaves the gradient to plain autograd
            owner.on_grad(p, bucket, i)

    def refuse_hand_set(grad: Tensor) -> None:
        p, owner = param_ref(), engine()
        if p is not None and owner is not None and p.grad is not None:
            owner.refuse_hand_set(p)

    return _PythonHandles(param.register_post_accumulate_grad_hook(take),
                          param.register_hook(refuse_hand_set))


class Hooks:
    """One optimizer's gradient hooks, and the collector's slots (one per parameter, kept if its
    hook is registered again)."""

    def __init__(self, engine: weakref.ref, group_bytes: int):
        self.engine = engine
        self.collector = make_collector(engine, group_bytes)
        self.handles: dict[Tensor, Any] = {}       # hooked parameter -> its handle
        self.first_ids: dict[Tensor, int] = {}     # hooked parameter -> first hook id after ours
        self.slot_list: list[tuple[Bucket, int, Tensor]] = []   # collector slot -> parameter
        self.bucket_slots: dict[Bucket, list[int]] = {}   # bucket -> each hooked slot, or -1
        self.slot_ids: dict[Tensor, int] = {}      # parameter -> its collector slot

    def __contains__(self, param: Tensor) -> bool:
        return param in self.handles

    @staticmethod
    def hook_on_node(param: Tensor) -> bool:
        """The collector's node hook (no Python per gradient) where there are no streams: it keeps
        the AccumulateGrad node, and with it the stream current at its making, alive."""
        return param.device.type == "cpu"

    def register(self, param: Tensor, bucket: Bucket, i: int, bucket_index: int) -> None:
        if self.collector is not None:
            slot = self.slot_ids.get(param)
            if slot is None:
                slot = self.slot_ids[param] = len(self.slot_list)
                self.slot_list.append((bucket, i, param))
            self.bucket_slots.setdefault(bucket, [-1] * len(bucket.params))[i] = slot
            where = (slot, bucket_index, i)
            if Hooks.hook_on_node(param):
                self.collector.add(param, *where)
                handle = _CollectorHandle(self.collector, slot, param)
            else:
                handle = _CollectorHandle(self.collector, slot, param,
                                          param.register_post_accumulate_grad_hook(
                                              self.collector.hook(*where)))
        else:
            handle = _python_hooks(self.engine, param, bucket, i)
        self.handles[param] = handle
        # A hook of the user's registered from now on would run after ours on an accelerator
        # (seeing .grad = None) but before it on a CPU, where ours is a node hook: see
        # check_foreign.
        self.first_ids[param] = torch.utils.hooks.RemovableHandle.next_id

    def unregister(self, param: Tensor, bucket: Bucket, i: int) -> None:
        self.handles.pop(param).remove()
        self.first_ids.pop(param, None)
        if self.collector is not None:
            self.bucket_slots[bucket][i] = -1

    def check_foreign(self, label) -> None:
        """Refuse a post-accumulate-grad hook of the user's registered on a parameter after its
        gradients began to be taken here: it would run after this optimizer's hook on an
        accelerator (and see ``.grad = None``) but before it on a CPU (and see the gradient)."""
        for param, first_id in self.first_ids.items():
            hooks = param._post_accumulate_grad_hooks
            if hooks and max(hooks) >= first_id:
                raise RuntimeError(
                    f"fused_accum: parameter {label(param)} got a post-accumulate-grad hook "
                    "(register_post_accumulate_grad_hook) after this optimizer began to take its "
                    "gradients as they arrive: on a GPU it would run after the optimizer's own "
                    "hook and see .grad = None, on a CPU before it. Register it before building "
                    "the optimizer (it then sees each gradient on every device), or use "
                    "accumulation_steps=1 in one process, where .grad works as in torch.optim")
