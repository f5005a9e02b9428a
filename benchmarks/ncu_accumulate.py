"""One fp32 accumulate of 256 MB through each contender, for ncu to compare with torch's add_:
ncu --clock-control none --kernel-name regex:'accumulate|elementwise' python benchmarks/ncu_accumulate.py"""
import torch

from fused_accum import kernels

n = 64 * 2**20
g, acc = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
found, weight = torch.zeros((), device="cuda"), torch.ones((), device="cuda")
acc.add_(g)
for name in ("extension", "triton"):
    kernels.get_backend(name, torch.device("cuda")).accumulate([g], [acc], [False], weight, found, None)
torch.cuda.synchronize()
