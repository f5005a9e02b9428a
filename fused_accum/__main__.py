"""``python -m fused_accum {check,info}``."""
from __future__ import annotations

import argparse
import sys

from .cli import check, info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_accum")
    commands = parser.add_subparsers(dest="command", required=True)
    check.add_arguments(commands.add_parser(
        "check", help="train a small model accumulated and as one large batch; print the difference"))
    commands.add_parser("info", help="versions, devices and which backends can run")
    args = parser.parse_args(argv)
    return {"check": check.run, "info": info.run}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
