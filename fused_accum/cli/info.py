"""``python -m fused_accum info``: versions, devices, and which backends can run where."""
from __future__ import annotations

import argparse
import importlib
import platform

import torch

from .. import __version__, kernels


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except Exception as exc:
        return f"not available ({type(exc).__name__}: {exc})"


def devices() -> list[torch.device]:
    found = [torch.device("cpu")]
    if torch.cuda.is_available():
        found += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return found


def run(args: argparse.Namespace | None = None) -> int:
    print(f"fused_accum {__version__}")
    print(f"python      {platform.python_version()} ({platform.machine()})")
    print(f"torch       {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"triton      {_version('triton')}")
    print(f"numpy       {_version('numpy')}")
    from ..kernels import build
    module, reason = build.load_collector()
    print("gradient hooks: " + ("the C++ collector (one Python call per group of gradients)"
                                if module is not None else
                                f"Python, one call per gradient (collector: {reason})"))
    for device in devices():
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        print(f"\ndevice {device}: {name}")
        try:
            chosen = kernels.get_backend("auto", device).name
        except Exception as exc:
            chosen = f"none ({exc})"
        print(f"  backend='auto' uses: {chosen}")
        for backend in kernels.backend_names():
            ok, reason = kernels.availability(backend, device)
            print(f"  {backend:<10} {'available' if ok else 'unavailable'}: {reason}")
    return 0
