"""torch.optim's wrapper of ``step()`` (the step hooks, the profiler's label), minus the label's
cost when no profiler runs.

torch wraps every optimizer's ``step`` in ``Optimizer.profile_hook_step``, whose
``record_function`` costs about 20 microseconds a call even with no profiler on.  A torch optimizer
pays that once a window; fused_accum's ``step()`` runs once a micro-batch, k times as often.  This
wrapper runs the same hooks in the same order and hands over to torch's own wrapper whenever a
profiler is on, so that traces keep their ``Optimizer.step#...`` ranges.
"""
from __future__ import annotations

import functools
from itertools import chain
from typing import Any, Callable

import torch
from torch.optim import optimizer as torch_optimizer


def hooked_step(step: Callable[..., Any]) -> Callable[..., Any]:
    """``step`` with torch's step hooks; marked so that ``Optimizer.__init__`` does not wrap it
    again."""
    profiled = torch_optimizer.Optimizer.profile_hook_step(step)

    @functools.wraps(step)
    def wrapper(self, *args: Any, **kwargs: Any) -> Any:
        if torch.autograd.profiler._is_profiler_enabled:
            return profiled(self, *args, **kwargs)
        for pre_hook in chain(torch_optimizer._global_optimizer_pre_hooks.values(),
                              self._optimizer_step_pre_hooks.values()):
            result = pre_hook(self, (self, *args), kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(f"{step} must return None or a tuple of (new_args, "
                                       f"new_kwargs), but got {result}.")
                (self, *args), kwargs = result
        out = step(self, *args, **kwargs)
        self._optimizer_step_code()
        for post_hook in chain(self._optimizer_step_post_hooks.values(),
                               torch_optimizer._global_optimizer_post_hooks.values()):
            post_hook(self, (self, *args), kwargs)
        return out

    wrapper.hooked = True
    return wrapper
