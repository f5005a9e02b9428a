"""Every compiled or generated backend against ``reference`` on identical fresh inputs, and the
compiled ops through torch.library.opcheck (schema, mutation annotations, fake implementation)."""
import pytest
import torch

from fused_accum import kernels
from fused_accum.kernels import reference
from helpers import every_compact_pair, write_compact_parameters, write_some_elements

CPU = torch.device("cpu")
OTHERS = [n for n in kernels.backend_names()
          if n != "reference" and kernels.availability(n, CPU)[0]]
pytestmark = pytest.mark.skipif(not OTHERS, reason="no backend besides reference builds here")


@pytest.fixture(params=OTHERS or ["none"])
def other(request):
    return kernels.get_backend(request.param, CPU)


@pytest.fixture
def extension():
    """The compiled extension, whose ops are registered through torch.library."""
    if "extension" not in OTHERS:
        pytest.skip("the compiled extension does not build here")
    return kernels.get_backend("extension", CPU)


def _bucket(seed, sizes, dtype):
    """Random step and accumulate arguments; low-precision parameters have fp32 masters, whose
    rounding they hold (as after a step)."""
    g = torch.Generator().manual_seed(seed)
    flat = lambda scale=1.0: [torch.randn(n, generator=g) * scale for n in sizes]
    values = flat()
    return dict(params=[t.to(dtype) for t in values], accs=flat(3.0), m=flat(0.1),
                v=[t.abs() for t in flat(0.1)], vmax=[t.abs() + 0.05 for t in flat(0.1)],
                masters=None if dtype == torch.float32 else values,
                steps=[torch.tensor(float(i % 4)) for i in range(len(sizes))],
                grads=[t.to(dtype) for t in flat(2.0)])


def _clone(d):
    return {k: (None if v is None else [t.clone() for t in v]) for k, v in d.items()}


def _assert_lists_close(a, b, rtol=1e-6):
    for x, y in zip(a, b):
        assert x.dtype == y.dtype
        scale = y.float().abs().max().item() or 1.0
        torch.testing.assert_close(x.float(), y.float(), rtol=0, atol=rtol * scale)


SIZES = [1, 3, 4097, 70001] + [5, 17, 1, 64, 129] * 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_accumulate_matches_reference(other, dtype):
    d = _bucket(1, SIZES, dtype)
    first = [i % 2 == 0 for i in range(len(SIZES))]
    results = []
    for backend in (reference, other):
        x = _clone(d)
        for acc, f in zip(x["accs"], first):
            if f:
                acc.fill_(float("nan"))   # poison: first touch must write every element
        found, sumsq = torch.tensor(0.0), torch.tensor(0.25)
        backend.accumulate(x["grads"], x["accs"], first, torch.tensor(1.7), found, sumsq)
        results.append((x["accs"], found, sumsq))
    _assert_lists_close(results[1][0], results[0][0])
    assert results[1][1].item() == results[0][1].item() == 0
    torch.testing.assert_close(results[1][2], results[0][2], rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hp", [
    dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    dict(momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False, maximize=True),
    dict(momentum=0.9, dampening=0.0, weight_decay=0.1, nesterov=True, maximize=False)])
def test_sgd_step_matches_reference(other, dtype, hp):
    d = _bucket(2, SIZES, dtype)
    results = []
    for backend in (reference, other):
        x = _clone(d)
        backend.sgd_step(x["params"], x["accs"], x["m"] if hp["momentum"] else None, x["steps"],
                         x["masters"], lr=0.05, **hp, grad_scale=torch.tensor(0.3),
                         found_inf=torch.tensor(0.0))
        results.append(x)
    for key in ("params", "m", "masters", "steps"):
        if results[0][key] is not None:
            _assert_lists_close(results[1][key], results[0][key],
                                rtol=1e-6 if key != "params" or dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("amsgrad,maximize,decoupled", [(False, False, True), (True, True, False)])
def test_adam_step_matches_reference(other, dtype, amsgrad, maximize, decoupled):
    d = _bucket(3, SIZES, dtype)
    results = []
    for backend in (reference, other):
        x = _clone(d)
        backend.adam_step(x["params"], x["accs"], x["m"], x["v"], x["vmax"] if amsgrad else None,
                          x["steps"], x["masters"], lr=torch.tensor(3e-3), beta1=0.9, beta2=0.999,
                          eps=1e-8, weight_decay=0.1, amsgrad=amsgrad, maximize=maximize,
                          decoupled_weight_decay=decoupled, grad_scale=0.5,
                          found_inf=torch.tensor(0.0))
        results.append(x)
    for key in ("params", "m", "v", "vmax", "masters", "steps"):
        if results[0][key] is not None:
            _assert_lists_close(results[1][key], results[0][key],
                                rtol=1e-5 if key != "params" or dtype == torch.float32 else 1e-2)


def test_non_contiguous_parameters_are_updated_in_place(other):
    param = torch.randn(6, 4).t()          # a transposed (non-contiguous) parameter
    expected = param.clone()
    acc = torch.randn(4, 6)
    reference.sgd_step([expected], [acc], None, [torch.tensor(0.0)], None, lr=0.1, momentum=0.0,
                       dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                       grad_scale=1.0, found_inf=torch.tensor(0.0))
    other.sgd_step([param], [acc], None, [torch.tensor(0.0)], None, lr=0.1, momentum=0.0,
                   dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                   grad_scale=1.0, found_inf=torch.tensor(0.0))
    assert not param.is_contiguous()
    torch.testing.assert_close(param, expected, rtol=1e-6, atol=1e-7)


def _opcheck_cases():
    d = _bucket(4, [5, 130], torch.bfloat16)
    f32 = lambda v: torch.tensor(float(v))
    ops = torch.ops.fused_accum
    return {
        "accumulate": (ops.accumulate.default,
                       (d["grads"], d["accs"], [1, 0], f32(2.0), f32(0.0), f32(0.5))),
        "norm": (ops.norm.default, (d["accs"], f32(0.0))),
        "sgd_step": (ops.sgd_step.default,
                     (d["params"], d["accs"], d["m"], d["steps"], d["masters"], f32(0.1), 0.9,
                      0.0, 0.01, True, False, f32(0.5), f32(0.0))),
        "adam_step": (ops.adam_step.default,
                      (d["params"], d["accs"], d["m"], d["v"], d["vmax"], d["steps"], d["masters"],
                       f32(1e-3), 0.9, 0.999, 1e-8, 0.1, True, False, True, f32(0.5), f32(0.0))),
    }


@pytest.mark.parametrize("op", ["accumulate", "norm", "sgd_step", "adam_step"])
def test_opcheck(extension, op):
    fn, args = _opcheck_cases()[op]
    torch.library.opcheck(fn, args)


def test_torch_compile_traces_a_window_through_the_ops(extension):
    ops = torch.ops.fused_accum

    def window(g1, g2, acc, p, m, v, step, w, found, sumsq, lr, scale):
        ops.accumulate([g1], [acc], [1], w, found, None)
        ops.accumulate([g2], [acc], [0], w, found, sumsq)
        ops.adam_step([p], [acc], [m], [v], [], [step], [], lr, 0.9, 0.999, 1e-8, 0.1, False,
                      False, True, scale, found)

    g = torch.Generator().manual_seed(5)
    eager = [torch.randn(1000, generator=g).bfloat16(), torch.randn(1000, generator=g).bfloat16(),
             torch.randn(1000, generator=g), torch.randn(1000, generator=g),
             torch.randn(1000, generator=g) * 0.1, torch.rand(1000, generator=g) * 0.1,
             torch.tensor(3.0), torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.0),
             torch.tensor(1e-3), torch.tensor(0.5)]
    compiled = [t.clone() for t in eager]
    window(*eager)
    torch.compile(window, fullgraph=True)(*compiled)
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)
    assert eager[6].item() == 4.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conversions_are_torch_casts_bit_for_bit(other, dtype):
    # low precision -> fp32: every bit pattern, through accumulate (first touch, weight 1)
    every = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    acc = torch.full((every.numel(),), 7.0)
    other.accumulate([every], [acc], [True], torch.tensor(1.0), torch.tensor(0.0), None)
    expected = every.float()
    same = acc.view(torch.int32) == expected.view(torch.int32)
    assert (same | (torch.isnan(acc) & torch.isnan(expected))).all()   # NaN payloads may differ
    # fp32 -> low precision: a step writes the parameter from its fp32 master, here -0.0 - g with
    # g = -value (exact for every value, signed zeros included)
    g = torch.Generator().manual_seed(6)
    value = torch.randn(1_000_000, generator=g) * 10.0 ** torch.randint(-12, 8, (1_000_000,), generator=g)
    value = torch.cat([value, torch.tensor([0.0, -0.0, 65504.0, 65520.0, 1e6, -1e6, 6e-8, 3e-8,
                                            float("inf"), float("nan")])])
    param = torch.full((value.numel(),), -0.0, dtype=dtype)
    other.sgd_step([param], [-value], None, [torch.tensor(1.0)], [torch.full_like(value, -0.0)],
                   lr=1.0, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                   maximize=False, grad_scale=1.0, found_inf=torch.tensor(0.0))
    expected = value.to(dtype)
    same = param.view(torch.int16) == expected.view(torch.int16)
    both_nan = torch.isnan(param) & torch.isnan(expected)
    assert (same | both_nan).all()


@pytest.mark.parametrize("beta1", [0.9, 0.3])   # torch.lerp's two forms: weight below 0.5, above
def test_adam_moments_are_the_reference_s_bit_for_bit(other, beta1):
    """m = lerp(m, g, 1 - beta1) and v = v * beta2 + g * g * (1 - beta2), rounded as torch rounds
    them: the moments do not depend on lr or weight decay, so every backend must match exactly."""
    d = _bucket(4, SIZES, torch.float32)
    results = []
    for backend in (reference, other):
        x = _clone(d)
        backend.adam_step(x["params"], x["accs"], x["m"], x["v"], x["vmax"], x["steps"], None,
                          lr=torch.tensor(1e-3), beta1=beta1, beta2=0.99, eps=1e-8,
                          weight_decay=0.1, amsgrad=True, maximize=False,
                          decoupled_weight_decay=True, grad_scale=0.37,
                          found_inf=torch.tensor(0.0))
        results.append(x)
    for key in ("m", "v", "vmax"):
        for a, b in zip(results[1][key], results[0][key]):
            assert torch.equal(a, b), key


def test_amsgrad_keeps_a_nan_as_torch_maximum_does(other):
    d = _bucket(5, [33], torch.float32)
    d["vmax"][0][7] = float("nan")
    d["accs"][0][9] = float("nan")   # and a NaN gradient reaches v, then vmax
    for backend in (reference, other):
        x = _clone(d)
        backend.adam_step(x["params"], x["accs"], x["m"], x["v"], x["vmax"], x["steps"], None,
                          lr=torch.tensor(1e-3), beta1=0.9, beta2=0.99, eps=1e-8,
                          weight_decay=0.0, amsgrad=True, maximize=False,
                          decoupled_weight_decay=True, grad_scale=1.0,
                          found_inf=torch.tensor(0.0))
        nan = torch.isnan(x["vmax"][0])
        assert nan[7] and nan[9] and nan.sum() == 2, backend.name


ADAM_OPTIONS = [dict(amsgrad=a, maximize=m, decoupled_weight_decay=d, weight_decay=wd, beta1=b1)
                for a, m, d, wd, b1 in [(False, False, True, 0.1, 0.9), (True, True, False, 0.01, 0.9),
                                        (False, False, False, 0.0, 0.3), (True, False, True, 0.05, 0.4)]]
SGD_OPTIONS = [dict(momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False, maximize=True),
               dict(momentum=0.9, dampening=0.0, weight_decay=0.1, nesterov=True, maximize=False),
               dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)]


@pytest.mark.parametrize("lr", [torch.tensor(3e-3), 0.0123])
@pytest.mark.parametrize("options", range(len(ADAM_OPTIONS)))
def test_fp32_adam_step_is_the_reference_s_bit_for_bit(other, options, lr):
    """With fp32 parameters nothing is rounded to a low precision, so a backend that rounds what
    the reference rounds, in its order, without fused multiply-adds, gives the same bits."""
    d = _bucket(6, SIZES, torch.float32)
    results = []
    for backend in (reference, other):
        x = _clone(d)
        backend.adam_step(x["params"], x["accs"], x["m"], x["v"], x["vmax"], x["steps"], None,
                          lr=lr, beta2=0.995, eps=1e-8, **ADAM_OPTIONS[options], grad_scale=0.37,
                          found_inf=torch.tensor(0.0))
        results.append(x)
    for key in ("params", "m", "v", "vmax", "steps"):
        for a, b in zip(results[1][key], results[0][key]):
            assert torch.equal(a, b), key


@pytest.mark.parametrize("options", range(len(SGD_OPTIONS)))
def test_fp32_sgd_step_is_the_reference_s_bit_for_bit(other, options):
    d = _bucket(7, SIZES, torch.float32)
    results = []
    for backend in (reference, other):
        x = _clone(d)
        hp = SGD_OPTIONS[options]
        backend.sgd_step(x["params"], x["accs"], x["m"] if hp["momentum"] else None, x["steps"],
                         None, lr=0.0123, **hp, grad_scale=torch.tensor(0.3),
                         found_inf=torch.tensor(0.0))
        results.append(x)
    for key in ("params", "m", "steps"):
        for a, b in zip(results[1][key], results[0][key]):
            assert torch.equal(a, b), key


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op,options", [("sgd", i) for i in range(len(SGD_OPTIONS))]
                         + [("adam", i) for i in range(len(ADAM_OPTIONS))])
def test_written_parameters_are_updated_as_the_reference_does_bit_for_bit(other, dtype, op, options):
    """Parameters partly written since the last step (some elements no longer hold their
    master's rounding; the stale masters of some of those are NaN, which must not leak)."""
    d = _bucket(8, SIZES, dtype)
    for i, (param, master) in enumerate(zip(d["params"], d["masters"])):
        written = write_some_elements(param, seed=i)
        master[written & (torch.arange(master.numel()) % 3 == 0)] = float("nan")
    results = []
    for backend in (reference, other):
        x = _clone(d)
        found = torch.tensor(0.0)
        if op == "sgd":
            hp = SGD_OPTIONS[options]
            backend.sgd_step(x["params"], x["accs"], x["m"] if hp["momentum"] else None,
                             x["steps"], x["masters"], lr=0.0123, **hp,
                             grad_scale=torch.tensor(0.3), found_inf=found)
        else:
            backend.adam_step(x["params"], x["accs"], x["m"], x["v"], x["vmax"], x["steps"],
                              x["masters"], lr=torch.tensor(3e-3), beta2=0.995, eps=1e-8,
                              **ADAM_OPTIONS[options], grad_scale=0.37, found_inf=found)
        results.append(x)
    assert not any(torch.isnan(m).any() for m in results[0]["masters"])
    for key in ("params", "masters", "m", "v", "vmax", "steps"):
        for a, b in zip(results[1][key], results[0][key]):
            assert torch.equal(_bits(a), _bits(b)), key


def _same_or_both_nan(a, b):
    """Bit for bit, NaN payloads aside (an fp32 NaN's payload is what the hardware propagates)."""
    return torch.equal(_bits(a), _bits(b)) or bool(((_bits(a) == _bits(b)) | (a.isnan() & b.isnan())).all())


def _compact_step(backend, x, op, options):
    found = torch.tensor(0.0)
    if op == "sgd":
        hp = SGD_OPTIONS[options]
        backend.sgd_step(x["params"], x["accs"], x["m"] if hp["momentum"] else None, x["steps"],
                         x["masters"], lr=0.0123, **hp, grad_scale=torch.tensor(0.3),
                         found_inf=found)
    else:
        backend.adam_step(x["params"], x["accs"], x["m"], x["v"], x["vmax"], x["steps"],
                          x["masters"], lr=torch.tensor(3e-3), beta2=0.995, eps=1e-8,
                          **ADAM_OPTIONS[options], grad_scale=0.37, found_inf=found)


def _check_compact_results(results):
    """Every backend writes the reference's bits, and the reference writes pairs that hold their
    masters: the split of the master they hold (a NaN master is parameter 0x7FC0, remainder 0, so
    a parameter never hides one)."""
    for p, r in zip(results[0]["params"], results[0]["masters"]):
        master = reference.compact_master(p, r)
        assert torch.equal(torch.isnan(master), torch.isnan(p))
        high, remainder = reference.split_master(master)
        assert torch.equal(high, p.view(torch.int16)) and torch.equal(remainder, r)
    for key in ("params", "masters", "steps"):
        for a, b in zip(results[1][key], results[0][key]):
            assert torch.equal(_bits(a), _bits(b)), key
    for key in ("m", "v", "vmax"):
        for a, b in zip(results[1][key], results[0][key]):
            assert _same_or_both_nan(a, b), key


@pytest.mark.parametrize("op,options", [("sgd", i) for i in range(len(SGD_OPTIONS))]
                         + [("adam", i) for i in range(len(ADAM_OPTIONS))])
def test_written_compact_parameters_are_updated_as_the_reference_does_bit_for_bit(other, op, options):
    """bf16 parameters with compact masters, partly written since the last step: new values
    (which keep their stale remainders, less than half an ulp) and zeros over negative
    remainders, infinities over positive ones (which drop them)."""
    d = _bucket(9, SIZES, torch.float32)
    pairs = [reference.split_master(t) for t in d["params"]]
    d["params"] = [h.view(torch.bfloat16).clone() for h, _ in pairs]
    d["masters"] = [r.clone() for _, r in pairs]
    dropped = [write_compact_parameters(p, r, seed=i)[1]
               for i, (p, r) in enumerate(zip(d["params"], d["masters"]))]
    assert sum(int(x.sum()) for x in dropped) > 100
    results = []
    for backend in (reference, other):
        x = _clone(d)
        _compact_step(backend, x, op, options)
        results.append(x)
    _check_compact_results(results)


@pytest.mark.parametrize("op,options", [("sgd", 1), ("adam", 0), ("adam", 1)])
def test_every_compact_pair_steps_as_the_reference_does_bit_for_bit(other, op, options):
    """Every bf16 parameter with remainders at the ends of their range and around zero: +-0,
    +-inf, the largest finite values, NaNs, and the pairs no step writes (written parameters)."""
    param, remainder = every_compact_pair()
    n = param.numel()
    g = torch.Generator().manual_seed(10)
    d = dict(params=[param], masters=[remainder], accs=[torch.randn(n, generator=g)],
             m=[torch.randn(n, generator=g) * 0.1], v=[torch.rand(n, generator=g) * 0.1],
             vmax=[torch.rand(n, generator=g) * 0.2], steps=[torch.tensor(4.0)])
    results = []
    for backend in (reference, other):
        x = _clone(d)
        _compact_step(backend, x, op, options)
        results.append(x)
    _check_compact_results(results)
