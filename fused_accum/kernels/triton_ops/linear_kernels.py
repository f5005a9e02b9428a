"""``accumulate_linear`` as one Triton GEMM per weight: ``acc = (first ? 0 : acc) + weight *
(grad_output^T @ input)``, the product summed in fp32 from the operands as they are (bf16/fp16
products are exact in fp32; fp32 operands are multiplied in IEEE fp32, never TF32; under the
interpreter every operand is widened first, which gives the same products), the weight
read on the device, the sum written in the epilogue: no model-dtype gradient, no widened copy of
the operands, no second pass over the accumulator.  Optionally writes each tile's sum of squares
to ``partial`` (one per program, added in order by ``add_partials_kernel``: the norm does not depend
on the programs' order).  Offsets are 64-bit: an LM head's output gradient (tokens x vocabulary)
passes 2^31 elements.  Specification: :func:`fused_accum.kernels.reference.accumulate_linear`.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def accumulate_linear_kernel(g_ptr, x_ptr, acc_ptr, weight_ptr, partial, rows, out_features,
                             in_features, stride_g_row, stride_g_out, stride_x_row, stride_x_in,
                             stride_acc_out, stride_acc_in, FIRST: tl.constexpr,
                             HAS_WEIGHT: tl.constexpr, FOLD: tl.constexpr, WIDEN: tl.constexpr,
                             BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr,
                             BLOCK_ROWS: tl.constexpr):
    out_idx = tl.program_id(0).to(tl.int64) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    in_idx = tl.program_id(1).to(tl.int64) * BLOCK_IN + tl.arange(0, BLOCK_IN)
    out_ok, in_ok = out_idx < out_features, in_idx < in_features
    product = tl.zeros((BLOCK_OUT, BLOCK_IN), dtype=tl.float32)
    for start in range(0, rows, BLOCK_ROWS):
        row = start + tl.arange(0, BLOCK_ROWS).to(tl.int64)
        row_ok = row < rows
        g_t = tl.load(g_ptr + row[None, :] * stride_g_row + out_idx[:, None] * stride_g_out,
                      mask=out_ok[:, None] & row_ok[None, :], other=0.0)   # out x rows
        x = tl.load(x_ptr + row[:, None] * stride_x_row + in_idx[None, :] * stride_x_in,
                    mask=row_ok[:, None] & in_ok[None, :], other=0.0)      # rows x in
        if WIDEN:   # fp32 operands, or the interpreter (whose dot reads bf16 as its bits)
            product = tl.dot(g_t.to(tl.float32), x.to(tl.float32), product,
                             input_precision="ieee")
        else:       # bf16/fp16 on a GPU: the tensor cores, products exact, summed in fp32
            product = tl.dot(g_t, x, product)
    if HAS_WEIGHT:
        product = product * tl.load(weight_ptr)
    ok = out_ok[:, None] & in_ok[None, :]
    where = acc_ptr + out_idx[:, None] * stride_acc_out + in_idx[None, :] * stride_acc_in
    if not FIRST:   # the first touch never reads the sum: whatever it held is overwritten
        product = tl.load(where, mask=ok, other=0.0) + product
    tl.store(where, product, mask=ok)
    if FOLD:
        tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        tl.store(partial + tile, tl.sum(tl.sum(tl.where(ok, product * product, 0.0), 1), 0))
