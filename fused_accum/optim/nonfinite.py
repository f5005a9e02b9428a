"""Noticing skipped windows without a host synchronisation.

The non-finite flag of a window lives on the device.  To warn once that windows are being
skipped, each window's flag is copied to pinned host memory behind an event, and read at a later
window end only if the event has completed: nothing on the hot path waits for the device.
"""
from __future__ import annotations

import torch
from torch import Tensor


class SkipMonitor:
    def __init__(self, device: torch.device):
        self.device = device
        self._pending: list[tuple[Tensor, torch.cuda.Event | None]] = []

    def record(self, found_inf: Tensor) -> None:
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return   # a captured window is replayed without Python: nothing to record
        if self.device.type == "cuda":
            host = torch.empty((), dtype=found_inf.dtype, pin_memory=True)
            host.copy_(found_inf, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((host, event))
        else:   # the window end's flag is a tensor of its own, never written again
            self._pending.append((found_inf, None))

    def poll(self) -> bool:
        """Whether a recorded window that has finished on the device was skipped."""
        seen, still = False, []
        for host, event in self._pending:
            if event is None or event.query():
                seen = seen or host.item() != 0
            else:
                still.append((host, event))
        self._pending = still
        return seen
