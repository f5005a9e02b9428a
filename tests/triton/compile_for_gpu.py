"""Compiles every Triton kernel specialisation the backend launches for an NVIDIA GPU, without
one: Triton lowers to PTX and runs ptxas for the target named here.  The interpreter that runs the
kernels in CI is lenient about types and never lowers, so this is what catches a kernel that would
not compile on the GPU.  Prints one JSON line per kernel: name, specialisation, vector width.

Run in a process without TRITON_INTERPRET (the kernels must be JIT functions).
Usage: python compile_for_gpu.py [ARCH]    (ARCH: 90 for H100/H200, the default; 80 for A100)
"""
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fused_accum.kernels.triton_ops import accumulate_kernels as accumulate, configs
from fused_accum.kernels.triton_ops import linear_kernels as linear
from fused_accum.kernels.triton_ops import _LINEAR_BLOCKS, _LINEAR_WARPS
from fused_accum.kernels.triton_ops import step_kernels as steps
from fused_accum.kernels.triton_ops.common import COMPACT_MASTER, FP32_MASTER, NO_MASTER

FLOATS = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
TABLE = {"ptrs": "*i64", "pmap": "*i64", "n": "i32"}


def _cases():
    block = configs.UNTUNED.block
    for g, aligned, sumsq in itertools.product(FLOATS, (True, False), (True, False)):
        yield (accumulate.accumulate_kernel,
               {**TABLE, "weight_ptr": "*fp32", "found_ptr": "*fp32", "partial": "*fp32"},
               dict(G=FLOATS[g], ALIGNED=aligned, SUMSQ=sumsq, BLOCK=block))
    for aligned in (True, False):
        yield accumulate.norm_kernel, {**TABLE, "partial": "*fp32"}, dict(ALIGNED=aligned, BLOCK=block)
    yield (accumulate.add_partials_kernel, {"partial": "*fp32", "count": "i32", "sumsq_ptr": "*fp32"},
           dict(BLOCK=1024))
    yield (steps.increment_steps_kernel, {"ptrs": "*i64", "row": "i32", "n": "i32", "found_ptr": "*fp32"},
           dict(BLOCK=128))
    scalars = {"lr_ptr": "*fp32", "scale_ptr": "*fp32", "found_ptr": "*fp32"}
    masters = [("fp32", NO_MASTER), ("bf16", NO_MASTER), ("fp16", NO_MASTER), ("bf16", FP32_MASTER),
               ("fp16", FP32_MASTER), ("bf16", COMPACT_MASTER)]
    for (p, master), on, aligned in itertools.product(masters, (True, False), (True, False)):
        stochastic = on and p == "bf16" and master == NO_MASTER
        yield (steps.sgd_kernel,
               {**TABLE, **scalars, "momentum": "fp32", "one_minus_dampening": "fp32",
                "weight_decay": "fp32", "seed": "i64"},
               dict(P=FLOATS[p], MASTER=master, HAS_BUF=on, NESTEROV=on, MAXIMIZE=on, DECAY=on,
                    STOCHASTIC=stochastic, ALIGNED=aligned, BLOCK=block))
        yield (steps.adam_kernel,
               {**TABLE, **scalars, **{k: "fp32" for k in (
                   "lerp_weight", "beta2", "one_minus_beta2", "beta1_hi", "beta1_lo", "beta2_hi",
                   "beta2_lo", "eps", "weight_decay")}, "seed": "i64"},
               dict(P=FLOATS[p], MASTER=master, AMSGRAD=on, MAXIMIZE=on, DECAY=on, DECOUPLED=on,
                    STOCHASTIC=stochastic, ALIGNED=aligned, BLOCK=block))
    # Sizes and strides as Triton passes them below 2^31 (i32): the kernel widens its offsets.
    sizes = {name: "i32" for name in ("rows", "out_features", "in_features", "stride_g_row",
                                      "stride_g_out", "stride_x_row", "stride_x_in",
                                      "stride_acc_out", "stride_acc_in")}
    for g, first, weighted, fold in itertools.product(FLOATS, (True, False), (True, False),
                                                      (True, False)):
        yield (linear.accumulate_linear_kernel,
               {"g_ptr": f"*{g}", "x_ptr": f"*{g}", "acc_ptr": "*fp32", "weight_ptr": "*fp32",
                "partial": "*fp32", **sizes},
               dict(FIRST=first, HAS_WEIGHT=weighted, FOLD=fold, WIDEN=g == "fp32",
                    **_LINEAR_BLOCKS), _LINEAR_WARPS)


def _resources(cubin: bytes) -> dict:
    """Registers, stack and local memory per thread, as Triton's bundled cuobjdump reports them."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        report = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True,
                                check=True).stdout
    registers, stack, local = re.search(r"REG:(\d+).*STACK:(\d+).*LOCAL:(\d+)", report).groups()
    return {"registers": int(registers), "stack_bytes": int(stack), "local_bytes": int(local)}


def main(arch: int) -> None:
    target = GPUTarget("cuda", arch, 32)
    for kernel, signature, constexprs, *warps in _cases():
        signature = {**signature, **{k: "constexpr" for k in constexprs}}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        num_warps = warps[0] if warps else configs.UNTUNED.num_warps   # as each is launched
        compiled = triton.compile(source, target=target,
                                  options=dict(num_warps=num_warps, enable_fp_fusion=False))
        widths = [int(w) for w in re.findall(r"ld\.global(?:\.\w+)*\.v(\d)", compiled.asm["ptx"])]
        print(json.dumps({"kernel": kernel.__name__,
                          "constexprs": {k: str(v) for k, v in constexprs.items()},
                          "max_vector_load": max(widths, default=1),
                          **_resources(compiled.asm["cubin"])}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
