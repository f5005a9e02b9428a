"""master_weights="compact": a bf16 parameter plus an int16 remainder hold the fp32 master exactly."""
import io

import pytest
import torch

import fused_accum
from fused_accum import kernels
from fused_accum.kernels.reference import compact_master, split_master


def test_split_and_combine_are_lossless_on_every_kind_of_value():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(200_000, generator=g) * 10.0 ** torch.randint(-35, 35, (200_000,), generator=g)
    ties = ((torch.randint(0, 2**15, (500,), generator=g, dtype=torch.int32) << 16) | 0x8000).view(torch.float32)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.3895e38, -3.3895e38, 1e-45, -1e-45])
    x = torch.cat([values, ties, -ties, special])
    high, remainder = split_master(x)
    param = high.view(torch.bfloat16)
    assert torch.equal(compact_master(param, remainder).view(torch.int32), x.view(torch.int32))
    # The parameter is x rounded to nearest; only exact ties may differ from torch's RNE cast.
    differs = param.view(torch.int16) != x.to(torch.bfloat16).view(torch.int16)
    is_tie = (x.view(torch.int32) & 0xFFFF) == 0x8000
    assert not (differs & ~is_tie).any() and differs.any()


def _compact_vs_full(backend, op):
    """One step through ``op`` with full and with compact masters on the same inputs."""
    g = torch.Generator().manual_seed(1)
    sizes = [1, 3, 4097, 70001]
    masters = [torch.randn(n, generator=g) for n in sizes]
    common = dict(accs=[torch.randn(n, generator=g) for n in sizes],
                  s1=[torch.randn(n, generator=g) * 0.1 for n in sizes],
                  s2=[torch.rand(n, generator=g) * 0.1 for n in sizes])
    results = {}
    for kind in ("full", "compact"):
        if kind == "full":
            params = [m.to(torch.bfloat16) for m in masters]
            held = [m.clone() for m in masters]
        else:
            pairs = [split_master(m) for m in masters]
            params = [h.view(torch.bfloat16).clone() for h, _ in pairs]
            held = [r.clone() for _, r in pairs]
        c = {k: [t.clone() for t in v] for k, v in common.items()}
        steps = [torch.tensor(3.0) for _ in sizes]
        found = torch.tensor(0.0)
        if op == "sgd":
            backend.sgd_step(params, c["accs"], c["s1"], steps, held, lr=0.1, momentum=0.9,
                             dampening=0.0, weight_decay=0.01, nesterov=True, maximize=False,
                             grad_scale=0.5, found_inf=found)
        else:
            backend.adam_step(params, c["accs"], c["s1"], c["s2"], None, steps, held, lr=1e-2,
                              beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=False,
                              maximize=False, decoupled_weight_decay=True, grad_scale=0.5,
                              found_inf=found)
        master = held if kind == "full" else [compact_master(p, r) for p, r in zip(params, held)]
        results[kind] = (params, master, c["s1"])
    return results


@pytest.mark.parametrize("op", ["sgd", "adam"])
def test_compact_step_reproduces_the_fp32_master_bit_for_bit(backend, op):
    results = _compact_vs_full(kernels.get_backend(backend, torch.device("cpu")), op)
    for full, compact in zip(results["full"][1], results["compact"][1]):
        assert torch.equal(full.view(torch.int32), compact.view(torch.int32))
    for full, compact in zip(results["full"][2], results["compact"][2]):
        assert torch.equal(full, compact)
    for p_full, p_compact, master in zip(results["full"][0], results["compact"][0], results["full"][1]):
        is_tie = (master.view(torch.int32) & 0xFFFF) == 0x8000
        assert torch.equal(p_full[~is_tie], p_compact[~is_tie])


def _param_independent_run(master_weights, backend, windows=6):
    """AdamW on bf16 parameters whose gradients do not depend on the parameters."""
    g = torch.Generator().manual_seed(2)
    params = [torch.nn.Parameter((torch.randn(n, generator=g) * 0.1).bfloat16()) for n in (5, 300, 4099)]
    grads = [[torch.randn(p.shape, generator=g).bfloat16() for p in params] for _ in range(windows * 2)]
    opt = fused_accum.AdamW(params, lr=1e-3, weight_decay=0.1, accumulation_steps=2,
                            master_weights=master_weights, max_grad_norm=1.0, backend=backend)
    for c in grads:
        sum((p * ci).sum() for p, ci in zip(params, c)).backward()
        opt.step()
    return params, opt


def test_compact_masters_track_full_masters_bit_for_bit_over_training(backend):
    full_params, full = _param_independent_run(True, backend)
    compact_params, compact = _param_independent_run("compact", backend)
    for pf, pc in zip(full_params, compact_params):
        master = full.state[pf]["master_param"]
        held = compact_master(pc.detach(), compact.state[pc]["master_remainder"])
        assert torch.equal(master.view(torch.int32), held.view(torch.int32))
        assert torch.equal(full.state[pf]["exp_avg"], compact.state[pc]["exp_avg"])


def test_compact_masters_hold_two_bytes_a_parameter(backend):
    params, opt = _param_independent_run("compact", backend, windows=1)
    held, n = opt.memory_bytes(), sum(p.numel() for p in params)
    assert "master_param" not in held
    per_param = sum(held[k] for k in ("parameters", "master_remainder", "accumulators",
                                      "exp_avg", "exp_avg_sq")) / n
    assert 16 <= per_param <= 16.2   # 2 + 2 + 4 + 8, plus 64-byte slice alignment


@pytest.mark.parametrize("saved,loaded", [("compact", True), (True, "compact")])
def test_state_dicts_convert_between_full_and_compact_masters(saved, loaded, backend):
    params, opt = _param_independent_run(saved, backend, windows=2)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    masters = ([opt.state[p]["master_param"] for p in params] if saved is True else
               [compact_master(p.detach(), opt.state[p]["master_remainder"]) for p in params])
    fresh = [torch.nn.Parameter(t.clone()) for t in checkpoint["params"]]
    opt2 = fused_accum.AdamW(fresh, lr=1e-3, accumulation_steps=2, master_weights=loaded, backend=backend)
    opt2.load_state_dict(checkpoint["opt"])
    for p, master in zip(fresh, masters):
        held = (opt2.state[p]["master_param"] if loaded is True else
                compact_master(p.detach(), opt2.state[p]["master_remainder"]))
        assert torch.equal(held.view(torch.int32), master.view(torch.int32))
