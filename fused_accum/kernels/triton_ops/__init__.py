"""The ``triton`` backend: the op set as Triton kernels (see ``accumulate_kernels.py``,
``step_kernels.py`` and ``linear_kernels.py``; ``accumulate_linear`` runs the library's GEMM unless
``FUSED_ACCUM_LINEAR_GEMM=triton``).

Same contract as :mod:`fused_accum.kernels.reference`.  Each op launches once per group of
tensors sharing a dtype and alignment (see ``launch.py``), with every value that may change
between calls read on the device.  On CPU tensors the kernels run only under Triton's interpreter
(``TRITON_INTERPRET=1`` when Triton is first imported); that is how CI tests them.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
from torch import Tensor

from .._adapt import contiguous, contiguous_inputs, scalar, write_back
from .. import gemm
from . import configs, launch
from .accumulate_kernels import accumulate_kernel, add_partials_kernel, norm_kernel
from .linear_kernels import accumulate_linear_kernel
from .common import COMPACT_MASTER, FP32_MASTER, NO_MASTER, TL_DTYPES
from .step_kernels import adam_kernel, increment_steps_kernel, sgd_kernel

name = "triton"


def interpreted() -> bool:
    """Whether the kernels were built for Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(accumulate_kernel, InterpretedFunction)


def available(device: torch.device) -> tuple[bool, str]:
    device = torch.device(device)
    if interpreted():
        return True, f"Triton {triton.__version__} interpreter (TRITON_INTERPRET=1): for tests, slow"
    if device.type != "cuda":
        return False, (f"Triton compiles for GPUs; on {device.type} tensors it runs only under its "
                       "interpreter (TRITON_INTERPRET=1, set before Triton is imported)")
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, f"needs compute capability 8.0 or newer (bfloat16); the device has {major}.{minor}"
    tuned = "measured block sizes" if configs.measured(device) else "untuned block sizes"
    return True, f"Triton {triton.__version__} kernels, {tuned}"


def _on_tensors_device(lists_at: int):
    """Run the op with the device of its ``lists_at``-th argument's tensors current: Triton
    launches (and the tables upload) on the current device's current stream."""
    def wrap(op):
        @functools.wraps(op)
        def guarded(*args, **kwargs):
            tensors = args[lists_at]
            if not tensors:
                return op(*args, **kwargs)
            with launch.on_device(tensors[0].device):
                return op(*args, **kwargs)
        return guarded
    return wrap


def _launch(kernel, programs: int, config: configs.Config, *args, **constexprs) -> None:
    # No fused multiply-adds: the kernels round every product as the reference does.
    kernel[(programs,)](*args, BLOCK=config.block, num_warps=config.num_warps,
                        enable_fp_fusion=False, **constexprs)


_FINISH = configs.Config(block=1024, num_warps=4)
_STEPS = configs.Config(block=128, num_warps=4)


def _check_lists(op: str, first: list[Tensor], **lists: list[Tensor] | None) -> None:
    for what, lst in lists.items():
        if lst is None:
            continue
        if len(lst) != len(first):
            raise ValueError(f"fused_accum.{op}: {what} has {len(lst)} tensors, expected {len(first)}")
        for i, (t, ref) in enumerate(zip(lst, first)):
            if t.numel() != ref.numel() or t.device != ref.device:
                raise ValueError(f"fused_accum.{op}: {what}[{i}] has {t.numel()} elements on "
                                 f"{t.device}, expected {ref.numel()} on {ref.device}")
            if not t.is_contiguous():
                raise ValueError(f"fused_accum.{op}: {what}[{i}] must be contiguous")


def _check_dtypes(op: str, what: str, tensors: list[Tensor], allowed) -> None:
    for i, t in enumerate(tensors):
        if t.dtype not in allowed:
            raise TypeError(f"fused_accum.{op}: {what}[{i}] is {t.dtype}; expected one of "
                            f"{sorted(str(d) for d in allowed)}")


_FP32 = (torch.float32,)


def _plans(op: str, addresses: list[list[int] | None], dtype_of: list[Tensor],
           numels: list[int], device: torch.device) -> list[tuple]:
    """(group, config, program map, number of programs) for each launch of ``op``."""
    plans = []
    for group in launch.groups(addresses, dtype_of):
        config = configs.lookup(op, group.dtype, device)
        pmap, programs = launch.program_map([numels[i] for i in group.indices], config.block, device)
        plans.append((group, config, pmap, programs))
    return plans


@_on_tensors_device(1)
def accumulate(grads, accs, first, weight, found_inf, sumsq=None) -> None:
    if not accs:
        return
    grads = contiguous_inputs(grads)
    _check_lists("accumulate", accs, grads=grads)
    _check_dtypes("accumulate", "grads", grads, TL_DTYPES)
    _check_dtypes("accumulate", "accs", accs, _FP32)
    if len(first) != len(accs):
        raise ValueError("fused_accum.accumulate: one first flag per tensor")
    device = accs[0].device
    weight = scalar(weight, accs[0])
    numels = [a.numel() for a in accs]
    first = [bool(f) for f in first]
    addresses = launch.addresses([grads, accs])
    plans = [p for p in _plans("accumulate", addresses, grads, numels, device) if p[3]]
    partial = torch.empty(sum(p[3] for p in plans) if sumsq is not None else 1,
                          dtype=torch.float32, device=device)
    base = 0
    for group, config, pmap, programs in plans:
        ptrs = launch.pointer_table(addresses, group, device, [numels, first])
        _launch(accumulate_kernel, programs, config, ptrs, pmap, len(group.indices), weight,
                found_inf, partial[base:] if sumsq is not None else partial,
                G=TL_DTYPES[group.dtype], ALIGNED=group.aligned, SUMSQ=sumsq is not None)
        base += programs if sumsq is not None else 0
    if sumsq is not None and base:
        _launch(add_partials_kernel, 1, _FINISH, partial, base, sumsq)


@_on_tensors_device(0)
def norm(accs, sumsq) -> None:
    if not accs:
        return
    _check_lists("norm", accs)
    _check_dtypes("norm", "accs", accs, _FP32)
    device = accs[0].device
    numels = [a.numel() for a in accs]
    addresses = launch.addresses([accs])
    plans = [p for p in _plans("norm", addresses, accs, numels, device) if p[3]]
    partial = torch.empty(max(1, sum(p[3] for p in plans)), dtype=torch.float32, device=device)
    base = 0
    for group, config, pmap, programs in plans:
        ptrs = launch.pointer_table(addresses, group, device, [numels])
        _launch(norm_kernel, programs, config, ptrs, pmap, len(group.indices), partial[base:],
                ALIGNED=group.aligned)
        base += programs
    if base:
        _launch(add_partials_kernel, 1, _FINISH, partial, base, sumsq)


# The Triton GEMM of accumulate_linear is chosen by this variable ("triton"; by default the
# library's GEMM, gemm.py) until a GPU measurement picks between them (issue #20).
LINEAR_GEMM_ENV = "FUSED_ACCUM_LINEAR_GEMM"
_LINEAR_BLOCKS = dict(BLOCK_OUT=64, BLOCK_IN=64, BLOCK_ROWS=32)
_LINEAR_WARPS = 4


def linear_gemm() -> str:
    """Which GEMM ``accumulate_linear`` runs: "library" (default) or "triton"."""
    choice = os.environ.get(LINEAR_GEMM_ENV, "library")
    if choice not in ("library", "triton"):
        raise ValueError(f"{LINEAR_GEMM_ENV}={choice!r}: expected 'library' or 'triton'")
    return choice


def accumulate_linear(grad_outputs, inputs, accs, first, weight, sumsq=None) -> None:
    if linear_gemm() == "library":
        gemm.accumulate_linear(grad_outputs, inputs, accs, first, weight, sumsq)
    else:
        triton_accumulate_linear(grad_outputs, inputs, accs, first, weight, sumsq)


@_on_tensors_device(2)
def triton_accumulate_linear(grad_outputs, inputs, accs, first, weight, sumsq=None) -> None:
    """One Triton GEMM per (grad_output, input, acc) triple (see ``linear_kernels.py``)."""
    if not accs:
        return
    if not (len(grad_outputs) == len(inputs) == len(accs) == len(first)):
        raise ValueError("fused_accum.accumulate_linear: grad_outputs, inputs, accs and first "
                         "must have one entry per weight")
    _check_dtypes("accumulate_linear", "accs", accs, _FP32)
    _check_dtypes("accumulate_linear", "grad_outputs", grad_outputs, TL_DTYPES)
    _check_dtypes("accumulate_linear", "inputs", inputs, TL_DTYPES)
    device = accs[0].device
    for i, (g, x, acc) in enumerate(zip(grad_outputs, inputs, accs)):
        if (g.dim() != 2 or x.dim() != 2 or g.shape[0] != x.shape[0]
                or tuple(acc.shape) != (g.shape[1], x.shape[1]) or g.dtype != x.dtype):
            raise ValueError(f"fused_accum.accumulate_linear: triple {i} does not fit: "
                             f"grad_output {tuple(g.shape)} {g.dtype}, input {tuple(x.shape)} "
                             f"{x.dtype}, acc {tuple(acc.shape)} (expected rows x out, rows x in "
                             "of one dtype, out x in)")
        if g.device != device or x.device != device or acc.device != device:
            raise ValueError(f"fused_accum.accumulate_linear: triple {i} is not all on {device}")
        if acc.numel() > 1 and 0 in acc.stride():
            raise ValueError(f"fused_accum.accumulate_linear: accs[{i}] is expanded (a stride of "
                             "0): its elements would be written more than once")
    grids = [(triton.cdiv(acc.shape[0], _LINEAR_BLOCKS["BLOCK_OUT"]),
              triton.cdiv(acc.shape[1], _LINEAR_BLOCKS["BLOCK_IN"])) for acc in accs]
    like = accs[0]
    weight_arg = scalar(weight, like) if weight is not None else like   # (unread without weight)
    tiles = [rows * cols for rows, cols in grids]
    partial = torch.empty(max(1, sum(tiles)) if sumsq is not None else 1, dtype=torch.float32,
                          device=device)
    base = 0
    for g, x, acc, is_first, grid, count in zip(grad_outputs, inputs, accs, first, grids, tiles):
        if count == 0:
            continue
        accumulate_linear_kernel[grid](
            g, x, acc, weight_arg, partial[base:] if sumsq is not None else partial, g.shape[0],
            acc.shape[0], acc.shape[1], g.stride(0), g.stride(1), x.stride(0), x.stride(1),
            acc.stride(0), acc.stride(1), FIRST=bool(is_first), HAS_WEIGHT=weight is not None,
            FOLD=sumsq is not None, WIDEN=g.dtype == torch.float32 or interpreted(),
            num_warps=_LINEAR_WARPS, enable_fp_fusion=False, **_LINEAR_BLOCKS)
        base += count if sumsq is not None else 0
    if sumsq is not None and base:
        _launch(add_partials_kernel, 1, _FINISH, partial, base, sumsq)


def _master_kind(params: list[Tensor], masters: list[Tensor] | None, op: str) -> int:
    if not masters:
        return NO_MASTER
    if all(m.dtype == torch.float32 for m in masters):
        return FP32_MASTER
    if all(m.dtype == torch.int16 and p.dtype == torch.bfloat16 for p, m in zip(params, masters)):
        return COMPACT_MASTER
    raise TypeError(f"fused_accum.{op}: masters must all be float32, or all int16 remainders of "
                    "bfloat16 parameters (compact masters)")


def _steps(op: str, kernel, element_lists: dict[str, list[Tensor] | None], steps, masters,
           rounding_seed: int, found_inf: Tensor, scalars: tuple, **constexprs) -> None:
    """Launches ``kernel`` per (dtype, alignment) group of the parameters, then increments the
    groups' step counts.  ``element_lists`` maps names to the lists of the kernel's table, in
    order, starting with params and accs; masters and steps follow them."""
    params = element_lists["params"]
    _check_dtypes(op, "params", params, TL_DTYPES)
    _check_lists(op, params, **element_lists, masters=masters)
    if len(steps) != len(params):
        raise ValueError(f"fused_accum.{op}: one step count per tensor")
    _check_dtypes(op, "steps", steps, _FP32)
    master = _master_kind(params, masters, op)
    device = params[0].device
    elements = launch.addresses(list(element_lists.values()) + [masters])
    step_addresses = launch.addresses([steps])
    numels = [p.numel() for p in params]
    positions = list(range(len(params)))
    scalars = tuple(float(s) if isinstance(s, (int, float)) else s for s in scalars)
    for group, config, pmap, programs in _plans(op, elements, params, numels, device):
        ptrs = launch.pointer_table(elements + step_addresses, group, device, [numels, positions])
        stochastic = rounding_seed >= 0 and master == NO_MASTER and group.dtype == torch.bfloat16
        if programs:
            _launch(kernel, programs, config, ptrs, pmap, len(group.indices), *scalars,
                    rounding_seed & 0xFFFFFFFF, P=TL_DTYPES[group.dtype], MASTER=master,
                    STOCHASTIC=stochastic, ALIGNED=group.aligned, **constexprs)
        count = len(group.indices)
        _launch(increment_steps_kernel, triton.cdiv(count, _STEPS.block), _STEPS, ptrs,
                len(elements), count, found_inf)


@_on_tensors_device(0)
def sgd_step(params, accs, momentum_buffers, steps, masters, *, lr, momentum, dampening,
             weight_decay, nesterov, maximize, grad_scale, found_inf, rounding_seed=-1) -> None:
    if not params:
        return
    if momentum != 0 and not momentum_buffers:
        raise ValueError("fused_accum.sgd_step: momentum != 0 needs momentum_buffers")
    params, pending = contiguous(params)
    buffers = momentum_buffers if momentum != 0 else None
    _steps("sgd_step", sgd_kernel,
           dict(params=params, accs=accs, momentum_buffers=buffers), steps, masters, rounding_seed,
           found_inf, (scalar(lr, accs[0]), scalar(grad_scale, accs[0]), found_inf,
                       _fp32(momentum), _fp32(1.0 - dampening), _fp32(weight_decay)),
           HAS_BUF=buffers is not None, NESTEROV=nesterov, MAXIMIZE=maximize,
           DECAY=weight_decay != 0)
    write_back(pending)


def _fp32(value: float) -> float:
    """A hyper-parameter as the fp32 number the compiled kernel receives; rounded here so that
    Triton's interpreter, which would keep the float64, computes with the same value."""
    return float(torch.tensor(value, dtype=torch.float32))


def _split(value: float) -> tuple[float, float]:
    """A float64 as the sum of two fp32 values (about 48 significant bits)."""
    hi = float(torch.tensor(value, dtype=torch.float32))
    return hi, value - hi


@_on_tensors_device(0)
def adam_step(params, accs, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, masters, *, lr, beta1,
              beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_scale,
              found_inf, rounding_seed=-1) -> None:
    if not params:
        return
    if amsgrad and not max_exp_avg_sqs:
        raise ValueError("fused_accum.adam_step: amsgrad needs max_exp_avg_sqs")
    params, pending = contiguous(params)
    vmax = max_exp_avg_sqs if amsgrad else None
    beta1_hi, beta1_lo = _split(beta1)
    beta2_hi, beta2_lo = _split(beta2)
    _steps("adam_step", adam_kernel,
           dict(params=params, accs=accs, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                max_exp_avg_sqs=vmax), steps, masters, rounding_seed, found_inf,
           (scalar(lr, accs[0]), scalar(grad_scale, accs[0]), found_inf, _fp32(1.0 - beta1),
            _fp32(beta2), _fp32(1.0 - beta2), beta1_hi, beta1_lo, beta2_hi, beta2_lo, _fp32(eps),
            _fp32(weight_decay)),
           AMSGRAD=amsgrad, MAXIMIZE=maximize, DECAY=weight_decay != 0,
           DECOUPLED=decoupled_weight_decay)
    write_back(pending)
