"""accumulate and norm of every backend against the float64 oracle."""
import pytest
import torch

import oracle
from fused_accum import kernels

SIZES = oracle.SIZES
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _ops(name):
    return kernels.get_backend(name, torch.device("cpu"))


def _grads(sizes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).mul_(3).to(dtype) for n in sizes]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
def test_accumulate_first_touch_overwrites_every_element(backend, dtype, size):
    ops, size = _ops(backend), oracle.size_for(backend, size)
    grads = _grads([size], dtype, seed=size)
    acc = torch.full((size,), float("nan"))           # poison: every element must be written
    weight, found, sumsq = torch.tensor(0.37), torch.tensor(0.0), torch.tensor(1.5)
    ops.accumulate(grads, [acc], [True], weight, found, sumsq)
    expected = oracle.accumulate(acc, grads[0], True, 0.37)
    assert torch.isfinite(acc).all()
    assert oracle.rel_err(acc, expected) < 1e-6
    assert found.item() == 0
    assert oracle.rel_err(sumsq, 1.5 + expected.square().sum()) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
def test_accumulate_many_small_tensors_mixing_first_and_later_touches(backend, dtype):
    ops = _ops(backend)
    g = torch.Generator().manual_seed(7)
    sizes = torch.randint(1, 300, (200,), generator=g).tolist()
    grads = _grads(sizes, dtype, seed=8)
    flat = torch.randn(sum(sizes), generator=g)
    accs = list(flat.split(sizes))
    first = [i % 3 == 0 for i in range(len(sizes))]
    before = [a.clone() for a in accs]
    for a, is_first in zip(accs, first):
        if is_first:
            a.fill_(float("nan"))
    weight, found = torch.tensor(4.0), torch.tensor(0.0)
    ops.accumulate(grads, accs, first, weight, found, None)
    for a, b, grad, is_first in zip(accs, before, grads, first):
        assert oracle.rel_err(a, oracle.accumulate(b, grad, is_first, 4.0)) < 1e-6
    assert found.item() == 0


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_accumulate_flags_non_finite_gradients(backend, dtype, bad):
    ops = _ops(backend)
    grads = _grads([5, 4097, 9], dtype, seed=3)
    grads[1][1234] = bad
    accs = [torch.randn(n) for n in (5, 4097, 9)]
    found = torch.tensor(0.0)
    ops.accumulate(grads, accs, [False, True, False], torch.tensor(1.0), found, None)
    assert found.item() == 1
    assert torch.isfinite(accs[0]).all() and torch.isfinite(accs[2]).all()


def test_accumulate_flags_fp32_overflow_of_the_sum(backend):
    ops = _ops(backend)
    acc, found = torch.full((10,), 3e38), torch.tensor(0.0)
    ops.accumulate([torch.full((10,), 3e38)], [acc], [False], torch.tensor(1.0), found, None)
    assert found.item() == 1


def test_accumulate_keeps_a_set_flag(backend):
    ops = _ops(backend)
    found = torch.tensor(1.0)
    ops.accumulate(_grads([8], torch.float32, 1), [torch.randn(8)], [False], torch.tensor(1.0), found, None)
    assert found.item() == 1


@pytest.mark.parametrize("size", SIZES)
def test_norm_adds_the_sum_of_squares(backend, size):
    ops, size = _ops(backend), oracle.size_for(backend, size)
    accs = [torch.randn(size), torch.randn(17)]
    sumsq = torch.tensor(2.0)
    ops.norm(accs, sumsq)
    expected = 2.0 + sum(a.double().square().sum() for a in accs)
    assert oracle.rel_err(sumsq, expected) < 1e-5


def test_accumulate_mixes_gradient_dtypes_and_alignments_in_one_call(backend):
    # Backends that launch per dtype and alignment split this call into several launches whose
    # partial sums of squares must all reach sumsq.
    ops = _ops(backend)
    g = torch.Generator().manual_seed(11)
    sizes = [4099, 16, 7, 2050, 33, 1]
    grads = [(torch.randn(n, generator=g) * 2).to(dtype)
             for n, dtype in zip(sizes, DTYPES * 2)]
    flat = torch.randn(sum(sizes) + 1, generator=g)
    accs = list(flat[1:].split(sizes))          # offset by one element: most are unaligned
    accs[0] = torch.randn(sizes[0], generator=g)  # a fresh, aligned one among them
    before = [a.clone() for a in accs]
    first = [False, True, False, True, False, False]
    weight, found, sumsq = torch.tensor(0.5), torch.tensor(0.0), torch.tensor(0.0)
    ops.accumulate(grads, accs, first, weight, found, sumsq)
    expected = [oracle.accumulate(b, gr, f, 0.5) for b, gr, f in zip(before, grads, first)]
    for a, e in zip(accs, expected):
        assert oracle.rel_err(a, e) < 1e-6
    assert oracle.rel_err(sumsq, sum(e.square().sum() for e in expected)) < 1e-5
    assert found.item() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_sum_overflowing_from_low_precision_gradients_is_flagged(backend, dtype):
    """A second check of the sum, not the contribution: each gradient is finite and so is each
    weighted contribution; only acc + w * g leaves fp32's range (in the last, tail element)."""
    ops = _ops(backend)
    size = 4097
    grads = [torch.full((size,), 60000.0).to(dtype)]
    acc = torch.full((size,), 2e38)
    acc[:-1] = 1.0
    found = torch.tensor(0.0)
    ops.accumulate(grads, [acc], [False], torch.tensor(3e33), found, None)   # w * g = 1.8e38
    assert found.item() == 1 and torch.isinf(acc[-1])


def test_fp16_subnormal_gradients_convert_exactly(backend):
    """Every positive and negative fp16 subnormal, first touch and later, against torch's cast."""
    ops = _ops(backend)
    bits = torch.arange(1, 1024, dtype=torch.int16)
    grads = [torch.cat([bits, bits | -0x8000]).view(torch.float16)]   # magnitudes 2^-24 .. 2^-14
    first = torch.full((2046,), float("nan"))
    later = torch.full((2046,), 0.5)
    found = torch.tensor(0.0)
    ops.accumulate(grads, [first], [True], torch.tensor(1.0), found, None)
    ops.accumulate(grads, [later], [False], torch.tensor(1.0), found, None)
    assert torch.equal(first, grads[0].float())
    assert torch.equal(later, 0.5 + grads[0].float())
    assert found.item() == 0
