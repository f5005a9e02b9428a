"""accumulate_linear's two GEMMs of the Triton backend on one device: the library's (``addmm_``
into the fp32 sum; bf16/fp16 operands widened first) and the Triton GEMM with the beta epilogue
(``FUSED_ACCUM_LINEAR_GEMM=triton``), each checked against ``reference`` and timed (median of
interleaved repetitions) on weight-gradient shapes of the window configurations, with the bytes
each must move and the bandwidth that gives.  The measurement that picks the default (issue #20).

  python benchmarks/linear_gemm.py [--device cuda] [--repeats 20] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

SHAPES = {   # name: (rows, out, in): a micro-batch's tokens x a Linear's out and in features
    "e/f wide 4096": (16, 4096, 4096),
    "b GPT MLP up": (4096, 4096, 1024),
    "b GPT head": (4096, 32768, 1024),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--scale", type=float, default=1.0, help="shrink every shape (CPU runs)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from fused_accum.kernels import get_backend, reference, triton_ops
    device = torch.device(args.device)
    ops = get_backend("triton", device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows_out = []
    for name, shape in SHAPES.items():
        rows, out, inp = (max(1, int(n * args.scale)) for n in shape)
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.randn(rows, out, device=device).to(dtype)
            x = torch.randn(rows, inp, device=device).to(dtype)
            expected = torch.empty(out, inp, device=device)
            reference.accumulate_linear([g], [x], [expected], [True], None)
            reference.accumulate_linear([g], [x], [expected], [False], None)
            times, errors = {}, {}
            for gemm in ("library", "triton"):
                os.environ[triton_ops.LINEAR_GEMM_ENV] = gemm
                acc = torch.full((out, inp), float("nan"), device=device)
                ops.accumulate_linear([g], [x], [acc], [True], None)
                ops.accumulate_linear([g], [x], [acc], [False], None)
                errors[gemm] = ((acc - expected).abs().max() / expected.abs().max()).item()
                times[gemm] = []
            for _ in range(args.repeats):
                for gemm in ("library", "triton"):
                    os.environ[triton_ops.LINEAR_GEMM_ENV] = gemm
                    sync()
                    start = time.perf_counter()
                    ops.accumulate_linear([g], [x], [acc], [False], None)
                    sync()
                    times[gemm].append(time.perf_counter() - start)
            # A later touch must read both operands and read and write the fp32 sum.
            moved = (rows * (out + inp)) * g.element_size() + 8 * out * inp
            row = {"shape": name, "rows": rows, "out": out, "in": inp, "dtype": str(dtype),
                   "bytes": moved}
            for gemm in times:
                ms = statistics.median(times[gemm]) * 1e3
                row[gemm] = {"ms": round(ms, 4), "gb_per_s": round(moved / ms / 1e6, 1),
                             "max_rel_error": errors[gemm]}
            row["triton_vs_library"] = round(row["triton"]["ms"] / row["library"]["ms"], 3)
            rows_out.append(row)
            print(f"{name:14} {str(dtype):15} library {row['library']['ms']:9.3f} ms "
                  f"({row['library']['gb_per_s']:7.1f} GB/s)  triton {row['triton']['ms']:9.3f} ms "
                  f"({row['triton']['gb_per_s']:7.1f} GB/s)  triton/library "
                  f"{row['triton_vs_library']:.2f}x  errors {errors['library']:.1e} "
                  f"{errors['triton']:.1e}", flush=True)
    os.environ.pop(triton_ops.LINEAR_GEMM_ENV, None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device) if device.type == "cuda"
                       else "cpu", "torch": torch.__version__, "rows": rows_out}, f, indent=1)


if __name__ == "__main__":
    main()
