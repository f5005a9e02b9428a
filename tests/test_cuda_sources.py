"""Every CUDA source compiles (compile only: this runs without a GPU).

Two builds per file: against the installed torch's own stable ABI, and restricted to the torch
2.11 ABI (TORCH_TARGET_VERSION), the oldest torch the CUDA ops must run on."""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch.utils.cpp_extension

from fused_accum.kernels import build

NVCC = shutil.which("nvcc")
SOURCES = sorted((build.csrc_dir()).rglob("*.cu"))
TORCH_2_11 = "0x020b000000000000ULL"


def test_there_are_cuda_sources():
    assert SOURCES, "csrc/ has no .cu file"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA sources cannot be compiled here")
@pytest.mark.parametrize("target", ["installed", "2.11"])
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles(source: Path, target: str, tmp_path: Path):
    include = torch.utils.cpp_extension.include_paths()[0]
    # The flags of the just-in-time build: torch's common nvcc flags (no implicit half/bf16
    # conversions, ...) and ours.
    cmd = [NVCC, "-c", str(source), "-o", str(tmp_path / "out.o"), "-I", include,
           *torch.utils.cpp_extension.COMMON_NVCC_FLAGS, *build.cuda_flags()]
    if target == "2.11":
        cmd.append(f"-DTORCH_TARGET_VERSION={TORCH_2_11}")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
