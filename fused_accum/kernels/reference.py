"""The ``reference`` backend: pure torch, the executable specification of every op.

Every other backend is tested against these functions.  Each op mutates its outputs in place and
never synchronises with the host: values that may change between calls (weights, flags, the clip
coefficient) arrive as device tensors, and a skipped step is expressed with ``torch.where`` rather
than a Python ``if``.

Tensor lists are pairwise of equal shape (the ``torch._foreach`` convention): ``accs[i]`` is the
fp32 accumulator slice of ``params[i]`` viewed with the parameter's shape.

Rounding is part of the specification, so that every backend gives the same bits: each
operation below is one torch op on fp32 tensors with fp32 scalars, rounded once (no fused
multiply-add: ``a.add(b, alpha=c)`` and ``lerp`` are spelled out, since torch's CPU kernels fuse
them), square roots are correctly rounded, and the hyper-parameters enter as the fp32 values the
kernels receive (``lr``, the weight decay), with the bias corrections and the decoupled decay
factor computed in float64 from them.
"""
from __future__ import annotations

import torch
from torch import Tensor

Scalar = float | Tensor

name = "reference"


def available(device: torch.device) -> tuple[bool, str]:
    return True, "pure torch; runs on every device"


def accumulate(grads: list[Tensor], accs: list[Tensor], first: list[bool], weight: Tensor,
               found_inf: Tensor, sumsq: Tensor | None = None) -> None:
    """acc = (first ? 0 : acc) + weight * float(grad), for each pair.

    ``found_inf`` (fp32 scalar) becomes 1 if any written accumulator element is not finite, which
    covers non-finite gradients and fp32 overflow of the sum alike.  With ``sumsq`` (fp32 scalar),
    the sum of squares of the written accumulators is added to it; the optimizer asks for this in
    the last micro-batch of a window so that clipping needs no extra pass.
    """
    for g, acc, is_first in zip(grads, accs, first):
        contribution = g.to(torch.float32) * weight
        if is_first:
            acc.copy_(contribution)
        else:
            acc.add_(contribution)
        found_inf.copy_(torch.maximum(found_inf, (~torch.isfinite(acc)).any().to(torch.float32)))
        if sumsq is not None:
            sumsq.add_(acc.square().sum())


def accumulate_linear(grad_outputs: list[Tensor], inputs: list[Tensor], accs: list[Tensor],
                      first: list[bool], weight: Tensor | None, sumsq: Tensor | None = None) -> None:
    """acc = (first ? 0 : acc) + weight * (float(grad_output)^T @ float(input)), for each triple:
    the weight gradient of ``nn.Linear`` (``grad_output``: rows x out, ``input``: rows x in, ``acc``:
    out x in) accumulated without a gradient tensor in the model's dtype.  ``weight`` None is 1.

    No non-finite flag: a non-finite product or an fp32 overflow of the sum stays non-finite in
    the accumulator (inf and NaN absorb later adds), and the window's norm, which reads every
    accumulator at its end, skips such a window (as it does for adopted first gradients).
    ``sumsq`` as in :func:`accumulate`.
    """
    for g, x, acc, is_first in zip(grad_outputs, inputs, accs, first):
        product = g.to(torch.float32).t() @ x.to(torch.float32)
        if weight is not None:
            product = product * weight
        if is_first:
            acc.copy_(product)
        else:
            acc.add_(product)
        if sumsq is not None:
            sumsq.add_(acc.square().sum())


def norm(accs: list[Tensor], sumsq: Tensor) -> None:
    """sumsq += sum of squares of every accumulator (fp32)."""
    for acc in accs:
        sumsq.add_(acc.square().sum())


# Compact masters: a bf16 parameter p and an int16 remainder r hold an fp32 master u exactly, as
# bits: u = (p << 16) + r.  p is u rounded to nearest with ties away from zero: round-to-nearest-
# even cannot be split losslessly (an even bf16 value has 65537 fp32 values rounding to it), and
# rounding ties away keeps r within [-2^15, 2^15).  p differs from an RNE cast only at exact ties.
# A NaN master is held as torch's bf16 NaN, 0x7FC0, with remainder 0 (its payload is dropped):
# split as bits, a NaN could carry into the sign bit or past bit 31 and leave a parameter of +-0
# or +-inf that hides it (0x7FFFFFFF, CUDA's NaN, would split into -0.0 and -1).  So a step
# never writes a pair whose bits (p << 16) + r are a NaN unless p is NaN, and it rounds no finite
# value across the sign bit: the rounding below carries at most into the exponent (the largest
# finite masters, 0x7F7F8000 and up, round to +-inf with a negative remainder).
#
# The rule for parameters written since the last step (load_state_dict, an initialiser, clamp_):
# a pair is read as its master u = (p << 16) + r only if u rounds back to p (as split_master
# rounds it, NaN to 0x7FC0); otherwise p was written and the master is p itself, u = p << 16, its
# remainder dropped.  Every pair a step writes passes (in 32-bit arithmetic, the rounding of
# (p << 16) + r for r in [-2^15, 2^15) is p; a NaN u is written as (0x7FC0, 0)), so only a write
# fails it: +-0 over a negative remainder and +-inf over a positive
# one, whose bits are NaN patterns (a zero bias from LayerNorm.reset_parameters() would otherwise
# read as a NaN master, and split back into a zero parameter that never trains again), and NaN
# parameters other than 0x7FC0 (whose master is NaN either way).  Any other written value w keeps
# its stale remainder: the master is w plus less than half of w's ulp, which rounds to w.

_CANONICAL_NAN = 0x7FC00000   # the fp32 bits of a NaN master: bf16 0x7FC0, remainder 0


def _bits(x: Tensor) -> Tensor:
    """The fp32 bit pattern of ``x`` as an int64 in [0, 2^32)."""
    return x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def _as_fp32(u: Tensor, shape: torch.Size) -> Tensor:
    """fp32 values of bit patterns held as int64 in [0, 2^32)."""
    return torch.where(u >= 2**31, u - 2**32, u).to(torch.int32).view(torch.float32).view(shape)


def _canonical(u: Tensor) -> Tensor:
    """fp32 bits ``u`` (int64), with every NaN as the NaN a compact master holds."""
    return torch.where((u & 0x7FFFFFFF) > 0x7F800000, _CANONICAL_NAN, u)


def _high(u: Tensor) -> Tensor:
    """The bf16 bits (int64 in [0, 2^16)) that hold fp32 bits ``u``: rounded to nearest, ties away
    from zero; a NaN as 0x7FC0.  Past the NaNs, u + 0x8000 carries neither into the sign bit nor
    past bit 31."""
    return ((_canonical(u) + 0x8000) >> 16) & 0xFFFF


def compact_master(param: Tensor, remainder: Tensor) -> Tensor:
    """The fp32 master that a bf16 parameter and its int16 remainder hold: bits (p << 16) + r,
    unless they do not round back to p, the parameter having been written since (then p)."""
    high = param.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    u = ((high << 16) + remainder.to(torch.int64)) & 0xFFFFFFFF
    u = torch.where(_high(u) == high, u, high << 16)
    return _as_fp32(u, param.shape)


def split_master(master: Tensor) -> tuple[Tensor, Tensor]:
    """(bf16 bits as int16, int16 remainder) of an fp32 master (a NaN as 0x7FC0 and 0)."""
    u = _canonical(_bits(master))
    high = _high(u)
    remainder = u - (high << 16)   # in [-2^15, 2^15): no carry past bit 31 to undo
    high = torch.where(high >= 2**15, high - 2**16, high)
    return high.to(torch.int16).view(master.shape), remainder.to(torch.int16).view(master.shape)


# Stochastic rounding of an fp32 update into a bf16 parameter (no master): bits = (u + r) >> 16
# with r uniform in [0, 2^16), so the expected result is the fp32 value.  r comes from a counter-
# based hash of (seed, the tensor's step count before this step, its position in the call, the
# element index): different at every step, the same in every backend, no host synchronisation.
_M32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """lowbias32 (C. Wellons) on uint32 values held in int64."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def rounding_bits(seed: int, step: Tensor, tensor_id: int, numel: int) -> Tensor:
    """The 16 random bits each element of a tensor adds before truncation."""
    key = _mix32((seed + 0x9E3779B9 * (step.to(torch.int64) + 1) + 0x85EBCA6B * tensor_id) & _M32)
    index = torch.arange(numel, device=step.device, dtype=torch.int64) & _M32
    return _mix32(key ^ index) & 0xFFFF


def stochastic_round_bf16(value: Tensor, bits16: Tensor) -> Tensor:
    u = _bits(value).view(-1)
    high = ((u + bits16) >> 16) & 0xFFFF
    high = torch.where(torch.isnan(value.view(-1)), 0x7FC0, high)
    high = torch.where(high >= 2**15, high - 2**16, high)
    return high.to(torch.int16).view(torch.bfloat16).view(value.shape)


def _fp32(value: Scalar) -> Scalar:
    """``value`` as the fp32 number the kernels receive (a tensor stays on its device)."""
    if isinstance(value, Tensor):
        return value.to(torch.float32)
    return float(torch.tensor(value, dtype=torch.float32))


def _sqrt(x: Tensor) -> Tensor:
    """The correctly rounded fp32 square root (IEEE's sqrt, as CUDA's sqrtf, C++'s std::sqrt and
    Triton's sqrt_rn give it).  torch's vectorized CPU sqrt is off by an ulp for about one fp32
    element in six; through float64 the one rounding to fp32 is exact."""
    return x.to(torch.float64).sqrt().to(torch.float32)


def _rounding(param: Tensor, master: Tensor | None, seed: int, step: Tensor,
              tensor_id: int) -> Tensor | None:
    if seed < 0 or master is not None or param.dtype != torch.bfloat16:
        return None
    return rounding_bits(seed, step, tensor_id, param.numel())


def _stored_bits(x: Tensor) -> Tensor:
    """The bit pattern of each element of a float tensor, as integers of its width."""
    return x.view({2: torch.int16, 4: torch.int32}[x.element_size()])


def _load_fp32(param: Tensor, master: Tensor | None) -> Tensor:
    """The fp32 value a step updates (a new tensor).

    Without a master it is the parameter; a compact master is the parameter's bits above its
    remainder, unless they do not round back to the parameter (written since, see
    ``compact_master``: then the parameter).  An fp32 master is the value only while the
    parameter still holds what the last step wrote to it, the master rounded to the parameter's
    dtype: an element whose bits differ was written since (``load_state_dict``, an initialiser,
    ``clamp_``), and the written value is the one updated, its master forgotten.
    """
    if master is None:
        return param.to(torch.float32, copy=True)
    if master.dtype == torch.int16:
        return compact_master(param, master)
    written = _stored_bits(param) != _stored_bits(master.to(param.dtype))
    return torch.where(written, param.to(torch.float32), master)


def _store(updated: Tensor, param: Tensor, master: Tensor | None, keep: Tensor,
           rounding: Tensor | None = None) -> None:
    """Write the fp32 result to the master (if any) and the parameter, unless ``keep`` says skip.
    ``rounding``: random bits for stochastic rounding of a bf16 parameter without a master."""
    if master is None:
        cast = updated.to(param.dtype) if rounding is None else stochastic_round_bf16(updated, rounding)
        param.copy_(torch.where(keep, param, cast))
    elif master.dtype == torch.int16:   # a skipped step keeps the pair's bits, even a written one's
        high, remainder = split_master(updated)
        param.view(torch.int16).copy_(torch.where(keep, param.view(torch.int16), high))
        master.copy_(torch.where(keep, master, remainder))
    else:
        master.copy_(torch.where(keep, master, updated))
        param.copy_(torch.where(keep, param, updated.to(param.dtype)))


def sgd_step(params: list[Tensor], accs: list[Tensor], momentum_buffers: list[Tensor] | None,
             steps: list[Tensor], masters: list[Tensor] | None, *, lr: Scalar, momentum: float,
             dampening: float, weight_decay: float, nesterov: bool, maximize: bool,
             grad_scale: Scalar, found_inf: Tensor, rounding_seed: int = -1) -> None:
    """One SGD step of ``torch.optim.SGD`` on grad = acc * grad_scale (grad_scale = clip / W).

    ``steps[i]`` counts the steps taken by parameter i; at 0 the momentum buffer starts as the
    gradient itself, as torch does for a missing buffer.  Computed in fp32 whatever the parameter
    dtype; ``masters[i]``, when given, holds the value updated: an fp32 master (the parameter is
    rewritten from it by a cast; an element written since the last step is taken from the
    parameter instead, see ``_load_fp32``), or for bf16 parameters an int16 remainder (compact
    masters, see ``compact_master``).  Without masters, ``rounding_seed >= 0`` rounds bf16 parameters
    stochastically (see ``rounding_bits``).  Nothing changes where ``found_inf`` is non-zero.
    """
    keep = found_inf != 0
    for i, (param, acc, step) in enumerate(zip(params, accs, steps)):
        master = masters[i] if masters is not None else None
        p32 = _load_fp32(param, master)
        grad = acc * grad_scale
        if maximize:
            grad = -grad
        if weight_decay != 0:
            grad = grad + _fp32(weight_decay) * p32
        if momentum != 0:
            buf = momentum_buffers[i]
            new_buf = torch.where(step == 0, grad, buf * momentum + grad * (1 - dampening))
            buf.copy_(torch.where(keep, buf, new_buf))
            grad = grad + _fp32(momentum) * new_buf if nesterov else new_buf
        p32.sub_(grad * lr)
        _store(p32, param, master, keep, _rounding(param, master, rounding_seed, step, i))
        step.add_(torch.where(keep, 0.0, 1.0))


def adam_step(params: list[Tensor], accs: list[Tensor], exp_avgs: list[Tensor],
              exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor] | None, steps: list[Tensor],
              masters: list[Tensor] | None, *, lr: Scalar, beta1: float, beta2: float, eps: float,
              weight_decay: float, amsgrad: bool, maximize: bool, decoupled_weight_decay: bool,
              grad_scale: Scalar, found_inf: Tensor, rounding_seed: int = -1) -> None:
    """One Adam (``decoupled_weight_decay=False``) or AdamW step of ``torch.optim.Adam``.

    grad = acc * grad_scale.  Bias corrections are computed in float64 from the step count so that
    fp32 rounding of beta**step does not leak into the update.  Same master and skip rules as
    ``sgd_step``.
    """
    keep = found_inf != 0
    w = _fp32(1 - beta1)                 # lerp weight, as an fp32 number
    wd32 = _fp32(weight_decay)
    lr64 = _fp32(lr)
    lr64 = lr64.to(torch.float64) if isinstance(lr64, Tensor) else lr64
    decay = (1 - lr64 * wd32)            # float64, then rounded once to fp32 by mul_
    decay = decay.to(torch.float32) if isinstance(decay, Tensor) else _fp32(decay)
    for i, (param, acc, exp_avg, exp_avg_sq, step) in enumerate(
            zip(params, accs, exp_avgs, exp_avg_sqs, steps)):
        master = masters[i] if masters is not None else None
        p32 = _load_fp32(param, master)
        grad = acc * grad_scale
        if maximize:
            grad = -grad
        new_step = step.to(torch.float64) + 1
        if weight_decay != 0:
            if decoupled_weight_decay:
                p32.mul_(decay)
            else:
                grad = grad + wd32 * p32
        # torch.lerp(exp_avg, grad, w), its two forms spelled out (each op rounded once)
        if w < 0.5:
            new_avg = exp_avg + w * (grad - exp_avg)
        else:
            new_avg = grad - (grad - exp_avg) * (1 - w)
        new_avg_sq = exp_avg_sq * beta2 + grad * grad * (1 - beta2)
        bias_correction1 = 1 - beta1 ** new_step
        bias_correction2_sqrt = (1 - beta2 ** new_step).sqrt()
        step_size = (lr64 / bias_correction1).to(torch.float32)
        if amsgrad:
            new_max = torch.maximum(max_exp_avg_sqs[i], new_avg_sq)
            max_exp_avg_sqs[i].copy_(torch.where(keep, max_exp_avg_sqs[i], new_max))
            second_moment = new_max
        else:
            second_moment = new_avg_sq
        denom = _sqrt(second_moment) / bias_correction2_sqrt.to(torch.float32) + eps
        p32.sub_(step_size * new_avg / denom)
        exp_avg.copy_(torch.where(keep, exp_avg, new_avg))
        exp_avg_sq.copy_(torch.where(keep, exp_avg_sq, new_avg_sq))
        _store(p32, param, master, keep, _rounding(param, master, rounding_seed, step, i))
        step.add_(torch.where(keep, 0.0, 1.0))
