"""sgd_step and adam_step of every backend against the float64 oracle."""
import pytest
import torch

import oracle
from fused_accum import kernels
from fused_accum.kernels.reference import compact_master, split_master
from helpers import every_compact_pair, write_compact_parameters, write_some_elements

SIZES = oracle.SIZES


def _ops(name):
    return kernels.get_backend(name, torch.device("cpu"))


def _tensors(size, dtype, seed, master):
    g = torch.Generator().manual_seed(seed)
    p32 = torch.randn(size, generator=g)
    return dict(
        param=p32.to(dtype), master=p32.clone() if master else None,
        acc=torch.randn(size, generator=g) * 5,
        state=[torch.randn(size, generator=g) * 0.1 for _ in range(2)] + [torch.rand(size, generator=g)],
    )


SGD_CASES = [
    dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    dict(lr=0.05, momentum=0.9, dampening=0.2, weight_decay=0.01, nesterov=False, maximize=True),
    dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.1, nesterov=True, maximize=False),
]


def _check_param(param, master, expected, dtype):
    if master is not None:
        assert oracle.rel_err(master, expected) < 1e-6
        assert torch.equal(param, master.to(dtype))
    else:
        tol = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
        assert oracle.rel_err(param, expected) <= tol


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True),
                                          (torch.float16, True), (torch.bfloat16, False)])
@pytest.mark.parametrize("case", range(len(SGD_CASES)))
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("step", [0, 3])
def test_sgd_step(backend, dtype, master, case, size, step):
    size = oracle.size_for(backend, size)
    hp, t = SGD_CASES[case], _tensors(size, dtype, seed=size + case, master=master)
    buf = t["state"][0]
    p0, buf0 = (t["master"] if master else t["param"]).clone(), buf.clone()
    steps = [torch.tensor(float(step))]
    _ops(backend).sgd_step([t["param"]], [t["acc"]], [buf] if hp["momentum"] else None, steps,
                           [t["master"]] if master else None, **hp,
                           grad_scale=torch.tensor(0.25), found_inf=torch.tensor(0.0))
    expected, expected_buf = oracle.sgd(p0, t["acc"], buf0, step, **hp, grad_scale=0.25)
    _check_param(t["param"], t["master"], expected, dtype)
    if hp["momentum"]:
        assert oracle.rel_err(buf, expected_buf) < 1e-6
    assert steps[0].item() == step + 1


ADAM_CASES = [
    dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False,
         maximize=False, decoupled_weight_decay=False),
    dict(lr=3e-3, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1, amsgrad=True,
         maximize=True, decoupled_weight_decay=False),
    dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, amsgrad=False,
         maximize=False, decoupled_weight_decay=True),
]


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True),
                                          (torch.float16, True), (torch.bfloat16, False)])
@pytest.mark.parametrize("case", range(len(ADAM_CASES)))
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("step", [0, 41])
def test_adam_step(backend, dtype, master, case, size, step):
    size = oracle.size_for(backend, size)
    hp, t = ADAM_CASES[case], _tensors(size, dtype, seed=size * 7 + case, master=master)
    m, v, vmax = t["state"][0], t["state"][1].abs(), t["state"][2]
    p0, m0, v0, vmax0 = ((t["master"] if master else t["param"]).clone(), m.clone(), v.clone(),
                         vmax.clone())
    steps = [torch.tensor(float(step))]
    _ops(backend).adam_step([t["param"]], [t["acc"]], [m], [v], [vmax] if hp["amsgrad"] else None,
                            steps, [t["master"]] if master else None, **hp,
                            grad_scale=torch.tensor(0.5), found_inf=torch.tensor(0.0))
    expected, em, ev, evmax = oracle.adam(p0, t["acc"], m0, v0, vmax0, step, **hp, grad_scale=0.5)
    _check_param(t["param"], t["master"], expected, dtype)
    assert oracle.rel_err(m, em) < 1e-6 and oracle.rel_err(v, ev) < 1e-6
    if hp["amsgrad"]:
        assert oracle.rel_err(vmax, evmax) < 1e-6
    assert steps[0].item() == step + 1


# Parameters written since the last step (load_state_dict, an initialiser, clamp_): the elements
# whose bits are no longer the master's rounding are updated from their written values.

def _write_parameters(t, seed):
    """Writes some elements of t["param"] and poisons the stale masters of half of them with NaN
    (a written element's master must not reach its update).  Returns (mask of the written
    elements, the fp32 values the step must update)."""
    written = write_some_elements(t["param"], seed)
    poisoned = written & (torch.arange(written.numel()) % 2 == 0)
    t["master"][poisoned] = float("nan")
    untouched = ~written
    # the untouched masters hold detail below the parameter's ulp, which a step must keep using
    assert (t["master"][untouched] != t["param"][untouched].float()).any()
    return written, torch.where(written, t["param"].float(), t["master"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", range(len(SGD_CASES)))
@pytest.mark.parametrize("size", [3, 4097, oracle.LARGE])
def test_sgd_step_updates_written_parameters_from_the_written_values(backend, dtype, case, size):
    size = oracle.size_for(backend, size)
    hp, t = SGD_CASES[case], _tensors(size, dtype, seed=size + case + 100, master=True)
    _, p0 = _write_parameters(t, seed=size + case)
    buf = t["state"][0]
    buf0 = buf.clone()
    _ops(backend).sgd_step([t["param"]], [t["acc"]], [buf] if hp["momentum"] else None,
                           [torch.tensor(3.0)], [t["master"]], **hp,
                           grad_scale=torch.tensor(0.25), found_inf=torch.tensor(0.0))
    expected, expected_buf = oracle.sgd(p0, t["acc"], buf0, 3, **hp, grad_scale=0.25)
    _check_param(t["param"], t["master"], expected, dtype)
    if hp["momentum"]:
        assert oracle.rel_err(buf, expected_buf) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", range(len(ADAM_CASES)))
@pytest.mark.parametrize("size", [3, 4097, oracle.LARGE])
def test_adam_step_updates_written_parameters_from_the_written_values(backend, dtype, case, size):
    size = oracle.size_for(backend, size)
    hp, t = ADAM_CASES[case], _tensors(size, dtype, seed=size * 7 + case + 100, master=True)
    _, p0 = _write_parameters(t, seed=size + case)
    m, v, vmax = t["state"][0], t["state"][1].abs(), t["state"][2]
    m0, v0, vmax0 = m.clone(), v.clone(), vmax.clone()
    _ops(backend).adam_step([t["param"]], [t["acc"]], [m], [v], [vmax] if hp["amsgrad"] else None,
                            [torch.tensor(41.0)], [t["master"]], **hp,
                            grad_scale=torch.tensor(0.5), found_inf=torch.tensor(0.0))
    expected, em, ev, evmax = oracle.adam(p0, t["acc"], m0, v0, vmax0, 41, **hp, grad_scale=0.5)
    _check_param(t["param"], t["master"], expected, dtype)
    assert oracle.rel_err(m, em) < 1e-6 and oracle.rel_err(v, ev) < 1e-6
    if hp["amsgrad"]:
        assert oracle.rel_err(vmax, evmax) < 1e-6


# Compact masters (bf16 parameter p, int16 remainder r: the fp32 master is the bits (p << 16) + r)
# of parameters written since the last step: a written value that the stale remainder leaves the
# master's rounding keeps the remainder (less than half an ulp); one whose master it is not (a
# zero over a negative remainder, an infinity over a positive one: a NaN bit pattern) drops it.

def _compact_tensors(size, seed):
    g = torch.Generator().manual_seed(seed)
    high, remainder = split_master(torch.randn(size, generator=g))
    return dict(param=high.view(torch.bfloat16).clone(), rem=remainder.clone(),
                acc=torch.randn(size, generator=g) * 5,
                state=[torch.randn(size, generator=g) * 0.1 for _ in range(2)] + [torch.rand(size, generator=g)])


def _stale_master(param, remainder):
    """fp32 (param bits << 16) + remainder, computed apart from the backends."""
    u = (param.view(torch.int16).to(torch.int64) << 16) + remainder.to(torch.int64)
    u = u & 0xFFFFFFFF
    return torch.where(u >= 2**31, u - 2**32, u).to(torch.int32).view(torch.float32)


def _write_compact(t, seed):
    """Writes t["param"] (see write_compact_parameters); returns the fp32 values a step updates."""
    master = compact_master(t["param"], t["rem"]).clone()
    written, dropped = write_compact_parameters(t["param"], t["rem"], seed)
    assert dropped.any() and (written & ~dropped).any()
    stale = _stale_master(t["param"], t["rem"])
    assert torch.isnan(stale[dropped]).all()   # what the masters of those used to be
    kept = torch.where(written, stale, master)
    return torch.where(dropped, t["param"].float(), kept)


def _check_with_non_finite(actual, expected, tol=1e-6):
    """Finite elements to ``tol`` of the oracle; infinities and NaNs where the oracle has them."""
    expected = expected.to(torch.float32)
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isnan(actual), torch.isnan(expected))
    assert torch.equal(actual[torch.isinf(expected)], expected[torch.isinf(expected)])
    assert oracle.rel_err(actual[finite], expected.double()[finite]) < tol


def _check_compact(t, expected):
    master = compact_master(t["param"], t["rem"])
    _check_with_non_finite(master, expected)
    # what a step writes is a pair the split of its master gives: the parameter shows the master
    high, remainder = split_master(master)
    assert torch.equal(high, t["param"].view(torch.int16)) and torch.equal(remainder, t["rem"])


@pytest.mark.parametrize("case", range(len(SGD_CASES)))
@pytest.mark.parametrize("size", [3 * 7, 4097, oracle.LARGE])
def test_sgd_step_updates_written_compact_parameters_from_the_written_values(backend, case, size):
    size = oracle.size_for(backend, size)
    hp, t = SGD_CASES[case], _compact_tensors(size, seed=size + case + 200)
    p0 = _write_compact(t, seed=size + case)
    buf = t["state"][0]
    buf0 = buf.clone()
    _ops(backend).sgd_step([t["param"]], [t["acc"]], [buf] if hp["momentum"] else None,
                           [torch.tensor(3.0)], [t["rem"]], **hp,
                           grad_scale=torch.tensor(0.25), found_inf=torch.tensor(0.0))
    expected, expected_buf = oracle.sgd(p0, t["acc"], buf0, 3, **hp, grad_scale=0.25)
    _check_compact(t, expected)
    if hp["momentum"]:
        _check_with_non_finite(buf, expected_buf)


@pytest.mark.parametrize("case", range(len(ADAM_CASES)))
@pytest.mark.parametrize("size", [3 * 7, 4097, oracle.LARGE])
def test_adam_step_updates_written_compact_parameters_from_the_written_values(backend, case, size):
    size = oracle.size_for(backend, size)
    hp, t = ADAM_CASES[case], _compact_tensors(size, seed=size * 7 + case + 200)
    p0 = _write_compact(t, seed=size + case)
    m, v, vmax = t["state"][0], t["state"][1].abs(), t["state"][2]
    m0, v0, vmax0 = m.clone(), v.clone(), vmax.clone()
    _ops(backend).adam_step([t["param"]], [t["acc"]], [m], [v], [vmax] if hp["amsgrad"] else None,
                            [torch.tensor(41.0)], [t["rem"]], **hp,
                            grad_scale=torch.tensor(0.5), found_inf=torch.tensor(0.0))
    expected, em, ev, evmax = oracle.adam(p0, t["acc"], m0, v0, vmax0, 41, **hp, grad_scale=0.5)
    _check_compact(t, expected)
    _check_with_non_finite(m, em)
    _check_with_non_finite(v, ev)
    if hp["amsgrad"]:
        _check_with_non_finite(vmax, evmax)


def _pair_bits(param, remainder):
    return param.view(torch.int16).to(torch.int64) & 0xFFFF, remainder.to(torch.int64)


def test_a_step_that_moves_nothing_keeps_every_compact_pair_a_step_writes(backend):
    """Every bf16 parameter with remainders at the ends of their range and around zero, through
    a step that moves nothing (lr 0, a positive gradient: p - 0 is p, -0.0 included).  A pair
    whose master is not NaN is one a step writes, whatever it is (remainder -32768, p at the
    largest finite bf16, +-0, +-inf over a negative remainder: the largest finite fp32 values,
    which round to inf) and is kept bit for bit.  A pair whose master is a NaN bit pattern and
    whose parameter is not NaN was written (+-0 over a negative remainder, +-inf over a positive
    one): it drops its remainder.  A NaN parameter stays NaN, as torch writes it (0x7FC0), with
    remainder 0: a NaN master is always split so."""
    param, remainder = every_compact_pair()
    p_bits, r_bits = _pair_bits(param, remainder)
    u = ((p_bits << 16) + r_bits) & 0xFFFFFFFF
    master_is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    param_is_nan = (p_bits & 0x7FFF) > 0x7F80
    assert (master_is_nan & ~param_is_nan).sum() == 2 * 3 + 2 * 2   # +-0 over r < 0, +-inf over r > 0
    for op in ("sgd", "adam"):
        p, r = param.clone(), remainder.clone()
        ones = torch.ones(p.numel())
        state = [torch.zeros(p.numel()), torch.ones(p.numel())]
        if op == "sgd":
            _ops(backend).sgd_step([p], [ones], None, [torch.tensor(3.0)], [r], lr=0.0,
                                   momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                                   maximize=False, grad_scale=1.0, found_inf=torch.tensor(0.0))
        else:   # lr 0: a step size of 0 times a positive update
            _ops(backend).adam_step([p], [ones], state[:1], state[1:], None, [torch.tensor(3.0)],
                                    [r], lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8,
                                    weight_decay=0.0, amsgrad=False, maximize=False,
                                    decoupled_weight_decay=True, grad_scale=1.0,
                                    found_inf=torch.tensor(0.0))
        got_p, got_r = _pair_bits(p, r)
        assert torch.equal(got_p, torch.where(param_is_nan, 0x7FC0, p_bits)), op
        assert torch.equal(got_r, torch.where(master_is_nan, 0, r_bits)), op


@pytest.mark.parametrize("op", ["sgd", "adam"])
def test_a_set_non_finite_flag_changes_nothing(backend, op):
    t = _tensors(4097, torch.bfloat16, seed=1, master=True)
    write_some_elements(t["param"], seed=1)   # a skipped step keeps written parameters too
    t["acc"][17] = float("inf")
    state = [s.abs() for s in t["state"]]
    steps = [torch.tensor(5.0)]
    before = [x.clone() for x in [t["param"], t["master"], *state, steps[0]]]
    ops = _ops(backend)
    if op == "sgd":
        ops.sgd_step([t["param"]], [t["acc"]], [state[0]], steps, [t["master"]], **SGD_CASES[1],
                     grad_scale=1.0, found_inf=torch.tensor(1.0))
    else:
        ops.adam_step([t["param"]], [t["acc"]], [state[0]], [state[1]], [state[2]], steps,
                      [t["master"]], **ADAM_CASES[1], grad_scale=1.0, found_inf=torch.tensor(1.0))
    for b, a in zip(before, [t["param"], t["master"], *state, steps[0]]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", ["sgd", "adam"])
def test_a_set_non_finite_flag_changes_no_compact_pair(backend, op):
    """Not even a written one's: its remainder is dropped by a step taken, not by a skipped one."""
    t = _compact_tensors(4097, seed=2)
    write_compact_parameters(t["param"], t["rem"], seed=2)
    t["param"][5] = float("nan")   # and a NaN parameter is not made 0x7FC0
    t["acc"][17] = float("inf")
    state = [s.abs() for s in t["state"]]
    steps = [torch.tensor(5.0)]
    before = [x.clone() for x in [t["param"].view(torch.int16), t["rem"], *state, steps[0]]]
    ops = _ops(backend)
    if op == "sgd":
        ops.sgd_step([t["param"]], [t["acc"]], [state[0]], steps, [t["rem"]], **SGD_CASES[1],
                     grad_scale=1.0, found_inf=torch.tensor(1.0))
    else:
        ops.adam_step([t["param"]], [t["acc"]], [state[0]], [state[1]], [state[2]], steps,
                      [t["rem"]], **ADAM_CASES[1], grad_scale=1.0, found_inf=torch.tensor(1.0))
    for b, a in zip(before, [t["param"].view(torch.int16), t["rem"], *state, steps[0]]):
        assert torch.equal(a, b)


def test_many_tensors_in_one_call_with_their_own_step_counts(backend):
    g = torch.Generator().manual_seed(3)
    sizes = torch.randint(1, 200, (200,), generator=g).tolist()
    params = [torch.randn(n, generator=g) for n in sizes]
    accs = [torch.randn(n, generator=g) for n in sizes]
    ms = [torch.randn(n, generator=g) * 0.1 for n in sizes]
    vs = [torch.rand(n, generator=g) * 0.1 for n in sizes]
    step_values = [i % 5 for i in range(len(sizes))]
    steps = [torch.tensor(float(s)) for s in step_values]
    before = [(p.clone(), m.clone(), v.clone()) for p, m, v in zip(params, ms, vs)]
    hp = ADAM_CASES[2]
    _ops(backend).adam_step(params, accs, ms, vs, None, steps, None, **hp, grad_scale=1.0,
                            found_inf=torch.tensor(0.0))
    for p, a, (p0, m0, v0), s in zip(params, accs, before, step_values):
        expected = oracle.adam(p0, a, m0, v0, v0, s, **hp, grad_scale=1.0)[0]
        assert oracle.rel_err(p, expected) < 1e-6


@pytest.mark.parametrize("case", range(len(ADAM_CASES)))
@pytest.mark.parametrize("step", [0, 41])
def test_adam_update_matches_the_oracle_to_fp32_rounding(backend, case, step):
    """The update itself (p - p0), not only the parameter: with parameters much smaller than the
    update, the parameter's own rounding cannot hide an error in the update (fp32 bias
    corrections, for one, are off by about 2e-5 at step 1)."""
    size = oracle.size_for(backend, 4097)
    hp = ADAM_CASES[case]
    g = torch.Generator().manual_seed(case * 11 + step)
    p = torch.randn(size, generator=g) * 1e-4
    acc = torch.randn(size, generator=g) * 5
    m, v = torch.randn(size, generator=g) * 0.1, torch.rand(size, generator=g) * 0.1
    vmax = v + torch.rand(size, generator=g) * 0.01
    p0, m0, v0, vmax0 = p.clone(), m.clone(), v.clone(), vmax.clone()
    _ops(backend).adam_step([p], [acc], [m], [v], [vmax] if hp["amsgrad"] else None,
                            [torch.tensor(float(step))], None, **hp, grad_scale=torch.tensor(0.5),
                            found_inf=torch.tensor(0.0))
    expected = oracle.adam(p0, acc, m0, v0, vmax0, step, **hp, grad_scale=0.5)[0]
    assert oracle.rel_err(p - p0, expected - p0.double()) < 2e-6


@pytest.mark.parametrize("case", range(len(SGD_CASES)))
def test_sgd_update_matches_the_oracle_to_fp32_rounding(backend, case):
    size = oracle.size_for(backend, 4097)
    hp = SGD_CASES[case]
    g = torch.Generator().manual_seed(case + 5)
    p = torch.randn(size, generator=g) * 1e-4
    acc, buf = torch.randn(size, generator=g) * 5, torch.randn(size, generator=g)
    p0, buf0 = p.clone(), buf.clone()
    _ops(backend).sgd_step([p], [acc], [buf] if hp["momentum"] else None, [torch.tensor(3.0)],
                           None, **hp, grad_scale=torch.tensor(0.25), found_inf=torch.tensor(0.0))
    expected = oracle.sgd(p0, acc, buf0, 3, **hp, grad_scale=0.25)[0]
    assert oracle.rel_err(p - p0, expected - p0.double()) < 2e-6
