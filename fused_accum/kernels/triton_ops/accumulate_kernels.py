"""accumulate and norm as Triton kernels: one launch per (gradient dtype, alignment) group.

Per-program partial sums of squares go to a scratch buffer that one more program adds up in
program order, so the norm is deterministic.  The non-finite flag needs no reduction: a program
that sees a non-finite sum stores 1 into it, and concurrent stores all write the same value.
"""
import triton
import triton.language as tl

from .common import load_f32, locate, pointer

FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _accumulate_chunk(g, a, offs, mask, w, first):
    x = w * load_f32(g, offs, mask)
    if first:
        total = x                       # first touch: the old contents are never read
    else:
        total = tl.load(a + offs, mask=mask) + x
    tl.store(a + offs, total, mask=mask)
    return total


@triton.jit
def accumulate_kernel(ptrs, pmap, n, weight_ptr, found_ptr, partial,
                      G: tl.constexpr, ALIGNED: tl.constexpr, SUMSQ: tl.constexpr,
                      BLOCK: tl.constexpr):
    """ptrs rows: grads, accs, numel, first."""
    t, start = locate(pmap, BLOCK)
    g = pointer(ptrs, 0, n, t, start, G, ALIGNED)
    a = pointer(ptrs, 1, n, t, start, tl.float32, ALIGNED)
    numel = tl.load(ptrs + 2 * n + t)
    first = tl.load(ptrs + 3 * n + t) != 0
    w = tl.load(weight_ptr)
    offs = tl.arange(0, BLOCK)
    if start + BLOCK <= numel:         # full chunk: unmasked, vectorised access
        total = _accumulate_chunk(g, a, offs, None, w, first)
    else:
        mask = offs < numel - start
        total = tl.where(mask, _accumulate_chunk(g, a, offs, mask, w, first), 0.0)
    not_finite = tl.max((~(tl.abs(total) <= FLT_MAX)).to(tl.int32), axis=0)
    tl.store(found_ptr, 1.0, mask=not_finite != 0)
    if SUMSQ:
        tl.store(partial + tl.program_id(0), tl.sum(total * total, axis=0))


@triton.jit
def norm_kernel(ptrs, pmap, n, partial, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """ptrs rows: accs, numel."""
    t, start = locate(pmap, BLOCK)
    a = pointer(ptrs, 0, n, t, start, tl.float32, ALIGNED)
    numel = tl.load(ptrs + n + t)
    offs = tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        x = tl.load(a + offs)
    else:
        x = tl.load(a + offs, mask=offs < numel - start, other=0.0)
    tl.store(partial + tl.program_id(0), tl.sum(x * x, axis=0))


@triton.jit
def add_partials_kernel(partial, count, sumsq_ptr, BLOCK: tl.constexpr):
    """sumsq += the ``count`` partial sums, added in order in float64 (one program)."""
    total = tl.zeros([BLOCK], dtype=tl.float64)
    begin = 0
    while begin < count:    # not range(0, count, BLOCK): Triton 3.6's interpreter cannot take it
        offs = begin + tl.arange(0, BLOCK)
        total += tl.load(partial + offs, mask=offs < count, other=0.0).to(tl.float64)
        begin += BLOCK
    tl.store(sumsq_ptr, tl.load(sumsq_ptr) + tl.sum(total, axis=0).to(tl.float32))
