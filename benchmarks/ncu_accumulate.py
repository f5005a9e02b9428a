"""One fp32 accumulate of 256 MB through each compiled contender, for ncu to compare with torch's
add_:

    ncu --clock-control none --kernel-name regex:'accumulate|elementwise' python benchmarks/ncu_accumulate.py

``--device cpu --mb 4`` runs the same calls on a CPU without ncu (the GPU session's dry run).
"""
import argparse

import torch

from fused_accum import kernels

parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run")
parser.add_argument("--mb", type=int, default=256, help="fp32 megabytes accumulated")
args = parser.parse_args()
device = torch.device(args.device)
n = args.mb * 2**20 // 4
g, acc = torch.randn(n, device=device), torch.randn(n, device=device)
found, weight = torch.zeros((), device=device), torch.ones((), device=device)
acc.add_(g)
for name in ("extension", "triton"):
    ok, why = kernels.availability(name, device)
    if not ok or kernels.interpreted(name):
        print(f"{name}: not run on {device} ({why or 'interpreted'})")
        continue
    kernels.get_backend(name, device).accumulate([g], [acc], [False], weight, found, None)
    print(f"{name}: accumulated {args.mb} MB on {device}")
if device.type == "cuda":
    torch.cuda.synchronize()
