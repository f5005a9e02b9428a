"""What ``.grad`` holds between ``backward()`` and ``step()`` while gradients are taken as they
arrive: a placeholder that refuses to be used.

The gradients are in the window's fp32 sums, so ``.grad`` has none to give.  Left ``None``, code
written for plain PyTorch that reads or changes it there would carry on silently: a hand-written
clip (``gs = [p.grad for p in params if p.grad is not None]``), gradient noise added in place,
gradient logging, all seeing or changing nothing.  Instead, at the end of each backward pass every
parameter that got a gradient in the window holds a :class:`GradPlaceholder` in ``.grad``: a
tensor of the parameter's shape, dtype and device over a single element, whose metadata reads as
usual and whose every other use (its values read, an in-place change, printing it) raises an error
that names the parameter and the remedy.  It is removed (``.grad = None`` again) by the
optimizer's next call (``step()``, ``zero_grad()``, ``state_dict()``, ...) and when the next
backward pass begins, before autograd could add into it.

A placeholder that someone else removed (``p.grad = None`` by hand, or a torch optimizer's
``zero_grad()`` over these parameters) means what it means in torch: drop that parameter's
gradients since the last ``step()`` (see :meth:`Placeholders.clear`).
"""
from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

# Metadata of a placeholder reads as a gradient's would (code that checks shapes or dtypes, or
# keys dictionaries by tensor, runs on); everything else is a use of the values that are not there.
def _metadata() -> frozenset:
    getters = ("shape", "dtype", "device", "layout", "ndim", "is_sparse", "is_cuda", "is_meta",
               "is_nested", "is_quantized", "requires_grad", "grad_fn", "is_leaf", "nbytes",
               "itemsize")
    methods = ("size", "dim", "numel", "__hash__", "is_floating_point", "is_complex",
               "element_size", "stride", "is_contiguous", "storage_offset")
    found = {getattr(Tensor, name).__get__ for name in getters if hasattr(Tensor, name)}
    found |= {getattr(Tensor, name) for name in methods if hasattr(Tensor, name)}
    return frozenset(found | {torch._has_compatible_shallow_copy_type})


_METADATA = _metadata()


def _tracing() -> bool:
    """Whether torch.compile is compiling: dynamo makes a fake tensor of each parameter and of
    its ``.grad``, reading every piece of metadata (no value), as a compiled step is built."""
    guards = sys.modules.get("torch._guards")
    return guards is not None and guards.TracingContext.try_get() is not None


def _placeholder_in(args) -> GradPlaceholder | None:
    for arg in args:
        if isinstance(arg, GradPlaceholder):
            return arg
        if isinstance(arg, (list, tuple)):
            found = _placeholder_in(arg)
            if found is not None:
                return found
    return None


# Conversions, as ``module.to(...)``, ``.cpu()`` or ``.half()`` apply them to ``.grad`` too: a
# placeholder converted is a placeholder (itself where nothing changes, as torch returns self).
_CONVERSIONS = frozenset({
    Tensor.to, Tensor.cpu, Tensor.cuda, Tensor.type, Tensor.float, Tensor.double, Tensor.half,
    Tensor.bfloat16, Tensor.requires_grad_, Tensor.detach, Tensor.share_memory_,
    Tensor.pin_memory, torch.empty_like,
})


_GRAD_SCALER_UNSCALE = torch._amp_foreach_non_finite_check_and_unscale_


class GradPlaceholder(Tensor):
    """``.grad`` of a parameter whose gradient is in a fused optimizer's window: see the module."""

    label: str
    on_grad_scaler: Callable[[], None] | None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in _METADATA or _tracing():
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        if func in _CONVERSIONS and type(args[0]) is cls:
            return args[0]._converted(func, args[1:], kwargs or {})
        if func == Tensor.data.__set__ and all(type(a) is cls for a in args):   # module._apply
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args)
        found = _placeholder_in(args)   # (never `or`: bool() of a tensor is a use too)
        if found is None:
            found = _placeholder_in(tuple((kwargs or {}).values()))
        if func is _GRAD_SCALER_UNSCALE and getattr(found, "on_grad_scaler", None) is not None:
            found.on_grad_scaler()   # GradScaler.unscale_: the optimizer refuses it, saying why
        label = getattr(found, "label", "?")
        name = getattr(func, "__name__", str(func))
        zeroing = "" if name != "zero_" else (
            " To drop the gradients (a zero_grad(set_to_none=False) of another optimizer or "
            "module?), call the fused optimizer's zero_grad().")
        raise RuntimeError(
            f"fused_accum: the .grad of parameter {label} was used ({name}) between backward() "
            "and step(), where the optimizer holds the gradient in its window's fp32 sum "
            "(accumulation_steps > 1, data parallelism, or a framework's windows): .grad holds no "
            "gradient there, so reading or changing it would see or change nothing." + zeroing +
            " Clip with max_grad_norm= (the window's norm is opt.grad_norm after its step), change "
            "gradients inside backward (a tensor hook, p.register_hook, or a loss term), or use "
            "accumulation_steps=1 in one process, where .grad works as in torch.optim. (Nothing "
            "was changed: this placeholder leaves .grad at the optimizer's next call or backward "
            "pass)")

    def _converted(self, func, args, kwargs) -> GradPlaceholder:
        with torch._C.DisableTorchFunctionSubclass():   # one element, of the same rank
            one = torch.empty((1,) * self.dim(), dtype=self.dtype, device=self.device)
            converted = func(one, *args, **kwargs)
        if not isinstance(converted, Tensor) or (converted.dtype == self.dtype
                                                 and converted.device == self.device):
            return self if isinstance(converted, Tensor) else converted
        new = converted.expand(self.shape).as_subclass(GradPlaceholder)
        new.label, new.on_grad_scaler = self.label, self.on_grad_scaler
        return new


def is_placeholder(grad: Tensor | None) -> bool:
    return type(grad) is GradPlaceholder


def grad_or_none(param: Tensor) -> Tensor | None:
    """``param.grad``, None for a placeholder."""
    grad = param.grad
    return None if is_placeholder(grad) else grad


class Placeholders:
    """The parameters of one optimizer that hold a placeholder now.  ``on_removed(params)`` is
    called (by :meth:`clear`) with the parameters whose placeholder someone else removed;
    ``on_grad_scaler()`` when ``torch.amp.GradScaler`` unscales a placeholder (it raises)."""

    def __init__(self, on_removed: Callable[[list[Tensor]], None] | None = None,
                 on_grad_scaler: Callable[[], None] | None = None):
        self._on_grad_scaler = on_grad_scaler
        self.placed: list[tuple[Tensor, GradPlaceholder]] = []
        self._made: dict[Tensor, GradPlaceholder] = {}   # made once per parameter, then reused
        self._bases: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        self._on_removed = on_removed

    def place(self, params: Iterable[tuple[Tensor, str]]) -> None:
        """Put a placeholder into the empty ``.grad`` of each (parameter, label)."""
        made, placed = self._made, self.placed
        for p, label in params:
            if p.grad is not None:
                continue   # ours already, or a .grad set by hand (refused where it is found)
            holder = made.get(p)
            if holder is None:
                holder = made[p] = self._base(p).expand(p.shape).as_subclass(GradPlaceholder)
                holder.label, holder.on_grad_scaler = label, self._on_grad_scaler
            p.grad = holder
            placed.append((p, holder))

    def _base(self, p: Tensor) -> Tensor:
        """The one element every placeholder of ``p``'s dtype and device expands (never written:
        no kernel runs, which a CUDA graph being captured would record)."""
        key = (p.dtype, p.device)
        base = self._bases.get(key)
        if base is None:
            base = self._bases[key] = torch.empty((), dtype=p.dtype, device=p.device)
        return base

    def clear(self, removed_means_discard: bool = True,
              params: Iterable[Tensor] | None = None) -> None:
        """Take the placeholders (of ``params``, by default all) out of ``.grad``.  Those someone
        else removed are reported to ``on_removed`` (with ``removed_means_discard``), after all
        are out."""
        if not self.placed:
            return
        if params is None:
            placed, self.placed = self.placed, []
        else:
            wanted = set(params)
            placed = [(p, h) for p, h in self.placed if p in wanted]
            self.placed = [(p, h) for p, h in self.placed if p not in wanted]
        removed = []
        for p, holder in placed:
            grad = p.grad
            if is_placeholder(grad):   # its own, or one converted (model.to(...))
                p.grad = None
            elif grad is None:
                removed.append(p)
        if removed and removed_means_discard and self._on_removed is not None:
            self._on_removed(removed)

    def forget(self, param: Tensor) -> None:
        """``param`` leaves the optimizer: its placeholder (if any) leaves its ``.grad``."""
        holder = self._made.pop(param, None)
        if holder is not None and param.grad is holder:
            param.grad = None
        self.placed = [(p, h) for p, h in self.placed if p is not param]


def clear_on_death(owner: object, placeholders: Placeholders) -> None:
    """When ``owner`` (the gradient engine) dies, its placeholders leave ``.grad``: autograd would
    otherwise add the next plain backward pass into them."""
    weakref.finalize(owner, placeholders.clear, False)
