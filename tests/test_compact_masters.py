"""master_weights="compact": a bf16 parameter plus an int16 remainder hold the fp32 master exactly."""
import io

import pytest
import torch

import fused_accum
from fused_accum import kernels
from fused_accum.kernels.reference import compact_master, split_master
from helpers import write_some_elements


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


def _zero_lr_step(backend, op, params, remainders):
    """A step that changes no parameter: lr 0 (the decoupled decay factor is then 1)."""
    ops = kernels.get_backend(backend, torch.device("cpu"))
    accs = [torch.randn(p.shape) for p in params]
    state = [[torch.rand(p.shape) for p in params] for _ in range(2)]
    steps = [torch.tensor(3.0) for _ in params]
    if op == "sgd":
        ops.sgd_step(params, accs, state[0], steps, remainders, lr=0.0, momentum=0.9,
                     dampening=0.0, weight_decay=0.01, nesterov=True, maximize=False,
                     grad_scale=0.5, found_inf=torch.tensor(0.0))
    else:
        ops.adam_step(params, accs, state[0], state[1], None, steps, remainders, lr=0.0,
                      beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=False,
                      maximize=False, decoupled_weight_decay=True, grad_scale=0.5,
                      found_inf=torch.tensor(0.0))


def _compact_pairs(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    pairs = [split_master(torch.randn(n, generator=g)) for n in sizes]
    return [h.view(torch.bfloat16).clone() for h, _ in pairs], [r.clone() for _, r in pairs]


@pytest.mark.parametrize("op", ["sgd", "adam"])
def test_a_written_parameter_moves_its_compact_master_with_it(backend, op):
    """A bf16 parameter written between steps (load_state_dict, clamp_) takes its master along:
    the master becomes the written value plus the old remainder, less than half an ulp, so it
    still rounds to what was written, and a step that moves nothing leaves it as written."""
    params, remainders = _compact_pairs([3, 4097, 70001], seed=4)
    for i, p in enumerate(params):
        write_some_elements(p, seed=i)
        assert not (p == 0).any()   # see the zero case below
    written = [p.clone() for p in params]
    for p, r in zip(params, remainders):
        assert torch.equal(split_master(compact_master(p, r))[0], p.view(torch.int16))
    _zero_lr_step(backend, op, params, remainders)
    for p, w in zip(params, written):
        assert torch.equal(p.view(torch.int16), w.view(torch.int16))


@pytest.mark.parametrize("zero", [0.0, -0.0])
def test_a_parameter_written_to_zero_keeps_training_with_compact_masters(backend, zero):
    """A bf16 zero written over a negative remainder (LayerNorm.reset_parameters() on its bias
    writes +0; p.mul_(0) on a negative weight writes -0) made (p << 16) + r wrap past the sign
    bit into a NaN master, which split back into a zero parameter: the element stopped training,
    silently.  The pair is no longer one a step writes, so it reads as the written zero."""
    params, remainders = _compact_pairs([4097], seed=5)
    params[0].fill_(zero)
    negative = remainders[0] < 0
    assert negative.any() and (remainders[0] > 0).any()
    kernels.get_backend(backend, torch.device("cpu")).sgd_step(
        params, [torch.ones(4097)], None, [torch.tensor(3.0)], remainders, lr=0.1, momentum=0.0,
        dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False, grad_scale=1.0,
        found_inf=torch.tensor(0.0))
    master = compact_master(params[0], remainders[0])
    assert not torch.isnan(master).any()
    assert (params[0][negative] != 0).all()   # each element moved by -0.1
    # exactly from the written zero where the remainder was dropped: the master is 0 - 0.1
    assert torch.equal(master[negative], torch.full_like(master[negative], -0.1))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_an_infinite_parameter_written_over_a_positive_remainder_stays_infinite(backend, sign):
    """bf16 +-inf written over a positive remainder made (p << 16) + r a NaN master.  It reads as
    the written infinity now, and a step keeps it.  Over a negative remainder the pair is the one
    a step writes for the largest finite fp32 masters, which round to infinity: the master stays
    within the parameter's rounding, finite, as every written parameter's master does."""
    params, remainders = _compact_pairs([4097], seed=6)
    params[0].fill_(sign * float("inf"))
    positive, negative = remainders[0] > 0, remainders[0] < 0
    assert positive.any() and negative.any()
    kernels.get_backend(backend, torch.device("cpu")).sgd_step(
        params, [torch.ones(4097)], None, [torch.tensor(3.0)], remainders, lr=0.1, momentum=0.0,
        dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False, grad_scale=1.0,
        found_inf=torch.tensor(0.0))
    master = compact_master(params[0], remainders[0])
    assert not torch.isnan(master).any()
    assert (params[0] == sign * float("inf")).all()
    assert (master[positive] == sign * float("inf")).all()
    assert (remainders[0][positive] == 0).all()
    largest = torch.tensor(0x7F7F8000, dtype=torch.int32).view(torch.float32)   # rounds to inf
    assert (master[negative].abs() >= largest).all() and torch.isfinite(master[negative]).all()


# Training after writes, compact masters against fp32 masters.  The gradients do not depend on
# the parameters (loss = sum(p * c)), so each element trains on its own and the two runs can be
# compared element by element: the same bits where nothing was written and where a compact
# master drops its remainder (a zero over a negative remainder, an infinity over a positive one:
# the master is then the written value, as an fp32 master is), and within the parameter's bf16
# rounding where a written parameter kept its stale remainder (less than half an ulp of it).

class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(96)
        self.proj = torch.nn.Linear(96, 40)


def _block(seed):
    torch.manual_seed(seed)
    block = _Block()
    with torch.no_grad():
        block.norm.weight.uniform_(0.5, 1.5)
        block.norm.bias.uniform_(-0.5, 0.5)
        block.proj.bias.uniform_(-0.5, 0.5)
    return block.to(torch.bfloat16)


def _written_elements_kept(master_weights, backend, optimizer, windows=6, written_after=2):
    block = _block(8)
    params = list(block.parameters())
    g = torch.Generator().manual_seed(9)
    grads = [[torch.randn(p.shape, generator=g).bfloat16() for p in params] for _ in range(windows * 2)]
    kwargs = dict(accumulation_steps=2, master_weights=master_weights, backend=backend)
    opt = (fused_accum.AdamW(params, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0, **kwargs)
           if optimizer == "adamw" else
           fused_accum.SGD(params, lr=0.05, momentum=0.9, nesterov=True, **kwargs))

    def remainders():
        if master_weights == "compact":
            return [opt.state[p]["master_remainder"].clone() for p in params]
        return [split_master(opt.state[p]["master_param"])[1] for p in params]

    for i, c in enumerate(grads):
        if i == 2 * written_after:
            before = [p.detach().clone() for p in params]
            stale = remainders()
            with torch.no_grad():
                block.norm.reset_parameters()             # bias to zeros, weight to ones
                block.proj.weight.clamp_(-0.05, 0.05)
                bias = block.proj.bias                    # +-inf over the positive remainders
                sign = torch.where(torch.arange(bias.numel()) % 2 == 0, 1.0, -1.0)
                infinite = stale[3] > 0
                bias.copy_(torch.where(infinite, sign * float("inf"), bias.float()).bfloat16())
            values = [p.detach().clone() for p in params]
            written = [v.view(torch.int16) != b.view(torch.int16) for v, b in zip(values, before)]
            exact = [torch.zeros_like(w) for w in written]
            exact[1] = written[1] & (stale[1] < 0)        # LayerNorm bias: zero over negative
            exact[3] = written[3] & infinite
            assert exact[1].any() and exact[3].any() and (written[1] & ~exact[1]).any()
        sum((p.float() * ci.float()).sum() for p, ci in zip(params, c)).backward()
        opt.step()
    if master_weights == "compact":
        masters = [compact_master(p.detach(), opt.state[p]["master_remainder"]) for p in params]
    else:
        masters = [opt.state[p]["master_param"] for p in params]
    return [p.detach() for p in params], masters, values, written, exact


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_compact_masters_train_on_from_written_parameters_as_fp32_masters_do(backend, optimizer):
    full_params, full_masters, values, written, exact = _written_elements_kept(True, backend,
                                                                               optimizer)
    compact_params, compact_masters, _, written_c, exact_c = _written_elements_kept(
        "compact", backend, optimizer)
    for w, wc, e, ec in zip(written, written_c, exact, exact_c):
        assert torch.equal(w, wc) and torch.equal(e, ec)
    for pf, pc, mf, mc, v, w, e in zip(full_params, compact_params, full_masters, compact_masters,
                                       values, written, exact):
        assert not torch.isnan(mc).any() and not torch.isnan(mf).any()
        same = ~w | e
        assert torch.equal(mc[same].view(torch.int32), mf[same].view(torch.int32))
        is_tie = (mf.view(torch.int32) & 0xFFFF) == 0x8000   # RNE cast and ties-away split
        assert torch.equal(pc[same & ~is_tie].view(torch.int16), pf[same & ~is_tie].view(torch.int16))
        kept = w & ~e   # written values that kept their stale remainders
        if kept.any():
            largest = torch.maximum(v[kept].float().abs(), pf[kept].float().abs())
            ulp = 2.0 ** (torch.frexp(largest).exponent.float() - 8)   # bf16 ulp
            assert ((mc[kept] - mf[kept]).abs() <= 0.5 * ulp + 1e-6 * mf[kept].abs()).all()
            assert ((pc[kept].float() - pf[kept].float()).abs() <= ulp).all()
