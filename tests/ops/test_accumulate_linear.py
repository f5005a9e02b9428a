"""accumulate_linear of every backend against ``reference`` and against float64: a Linear's weight
gradient written (first touch) or added into its fp32 sum from the GEMM's operands."""
import pytest
import torch

from fused_accum import kernels
from fused_accum.kernels import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1, 1), (7, 33, 5), (64, 48, 96)]   # rows, out, in


def _operands(seed, rows, out, inp, dtype):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, out, generator=g).to(dtype),
            torch.randn(rows, inp, generator=g).to(dtype))


def _float64_product(g, x):
    return g.double().t() @ x.double()


def _check_first_touch_then_add(ops, dtype, shape, weighted):
    rows, out, inp = shape
    g1, x1 = _operands(1, *shape, dtype)
    g2, x2 = _operands(2, *shape, dtype)
    weight = torch.tensor(0.37) if weighted else None
    w = 0.37 if weighted else 1.0
    acc = torch.full((out, inp), float("nan"))   # poison: the first touch must not read it
    sumsq = torch.tensor(1.5)
    ops.accumulate_linear([g1], [x1], [acc], [True], weight, None)
    assert torch.isfinite(acc).all()
    ops.accumulate_linear([g2], [x2], [acc], [False], weight, sumsq)
    expected = w * (_float64_product(g1, x1) + _float64_product(g2, x2))
    scale = expected.abs().max().clamp(min=1e-30)   # (no rows: the sum is exactly zero)
    assert ((acc.double() - expected).abs().max() / scale).item() < 1e-6
    assert abs(sumsq.item() - (1.5 + expected.square().sum().item())) < 1e-5 * sumsq.item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_first_touch_writes_every_element_and_later_touches_add(backend, dtype, shape, weighted):
    _check_first_touch_then_add(kernels.get_backend(backend, torch.device("cpu")), dtype, shape,
                                weighted)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backends_agree_with_reference_on_several_triples(backend, dtype):
    ops = kernels.get_backend(backend, torch.device("cpu"))
    triples = [_operands(10 + i, rows, out, inp, dtype) for i, (rows, out, inp) in enumerate(SHAPES)]
    g = torch.Generator().manual_seed(3)
    start = [torch.randn(out, inp, generator=g) for _, out, inp in SHAPES]
    first = [True, False, False]
    mine = [a.clone() for a in start]
    mine[0].fill_(float("nan"))
    spec = [a.clone() for a in start]
    weight = torch.tensor(2.5)
    ops.accumulate_linear([t[0] for t in triples], [t[1] for t in triples], mine, first, weight)
    reference.accumulate_linear([t[0] for t in triples], [t[1] for t in triples], spec, first,
                                weight)
    for a, b in zip(mine, spec):
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-6


def test_non_finite_operands_stay_in_the_sum(backend):
    """No flag: a non-finite product stays non-finite through later adds, for the window's norm."""
    ops = kernels.get_backend(backend, torch.device("cpu"))
    g, x = _operands(4, 5, 3, 4, torch.float32)
    acc = torch.randn(3, 4)
    bad = g.clone()
    bad[2, 1] = float("inf")
    ops.accumulate_linear([bad], [x], [acc], [False], None)
    ops.accumulate_linear([g], [x], [acc], [False], None)
    assert not torch.isfinite(acc[1]).all()
    assert torch.isfinite(acc[0]).all()


def test_widened_operands_go_in_chunks_of_rows_with_the_same_sum(monkeypatch):
    """bf16 operands widened to fp32 a few rows at a time (bounded memory), first touch once."""
    from fused_accum.kernels import gemm
    monkeypatch.setattr(gemm, "WIDEN_BYTES", 4 * (48 + 96) * 5)   # 5 rows per chunk
    g, x = _operands(6, 64, 48, 96, torch.bfloat16)
    acc = torch.full((48, 96), float("nan"))
    gemm.accumulate_linear([g], [x], [acc], [True], torch.tensor(0.5))
    expected = 0.5 * _float64_product(g, x)
    assert ((acc.double() - expected).abs().max() / expected.abs().max()).item() < 1e-6


# The Triton backend's own GEMM (FUSED_ACCUM_LINEAR_GEMM=triton; the library GEMM by default until
# a GPU measurement picks): under Triton's interpreter here.

@pytest.fixture
def triton_gemm(monkeypatch):
    if "triton" not in kernels.backend_names() or not kernels.availability(
            "triton", torch.device("cpu"))[0]:
        pytest.skip("Triton is not installed here")
    from fused_accum.kernels import triton_ops
    monkeypatch.setenv(triton_ops.LINEAR_GEMM_ENV, "triton")
    assert triton_ops.linear_gemm() == "triton"
    return kernels.get_backend("triton", torch.device("cpu"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(0, 3, 4), (100, 130, 70)])   # no rows; several tiles
@pytest.mark.parametrize("weighted", [False, True])
def test_triton_gemm_first_touch_writes_every_element_and_later_touches_add(
        triton_gemm, dtype, shape, weighted):
    _check_first_touch_then_add(triton_gemm, dtype, shape, weighted)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_gemm_agrees_with_reference_on_strided_operands(triton_gemm, dtype):
    """Operands as autograd hands them (a transposed input, a sliced output gradient)."""
    g, x = _operands(7, 40, 24, 18, dtype)
    wide = torch.randn(40, 50).to(dtype)
    wide[:, 3:27] = g
    g_view, x_view = wide[:, 3:27], x.t().contiguous().t()
    assert not g_view.is_contiguous() and not x_view.is_contiguous()
    start = torch.randn(24, 18)
    mine, spec = start.clone(), start.clone()
    sumsq_mine, sumsq_spec = torch.tensor(0.25), torch.tensor(0.25)
    triton_gemm.accumulate_linear([g_view], [x_view], [mine], [False], torch.tensor(-1.5),
                                  sumsq_mine)
    reference.accumulate_linear([g], [x], [spec], [False], torch.tensor(-1.5), sumsq_spec)
    assert ((mine - spec).abs().max() / spec.abs().max()).item() < 1e-6
    assert abs(sumsq_mine.item() - sumsq_spec.item()) < 1e-5 * sumsq_spec.item()


def test_triton_gemm_of_several_triples_with_mixed_first_flags_and_strided_sums(triton_gemm):
    """One call, three weights: a first touch (poisoned sum), a later touch into a transposed
    view, a later touch into a column slice (the columns beside it untouched); a Python weight;
    the norm added in a fixed order from per-tile partials."""
    shapes = [(9, 70, 65), (40, 24, 18), (3, 5, 66)]
    triples = [_operands(20 + i, *shape, torch.bfloat16) for i, shape in enumerate(shapes)]
    g = torch.Generator().manual_seed(21)
    poisoned = torch.full((70, 65), float("nan"))
    transposed = torch.randn(18, 24, generator=g).t()
    wide = torch.randn(5, 80, generator=g)
    sliced = wide[:, 7:73]
    beside = torch.cat([wide[:, :7], wide[:, 73:]], 1).clone()
    mine = [poisoned, transposed, sliced]
    spec = [torch.empty(70, 65), transposed.clone(), sliced.clone()]
    first = [True, False, False]
    sumsq_mine, sumsq_spec = torch.tensor(2.0), torch.tensor(2.0)
    triton_gemm.accumulate_linear([a for a, _ in triples], [b for _, b in triples], mine, first,
                                  0.5, sumsq_mine)
    reference.accumulate_linear([a for a, _ in triples], [b for _, b in triples], spec, first,
                                torch.tensor(0.5), sumsq_spec)
    for a, b in zip(mine, spec):
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-6
    assert torch.equal(torch.cat([wide[:, :7], wide[:, 73:]], 1), beside)
    assert abs(sumsq_mine.item() - sumsq_spec.item()) < 1e-5 * sumsq_spec.item()


def test_triton_gemm_offsets_past_two_to_the_31(triton_gemm):
    """An output gradient whose rows lie more than 2^31 elements apart (an LM head's tokens x
    vocabulary): 64-bit offsets.  The storage is reserved, not touched, beyond three rows."""
    stride, out, inp, rows = 1_200_000_000, 16, 4, 3
    try:
        storage = torch.empty((rows - 1) * stride + out, dtype=torch.bfloat16)
    except RuntimeError as error:   # a machine that refuses to reserve 4.8 GB of address space
        pytest.skip(f"cannot reserve the storage here: {error}")
    g = storage.as_strided((rows, out), (stride, 1))
    for r in range(rows):
        g[r] = torch.arange(out, dtype=torch.float32) - 7 * r
    x = torch.randn(rows, inp).to(torch.bfloat16)
    acc, spec = torch.full((out, inp), float("nan")), torch.empty(out, inp)
    triton_gemm.accumulate_linear([g], [x], [acc], [True], None)
    reference.accumulate_linear([g], [x], [spec], [True], None)
    assert ((acc - spec).abs().max() / spec.abs().max()).item() < 1e-6


def test_triton_gemm_refuses_operands_that_do_not_fit(triton_gemm):
    g, x = _operands(8, 5, 3, 4, torch.float32)
    acc = torch.randn(3, 4)
    before = acc.clone()
    with pytest.raises(ValueError, match="triple 0 does not fit"):
        triton_gemm.accumulate_linear([g], [x[:4]], [acc], [False], None)
    with pytest.raises(ValueError, match="triple 0 does not fit"):
        triton_gemm.accumulate_linear([g], [x.to(torch.bfloat16)], [acc], [False], None)
    with pytest.raises(ValueError, match=r"accs\[0\] is expanded"):
        triton_gemm.accumulate_linear([g], [x], [torch.zeros(4).expand(3, 4)], [False], None)
    assert torch.equal(acc, before)


def test_linear_gemm_setting_names_the_variable(monkeypatch):
    if "triton" not in kernels.backend_names():
        pytest.skip("Triton is not installed here")
    from fused_accum.kernels import triton_ops
    monkeypatch.setenv(triton_ops.LINEAR_GEMM_ENV, "cublas")
    with pytest.raises(ValueError, match="FUSED_ACCUM_LINEAR_GEMM='cublas'"):
        triton_ops.linear_gemm()
