"""Building and loading the compiled ops in csrc/.

The CPU library is built just in time with ninja on first use (``torch.utils.cpp_extension``
caches it under ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) unless
``setup.py`` built it ahead of time (``FUSED_ACCUM_BUILD_EXT=1``).  The CUDA library is built the
same way where torch has CUDA.  A failed build is remembered with its message: ``backend="auto"``
then falls back, and ``backend="extension"`` raises with it.  The gradient collector
(``csrc/autograd/collector.cpp``, C++ hooks on autograd's gradient accumulators) is a Python
module built the same way; without it the gradient hooks run in Python.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import threading
import time
from pathlib import Path

import torch

from . import schemas

_PACKAGE = Path(__file__).resolve().parents[1]
_lock = threading.Lock()
_loaded: dict[str, str | None] = {}   # device type -> None when loaded, else the error


def csrc_dir() -> Path:
    """csrc/ of a source checkout, or the copy setup.py puts inside an installed package."""
    for candidate in (_PACKAGE / "_csrc", _PACKAGE.parent / "csrc"):
        if (candidate / "cpu" / "ops.cpp").exists():
            return candidate
    raise FileNotFoundError(f"csrc/ not found next to {_PACKAGE}")


def cpu_flags() -> list[str]:
    # -fopenmp: at::parallel_for is inline over `omp parallel` in torch's OpenMP builds, so
    # without it the kernels run on one thread (libgomp.so.1 resolves to the copy torch loaded);
    # it also honours the kernels' `omp simd` loops.  -fno-math-errno: sqrt needs no errno
    # branch, so the Adam loop vectorizes; results are the same.  -ffp-contract=off: the fp16
    # conversions rely on separately rounded products.  Never -ffast-math: it would break the
    # non-finite checks and torch's rounding.
    flags = ["-O3", "-std=c++17", "-fno-math-errno", "-fopenmp", "-ffp-contract=off"]
    arch = os.environ.get("FUSED_ACCUM_CPU_ARCH", "native")   # "" for the compiler's default
    if arch:
        flags.append(f"-march={arch}")
    return flags


# Machine code for the GPUs the kernels were written for, and PTX of the newest, which the driver
# compiles for later architectures (sm_100, sm_120) on first use.
CUDA_TARGETS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                "-gencode=arch=compute_90,code=compute_90"]


def cuda_flags() -> list[str]:
    # USE_CUDA declares aoti_torch_get_current_cuda_stream in the stable ABI's shim (torch < 2.13).
    # --fmad=false: every product is rounded before it is added, as the reference (and the CPU
    # build's -ffp-contract=off, and Triton's enable_fp_fusion=False) rounds it, so backends agree
    # bit for bit and a checkpoint can move between them.
    return ["-O3", "-std=c++17", "-lineinfo", "-DUSE_CUDA", "--fmad=false", *CUDA_TARGETS]


def _prebuilt(device_type: str) -> Path | None:
    spec = importlib.util.find_spec(f"fused_accum._C_{device_type}")
    return Path(spec.origin) if spec and spec.origin else None


def _build(device_type: str) -> None:
    from torch.utils import cpp_extension
    prebuilt = _prebuilt(device_type)
    if prebuilt is not None:
        torch.ops.load_library(str(prebuilt))
        return
    src = csrc_dir()
    if device_type == "cpu":
        sources = [src / "cpu" / "ops.cpp"]
        kwargs = {"extra_cflags": cpu_flags(), "extra_ldflags": ["-fopenmp"]}
    else:
        sources = [src / "cuda" / "ops.cu"]
        kwargs = {"extra_cflags": ["-O3", "-std=c++17"], "extra_cuda_cflags": cuda_flags()}
    start = time.perf_counter()
    cpp_extension.load(name=f"fused_accum_{device_type}", sources=[str(s) for s in sources],
                       is_python_module=False, verbose=bool(os.environ.get("FUSED_ACCUM_VERBOSE")),
                       **kwargs)
    seconds = time.perf_counter() - start
    if seconds > 2:   # a cached load takes milliseconds: this was a build
        print(f"fused_accum: built the {device_type.upper()} extension in {seconds:.0f} s "
              "(cached for next time)", file=sys.stderr, flush=True)


def load(device_type: str) -> str | None:
    """Load the compiled ops for ``device_type`` ("cpu" or "cuda"); None, or why they cannot."""
    with _lock:
        if device_type not in _loaded:
            schemas.define()
            if device_type == "cuda" and not torch.cuda.is_available():
                _loaded[device_type] = "torch has no CUDA device here"
            elif device_type not in ("cpu", "cuda"):
                _loaded[device_type] = f"no compiled ops for {device_type} devices"
            else:
                try:
                    _build(device_type)
                    _loaded[device_type] = None
                except Exception as exc:   # kept as the reason; "auto" falls back on it
                    _loaded[device_type] = f"build failed: {type(exc).__name__}: {exc}"
        return _loaded[device_type]


_collector: list = []   # [module or None, error or None] once tried


def load_collector():
    """The gradient collector module, or (None, why it cannot be built)."""
    with _lock:
        if not _collector:
            try:
                spec = importlib.util.find_spec("fused_accum._C_collector")
                if spec is not None and spec.origin:
                    module = importlib.import_module("fused_accum._C_collector")
                else:
                    from torch.utils import cpp_extension
                    start = time.perf_counter()
                    module = cpp_extension.load(
                        name="fused_accum_collector",
                        sources=[str(csrc_dir() / "autograd" / "collector.cpp")],
                        extra_cflags=["-O2", "-std=c++17"], is_python_module=True,
                        verbose=bool(os.environ.get("FUSED_ACCUM_VERBOSE")))
                    if time.perf_counter() - start > 2:
                        print("fused_accum: built the gradient collector in "
                              f"{time.perf_counter() - start:.0f} s (cached for next time)",
                              file=sys.stderr, flush=True)
                _collector.extend([module, None])
            except Exception as exc:
                _collector.extend([None, f"build failed: {type(exc).__name__}: {exc}"])
        return _collector[0], _collector[1]
