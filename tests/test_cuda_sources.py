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
KERNEL_SOURCES = [source for source in SOURCES if "__global__" in source.read_text()]
INCLUDE = build.csrc_dir() / build.INCLUDE_DIR   # formulas.h, shared with the CPU kernels
TORCH_2_11 = "0x020b000000000000ULL"


def test_there_are_cuda_sources():
    assert SOURCES, "csrc/ has no .cu file"
    assert KERNEL_SOURCES, "csrc/ has no CUDA kernel"


def test_the_cuda_build_compiles_every_cuda_source():
    sources, headers = build.extension_files(build.csrc_dir(), "cuda", ".cu")
    assert sources == SOURCES
    assert INCLUDE / "fused_accum" / "formulas.h" in headers


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA sources cannot be compiled here")
@pytest.mark.parametrize("target", ["installed", "2.11"])
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles(source: Path, target: str, tmp_path: Path):
    include = torch.utils.cpp_extension.include_paths()[0]
    # The flags of the just-in-time build: torch's common nvcc flags (no implicit half/bf16
    # conversions, ...) and ours.
    cmd = [NVCC, "-c", str(source), "-o", str(tmp_path / "out.o"), "-I", include,
           "-I", str(INCLUDE), *torch.utils.cpp_extension.COMMON_NVCC_FLAGS, *build.cuda_flags()]
    if target == "2.11":
        cmd.append(f"-DTORCH_TARGET_VERSION={TORCH_2_11}")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_build_keeps_ptx_for_newer_gpus_and_rounds_every_product():
    flags = build.cuda_flags()
    assert "--fmad=false" in flags
    assert any(f.endswith("code=compute_90") for f in flags)   # PTX: sm_100/sm_120 JIT it


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA sources cannot be compiled here")
@pytest.mark.parametrize("source", KERNEL_SOURCES, ids=lambda p: p.name)
def test_no_fused_multiply_add_in_the_kernels(source: Path, tmp_path: Path):
    """The reference rounds every product before adding it; so must the CUDA kernels (nvcc
    contracts a * b + c into fma.rn.f32 unless told not to)."""
    include = torch.utils.cpp_extension.include_paths()[0]
    flags = [f for f in build.cuda_flags() if not f.startswith("-gencode")]
    ptx = tmp_path / "out.ptx"
    cmd = [NVCC, "-ptx", str(source), "-o", str(ptx), "-I", include, "-I", str(INCLUDE),
           "-arch=sm_90", *torch.utils.cpp_extension.COMMON_NVCC_FLAGS, *flags]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    text = ptx.read_text()
    assert ".entry" in text   # the kernels are there
    assert "fma.rn.f32" not in text and "fma.rn.ftz.f32" not in text
    # Without --fmad=false the same kernels are full of them: the check can fail.
    contracted = tmp_path / "contracted.ptx"
    cmd = [c for c in cmd if c != "--fmad=false"]
    cmd[cmd.index(str(ptx))] = str(contracted)
    assert subprocess.run(cmd, capture_output=True, text=True, timeout=600).returncode == 0
    assert "fma.rn.f32" in contracted.read_text()
