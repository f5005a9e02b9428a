"""``eager``: run a function outside torch.compile's tracing, at a plain call's cost when nothing
is being compiled.

fused_accum's entry points (``step``, ``zero_grad``, the gradient engine's callbacks from autograd)
are Python bookkeeping that dynamo must not trace: ``torch.compile(opt.step)`` would turn its
counts into constants, and autograd runs the engine's callbacks from inside whatever called
``backward()``, a compiled function included.  ``torch._disable_dynamo`` guarantees that, but costs
about 7 microseconds a call (it swaps the frame evaluator, consults the compile stance and the
export state every time), and fused_accum's entry points run four times a micro-batch: about 0.2 ms
of a window of eight on a CPU.

``eager(fn)`` calls ``fn`` directly while no frame evaluator is installed (nothing is compiling
here, so nothing can trace ``fn``), and through ``torch._disable_dynamo(fn)`` otherwise.  Its own
frame is marked for dynamo to run untraced, as torch's wrapper's is (a file of torch's), so that a
compiled frame that calls it, or an autograd callback made from one, reaches that test.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import torch

_F = TypeVar("_F", bound=Callable[..., Any])

try:
    from torch._C._dynamo import eval_frame as _frames

    _compiling = _frames.get_eval_frame_callback
    _run_untraced = _frames._FrameExecStrategy(_frames._FrameAction.SKIP,
                                               _frames._FrameAction.DEFAULT)
except (ImportError, AttributeError):   # a torch without these: always torch's wrapper
    _frames = None


def eager(fn: _F) -> _F:
    """``fn``, never traced by dynamo (see the module's docstring)."""
    disabled = torch._disable_dynamo(fn)
    if _frames is None:
        return disabled

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if _compiling() is None:
            return fn(*args, **kwargs)
        return disabled(*args, **kwargs)

    call._torchdynamo_disable = True   # a compiled frame calls it without inlining it
    call._torchdynamo_orig_callable = fn   # what dynamo guards on (the wrapper's code is shared)
    return call   # type: ignore[return-value]


if _frames is not None:
    _frames.set_code_exec_strategy(eager(lambda: None).__code__, _run_untraced)
