"""``eager``: run a function outside torch.compile's tracing, at a plain call's cost when nothing
is being compiled.

fused_accum's entry points (``step``, ``zero_grad``, the gradient engine's callbacks from autograd)
are Python bookkeeping that dynamo must not trace: ``torch.compile(opt.step)`` would turn its
counts into constants, and autograd runs the engine's callbacks from inside whatever called
``backward()``, a compiled function included.  ``torch._disable_dynamo`` guarantees that, but costs
about 7 microseconds a call (it swaps the frame evaluator, consults the compile stance and the
export state every time), and fused_accum's entry points run four times a micro-batch: about 0.2 ms
of a window of eight on a CPU.

``eager(fn)`` calls ``fn`` directly while this thread has no frame evaluator installed (nothing is
compiling here, so nothing can trace ``fn``), and through ``torch._disable_dynamo(fn)`` otherwise.
Its own frame is marked for dynamo to run untraced, as torch's wrapper's is (a file of torch's), so
that a compiled frame that calls it, or an autograd callback made from one, reaches that test.
Where this torch lacks the private calls that needs, ``eager`` is ``torch._disable_dynamo``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import torch

_F = TypeVar("_F", bound=Callable[..., Any])


def _direct_unless_compiling(fn: Callable[..., Any], disabled: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if _compiling() is None:
            return fn(*args, **kwargs)
        return disabled(*args, **kwargs)

    call._torchdynamo_disable = True        # a compiled frame calls it without inlining it
    call._torchdynamo_orig_callable = fn    # what dynamo guards on (the wrapper's code is shared)
    return call


try:
    from torch._C._dynamo import eval_frame as _frames

    _compiling = _frames.get_eval_frame_callback
    _frames.set_code_exec_strategy(   # every wrapper shares this code object
        _direct_unless_compiling(len, len).__code__,
        _frames._FrameExecStrategy(_frames._FrameAction.SKIP, _frames._FrameAction.DEFAULT))
    _FAST = True
except Exception:   # a torch without these private calls: always torch's wrapper
    _FAST = False


def eager(fn: _F) -> _F:
    """``fn``, never traced by dynamo (see the module's docstring)."""
    disabled = torch._disable_dynamo(fn)
    if not _FAST:
        return disabled
    return _direct_unless_compiling(fn, disabled)   # type: ignore[return-value]
