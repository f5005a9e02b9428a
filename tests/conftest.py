import pytest
import torch

from fused_accum import kernels


def _cpu_backends() -> list[str]:
    return [name for name in kernels.backend_names()
            if kernels.availability(name, torch.device("cpu"))[0]]


@pytest.fixture(params=_cpu_backends())
def backend(request) -> str:
    """Every backend that runs on this machine's CPU; the optimizer tests run once per backend."""
    return request.param
