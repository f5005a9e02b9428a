"""The gradient engine: where gradients go between autograd and the optimizer's update.

- :mod:`.window`: the window in progress, one record that owns its state;
- :mod:`.buckets`: parameters grouped by device and dtype, with their accumulators and state;
- :mod:`.hooks`: the per-parameter hooks (the C++ collector's, or Python's);
- :mod:`.passes`: one backward pass as the engine sees it, and how a failed one is undone;
- :mod:`.accumulate`: gradients into the window's sums, and the fp32 adoption rule;
- :mod:`.collector_bridge`: the collector's plan and what it reports;
- :mod:`.sparse`: sparse gradients summed sparse;
- :mod:`.grad_attribute`, :mod:`.zero_grad`: ``.grad`` read and checked, ``zero_grad()`` mid-window;
- :mod:`.engine`: :class:`GradBuffers`, which ties them together for one optimizer.
"""
from .engine import GROUP_ENV, GradBuffers, group_bytes
from .hooks import HOOKS_ENV, Hooks
from .passes import BackwardPass
from .window import Window

__all__ = ["BackwardPass", "GROUP_ENV", "GradBuffers", "HOOKS_ENV", "Hooks", "Window",
           "group_bytes"]
