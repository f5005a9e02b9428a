"""A large sparse embedding (nn.Embedding(sparse=True)) trained with accumulation: fused_accum's SGD
against torch's, in time per window and in peak memory.

torch: ``(loss / k).backward()`` k times into sparse ``.grad`` (autograd sums sparse tensors),
``torch.optim.SGD`` (which steps the gradient's rows), ``zero_grad()``.  fused_accum:
``fused_accum.SGD(accumulation_steps=k)``, whose sparse sums stay sparse (fused_accum/accumulation/sparse.py).
Both run the same model, micro-batches and order, interleaved; each pipeline's peak memory is the
peak resident size of a fresh process that trains it, less that of a process that only builds the
model and its micro-batches (reported beside it).

  python benchmarks/sparse_embedding.py [--vocab 1000000] [--dim 64] [--tokens 512] [--k 8]
                                        [--repeats 9] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

PIPELINES = ("torch", "fused_accum", "none")


def build(args):
    import torch
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model = torch.nn.Sequential(torch.nn.Embedding(args.vocab, args.dim, sparse=True),
                                torch.nn.Linear(args.dim, 16))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, args.vocab, (args.tokens,), generator=g),
                torch.randint(0, 16, (args.tokens,), generator=g)) for _ in range(args.k)]
    return model, batches


def loss_of(model, batch):
    import torch.nn.functional as F
    tokens, targets = batch
    return F.cross_entropy(model(tokens), targets)


def make_window(pipeline, model, batches, k):
    import torch
    import fused_accum
    if pipeline == "torch":
        opt = torch.optim.SGD(model.parameters(), lr=0.1)

        def window():
            for batch in batches:
                (loss_of(model, batch) / k).backward()
            opt.step()
            opt.zero_grad()
    else:
        opt = fused_accum.SGD(model.parameters(), lr=0.1, accumulation_steps=k)

        def window():
            for batch in batches:
                loss_of(model, batch).backward()
                opt.step()
                opt.zero_grad()
            assert opt.stepped
    return window


def child(args) -> None:
    """One pipeline in this process: train a few windows, print the peak resident size."""
    model, batches = build(args)
    if args.child != "none":
        window = make_window(args.child, model, batches, args.k)
        for _ in range(3):
            window()
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def peak(args, pipeline: str) -> float:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}   # freed blocks leave the process
    out = subprocess.run([sys.executable, __file__, "--child", pipeline, "--vocab", str(args.vocab),
                          "--dim", str(args.dim), "--tokens", str(args.tokens), "--k", str(args.k)],
                         env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the {pipeline} process failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--vocab", type=int, default=1_000_000, help="embedding rows")
    parser.add_argument("--dim", type=int, default=64, help="embedding width")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per micro-batch")
    parser.add_argument("--k", type=int, default=8, help="micro-batches per window")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved timed windows each")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", choices=PIPELINES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    import copy
    import torch
    import fused_accum
    model, batches = build(args)
    models = {p: copy.deepcopy(model) for p in ("torch", "fused_accum")}
    windows = {p: make_window(p, models[p], batches, args.k) for p in models}
    times = {p: [] for p in models}
    for p in models:
        windows[p]()   # warm up
    for _ in range(args.repeats):
        for p in models:
            start = time.perf_counter()
            windows[p]()
            times[p].append(time.perf_counter() - start)
    diff = max((a - b).abs().max().item()
               for a, b in zip(models["torch"].parameters(), models["fused_accum"].parameters()))
    base = peak(args, "none")
    rows = {}
    for p in models:
        ms = statistics.median(times[p]) * 1e3
        ratios = sorted(a / b for a, b in zip(times[p], times["torch"]))
        rows[p] = {"ms_per_window": round(ms, 3),
                   "time_vs_torch": round(ms / (statistics.median(times["torch"]) * 1e3), 3),
                   "ratio_p10_p90": [round(ratios[len(ratios) // 10], 3),
                                     round(ratios[-1 - len(ratios) // 10], 3)],
                   "peak_memory_mb": round(peak(args, p), 1)}
        rows[p]["beyond_model_mb"] = round(rows[p]["peak_memory_mb"] - base, 1)
    for p in rows:
        rows[p]["memory_vs_torch"] = round(rows[p]["peak_memory_mb"] / rows["torch"]["peak_memory_mb"], 3)
    result = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "fused_accum": fused_accum.__version__,
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "config": {"vocab": args.vocab, "dim": args.dim, "tokens": args.tokens, "k": args.k,
                         "repeats": args.repeats},
              "max_abs_diff": diff, "pipelines": rows}
    print(f"embedding {args.vocab} x {args.dim}, {args.tokens} tokens x {args.k} micro-batches; "
          f"largest parameter difference {diff:.1e}")
    print(f"{'pipeline':12} {'ms/window':>10} {'time vs torch (p10-p90)':>26} {'peak MB':>9} "
          f"{'beyond model':>13} {'memory':>7}")
    for p, r in rows.items():
        spread = f"{r['time_vs_torch']:.2f}x ({r['ratio_p10_p90'][0]:.2f}-{r['ratio_p10_p90'][1]:.2f})"
        print(f"{p:12} {r['ms_per_window']:10.1f} {spread:>26} {r['peak_memory_mb']:9.1f} "
              f"{r['beyond_model_mb']:13.1f} {r['memory_vs_torch']:6.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
