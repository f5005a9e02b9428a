"""``python -m fused_accum {bench,check,demo,info,tune}``."""
from __future__ import annotations

import argparse
import sys

from .cli import bench, check, demo, info, tune


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_accum")
    commands = parser.add_subparsers(dest="command", required=True)
    check.add_arguments(commands.add_parser(
        "check", help="train a small model accumulated and as one large batch; print the difference"))
    demo.add_arguments(commands.add_parser(
        "demo", help="train on real data (examples/) several ways; loss curves as JSON and PNG"))
    commands.add_parser("info", help="versions, devices and which backends can run")
    bench.add_arguments(commands.add_parser(
        "bench", help="fused_accum against plain PyTorch: ops and whole windows"))
    tune.add_arguments(commands.add_parser(
        "tune", help="measure the Triton kernels' block sizes on this GPU (writes tuned.json)"))
    args = parser.parse_args(argv)
    return {"check": check.run, "demo": demo.run, "info": info.run, "bench": bench.run,
            "tune": tune.run}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
