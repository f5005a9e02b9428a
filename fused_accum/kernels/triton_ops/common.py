"""Triton helpers shared by the kernels: locating a program's chunk, typed pointers from the
launch tables (see ``launch.py``), and the fp32 working value of a parameter with its write-back
(plain, fp32 master, compact master, stochastic rounding), as ``reference.py`` specifies them."""
import triton
import triton.language as tl

import torch

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

# Where a parameter's fp32 working value lives (the ``MASTER`` constexpr of the step kernels).
NO_MASTER, FP32_MASTER, COMPACT_MASTER = 0, 1, 2


@triton.jit
def locate(pmap, BLOCK: tl.constexpr):
    """(tensor index, index of this program's first element) for this program."""
    entry = tl.load(pmap + tl.program_id(0))
    return (entry >> 32).to(tl.int32), (entry & 0xFFFFFFFF) * BLOCK


@triton.jit
def pointer(ptrs, row, n, t, start, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Address of element ``start`` of tensor ``t`` in list ``row``, typed ``DTYPE``."""
    p = tl.load(ptrs + row * n + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p + start


@triton.jit
def load_f32(ptr, offs, mask):
    """Elements of a float32, bfloat16 or float16 array as fp32.  bfloat16 goes through its bits:
    exact, and the same in Triton's interpreter, whose bfloat16 casts differ from the GPU's."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = tl.load(ptr.to(tl.pointer_type(tl.uint16)) + offs, mask=mask)
        value = (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        value = tl.load(ptr + offs, mask=mask).to(tl.float32)
    return value


@triton.jit
def bf16_bits(value):
    """fp32 ``value`` rounded to bfloat16 as torch's cast rounds it (to nearest even, NaN as
    0x7FC0), as uint16 bits."""
    u = value.to(tl.uint32, bitcast=True)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return tl.where(value != value, 0x7FC0, rounded).to(tl.uint16)


@triton.jit
def store_f32(ptr, offs, mask, value):
    """Stores fp32 ``value`` into a float32, bfloat16 or float16 array, rounding to nearest even
    as torch's casts do (bfloat16 through its bits, NaN as torch writes it)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        tl.store(ptr.to(tl.pointer_type(tl.uint16)) + offs, bf16_bits(value), mask=mask)
    else:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def master_unless_written(param, master_value, offs, mask):
    """The fp32 master, unless the parameter no longer holds the master's rounding as
    ``store_f32`` writes it: then it was written since the last step (load_state_dict, an
    initialiser, clamp_) and its value is updated.  Compares bit patterns."""
    if param.dtype.element_ty == tl.bfloat16:
        held = tl.load(param.to(tl.pointer_type(tl.uint16)) + offs, mask=mask)
        stored = bf16_bits(master_value)
        written = (held.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    elif param.dtype.element_ty == tl.float16:
        raw = tl.load(param + offs, mask=mask)
        held = raw.to(tl.uint16, bitcast=True)
        stored = master_value.to(tl.float16).to(tl.uint16, bitcast=True)
        written = raw.to(tl.float32)
    else:
        raw = tl.load(param + offs, mask=mask)
        held = raw.to(tl.uint32, bitcast=True)
        stored = master_value.to(tl.uint32, bitcast=True)
        written = raw
    return tl.where(held == stored, master_value, written)


@triton.jit
def mix32(x):
    """lowbias32 (C. Wellons) on uint32."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def rounding_key(seed, step, position):
    """The per-tensor key of stochastic rounding: (seed, step count, position in the call)."""
    s = seed.to(tl.uint32) + (step + 1.0).to(tl.uint32) * 0x9E3779B9 \
        + position.to(tl.uint32) * 0x85EBCA6B
    return mix32(s)


@triton.jit
def canonical_nan(u):
    """fp32 bits ``u`` (uint32), with every NaN as the NaN a compact master holds (0x7FC00000:
    bf16 0x7FC0, remainder 0)."""
    return tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC00000, u).to(tl.uint32)


@triton.jit
def compact_high(u):
    """The bf16 bits that hold fp32 bits ``u`` in a compact master: rounded to nearest, ties away
    from zero, a NaN as 0x7FC0 (uint32)."""
    return ((canonical_nan(u) + 0x8000) >> 16) & 0xFFFF


@triton.jit
def compact_master(high, rem):
    """The fp32 master of bf16 bits ``high`` above remainder ``rem`` (both uint32): bits
    (high << 16) + rem, unless they do not round back to ``high``: the parameter was written
    since the last step (+-0 over a negative remainder, +-inf over a positive one; a NaN other
    than 0x7FC0), and its master is the parameter, ``high << 16``."""
    u = (high << 16) + rem
    return tl.where(compact_high(u) == high, u, high << 16).to(tl.float32, bitcast=True)


@triton.jit
def load_working(param, master, offs, mask, MASTER: tl.constexpr):
    """The fp32 value being updated: the fp32 master (while the parameter holds its rounding),
    the compact master (bf16 bits of the parameter above an int16 remainder, while they round
    back to the parameter), or the parameter itself."""
    if MASTER == 1:
        value = master_unless_written(param, tl.load(master + offs, mask=mask), offs, mask)
    elif MASTER == 2:
        high = tl.load(param.to(tl.pointer_type(tl.uint16)) + offs, mask=mask).to(tl.uint32)
        rem = tl.load(master + offs, mask=mask).to(tl.int32).to(tl.uint32, bitcast=True)
        value = compact_master(high, rem)
    else:
        value = load_f32(param, offs, mask)
    return value


@triton.jit
def store_working(param, master, offs, mask, value, key, start,
                  MASTER: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Writes the updated fp32 ``value`` back: master and parameter cast (round to nearest even),
    compact split (ties away from zero, a NaN as 0x7FC0 and 0), or stochastic rounding of a bf16
    parameter."""
    if MASTER == 1:
        tl.store(master + offs, value, mask=mask)
        store_f32(param, offs, mask, value)
    elif MASTER == 2:
        u = canonical_nan(value.to(tl.uint32, bitcast=True))
        high = compact_high(u)
        rem = (u - (high << 16)).to(tl.uint16).to(tl.int16, bitcast=True)
        tl.store(param.to(tl.pointer_type(tl.uint16)) + offs, high.to(tl.uint16), mask=mask)
        tl.store(master + offs, rem, mask=mask)
    elif STOCHASTIC:
        u = value.to(tl.uint32, bitcast=True)
        bits = mix32(key ^ (start + offs).to(tl.uint32)) & 0xFFFF
        high = tl.where(value != value, 0x7FC0, ((u + bits) >> 16) & 0xFFFF)
        tl.store(param.to(tl.pointer_type(tl.uint16)) + offs, high.to(tl.uint16), mask=mask)
    else:
        store_f32(param, offs, mask, value)
