"""Host time per gradient: what fused_accum's gradient path costs the host beyond autograd's own.

A stack of small Linear layers (so that kernels cost next to nothing and the host's work shows),
k micro-batches per window, SGD momentum, against torch's plain accumulation (``loss / k``, foreach
SGD, ``zero_grad``) on the same model and inputs, interleaved.  Each group bound of
``--group-mb`` is measured: 0 makes every gradient its own backend call (one launch per gradient,
as every weight gradient of 32 MB or more is on a GPU), and the default 0.03 MB makes a call of
every couple of gradients.  Each gradient path is measured in a fresh process, and checked there
to be the path its row names:

- ``collector (node hook)`` (``--hooks node``): the C++ collector hooked on the AccumulateGrad node (the default on
  CPUs; forced on GPUs, where it would tie backward passes to one stream);
- ``collector (tensor hook)`` (``tensor``): the C++ collector as a post-accumulate-grad tensor hook (the default
  on GPUs; forced on CPUs);
- ``python hook`` (``python``): ``FUSED_ACCUM_HOOKS=python``, a Python function per gradient.

  python benchmarks/host_overhead.py [--device cuda] [--group-mb 0,0.03] [--json OUT]

Prints one line per path and group bound: the window time of both pipelines (median of
interleaved repetitions), their ratio with its p10-p90 over the repetitions (marked * when that
includes 1.0: within the run's noise), the extra host microseconds per gradient and the
collector's launches per window.  A child that fails has its traceback printed; the others go
on, and the exit status is 1.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HOOK_ENV = "HOST_OVERHEAD_HOOK"
HOOKS = {   # --hooks name -> (the row's name, the environment of its process)
    "node": ("collector (node hook)", {HOOK_ENV: "node"}),
    "tensor": ("collector (tensor hook)", {HOOK_ENV: "tensor"}),
    "python": ("python hook", {HOOK_ENV: "python", "FUSED_ACCUM_HOOKS": "python"}),
}
WARMUP = 10


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _path(opt) -> str:
    """Which gradient path ``opt`` took, read off its hooks."""
    from fused_accum.accumulation.hooks import _CollectorHandle
    hooks = opt._buffers.hooks
    if hooks.collector is None:
        return "python"
    node = any(isinstance(h, _CollectorHandle) and h.on_node for h in hooks.handles.values())
    return "node" if node else "tensor"


def measure(device: str, layers: int, width: int, k: int, repeats: int, group_mb: float) -> dict:
    import torch
    import fused_accum
    from fused_accum.accumulation import GROUP_ENV
    os.environ[GROUP_ENV] = repr(group_mb)   # read when the optimizer is built
    torch.set_num_threads(1)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def model():
        torch.manual_seed(0)
        with torch.device(device):
            return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])

    inputs = [torch.randn(8, width, device=device) for _ in range(k)]
    plain, fused = model(), model()
    plain_opt = torch.optim.SGD(plain.parameters(), lr=1e-3, momentum=0.9, foreach=True)
    fused_opt = fused_accum.SGD(fused.parameters(), lr=1e-3, momentum=0.9, accumulation_steps=k,
                                backend="extension")

    def plain_window():
        for x in inputs:
            (plain(x).square().mean() / k).backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    def fused_window():
        for x in inputs:
            fused_opt.backward(fused(x).square().mean())
        fused_opt.step()

    times = {"torch": [], "fused_accum": []}
    for r in range(repeats + WARMUP):
        for name, window in (("torch", plain_window), ("fused_accum", fused_window)):
            sync()
            start = time.perf_counter()
            window()
            sync()
            if r >= WARMUP:
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) * 1e6 for name, t in times.items()}
    ratios = [a / b for a, b in zip(times["fused_accum"], times["torch"])]
    lo, hi = _percentile(ratios, 0.1), _percentile(ratios, 0.9)
    gradients = 2 * layers * k
    collector = fused_opt._buffers.collector
    launches = collector.launches() if collector is not None else None
    return {"group_mb": group_mb, "path": _path(fused_opt), "torch": torch.__version__,
            "torch_us": median["torch"], "fused_accum_us": median["fused_accum"],
            "ratio": median["fused_accum"] / median["torch"], "ratio_p10": lo, "ratio_p90": hi,
            "ratio_within_noise": lo <= 1.0 <= hi, "repeats": repeats,
            "extra_us_per_gradient": (median["fused_accum"] - median["torch"]) / gradients,
            "gradients_per_window": gradients,
            "collector_launches_per_window": (None if launches is None
                                              else launches / (repeats + WARMUP))}


def child(args: argparse.Namespace, groups: list[float]) -> list[dict]:
    import torch
    from fused_accum.accumulation import Hooks
    hook = os.environ[HOOK_ENV]
    default = "node" if Hooks.hook_on_node(torch.empty(0, device=args.device)) else "tensor"
    if hook in ("node", "tensor"):
        Hooks.hook_on_node = staticmethod(lambda param, node=hook == "node": node)
    rows = []
    for group_mb in groups:
        row = measure(args.device, args.layers, args.width, args.k, args.repeats, group_mb)
        if row["path"] != hook:
            raise RuntimeError(f"asked for the {HOOKS[hook][0]} path, but the optimizer took the "
                               f"{HOOKS[row['path']][0]} path (did the gradient collector fail "
                               "to build?)")
        row["hook"] = HOOKS[hook][0]
        row["default_here"] = hook == default
        rows.append(row)
    return rows


def _line(r: dict) -> str:
    name = r["hook"] + (", default here" if r["default_here"] else "")
    mark = " *" if r["ratio_within_noise"] else "  "
    launches = ("" if r["collector_launches_per_window"] is None
                else f", {r['collector_launches_per_window']:.0f} launches/window")
    return (f"{name:38s} group {r['group_mb']:<5g} MB  torch {r['torch_us']:8.0f} us  fused_accum "
            f"{r['fused_accum_us']:8.0f} us  {r['ratio']:.3f}x ({r['ratio_p10']:.2f}-"
            f"{r['ratio_p90']:.2f}){mark} extra {r['extra_us_per_gradient']:6.2f} us/gradient"
            f"{launches}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--group-mb", default="0,0.03",
                        help="group bounds to measure, comma-separated (0: a call per gradient)")
    parser.add_argument("--layers", type=int, default=32, help="Linear layers")
    parser.add_argument("--width", type=int, default=64, help="their width")
    parser.add_argument("--k", type=int, default=4, help="micro-batches per window")
    parser.add_argument("--repeats", type=int, default=50, help="timed windows per pipeline")
    parser.add_argument("--hooks", default=",".join(HOOKS),
                        help="gradient paths to measure, comma-separated (node, tensor, python)")
    parser.add_argument("--json", help="write the results here, rewritten after each path")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    groups = [float(g) for g in args.group_mb.split(",")]
    if args.child:
        print(json.dumps(child(args, groups)))
        return 0
    hooks = args.hooks.split(",")
    unknown = set(hooks) - set(HOOKS)
    if unknown:
        parser.error(f"--hooks: no path {sorted(unknown)}; there are {list(HOOKS)}")
    doc = {"device": args.device, "args": vars(args), "rows": [], "failures": [], "complete": False}
    print(f"host time per gradient on {args.device}: {args.layers} Linear({args.width}, "
          f"{args.width}), k={args.k}, {args.repeats} windows per pipeline "
          f"(* : the ratio's p10-p90 includes 1.0, within this run's noise)", flush=True)
    for hook in hooks:
        name, env = HOOKS[hook]
        child_run = subprocess.run(
            [sys.executable, __file__, "--child", *sys.argv[1:]], capture_output=True,
            text=True, env={**os.environ, **env})
        if child_run.returncode != 0:
            print(f"{name}: FAILED (exit {child_run.returncode}); its output:\n"
                  f"{child_run.stdout}{child_run.stderr}", flush=True)
            doc["failures"].append({"hook": hook, "name": name, "returncode": child_run.returncode,
                                    "stderr": child_run.stderr[-4000:]})
        else:
            for r in json.loads(child_run.stdout.strip().splitlines()[-1]):
                doc["rows"].append(r)
                print(_line(r), flush=True)
        _write(args.json, doc)
    doc["complete"] = True
    _write(args.json, doc)
    noisy = [r for r in doc["rows"] if r["ratio_within_noise"]]
    if noisy:
        print(f"warning: {len(noisy)} of {len(doc['rows'])} ratios are within this run's noise "
              "(marked *)", flush=True)
    return 1 if doc["failures"] else 0


def _write(path: str | None, doc: dict) -> None:
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(path + ".tmp", path)


if __name__ == "__main__":
    sys.exit(main())
