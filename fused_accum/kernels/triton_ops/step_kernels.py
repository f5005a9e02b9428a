"""sgd_step and adam_step as Triton kernels, and the step-count increment that follows them.

Lists in the ``ptrs`` table (see ``launch.py``), SGD: params, accs, momentum_buffers, masters,
steps, then numel and position rows; Adam: params, accs, exp_avgs, exp_avg_sqs,
max_exp_avg_sqs, masters, steps, numel, position.  Every program of a tensor reads its step count
before a separate launch increments it.  A set non-finite flag leaves everything unchanged.
"""
import triton
import triton.language as tl

from .common import load_working, locate, pointer, rounding_key, store_working


@triton.jit
def _power(base, exponent):
    """base ** exponent for a float64 base and an integer exponent in [0, 2^31), by squaring."""
    result = base * 0.0 + 1.0
    for _ in tl.static_range(31):
        result = tl.where((exponent & 1) != 0, result * base, result)
        base = base * base
        exponent = exponent >> 1
    return result


@triton.jit
def _tensor_facts(ptrs, n, t, start, seed, ROW: tl.constexpr, MASTER: tl.constexpr,
                  ALIGNED: tl.constexpr):
    """The rows that close every step table, from row ``ROW``: masters, steps, numel, position.
    Returns (master pointer, step count, numel, stochastic-rounding key)."""
    if MASTER == 2:
        master = pointer(ptrs, ROW, n, t, start, tl.int16, ALIGNED)
    else:
        master = pointer(ptrs, ROW, n, t, start, tl.float32, ALIGNED)
    step = tl.load(tl.load(ptrs + (ROW + 1) * n + t).to(tl.pointer_type(tl.float32)))
    numel = tl.load(ptrs + (ROW + 2) * n + t)
    key = rounding_key(seed, step, tl.load(ptrs + (ROW + 3) * n + t))
    return master, step, numel, key


@triton.jit
def _gradient(acc, offs, mask, scale, MAXIMIZE: tl.constexpr):
    """The window's gradient: the accumulator times grad_scale (1/W times the clip coefficient)."""
    g = tl.load(acc + offs, mask=mask) * scale
    if MAXIMIZE:
        g = -g
    return g


@triton.jit
def _sgd_chunk(param, acc, buf, master, offs, mask, lr, scale, momentum, one_minus_dampening,
               weight_decay, first_step, key, start, MASTER: tl.constexpr, HAS_BUF: tl.constexpr,
               NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, DECAY: tl.constexpr,
               STOCHASTIC: tl.constexpr):
    p = load_working(param, master, offs, mask, MASTER)
    g = _gradient(acc, offs, mask, scale, MAXIMIZE)
    if DECAY:
        g = g + weight_decay * p
    if HAS_BUF:
        if first_step:
            b = g
        else:
            b = momentum * tl.load(buf + offs, mask=mask) + one_minus_dampening * g
        tl.store(buf + offs, b, mask=mask)
        if NESTEROV:
            g = g + momentum * b
        else:
            g = b
    store_working(param, master, offs, mask, p - lr * g, key, start, MASTER, STOCHASTIC)


@triton.jit(do_not_specialize=["seed"])
def sgd_kernel(ptrs, pmap, n, lr_ptr, scale_ptr, found_ptr, momentum, one_minus_dampening,
               weight_decay, seed, P: tl.constexpr, MASTER: tl.constexpr, HAS_BUF: tl.constexpr,
               NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, DECAY: tl.constexpr,
               STOCHASTIC: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    if tl.load(found_ptr) == 0:
        t, start = locate(pmap, BLOCK)
        param = pointer(ptrs, 0, n, t, start, P, ALIGNED)
        acc = pointer(ptrs, 1, n, t, start, tl.float32, ALIGNED)
        buf = pointer(ptrs, 2, n, t, start, tl.float32, ALIGNED)
        master, step, numel, key = _tensor_facts(ptrs, n, t, start, seed, 3, MASTER, ALIGNED)
        lr = tl.load(lr_ptr)
        scale = tl.load(scale_ptr)
        offs = tl.arange(0, BLOCK)
        if start + BLOCK <= numel:
            _sgd_chunk(param, acc, buf, master, offs, None, lr, scale, momentum,
                       one_minus_dampening, weight_decay, step == 0, key, start, MASTER, HAS_BUF,
                       NESTEROV, MAXIMIZE, DECAY, STOCHASTIC)
        else:
            _sgd_chunk(param, acc, buf, master, offs, offs < numel - start, lr, scale, momentum,
                       one_minus_dampening, weight_decay, step == 0, key, start, MASTER, HAS_BUF,
                       NESTEROV, MAXIMIZE, DECAY, STOCHASTIC)


@triton.jit
def _adam_chunk(param, acc, exp_avg, exp_avg_sq, max_exp_avg_sq, master, offs, mask, scale,
                lerp_weight, beta2, one_minus_beta2, eps, weight_decay, decay, step_size,
                bc2_sqrt, key, start, MASTER: tl.constexpr, AMSGRAD: tl.constexpr,
                MAXIMIZE: tl.constexpr, DECAY: tl.constexpr, DECOUPLED: tl.constexpr,
                STOCHASTIC: tl.constexpr):
    p = load_working(param, master, offs, mask, MASTER)
    g = _gradient(acc, offs, mask, scale, MAXIMIZE)
    if DECAY:
        if DECOUPLED:
            p = p * decay
        else:
            g = g + weight_decay * p
    m = tl.load(exp_avg + offs, mask=mask)
    if lerp_weight < 0.5:               # torch.lerp's two forms
        m = m + lerp_weight * (g - m)
    else:
        m = g - (g - m) * (1.0 - lerp_weight)
    v = beta2 * tl.load(exp_avg_sq + offs, mask=mask) + g * g * one_minus_beta2
    tl.store(exp_avg + offs, m, mask=mask)
    tl.store(exp_avg_sq + offs, v, mask=mask)
    second = v
    if AMSGRAD:
        # torch.maximum: a NaN on either side wins
        second = tl.maximum(tl.load(max_exp_avg_sq + offs, mask=mask), v,
                            propagate_nan=tl.PropagateNan.ALL)
        tl.store(max_exp_avg_sq + offs, second, mask=mask)
    denom = tl.div_rn(tl.sqrt_rn(second), bc2_sqrt) + eps
    store_working(param, master, offs, mask, p - tl.div_rn(step_size * m, denom), key, start,
                  MASTER, STOCHASTIC)


@triton.jit(do_not_specialize=["seed"])
def adam_kernel(ptrs, pmap, n, lr_ptr, scale_ptr, found_ptr, lerp_weight, beta2, one_minus_beta2,
                beta1_hi, beta1_lo, beta2_hi, beta2_lo, eps, weight_decay, seed, P: tl.constexpr, MASTER: tl.constexpr,
                AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, DECAY: tl.constexpr,
                DECOUPLED: tl.constexpr, STOCHASTIC: tl.constexpr, ALIGNED: tl.constexpr,
                BLOCK: tl.constexpr):
    """lerp_weight = 1 - beta1.  beta_hi + beta_lo: a float64 beta passed as two fp32 values,
    for exact bias corrections."""
    if tl.load(found_ptr) == 0:
        t, start = locate(pmap, BLOCK)
        param = pointer(ptrs, 0, n, t, start, P, ALIGNED)
        acc = pointer(ptrs, 1, n, t, start, tl.float32, ALIGNED)
        exp_avg = pointer(ptrs, 2, n, t, start, tl.float32, ALIGNED)
        exp_avg_sq = pointer(ptrs, 3, n, t, start, tl.float32, ALIGNED)
        max_exp_avg_sq = pointer(ptrs, 4, n, t, start, tl.float32, ALIGNED)
        master, step, numel, key = _tensor_facts(ptrs, n, t, start, seed, 5, MASTER, ALIGNED)
        # Bias corrections in float64 from the step count, as the reference computes them.
        beta1_d = tl.cast(beta1_hi, tl.float64) + tl.cast(beta1_lo, tl.float64)
        beta2_d = tl.cast(beta2_hi, tl.float64) + tl.cast(beta2_lo, tl.float64)
        count = (step + 1.0).to(tl.int32)
        lr = tl.load(lr_ptr)
        step_size = (lr.to(tl.float64) / (1.0 - _power(beta1_d, count))).to(tl.float32)
        bc2_sqrt = tl.sqrt(1.0 - _power(beta2_d, count)).to(tl.float32)
        decay = (1.0 - lr.to(tl.float64) * weight_decay).to(tl.float32)
        scale = tl.load(scale_ptr)
        offs = tl.arange(0, BLOCK)
        if start + BLOCK <= numel:
            _adam_chunk(param, acc, exp_avg, exp_avg_sq, max_exp_avg_sq, master, offs, None,
                        scale, lerp_weight, beta2, one_minus_beta2, eps, weight_decay, decay,
                        step_size, bc2_sqrt, key, start, MASTER, AMSGRAD, MAXIMIZE, DECAY,
                        DECOUPLED, STOCHASTIC)
        else:
            _adam_chunk(param, acc, exp_avg, exp_avg_sq, max_exp_avg_sq, master, offs,
                        offs < numel - start, scale, lerp_weight, beta2, one_minus_beta2, eps,
                        weight_decay, decay, step_size, bc2_sqrt, key, start, MASTER,
                        AMSGRAD, MAXIMIZE, DECAY, DECOUPLED, STOCHASTIC)


@triton.jit
def increment_steps_kernel(ptrs, row, n, found_ptr, BLOCK: tl.constexpr):
    """steps[i] += 1 for the tensors of a launch, unless the non-finite flag is set."""
    if tl.load(found_ptr) == 0:
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        address = tl.load(ptrs + row * n + offs, mask=mask, other=0).to(tl.pointer_type(tl.float32))
        tl.store(address, tl.load(address, mask=mask) + 1.0, mask=mask)
