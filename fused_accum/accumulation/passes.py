"""One backward pass (an autograd graph task) as the gradient engine sees it.

A pass is opened at its first gradient, its gradients are queued and accumulated in groups, and it
is settled when autograd completes it (:class:`PassEnd`, the engine's final callback) or, when it
raised, undone: exactly where it only began sums (its first touches are forgotten and the window
restored as it was, see :meth:`fused_accum.accumulation.window.Window.save`), else by discarding
the window.
"""
from __future__ import annotations

import functools
import weakref

import torch
from torch import Tensor

from .buckets import Bucket
from .window import Saved


class BackwardPass:
    """What one backward pass has delivered so far."""

    __slots__ = ("task", "serial", "queue", "queued_bytes", "firsts", "added", "before",
                 "sumsq_before", "sparse_firsts")

    def __init__(self, task: int, serial: int, before: Saved, sumsq_before: dict[Bucket, Tensor]):
        self.task = task
        self.serial = serial
        self.before = before        # the window when it began, to undo it exactly
        self.queue: dict[Bucket, tuple[list[int], list[Tensor]]] = {}   # not yet accumulated
        self.queued_bytes = 0
        self.firsts: list[tuple[Bucket, int]] = []   # slots this pass touched first in the window
        self.sparse_firsts: list[tuple[Bucket, int]] = []   # sparse sums it began
        self.added = False          # it added into an earlier sum: it can no longer be undone
        # In a window's last micro-batch, the sums of squares before it: the collector folds
        # into them from C++, and what a failed pass folded is reported nowhere else.
        self.sumsq_before = sumsq_before


class PassEnd:
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


def queue_pass_end(owner: weakref.ref, task: int) -> None:
    torch.autograd.Variable._execution_engine.queue_callback(PassEnd(owner, task))


def _place_placeholders(owner: weakref.ref) -> None:
    engine = owner()
    if engine is not None:
        engine.place_placeholders()


def queue_after_pass(owner: weakref.ref) -> None:
    """From a final callback: place the engine's placeholders after the callbacks queued so far."""
    torch.autograd.Variable._execution_engine.queue_callback(
        functools.partial(_place_placeholders, owner))
