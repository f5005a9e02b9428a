"""One window configuration measured in a process of its own (started by
:func:`fused_accum.bench.windows.run`):

    python -m fused_accum.bench.config_child CONFIG --device cuda --repeats 15 --copy-bw BYTES_PER_S \\
        --backend auto --out ROWS.json [--quick]

Writes ``{"rows": [...]}`` to ``--out`` when done; prints progress (with a heartbeat) meanwhile.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from . import windows
from .harness import Heartbeat, heartbeat_interval


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_accum.bench.config_child")
    parser.add_argument("config")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, required=True)
    parser.add_argument("--copy-bw", type=float, required=True)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    heartbeat = Heartbeat(heartbeat_interval()).start()
    device = torch.device(args.device)
    rows = windows.measure_config(windows.find(device, args.quick, args.config), device,
                                  args.repeats, args.copy_bw, args.backend)
    heartbeat.stop()
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rows": rows}))
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
