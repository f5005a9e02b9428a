"""Warnings that point at the user's line, however deep inside fused_accum they are raised."""
from __future__ import annotations

import sys
import warnings

# Frames of these packages are skipped: fused_accum's own, and torch's wrappers around them
# (Optimizer.step's decorators, autograd's backward() calling the gradient hooks).
_SKIPPED = ("fused_accum", "torch")


def warn(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside fused_accum and torch, so that
    the message names the user's line and warning filters on the user's module apply."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in _SKIPPED:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)
