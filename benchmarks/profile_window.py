"""Where a window's time goes on a GPU: torch.profiler over a few windows of one benchmark
configuration, per pipeline; prints the ops by host (self CPU) time and by device time.

    python benchmarks/profile_window.py e b      # configuration names of fused_accum.bench.windows
    python benchmarks/profile_window.py --device cpu --quick d
    python benchmarks/profile_window.py --pipelines "fused_accum fused" "torch best" f
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from fused_accum.bench import windows
from fused_accum.bench.harness import synchronize

parser = argparse.ArgumentParser()
parser.add_argument("configs", nargs="*", default=["e"])
parser.add_argument("--device", default="cuda")
parser.add_argument("--quick", action="store_true")
parser.add_argument("--pipelines", nargs="+", default=["fused_accum", "torch best"],
                    help="pipeline names of fused_accum.bench.windows")
args = parser.parse_args()
device = torch.device(args.device)
activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
for name in args.configs:
    config = next(c for c in windows.configs(device, args.quick) if c.name == name)
    for pipeline in args.pipelines:
        p = windows.make_pipeline(pipeline, config, windows.Workload(config, device, 0), "auto")
        for _ in range(2):
            p.window()
        synchronize(device)
        with profile(activities=activities) as prof:
            for _ in range(3):
                p.window()
            synchronize(device)
        table = prof.key_averages()
        print(f"\n=== ({name}) {pipeline}: 3 windows ===")
        print(table.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60))
        if device.type == "cuda":
            print(table.table(sort_by="self_device_time_total", row_limit=10, max_name_column_width=60))
            del p
            torch.cuda.empty_cache()
