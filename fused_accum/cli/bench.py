"""``python -m fused_accum bench``: fused_accum against plain PyTorch, ops and whole windows.

Prints a progress line per measurement (and a "still on ..." line whenever a stage has printed
nothing for ``--progress-s`` seconds), each window configuration's rows as soon as it is measured,
and the tables at the end.  ``--json`` keeps every figure with the machine it was measured on; it
is rewritten (atomically) after every measurement, with ``"complete": false`` until the run ends,
so a run stopped at any point (a time cap, Ctrl-C, a kill) keeps what it measured.  ``--plot``
draws the figures (needs matplotlib).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch

from ..bench import comm, harness, ops, windows
from ..bench.report import plot, tables, windows_table

SCHEMA = "fused_accum.bench/1"


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each option's default, unless its help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = _Help
    parser.description = ("fused_accum against plain PyTorch: each op of each backend against "
                          "torch's nearest op, and whole accumulation windows of real models "
                          "against the best and the usual plain-PyTorch loops (time, bandwidth, "
                          "peak memory). Every time ratio is printed with its p10-p90 over "
                          "interleaved repetitions, marked * when that spread includes 1.0.")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and 3 repetitions: a check that everything runs, not a "
                             "measurement")
    parser.add_argument("--level", choices=["ops", "windows", "comm", "all"], default="all",
                        help="ops: single ops against torch; windows: whole accumulation windows; "
                             "comm: bytes two ranks communicate per window, against DDP; all: the "
                             "three")
    parser.add_argument("--backend", default="auto",
                        help="backend of fused_accum's window pipelines (auto, extension, triton, "
                             "reference)")
    parser.add_argument("--configs", default=None,
                        help="window configurations to run, comma-separated, in this order (e.g. "
                             "e,f,b) (default: all, a1 to f)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved repetitions per measurement (default: 15; 3 with --quick)")
    parser.add_argument("--json", type=Path, default=None,
                        help="write every figure to this file, updated after every measurement "
                             "(default: none)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="write a PNG plot at the end, needs matplotlib (default: none)")
    parser.add_argument("--config-timeout", type=float, default=None,
                        help="seconds one window configuration may take; one that runs longer is "
                             "stopped, reported and skipped (default: no limit)")
    parser.add_argument("--progress-s", type=float, default=30.0,
                        help="print a 'still on ...' line when nothing was printed for this many "
                             "seconds")


def _sizes(device: torch.device, quick: bool) -> list[int]:
    if device.type == "cuda":
        return [1, 16] if quick else [1, 16, 256, 1024]
    return [1, 4] if quick else [1, 16, 64]


class Results:
    """The result document, written to ``path`` (when given) after every measurement."""

    def __init__(self, path: Path | None, doc: dict):
        self.path, self.doc = path, doc
        self.save()

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1) + "\n")
        os.replace(tmp, self.path)   # a reader, or a kill, never sees half a file

    def add(self, level: str, rows: list[dict]) -> None:
        self.doc[level] += rows
        self.save()


def measure(device: torch.device, quick: bool, level: str, backend: str, repeats: int | None,
            configs: list[str] | None = None, json_path: Path | None = None,
            config_timeout: float | None = None, results: list | None = None) -> dict:
    """Runs the levels asked for; returns the result document (also kept in ``results[0]`` as it
    grows, for a caller that is interrupted)."""
    sizes = _sizes(device, quick)
    repeats = repeats or (3 if quick else 15)
    if configs is not None:   # a bad name fails now, not after the ops
        known = {c.name for c in windows.configs(device, quick)}
        if set(configs) - known:
            raise ValueError(f"--configs: no configuration {sorted(set(configs) - known)}; "
                             f"there are {sorted(known)}")
    harness.progress(f"copy bandwidth on {device}")
    copy_bw = harness.copy_bandwidth(device, max(sizes) * 2**20, repeats)
    if device.type == "cuda":
        torch.cuda.empty_cache()   # the copy's buffers: the window processes need the memory
    out = Results(json_path, {
        "schema": SCHEMA, "machine": harness.machine(device), "quick": quick, "repeats": repeats,
        "complete": False, "copy_bandwidth_gb_per_s": copy_bw / 1e9, "ops": [], "windows": [],
        "comm": [], "failures": []})
    if results is not None:
        results.append(out)
    if level in ("ops", "all"):
        ops.run(device, sizes, repeats, copy_bw, emit=lambda case, rows: out.add("ops", rows))
        if device.type == "cuda":
            torch.cuda.empty_cache()   # the ops' tensors, cached here, not in the windows' way
    if level in ("windows", "all"):
        def emit(config: str, rows: list[dict]) -> None:
            print(f"\n{windows_table(rows)}\n", flush=True)
            out.add("windows", rows)
        windows.run(device, quick, repeats, copy_bw, backend, configs, emit=emit,
                    timeout=config_timeout, failures=out.doc["failures"])
        out.save()
    if level in ("comm", "all"):
        out.add("comm", comm.run(device, quick))
    out.doc["complete"] = True
    out.save()
    return out.doc


def _interrupt(signum, frame):
    raise harness.Interrupted(signal.Signals(signum).name)


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    print(f"fused_accum bench on {device} ({'quick' if args.quick else 'full'} run)", flush=True)
    configs = args.configs.split(",") if args.configs else None
    # The configuration processes' heartbeat speaks first: the one here is for their silences.
    os.environ[harness.PROGRESS_ENV] = str(0.8 * args.progress_s)
    heartbeat = harness.Heartbeat(args.progress_s).start()
    previous = signal.signal(signal.SIGTERM, _interrupt)
    partial: list = []
    try:
        result = measure(device, args.quick, args.level, args.backend, args.repeats, configs,
                         args.json, args.config_timeout, partial)
    except ValueError as exc:   # a bad --configs
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, harness.Interrupted) as exc:
        heartbeat.stop()
        print(f"\nbench: interrupted ({exc or 'Ctrl-C'}); what was measured so far:", flush=True)
        if partial:
            print(tables(partial[0].doc))
            partial[0].save()
            if args.json:
                print(f"\nwrote {args.json} (incomplete)")
        return 130 if isinstance(exc, KeyboardInterrupt) else 143
    finally:
        heartbeat.stop()
        signal.signal(signal.SIGTERM, previous)
    print()
    print(tables(result))
    if args.json:
        print(f"\nwrote {args.json}")
    if args.plot:
        if plot(result, args.plot):
            print(f"wrote {args.plot}")
        else:
            print("no plot: matplotlib is not installed (pip install matplotlib)")
    return 1 if result["failures"] else 0
