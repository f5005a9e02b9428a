"""Peak memory of a window, per pipeline.

CUDA: ``max_memory_allocated`` over a few windows, less what the workload (the model and its
micro-batches) holds before the pipeline is built.  CPU: a process's peak
resident size cannot be reset, so each pipeline runs in a fresh process
(``python -m fused_accum.bench.memory CONFIG PIPELINE``) and the peak of one that only builds
the workload is subtracted.  The children allocate every block above 128 KB with mmap
(``MALLOC_MMAP_THRESHOLD_``), so memory a pipeline frees goes back to the system at once and the
peak is what was live: glibc's adaptive threshold would otherwise keep freed blocks resident
in its heap, by amounts that depend on the order of frees (tens of MB either way), not on what
the pipeline holds.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import torch

WORKLOAD_ONLY = "workload only"
WINDOWS = 3


def _config(device: torch.device, quick: bool, name: str):
    from .windows import configs
    return next(c for c in configs(device, quick) if c.name == name)


def _build(config, device, pipeline: str, backend: str):
    from .windows import Workload, make_pipeline
    work = Workload(config, device, 0)
    return work, (None if pipeline == WORKLOAD_ONLY else make_pipeline(pipeline, config, work, backend))


def cuda_peak_bytes(config, device: torch.device, pipeline: str, backend: str) -> int:
    torch.cuda.synchronize(device)
    work = _build(config, device, WORKLOAD_ONLY, backend)[0]
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    from .windows import make_pipeline
    p = make_pipeline(pipeline, config, work, backend)
    for _ in range(WINDOWS):
        p.window()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def _child(config_name: str, pipeline: str, quick: bool, backend: str) -> int:
    device = torch.device("cpu")
    work, p = _build(_config(device, quick, config_name), device, pipeline, backend)
    for _ in range(WINDOWS if p is not None else 0):
        p.window()
    return _peak_resident_bytes()


def _peak_resident_bytes() -> int:
    # VmHWM belongs to this address space, which exec made fresh.  ru_maxrss would not do: Linux
    # carries it across exec, so a child inherits its (larger) parent's peak.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # elsewhere: best effort


def cpu_peak_bytes(config_name: str, pipelines: list[str], quick: bool, backend: str) -> dict[str, int]:
    """Peak resident bytes each pipeline adds to its workload, from fresh processes."""
    peaks = {}
    for pipeline in [WORKLOAD_ONLY, *pipelines]:
        out = subprocess.run([sys.executable, "-m", "fused_accum.bench.memory", config_name, pipeline,
                              "--quick" if quick else "--full", backend],
                             capture_output=True, text=True, timeout=600, check=True,
                             env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)})
        peaks[pipeline] = json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]
    return {p: peaks[p] - peaks[WORKLOAD_ONLY] for p in pipelines}


if __name__ == "__main__":
    name, which, mode, backend_name = sys.argv[1:5]
    print(json.dumps({"peak_bytes": _child(name, which, mode == "--quick", backend_name)}))
