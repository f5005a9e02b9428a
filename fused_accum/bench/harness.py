"""Timing, bandwidth and machine facts shared by every benchmark level.

Times are medians over interleaved repetitions (each repetition runs every contender once, in an
order that changes), so that drifting clocks and caches hit all contenders alike; the spread is
reported as the 10th and 90th percentiles.  Bandwidth is bytes moved (DESIGN.md §5: each input
read once, each output written once) over time, and is compared with the fp32 copy bandwidth
measured in the same run.  A copy's destination is also read by the CPU's write-allocate, which
the convention does not count, so in-place kernels can exceed 100% of it.

Each ratio comes with its own repeat-to-repeat spread: the 10th and 90th percentiles of the
ratio taken within each repetition (the contenders of one repetition run back to back, so what
drifts between repetitions cancels).  When that spread includes 1.0 the difference is within
this run's noise, and the tables say so.

Long stages print: :func:`progress` starts a stage, and a :class:`Heartbeat` thread prints a line
("still on ...") whenever nothing was printed for ``interval`` seconds (30 by default).
"""
from __future__ import annotations

import datetime
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import fused_accum


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Timing:
    median: float
    p10: float
    p90: float
    samples: list[float] = field(default_factory=list, repr=False)   # in repetition order

    @classmethod
    def of(cls, samples: list[float]) -> "Timing":
        return cls(statistics.median(samples), percentile(samples, 0.1), percentile(samples, 0.9),
                   list(samples))


def ratio_spread(samples: list[float], base: list[float]) -> tuple[float, float]:
    """p10 and p90 of ``samples[r] / base[r]`` over the repetitions r (paired, as interleaved)."""
    ratios = [a / b for a, b in zip(samples, base)]
    return percentile(ratios, 0.1), percentile(ratios, 0.9)


def ratio_fields(key: str, timing: Timing, base: Timing, is_base: bool) -> dict[str, object]:
    """``key`` (median over median), its p10-p90 over paired repetitions, and whether that
    spread includes 1.0 (``<key>_within_noise``; None for the reference itself)."""
    if is_base:
        return {key: 1.0, f"{key}_p10": 1.0, f"{key}_p90": 1.0, f"{key}_within_noise": None}
    lo, hi = ratio_spread(timing.samples, base.samples)
    return {key: timing.median / base.median, f"{key}_p10": lo, f"{key}_p90": hi,
            f"{key}_within_noise": lo <= 1.0 <= hi}


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
    for r in range(repeats):
        status(f"repetition {r + 1} of {repeats}")
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


_print_lock = threading.Lock()
_heartbeat: "Heartbeat | None" = None
PROGRESS_ENV = "FUSED_ACCUM_BENCH_PROGRESS_S"   # the heartbeat's interval, for child processes


def _say(line: str) -> None:
    with _print_lock:
        print(line, flush=True)


def progress(message: str) -> None:
    """Print that a stage begins (with the time of day, so that logs show where time went); the
    heartbeat names it until the next one."""
    _say(f"  .. {time.strftime('%H:%M:%S')} {message}")
    if _heartbeat is not None:
        _heartbeat.said(stage=message)


def status(detail: str) -> None:
    """Where the current stage is (printed only by the heartbeat)."""
    if _heartbeat is not None:
        _heartbeat.detail = detail


def echo(line: str) -> None:
    """Print a line (a child process's output): it counts as progress."""
    _say(line)
    if _heartbeat is not None:
        _heartbeat.said()


class Heartbeat:
    """Prints ``  .. still on <stage>: <s> s[, <detail>]`` whenever nothing was printed for
    ``interval`` seconds.  :meth:`check` does the work (tests call it with their own clock);
    :meth:`start` calls it from a daemon thread."""

    def __init__(self, interval: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 say: Callable[[str], None] = _say):
        self.interval, self.clock, self.say = interval, clock, say
        self.last = self.stage_start = clock()
        self.stage: str | None = None
        self.detail = ""
        self._stop = threading.Event()

    def said(self, stage: str | None = None) -> None:
        now = self.clock()
        self.last = now
        if stage is not None:
            self.stage, self.stage_start, self.detail = stage, now, ""

    def check(self) -> str | None:
        now = self.clock()
        if self.stage is None or now - self.last < self.interval:
            return None
        line = f"  .. {time.strftime('%H:%M:%S')} still on {self.stage}: {now - self.stage_start:.0f} s"
        if self.detail:
            line += f", {self.detail}"
        self.last = now
        self.say(line)
        return line

    def start(self) -> "Heartbeat":
        global _heartbeat
        _heartbeat = self

        def beat() -> None:
            while not self._stop.wait(min(1.0, self.interval / 4)):
                self.check()
        threading.Thread(target=beat, name="bench-heartbeat", daemon=True).start()
        return self

    def stop(self) -> None:
        global _heartbeat
        self._stop.set()
        if _heartbeat is self:
            _heartbeat = None


def heartbeat_interval(default: float = 30.0) -> float:
    return float(os.environ.get(PROGRESS_ENV) or default)


class Interrupted(Exception):
    """SIGTERM (a time cap, a closed job): the bench stops and keeps what it measured."""


def run_child(cmd: list[str], env: dict[str, str] | None = None,
              timeout: float | None = None) -> tuple[int, str]:
    """Run ``cmd``, relaying its output line by line as progress; its exit status (or "timeout")
    and the last lines of its output.  Killed if this process is interrupted."""
    tail: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, bufsize=1)

    def relay() -> None:
        for line in proc.stdout:
            line = line.rstrip("\n")
            echo(line)
            tail.append(line)
            del tail[:-40]
    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    try:
        try:
            code: int | str = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = "timeout"
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    reader.join(timeout=5)
    return code, "\n".join(tail)
