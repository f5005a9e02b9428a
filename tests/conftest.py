import os

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton backend runs its kernels on CPU tensors under Triton's interpreter,
    # which must be switched on before Triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fused_accum import kernels


def _cpu_backends() -> list[str]:
    return [name for name in kernels.backend_names()
            if kernels.availability(name, torch.device("cpu"))[0]]


@pytest.fixture(params=["collector", "collector on the tensor", "python"])
def hooks(request, monkeypatch):
    """Each gradient hook: the C++ collector's node hook (CPUs), its tensor hook (accelerators;
    forced here on the CPU), and the Python hook."""
    monkeypatch.setenv("FUSED_ACCUM_HOOKS", "python" if request.param == "python" else "auto")
    if request.param == "collector on the tensor":
        from fused_accum.accumulation import Hooks
        monkeypatch.setattr(Hooks, "hook_on_node", staticmethod(lambda param: False))
    return request.param


@pytest.fixture(params=_cpu_backends())
def backend(request) -> str:
    """Every backend that runs on this machine's CPU; the optimizer tests run once per backend."""
    return request.param
