"""``python -m fused_accum {bench,check,demo,info,tune}``."""
from __future__ import annotations

import argparse
import sys

from . import __version__
from .cli import HelpFormatter, bench, check, demo, info, tune

COMMANDS = {
    "check": (check, "train a small model accumulated and as one large batch; print the difference",
              "Train a small transformer-style model for a few windows two ways: k micro-batches "
              "through fused_accum, and one batch k times as large through the torch optimizer "
              "of the same name. Prints the largest relative parameter difference; the exit "
              "status is 1 when it exceeds the tolerance. Under torchrun (torchrun "
              "--nproc_per_node=2 -m fused_accum check) each rank takes its share of every "
              "window and the result is compared with one process training on the whole batch."),
    "demo": (demo, "train on real data several ways (fused_accum.examples); loss curves as JSON "
                   "and PNG",
             "Train the examples (fused_accum.examples: a digits CNN, a byte-level GPT in bf16, "
             "the transformers Trainer) on real data several ways (the large batch, "
             "fused_accum, and the hand-written loops that go wrong) and write their held-out "
             "loss curves as demo.json and one PNG per task into --out. The exit status is 1 "
             "when a fused_accum curve strays more than 1% from the large batch's. Needs the "
             "[demo] extra; nothing is downloaded."),
    "info": (info, "versions, devices and which backends can run",
             "Print the versions of fused_accum, Python, torch, Triton and NumPy, whether the "
             "C++ gradient collector loads, and for each device which backends can run and which "
             "one backend='auto' uses. Builds the compiled extensions on first use."),
    "bench": (bench, "fused_accum against plain PyTorch: ops and whole windows", None),
    "tune": (tune, "measure the Triton kernels' block sizes on this GPU (writes tuned.json)",
             "Time each candidate block size of the Triton kernels on this GPU and write the "
             "fastest to the tuning file the Triton backend reads."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fused_accum", formatter_class=HelpFormatter,
        description="fused_accum's commands: check that accumulating gives the large batch's "
                    "result, train the demos, list what runs here, benchmark, tune.")
    parser.add_argument("--version", action="version", version=f"fused_accum {__version__}",
                        help="print fused_accum's version and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     title="commands",
                                     description="python -m fused_accum COMMAND --help says more")
    for name, (module, summary, description) in COMMANDS.items():
        sub = commands.add_parser(name, help=summary, description=description or summary,
                                  formatter_class=HelpFormatter)
        if hasattr(module, "add_arguments"):
            module.add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return {"check": check.run, "demo": demo.run, "info": info.run, "bench": bench.run,
            "tune": tune.run}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
