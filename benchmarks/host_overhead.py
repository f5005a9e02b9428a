"""Host time per gradient: what fused_accum's gradient path costs the host beyond autograd's own.

A stack of small Linear layers (so that kernels cost next to nothing and the host's work shows),
k micro-batches per window, SGD momentum, against torch's plain accumulation (``loss / k``, foreach
SGD, ``zero_grad``) on the same model and inputs, interleaved.  With a tiny group bound
(``--group-mb``) every group of a few gradients is one backend call, as every 16 MB weight gradient
is under a GPU's 32 MB bound: this is the cost that made an H200's windows host-bound
(benchmarks/GPU_NOTES.md).  Each hook kind is measured in a fresh process:

  python benchmarks/host_overhead.py [--device cuda] [--group-mb 0.03] [--json OUT]

Prints, per hook kind: window time of both pipelines (median of interleaved repetitions), their
ratio, and the extra host microseconds per gradient.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HOOKS = {   # name -> environment of its process
    "collector (node hook, CPUs)": {},
    "collector (tensor hook, GPUs)": {"HOST_OVERHEAD_TENSOR_HOOK": "1"},
    "python hook": {"FUSED_ACCUM_HOOKS": "python"},
}


def measure(device: str, layers: int, width: int, k: int, repeats: int) -> dict:
    import torch
    import fused_accum
    from fused_accum.gradients import GradBuffers
    if os.environ.get("HOST_OVERHEAD_TENSOR_HOOK"):
        GradBuffers._hook_on_node = staticmethod(lambda param: False)
    torch.set_num_threads(1)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).to(device)

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
    for r in range(repeats + 10):
        for name, window in (("torch", plain_window), ("fused_accum", fused_window)):
            sync()
            start = time.perf_counter()
            window()
            sync()
            if r >= 10:   # warm-up
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) * 1e6 for name, t in times.items()}
    gradients = 2 * layers * k
    collector = fused_opt._buffers._collector
    return {"torch_us": median["torch"], "fused_accum_us": median["fused_accum"],
            "ratio": median["fused_accum"] / median["torch"],
            "extra_us_per_gradient": (median["fused_accum"] - median["torch"]) / gradients,
            "planned_launches": collector.launches() if hasattr(collector, "launches") else None,
            "group_mb": float(os.environ.get("FUSED_ACCUM_GROUP_MB", "nan"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--group-mb", type=float, default=0.03)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.device, args.layers, args.width, args.k, args.repeats)))
        return
    results = {}
    for name, env in HOOKS.items():
        child = subprocess.run(
            [sys.executable, __file__, "--child", *sys.argv[1:]], check=True, capture_output=True,
            text=True, env={**os.environ, "FUSED_ACCUM_GROUP_MB": str(args.group_mb), **env})
        results[name] = json.loads(child.stdout.strip().splitlines()[-1])
        r = results[name]
        print(f"{name:32s} torch {r['torch_us']:8.0f} us  fused_accum {r['fused_accum_us']:8.0f} us"
              f"  {r['ratio']:.3f}x  extra {r['extra_us_per_gradient']:5.2f} us/gradient", flush=True)
    if args.json:
        import torch
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "torch": torch.__version__, "args": vars(args),
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
