"""stochastic_rounding=True: bf16 parameters without masters take unbiased rounded updates."""
import pytest
import torch

import fused_accum
from fused_accum import kernels
from fused_accum.kernels import reference


def _train(stochastic: bool, backend: str, steps: int = 50, lr: float = 1e-4):
    # Every element starts at 1.0 with gradient 1: each fp32 update (1e-4) is far below half a
    # bf16 ulp below 1.0 (2^-9), so round-to-nearest never moves the parameter.
    param = torch.nn.Parameter(torch.ones(100_000, dtype=torch.bfloat16))
    opt = fused_accum.SGD([param], lr=lr, master_weights=False, stochastic_rounding=stochastic,
                          backend=backend)
    for _ in range(steps):
        param.sum().backward()
        opt.step()
        opt.zero_grad()
    return param.detach().double()


def test_mean_of_stochastically_rounded_updates_converges_to_the_fp32_value(backend):
    if kernels.interpreted(backend):   # 50 steps of 100 000 elements take minutes interpreted
        pytest.skip("interpreted Triton draws the reference's bits (tested below, and on a GPU "
                    "in tests/test_gpu.py), so its mean is the reference's")
    torch.manual_seed(0)
    rounded = _train(True, backend)
    nearest = _train(False, backend)
    exact = 1.0 - 50 * 1e-4
    assert torch.equal(nearest, torch.ones_like(nearest))            # updates lost to rounding
    # per element, 50 roundings of at most one ulp (2^-8) each: std <= 2^-9 * sqrt(50) = 0.014;
    # over 100 000 elements the mean's std is below 5e-5
    assert abs(rounded.mean().item() - exact) < 3e-4
    assert set(rounded.unique().tolist()) <= {1.0 - k * 2**-8 for k in range(10)}


def test_stochastic_rounding_depends_on_the_seed_and_repeats_under_manual_seed(backend):
    torch.manual_seed(1)
    a = _train(True, backend, steps=3)
    torch.manual_seed(1)
    b = _train(True, backend, steps=3)
    torch.manual_seed(2)
    c = _train(True, backend, steps=3)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_every_backend_draws_the_reference_bits():
    g = torch.Generator().manual_seed(3)
    values = [torch.randn(n, generator=g) for n in (1, 3, 4097, 70001)]
    results = {}
    for name in kernels.backend_names():
        if not kernels.availability(name, torch.device("cpu"))[0]:
            continue
        backend = kernels.get_backend(name, torch.device("cpu"))
        params = [v.to(torch.bfloat16) for v in values]
        accs = [torch.full_like(v, 1e-4) for v in values]
        backend.sgd_step(params, accs, None, [torch.tensor(7.0) for _ in values], None, lr=1.0,
                         momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                         maximize=False, grad_scale=1.0, found_inf=torch.tensor(0.0),
                         rounding_seed=12345)
        results[name] = params
    for name, params in results.items():
        for p, q in zip(params, results["reference"]):
            assert torch.equal(p, q), name


def test_stochastic_rounding_needs_master_weights_false():
    with pytest.raises(ValueError, match="master_weights=False"):
        fused_accum.SGD([torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))],
                        stochastic_rounding=True)
    assert reference.rounding_bits(0, torch.tensor(0.0), 0, 8).max() < 2**16
