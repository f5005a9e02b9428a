"""Op level: each op of each available backend against torch's nearest equivalent.

Bytes per element follow DESIGN.md §5 (each input read once, each output written once).  The
torch side of each case is what a plain-PyTorch user runs for the same job.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import kernels
from .harness import progress, ratio_fields, time_interleaved

F32 = torch.float32
HYPER_ADAM = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, amsgrad=False, maximize=False)


@dataclass
class OpCase:
    op: str
    variant: str
    bytes_ours: int            # per element
    bytes_torch: int
    torch_runs: str            # what the baseline does, in words
    setup: Callable[[int, torch.device], dict]
    ours: Callable[[object, dict], None]
    torch_fn: Callable[[dict], None]


def _randn(n, device, dtype=F32, scale=1.0):
    return (torch.randn(n, device=device) * scale).to(dtype)


def _scalars(device):
    return dict(w=torch.ones((), device=device), found=torch.zeros((), device=device),
                sumsq=torch.zeros((), device=device), scale=torch.full((), 0.125, device=device))


def _acc_setup(grad_dtype):
    def setup(n, device):
        return dict(g=_randn(n, device, grad_dtype), acc=_randn(n, device), **_scalars(device))
    return setup


def _step_setup(param_dtype, master):
    def setup(n, device):
        p32 = _randn(n, device)
        return dict(p=p32.to(param_dtype), master=p32.clone() if master else None,
                    acc=_randn(n, device, scale=1e-3), m=_randn(n, device, scale=1e-4),
                    v=_randn(n, device, scale=1e-4).abs(), buf=_randn(n, device, scale=1e-3),
                    step=torch.full((), 5.0, device=device), torch_step=torch.full((), 5.0, device=device),
                    **_scalars(device))
    return setup


def _adam(backend, d):
    backend.adam_step([d["p"]], [d["acc"]], [d["m"]], [d["v"]], None, [d["step"]],
                      [d["master"]] if d["master"] is not None else None, lr=1e-3,
                      decoupled_weight_decay=True, grad_scale=1.0, found_inf=d["found"], **HYPER_ADAM)


def _torch_adamw(d):
    target = d["master"] if d["master"] is not None else d["p"]
    torch._fused_adamw_([target], [d["acc"]], [d["m"]], [d["v"]], [], [d["torch_step"]], lr=1e-3,
                        **HYPER_ADAM)
    if d["master"] is not None:
        d["p"].copy_(d["master"])


CASES = [
    OpCase("accumulate", "bf16 grad, later micro-batch", 10, 10, "acc.add_(g)", _acc_setup(torch.bfloat16),
           lambda b, d: b.accumulate([d["g"]], [d["acc"]], [False], d["w"], d["found"], None),
           lambda d: d["acc"].add_(d["g"])),
    OpCase("accumulate", "bf16 grad, first micro-batch", 6, 6, "acc.copy_(g)", _acc_setup(torch.bfloat16),
           lambda b, d: b.accumulate([d["g"]], [d["acc"]], [True], d["w"], d["found"], None),
           lambda d: d["acc"].copy_(d["g"])),
    OpCase("accumulate", "bf16 grad, last micro-batch + norm", 10, 14,
           "acc.add_(g); vector_norm(acc)", _acc_setup(torch.bfloat16),
           lambda b, d: b.accumulate([d["g"]], [d["acc"]], [False], d["w"], d["found"], d["sumsq"]),
           lambda d: (d["acc"].add_(d["g"]), torch.linalg.vector_norm(d["acc"]))),
    OpCase("accumulate", "fp32 grad, later micro-batch", 12, 12, "acc.add_(g)", _acc_setup(F32),
           lambda b, d: b.accumulate([d["g"]], [d["acc"]], [False], d["w"], d["found"], None),
           lambda d: d["acc"].add_(d["g"])),
    OpCase("norm", "fp32", 4, 4, "vector_norm(acc)", _acc_setup(F32),
           lambda b, d: b.norm([d["acc"]], d["sumsq"]),
           lambda d: torch.linalg.vector_norm(d["acc"])),
    OpCase("sgd_step", "fp32, momentum", 20, 20, "torch._fused_sgd_", _step_setup(F32, False),
           lambda b, d: b.sgd_step([d["p"]], [d["acc"]], [d["buf"]], [d["step"]], None, lr=1e-2,
                                   momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
                                   maximize=False, grad_scale=1.0, found_inf=d["found"]),
           lambda d: torch._fused_sgd_([d["p"]], [d["acc"]], [d["buf"]], weight_decay=0.0,
                                       momentum=0.9, lr=1e-2, dampening=0.0, nesterov=False,
                                       maximize=False, is_first_step=False)),
    OpCase("adam_step", "fp32 AdamW", 28, 28, "torch._fused_adamw_", _step_setup(F32, False),
           _adam, _torch_adamw),
    # ours: the fp32 master in and out, and the parameter read (was it written since the last
    # step?) and written: 32 bytes; torch's copy-back reads the master again instead
    OpCase("adam_step", "bf16 param, fp32 master AdamW", 32, 34,
           "torch._fused_adamw_ on the master; param.copy_(master)",
           _step_setup(torch.bfloat16, True), _adam, _torch_adamw),
]


def backends_for(device: torch.device) -> list[str]:
    return [n for n in kernels.backend_names()
            if kernels.availability(n, device)[0] and not kernels.interpreted(n)]


def run(device: torch.device, sizes_mb: list[int], repeats: int, copy_bw: float,
        backends: list[str] | None = None,
        emit: Callable[[str, list[dict]], None] | None = None) -> list[dict]:
    """One row per (case, size, contender); ``emit(case, rows)`` as each case and size is done."""
    rows = []
    backends = backends or backends_for(device)
    for case in CASES:
        for size_mb in sizes_mb:
            n = size_mb * 2**20 // 4
            progress(f"ops: {case.op} ({case.variant}), {size_mb} MB")
            data = case.setup(n, device)
            contenders = {"torch": lambda: case.torch_fn(data)}
            for name in backends:
                backend = kernels.get_backend(name, device)
                contenders[f"fused_accum:{name}"] = lambda b=backend: case.ours(b, data)
            timings = time_interleaved(contenders, device, repeats)
            base = timings["torch"]
            case_rows = []
            for contender, t in timings.items():
                nbytes = n * (case.bytes_torch if contender == "torch" else case.bytes_ours)
                case_rows.append(dict(
                    op=case.op, variant=case.variant, size_mb=size_mb, elements=n,
                    contender=contender, runs=case.torch_runs if contender == "torch" else contender,
                    bytes=nbytes, time_s=t.median, time_p10_s=t.p10, time_p90_s=t.p90,
                    repeats=repeats, gb_per_s=nbytes / t.median / 1e9,
                    fraction_of_copy=nbytes / t.median / copy_bw,
                    **ratio_fields("time_vs_torch", t, base, contender == "torch")))
            rows += case_rows
            if emit is not None:
                emit(f"{case.op} ({case.variant}), {size_mb} MB", case_rows)
            del data
    return rows
