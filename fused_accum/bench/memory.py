"""Peak memory of a window, per pipeline, measured in the configuration's own process while the
pipeline runs its first windows (:func:`fused_accum.bench.windows.measure_config`).

Each pipeline is built on its own copy of the workload (the model and its micro-batches); the
peak is what the pipeline adds above that workload over its first ``WINDOWS`` windows: the
optimizer, its state, gradients and every transient.

- CUDA: ``max_memory_allocated`` since ``reset_peak_memory_stats``, less what was allocated
  before the pipeline was built.
- CPU (Linux): the process's peak resident size (``VmHWM``), reset to the current resident
  size by writing 5 to ``/proc/self/clear_refs`` before the pipeline is built, less that size.
  So that memory freed goes back to the system at once and the peak is what was live, every
  block above 128 KB is allocated with mmap while pipelines are measured (glibc's ``mallopt``;
  its adaptive threshold would otherwise keep freed blocks resident in its heap, by amounts that
  depend on the order of frees, not on what the pipeline holds); :func:`timing_allocator` then
  sets glibc's steady state back for the timed windows.
- Elsewhere (no ``clear_refs``): None ("n/a" in the tables).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc

import torch

WINDOWS = 3

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters


def _libc(name: str):
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or None), name)
    except (OSError, AttributeError):   # not glibc
        return None


def _mallopt(param: int, value: int) -> bool:
    mallopt = _libc("mallopt")
    return bool(mallopt is not None and mallopt(param, value))


def _malloc_trim() -> None:
    trim = _libc("malloc_trim")
    if trim is not None:
        trim(0)   # free heap memory back to the system, so the next peak starts from live memory


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_resident_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMeter:
    """``start()`` before a pipeline is built, ``peak()`` after its windows: the bytes it added
    at its peak, or None where this machine cannot tell.  Made before the process allocates
    what it will free (on CPUs it sets the allocator up)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0
        self.available = device.type == "cuda" or (
            _status_bytes("VmHWM") is not None and _reset_resident_peak())
        if self.available and device.type != "cuda":
            _mallopt(_M_MMAP_THRESHOLD, 128 * 1024)

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.available:
            _malloc_trim()
            _reset_resident_peak()
            self.base = _status_bytes("VmRSS") or 0

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        if not self.available:
            return None
        return max(0, (_status_bytes("VmHWM") or 0) - self.base)

    def timing_allocator(self) -> None:
        """After the peaks: glibc's allocator as it settles by itself in a long run (blocks up to
        32 MB from its heap, trimmed above 64 MB), so the timed windows do not pay an mmap and
        fresh pages for every tensor."""
        if self.available and self.device.type != "cuda":
            _mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
            _mallopt(_M_TRIM_THRESHOLD, 64 * 2**20)
