"""``python -m fused_accum bench``: fused_accum against plain PyTorch, ops and whole windows.

Prints a progress line per measurement and the tables at the end; ``--json`` keeps every figure
with the machine it was measured on, ``--plot`` draws them (needs matplotlib).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..bench import comm, harness, ops, windows
from ..bench.report import plot, tables

SCHEMA = "fused_accum.bench/1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions (under a minute)")
    parser.add_argument("--level", choices=["ops", "windows", "comm", "all"], default="all",
                        help="comm: bytes communicated per window by two ranks, against DDP")
    parser.add_argument("--backend", default="auto", help="backend of the window runs")
    parser.add_argument("--configs", default=None,
                        help="window configurations to run, comma-separated (e.g. b,e,f); default all")
    parser.add_argument("--repeats", type=int, default=None, help="repetitions per measurement")
    parser.add_argument("--json", type=Path, default=None, help="write every figure to this file")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG plot (needs matplotlib)")


def measure(device: torch.device, quick: bool, level: str, backend: str, repeats: int | None,
            configs: list[str] | None = None) -> dict:
    if device.type == "cuda":
        sizes = [1, 16] if quick else [1, 16, 256, 1024]
    else:
        sizes = [1, 4] if quick else [1, 16, 64]
    repeats = repeats or (3 if quick else 15)
    harness.progress(f"copy bandwidth on {device}")
    copy_bw = harness.copy_bandwidth(device, max(sizes) * 2**20, repeats)
    result = {"schema": SCHEMA, "machine": harness.machine(device), "quick": quick,
              "copy_bandwidth_gb_per_s": copy_bw / 1e9, "ops": [], "windows": [], "comm": []}
    if level in ("ops", "all"):
        result["ops"] = ops.run(device, sizes, repeats, copy_bw)
    if level in ("windows", "all"):
        result["windows"] = windows.run(device, quick, repeats, copy_bw, backend, configs)
    if level in ("comm", "all"):
        result["comm"] = comm.run(device, quick)
    return result


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    print(f"fused_accum bench on {device} ({'quick' if args.quick else 'full'} run)", flush=True)
    configs = args.configs.split(",") if args.configs else None
    try:
        result = measure(device, args.quick, args.level, args.backend, args.repeats, configs)
    except ValueError as exc:   # a bad --configs
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    print()
    print(tables(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    if args.plot:
        if plot(result, args.plot):
            print(f"wrote {args.plot}")
        else:
            print("no plot: matplotlib is not installed (pip install matplotlib)")
    return 0
