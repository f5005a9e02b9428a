"""Measures the Triton kernels' block size and warp count per op and dtype on this GPU.

Every candidate of ``triton_ops.configs.CANDIDATES`` is timed on one bucket (``size_mb`` of fp32
accumulators in tensors of 16 MB and one odd-sized tensor), interleaved as the benchmark does; the
fastest is recorded with every candidate's time, under the device's name, in the tuning file that
``configs.lookup`` reads.  ``python -m fused_accum tune --device cuda`` on the GPU, then commit
``fused_accum/kernels/triton_ops/tuned.json``.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from .. import kernels
from ..kernels.triton_ops import configs
from .harness import machine, progress, time_interleaved

F32 = torch.float32
_TENSOR_MB = 16


def _sizes(size_mb: float) -> list[int]:
    """Element counts of a bucket of ``size_mb`` MB (fp32): 16 MB tensors and an odd tail."""
    total = int(size_mb * 2**20) // 4
    per = min(total, _TENSOR_MB * 2**20 // 4)
    sizes = [per] * (total // per)
    return sizes + [total - sum(sizes) + 3]


def _randn(sizes, device, dtype=F32, scale=1.0) -> list[torch.Tensor]:
    return [(torch.randn(n, device=device) * scale).to(dtype) for n in sizes]


def _cases(sizes: list[int], device: torch.device) -> list[tuple[str, torch.dtype, Callable]]:
    """(op, dtype, fn(backend)) on fresh random data; fn runs the op once over the bucket."""
    found = torch.zeros((), device=device)
    weight = torch.ones((), device=device)
    sumsq = torch.zeros((), device=device)
    cases = []
    for dtype in (F32, torch.bfloat16, torch.float16):
        grads, accs = _randn(sizes, device, dtype), _randn(sizes, device)
        cases.append(("accumulate", dtype, lambda b, g=grads, a=accs: b.accumulate(
            g, a, [False] * len(a), weight, found, sumsq)))
    accs = _randn(sizes, device)
    cases.append(("norm", F32, lambda b, a=accs: b.norm(a, sumsq)))
    for dtype in (F32, torch.bfloat16, torch.float16):
        p32 = _randn(sizes, device)
        params = [p.to(dtype) for p in p32]
        masters = None if dtype == F32 else [p.clone() for p in p32]
        accs, m = _randn(sizes, device, scale=1e-3), _randn(sizes, device, scale=1e-4)
        v = [t.abs() for t in _randn(sizes, device, scale=1e-4)]
        steps = [torch.full((), 5.0, device=device) for _ in sizes]
        cases.append(("sgd_step", dtype, lambda b, p=params, a=accs, m=m, s=steps, ms=masters:
                      b.sgd_step(p, a, m, s, ms, lr=1e-3, momentum=0.9, dampening=0.0,
                                 weight_decay=0.0, nesterov=False, maximize=False, grad_scale=1.0,
                                 found_inf=found)))
        cases.append(("adam_step", dtype, lambda b, p=params, a=accs, m=m, v=v, s=steps, ms=masters:
                      b.adam_step(p, a, m, v, None, s, ms, lr=1e-4, beta1=0.9, beta2=0.999,
                                  eps=1e-8, weight_decay=0.01, amsgrad=False, maximize=False,
                                  decoupled_weight_decay=True, grad_scale=1.0, found_inf=found)))
    return cases


def tune(device: torch.device, size_mb: float, repeats: int,
         candidates: tuple[configs.Config, ...] = configs.CANDIDATES) -> dict:
    """The tuning entry of ``device``: the fastest config per op and dtype, and every timing."""
    backend = kernels.get_backend("triton", device)
    sizes = _sizes(size_mb)
    chosen: dict[str, dict] = {}
    timings: list[dict] = []
    for op, dtype, fn in _cases(sizes, device):
        progress(f"tune: {op} {configs.dtype_key(dtype)}, {size_mb} MB")

        def timed(config, fn=fn):
            def run():
                with configs.forced(config):
                    fn(backend)
            return run

        result = time_interleaved({c: timed(c) for c in candidates}, device, repeats)
        best = min(result, key=lambda c: result[c].median)
        chosen.setdefault(op, {})[configs.dtype_key(dtype)] = asdict(best)
        timings += [dict(op=op, dtype=configs.dtype_key(dtype), **asdict(c),
                         time_s=t.median, best=c == best) for c, t in result.items()]
    return {"configs": chosen, "bucket_mb": size_mb, "machine": machine(device), "timings": timings}


def write(entry: dict, device: torch.device, path: Path = configs.TUNED_FILE) -> None:
    """Stores ``entry`` under the device's name, keeping other devices' entries."""
    table = configs.read(path)
    table[configs.device_key(device)] = entry
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
