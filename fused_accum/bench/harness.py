"""Timing, bandwidth and machine facts shared by every benchmark level.

Times are medians over interleaved repetitions (each repetition runs every contender once, in an
order that changes), so that drifting clocks and caches hit all contenders alike; the spread is
reported as the 10th and 90th percentiles.  Bandwidth is bytes moved (DESIGN.md §5: each input
read once, each output written once) over time, and is compared with the fp32 copy bandwidth
measured in the same run.  A copy's destination is also read by the CPU's write-allocate, which
the convention does not count, so in-place kernels can exceed 100% of it.
"""
from __future__ import annotations

import datetime
import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import fused_accum


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    median: float
    p10: float
    p90: float

    @classmethod
    def of(cls, samples: list[float]) -> "Timing":
        ordered = sorted(samples)
        pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]
        return cls(statistics.median(ordered), pick(0.1), pick(0.9))


def time_interleaved(contenders: dict[str, Callable[[], object]], device: torch.device,
                     repeats: int, warmup: int = 2, seed: int = 0) -> dict[str, Timing]:
    """Median time of each contender, repetitions interleaved in a shuffled order."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders)
    rng = random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                contenders[name]()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                contenders[name]()
                samples[name].append(time.perf_counter() - t0)
    return {name: Timing.of(s) for name, s in samples.items()}


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """fp32 device copy bandwidth in bytes/s (bytes read plus bytes written)."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    timing = time_interleaved({"copy": lambda: dst.copy_(src)}, device, repeats)["copy"]
    return 2 * n * 4 / timing.median


def _cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict[str, object]:
    """What the numbers were measured on."""
    info: dict[str, object] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": str(device),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fused_accum": fused_accum.__version__,
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def progress(message: str) -> None:
    print(f"  .. {message}", flush=True)
