"""``python -m fused_accum tune``: measure the Triton kernels' block sizes on this GPU."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda", help="the GPU to tune for, e.g. cuda:1")
    parser.add_argument("--size-mb", type=float, default=256.0,
                        help="size of the bucket each candidate is timed on, in MB of fp32")
    parser.add_argument("--repeats", type=int, default=15,
                        help="timed repetitions per candidate block size")
    parser.add_argument("--out", type=Path, default=None,
                        help="tuning file to update (default: the tuned.json the backend reads)")


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("tune: torch sees no CUDA device", file=sys.stderr)
        return 2
    from ..bench import tune               # imports Triton: only for this command
    from ..kernels.triton_ops import configs

    out = args.out or configs.TUNED_FILE
    entry = tune.tune(device, args.size_mb, args.repeats)
    tune.write(entry, device, out)
    for op, by_dtype in entry["configs"].items():
        for dtype, config in by_dtype.items():
            print(f"{op:<11} {dtype:<9} block {config['block']:>5}, {config['num_warps']:>2} warps")
    print(f"wrote {out} ({configs.device_key(device)})")
    return 0
