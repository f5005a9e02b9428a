"""The CUDA side: compiled CUDA ops against reference on the GPU, and whole windows on the GPU.

Skipped where there is no CUDA device; tests/ops and the optimizer tests are the CPU versions
of these checks."""
import warnings

import pytest
import torch

import fused_accum
from fused_accum import kernels
from fused_accum.kernels import reference
from helpers import (assert_same_params, clone, every_compact_pair, lm_loss, make_batches,
                     make_model, train_accumulated, train_large_batch, write_compact_parameters,
                     write_some_elements)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (CPU versions: tests/ops, tests/test_*.py)")
CUDA = torch.device("cuda")


def _gpu_backends():
    if not torch.cuda.is_available():
        return ["none"]
    return [n for n in kernels.backend_names() if n != "reference"]


@pytest.fixture(params=_gpu_backends())
def gpu_backend(request):
    ok, reason = kernels.availability(request.param, CUDA)
    assert ok, f"{request.param} cannot run on CUDA: {reason}"
    return kernels.get_backend(request.param, CUDA)


SIZES = [1, 3, 4097, 2**20 + 5] + [7, 129, 1000] * 70   # > 200 tensors: several per launch


def _lists(seed, dtype):
    """Low-precision parameters hold their fp32 masters' rounding, as after a step."""
    g = torch.Generator(device=CUDA).manual_seed(seed)
    mk = lambda scale=1.0: [torch.randn(n, generator=g, device=CUDA) * scale for n in SIZES]
    values = mk()
    return dict(params=[t.to(dtype) for t in values], grads=[t.to(dtype) for t in mk(2.0)], accs=mk(3.0),
                m=mk(0.1), v=[t.abs() for t in mk(0.1)], vmax=[t.abs() + 0.05 for t in mk(0.1)],
                masters=None if dtype == torch.float32 else values,
                steps=[torch.tensor(float(i % 3), device=CUDA) for i in range(len(SIZES))])


def _clone(d):
    return {k: None if v is None else [t.clone() for t in v] for k, v in d.items()}


def _close(a, b, rtol=1e-6):
    for x, y in zip(a, b):
        scale = y.float().abs().max().item() or 1.0
        torch.testing.assert_close(x.float(), y.float(), rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fold", [True, False])   # with a sum of squares: two launches; without: one
def test_accumulate_on_gpu_matches_reference(gpu_backend, dtype, fold):
    d = _lists(1, dtype)
    first = [i % 2 == 0 for i in range(len(SIZES))]
    out = []
    for backend in (reference, gpu_backend):
        x = _clone(d)
        for acc, f in zip(x["accs"], first):
            if f:
                acc.fill_(float("nan"))
        found = torch.zeros((), device=CUDA)
        sumsq = torch.full((), 0.5, device=CUDA) if fold else None
        backend.accumulate(x["grads"], x["accs"], first, torch.full((), 1.3, device=CUDA), found, sumsq)
        out.append((x["accs"], found, sumsq))
    _close(out[1][0], out[0][0])
    assert out[1][1].item() == 0
    if fold:
        torch.testing.assert_close(out[1][2], out[0][2], rtol=1e-5, atol=0)
    for where in (3, len(SIZES) - 1):   # a large tensor, and the last tensor of the last launch
        x = _clone(d)
        x["grads"][where][-1] = float("inf")
        found = torch.zeros((), device=CUDA)
        gpu_backend.accumulate(x["grads"], x["accs"], first, torch.ones((), device=CUDA), found,
                               torch.zeros((), device=CUDA) if fold else None)
        assert found.item() == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_steps_on_gpu_match_reference(gpu_backend, dtype):
    d = _lists(2, dtype)
    results = []
    for backend in (reference, gpu_backend):
        x = _clone(d)
        backend.adam_step(x["params"], x["accs"], x["m"], x["v"], x["vmax"], x["steps"], x["masters"],
                          lr=3e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=True,
                          maximize=False, decoupled_weight_decay=True,
                          grad_scale=torch.full((), 0.5, device=CUDA),
                          found_inf=torch.zeros((), device=CUDA))
        backend.sgd_step(x["params"], x["accs"], x["v"], x["steps"], x["masters"], lr=0.1,
                         momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False,
                         maximize=True, grad_scale=0.25, found_inf=torch.zeros((), device=CUDA))
        results.append(x)
    for key in ("m", "v", "vmax", "masters", "steps"):
        if results[0][key] is not None:
            _close(results[1][key], results[0][key], rtol=1e-5)
    _close(results[1]["params"], results[0]["params"], rtol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_written_parameters_on_gpu_are_updated_from_their_written_values(gpu_backend, dtype):
    """Some parameter elements written since the last step (no longer their master's rounding;
    the stale masters of some are NaN, which must not leak), in vector steps and tails alike."""
    d = _lists(5, dtype)
    for i, (param, master) in enumerate(zip(d["params"], d["masters"])):
        written = write_some_elements(param, seed=i)
        master[written & (torch.arange(master.numel(), device=CUDA) % 3 == 0)] = float("nan")
    results = []
    for backend in (reference, gpu_backend):
        x = _clone(d)
        backend.adam_step(x["params"], x["accs"], x["m"], x["v"], x["vmax"], x["steps"], x["masters"],
                          lr=3e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=True,
                          maximize=False, decoupled_weight_decay=True,
                          grad_scale=torch.full((), 0.5, device=CUDA),
                          found_inf=torch.zeros((), device=CUDA))
        backend.sgd_step(x["params"], x["accs"], x["v"], x["steps"], x["masters"], lr=0.1,
                         momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=True,
                         maximize=False, grad_scale=0.25, found_inf=torch.zeros((), device=CUDA))
        results.append(x)
    assert not any(torch.isnan(m).any().item() for m in results[1]["masters"])
    for key in ("m", "v", "vmax", "masters", "steps"):
        _close(results[1][key], results[0][key], rtol=1e-5)
    for p, m in zip(results[1]["params"], results[1]["masters"]):
        assert torch.equal(p, m.to(dtype))


def _windows_and_large_batch():
    """Three windows of four micro-batches on the GPU, the model they start from, and what
    torch's AdamW makes of it on one large batch per window."""
    windows = [make_batches(s, 4, 3) for s in range(3)]
    windows = [[(x.cuda(), y.cuda()) for x, y in w] for w in windows]
    base = make_model(seed=1).cuda()
    expected = train_large_batch(clone(base), lambda p: torch.optim.AdamW(p, lr=1e-2), windows,
                                 max_grad_norm=0.5)
    return windows, base, expected


def test_window_on_gpu_equals_large_batch(gpu_backend):
    windows, base, expected = _windows_and_large_batch()
    model = clone(base)
    opt = fused_accum.AdamW(model.parameters(), lr=1e-2, accumulation_steps=4, max_grad_norm=0.5,
                            backend=gpu_backend.name)
    train_accumulated(model, opt, windows)
    assert_same_params(model, expected)


def test_compact_masters_on_gpu_match_reference(gpu_backend):
    from fused_accum.kernels.reference import compact_master, split_master
    g = torch.Generator(device=CUDA).manual_seed(3)
    masters = [torch.randn(n, generator=g, device=CUDA) for n in SIZES]
    results = []
    for backend in (reference, gpu_backend):
        pairs = [split_master(m) for m in masters]
        params = [h.view(torch.bfloat16).clone() for h, _ in pairs]
        rems = [r.clone() for _, r in pairs]
        m = [torch.zeros_like(x) for x in masters]
        v = [torch.zeros_like(x) for x in masters]
        accs = [torch.randn(x.shape, generator=torch.Generator(device=CUDA).manual_seed(4), device=CUDA)
                for x in masters]
        backend.adam_step(params, accs, m, v, None, [torch.zeros((), device=CUDA) for _ in SIZES],
                          rems, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                          amsgrad=False, maximize=False, decoupled_weight_decay=True,
                          grad_scale=1.0, found_inf=torch.zeros((), device=CUDA))
        results.append([compact_master(p, r) for p, r in zip(params, rems)])
    _close(results[1], results[0], rtol=1e-6)


def _pair_bits(param, remainder):
    return param.view(torch.int16).to(torch.int64) & 0xFFFF, remainder.to(torch.int64)


def test_compact_pairs_on_gpu_through_a_step_that_moves_nothing(gpu_backend):
    """CPU version: tests/ops/test_optimizer_steps.py (the same rule: a pair whose master is not
    NaN is kept bit for bit; +-0 over a negative remainder and +-inf over a positive one drop
    it; a NaN parameter becomes 0x7FC0 with remainder 0)."""
    param, remainder = (t.to(CUDA) for t in every_compact_pair())
    p_bits, r_bits = _pair_bits(param, remainder)
    u = ((p_bits << 16) + r_bits) & 0xFFFFFFFF
    master_is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    param_is_nan = (p_bits & 0x7FFF) > 0x7F80
    n = param.numel()
    for op in ("sgd", "adam"):
        p, r = param.clone(), remainder.clone()
        ones = torch.ones(n, device=CUDA)
        zero = torch.zeros((), device=CUDA)
        if op == "sgd":
            gpu_backend.sgd_step([p], [ones], None, [torch.full((), 3.0, device=CUDA)], [r],
                                 lr=0.0, momentum=0.0, dampening=0.0, weight_decay=0.0,
                                 nesterov=False, maximize=False, grad_scale=1.0, found_inf=zero)
        else:
            gpu_backend.adam_step([p], [ones], [torch.zeros(n, device=CUDA)],
                                  [torch.ones(n, device=CUDA)], None,
                                  [torch.full((), 3.0, device=CUDA)], [r], lr=0.0, beta1=0.9,
                                  beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False,
                                  maximize=False, decoupled_weight_decay=True, grad_scale=1.0,
                                  found_inf=zero)
        got_p, got_r = _pair_bits(p, r)
        assert torch.equal(got_p, torch.where(param_is_nan, 0x7FC0, p_bits)), op
        assert torch.equal(got_r, torch.where(master_is_nan, 0, r_bits)), op


def test_written_compact_parameters_on_gpu_match_reference(gpu_backend):
    """Compact masters of parameters partly written since the last step (new values; +-0 over
    negative remainders, +-inf over positive ones), in vector steps and tails alike.  CPU
    version, bit for bit: tests/ops/test_against_reference.py."""
    from fused_accum.kernels.reference import compact_master, split_master
    g = torch.Generator().manual_seed(6)
    params, rems = [], []
    for i, n in enumerate(SIZES):
        high, rem = split_master(torch.randn(n, generator=g))
        param = high.view(torch.bfloat16).clone()
        write_compact_parameters(param, rem, seed=i)
        params.append(param.to(CUDA))
        rems.append(rem.to(CUDA))
    d = _lists(7, torch.float32)
    results = []
    for backend in (reference, gpu_backend):
        p, r = [t.clone() for t in params], [t.clone() for t in rems]
        x = _clone(d)
        backend.adam_step(p, x["accs"], x["m"], x["v"], x["vmax"], x["steps"], r, lr=3e-3,
                          beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=True,
                          maximize=False, decoupled_weight_decay=True,
                          grad_scale=torch.full((), 0.5, device=CUDA),
                          found_inf=torch.zeros((), device=CUDA))
        backend.sgd_step(p, x["accs"], x["v"], x["steps"], r, lr=0.1, momentum=0.9,
                         dampening=0.1, weight_decay=0.0, nesterov=True, maximize=False,
                         grad_scale=0.25, found_inf=torch.zeros((), device=CUDA))
        masters = [compact_master(pi, ri) for pi, ri in zip(p, r)]
        for pi, ri, mi in zip(p, r, masters):   # the pairs hold their masters
            assert torch.equal(torch.isnan(mi), torch.isnan(pi))
            high, remainder = split_master(mi)
            assert torch.equal(high, pi.view(torch.int16)) and torch.equal(remainder, ri)
        results.append(masters)
    for a, b in zip(results[1], results[0]):
        assert torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.isinf(a), torch.isinf(b))
        finite = torch.isfinite(b)
        assert torch.equal(a[~finite].nan_to_num(), b[~finite].nan_to_num())
    _close([a[torch.isfinite(b)] for a, b in zip(results[1], results[0])],
           [b[torch.isfinite(b)] for b in results[0]], rtol=1e-6)


def test_stochastic_rounding_on_gpu_draws_the_reference_bits(gpu_backend):
    values = [torch.randn(n, device=CUDA) for n in SIZES]
    out = []
    for backend in (reference, gpu_backend):
        params = [v.to(torch.bfloat16) for v in values]
        backend.sgd_step(params, [torch.full_like(v, 1e-4) for v in values], None,
                         [torch.full((), 7.0, device=CUDA) for _ in values], None, lr=1.0,
                         momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                         maximize=False, grad_scale=1.0, found_inf=torch.zeros((), device=CUDA),
                         rounding_seed=12345)
        out.append(torch.cat([p.float() for p in params]))
    same = (out[0] == out[1]).double().mean().item()
    assert same > 0.999   # the fp32 update may differ by an ulp (fused multiply-add) near a cut


def test_a_first_window_peaks_at_the_state_it_keeps_plus_one_gradient(gpu_backend):
    """Masters, moments and the accumulator are all the memory a bf16 window adds, beyond the
    gradient in flight: the first H200 run found the masters built through two transient fp32
    copies of the bucket (1.22x torch's peak on a 268M-parameter model)."""
    model = torch.nn.Linear(2048, 2048, bias=False).cuda().bfloat16()
    x = torch.randn(4, 2048, device=CUDA, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    opt = fused_accum.AdamW(model.parameters(), accumulation_steps=2, backend=gpu_backend.name)
    for _ in range(2):
        model(x).float().square().mean().backward()
        opt.step()
    assert opt.stepped
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before
    gradient = model.weight.nbytes
    assert kept >= 16 * model.weight.numel()   # fp32 accumulator, master and two moments
    assert torch.cuda.max_memory_allocated() - before <= kept + gradient + 2**20


def _fp16_window_setup(backend_name):
    torch.manual_seed(0)
    model = make_model(seed=7).cuda().half()
    opt = fused_accum.AdamW(model.parameters(), lr=1e-3, accumulation_steps=4, max_grad_norm=1.0,
                            loss_scale=fused_accum.DynamicLossScale(init_scale=2.0**10),
                            backend=backend_name)
    tokens = torch.randint(0, 37, (4, 2, 5), device=CUDA)
    targets = torch.randint(0, 37, (4, 2, 5), device=CUDA)
    from helpers import lm_loss

    def window():
        for i in range(4):
            opt.backward(lm_loss(model, tokens[i], targets[i]))
            opt.step()
    return model, opt, window


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_collector_s_plan_on_gpu_gives_the_python_path_s_result(dtype, monkeypatch):
    """On a GPU the collector (tensor hook) adopts and accumulates the compiled backend's
    gradients from C++; bit for bit what the Python path gives (CPU version:
    tests/test_collector_plan.py)."""
    ok, reason = kernels.availability("extension", CUDA)
    assert ok, reason
    windows = [[(x.cuda(), y.cuda()) for x, y in make_batches(s, 3, 2)] for s in range(2)]
    base = make_model(seed=5, dtype=dtype).cuda()
    runs = []
    for hooks in ("auto", "python"):
        monkeypatch.setenv("FUSED_ACCUM_HOOKS", hooks)
        monkeypatch.setenv("FUSED_ACCUM_GROUP_MB", "0.004")   # several launches per pass
        model = clone(base)
        opt = fused_accum.AdamW(model.parameters(), lr=1e-2, accumulation_steps=3,
                                backend="extension")
        train_accumulated(model, opt, windows)
        collector = opt._buffers.collector
        runs.append((model, 0 if collector is None else collector.launches()))
    (planned, launches), (python, none) = runs
    assert launches > 0 and none == 0
    for a, b in zip(planned.parameters(), python.parameters()):
        assert torch.equal(a, b)


def test_a_whole_window_runs_without_host_synchronisation(gpu_backend):
    model, opt, window = _fp16_window_setup(gpu_backend.name)
    window()   # first window: lazy allocations, extension loading
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        window()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.stepped


def test_a_backward_pass_on_a_side_stream_runs_on_that_stream(gpu_backend):
    """The optimizer is built on the default stream; a later backward pass on another stream must
    not be tied back to it (the first GPU run found the collector holding AccumulateGrad nodes,
    made on the default stream, which failed every CUDA graph capture)."""
    model, opt, window = _fp16_window_setup(gpu_backend.name)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*AccumulateGrad node's stream does not match")
        with torch.cuda.stream(side):
            window()
    torch.cuda.current_stream().wait_stream(side)
    assert opt.stepped


def test_a_window_captured_in_a_cuda_graph_replays_to_the_eager_result(gpu_backend):
    eager_model, eager_opt, eager_window = _fp16_window_setup(gpu_backend.name)
    model, opt, window = _fp16_window_setup(gpu_backend.name)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):   # warm up on a side stream, as graph capture requires
        window()
        eager_window()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        window()
    eager_window()                  # the captured window, run eagerly
    for _ in range(3):
        eager_window()
        graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(model.parameters(), eager_model.parameters()):
        assert torch.equal(a, b)
    assert opt.loss_scale == eager_opt.loss_scale


def _cold_triton_tables():
    """An empty Triton table cache (the capture test above warms it first, hiding what a
    capture does with tables it makes itself)."""
    try:
        from fused_accum.kernels.triton_ops import launch
    except ImportError:
        return
    launch._cache = launch._TableCache(launch._CACHE_SIZE)


def _capture_and_compare(gpu_backend, between_replays):
    eager_model, eager_opt, eager_window = _fp16_window_setup(gpu_backend.name)
    model, opt, window = _fp16_window_setup(gpu_backend.name)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        window()
        eager_window()
    torch.cuda.current_stream().wait_stream(side)
    _cold_triton_tables()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        window()
    eager_window()                  # the captured window, run eagerly: eager is one ahead
    for _ in range(3):
        between_replays()
        eager_window()
        graph.replay()
    graph.replay()                  # and even again (the H200 run found this replay missing)
    torch.cuda.synchronize()
    for a, b in zip(model.parameters(), eager_model.parameters()):
        assert torch.equal(a, b)


def test_a_capture_with_a_cold_table_cache_replays_to_the_eager_result(gpu_backend):
    _capture_and_compare(gpu_backend, lambda: None)


def test_replays_after_more_new_tables_than_the_cache_holds(gpu_backend):
    """Eager calls between replays fill the cache with 600 new tables: the graph's own tables
    must not be evicted (it reads them at every replay)."""
    def churn():
        for n in range(1, 601):
            acc = torch.zeros(n, device=CUDA)
            gpu_backend.accumulate([torch.ones(n, device=CUDA)], [acc], [True],
                                   torch.tensor(1.0, device=CUDA), torch.zeros((), device=CUDA))
    _capture_and_compare(gpu_backend, churn)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_bucket_on_a_device_that_is_not_current(gpu_backend):
    other = torch.device("cuda", 1)
    g = torch.Generator(device=other).manual_seed(5)
    grads = [torch.randn(n, generator=g, device=other) for n in (3, 4097, 70001)]
    accs, expected = [torch.full_like(x, float("nan")) for x in grads], [x.clone() for x in grads]
    with torch.cuda.device(0):
        gpu_backend.accumulate(grads, accs, [True] * 3, torch.tensor(1.0, device=other),
                               torch.zeros((), device=other))
    torch.cuda.synchronize(other)
    for a, e in zip(accs, expected):
        assert torch.equal(a, e)


def test_fused_linear_on_gpu_equals_the_hook_path_and_the_large_batch(gpu_backend):
    """fp32 weights: the weight gradient added into the sum by cuBLAS (CPU version:
    tests/test_fused_linear.py)."""
    from fused_accum.linear import fused_modules
    windows, base, expected = _windows_and_large_batch()
    hooked = clone(base)
    train_accumulated(hooked, fused_accum.AdamW(hooked.parameters(), lr=1e-2, accumulation_steps=4,
                                                max_grad_norm=0.5, backend=gpu_backend.name),
                      windows)
    fused = clone(base)
    opt = fused_accum.AdamW(fused, lr=1e-2, accumulation_steps=4, max_grad_norm=0.5,
                            backend=gpu_backend.name)
    assert sorted(fused_modules(fused)) == ["down", "head", "up"]
    train_accumulated(fused, opt, windows)
    assert_same_params(fused, hooked, rtol=1e-5)
    assert_same_params(fused, expected)


def test_fused_linear_on_gpu_leaves_bf16_weights_on_the_hook_path(monkeypatch):
    """bf16 operands would be widened to an fp32 GEMM without tensor cores: not fused on GPUs."""
    from fused_accum.accumulation import GradBuffers
    taken = []
    original = GradBuffers.take_linear_grad
    monkeypatch.setattr(GradBuffers, "take_linear_grad",
                        lambda self, *a: taken.append(1) or original(self, *a))
    model = make_model(seed=2).cuda().to(torch.bfloat16)
    opt = fused_accum.SGD(model, lr=0.1, accumulation_steps=2)
    for tokens, targets in make_batches(3, 2, 2):
        lm_loss(model, tokens.cuda(), targets.cuda()).backward()
        opt.step()
    assert taken == [] and opt.stepped


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_gemm_of_accumulate_linear_on_gpu_matches_reference(dtype, monkeypatch):
    """FUSED_ACCUM_LINEAR_GEMM=triton: the Triton GEMM (tensor cores for bf16/fp16, IEEE fp32 for
    fp32) writes, then adds into, the fp32 sum (CPU version: tests/ops/test_accumulate_linear.py)."""
    if not kernels.availability("triton", CUDA)[0]:
        pytest.skip("Triton cannot run on this GPU")
    from fused_accum.kernels import triton_ops
    monkeypatch.setenv(triton_ops.LINEAR_GEMM_ENV, "triton")
    ops = kernels.get_backend("triton", CUDA)
    g = torch.Generator(device=CUDA).manual_seed(5)
    shapes = [(1, 1, 1), (300, 257, 129), (2048, 1024, 512)]   # rows, out, in
    operands = [(torch.randn(r, o, generator=g, device=CUDA).to(dtype),
                 torch.randn(r, i, generator=g, device=CUDA).to(dtype)) for r, o, i in shapes]
    accs = [torch.full((o, i), float("nan"), device=CUDA) for _, o, i in shapes]
    spec = [torch.empty(o, i, device=CUDA) for _, o, i in shapes]
    weight = torch.tensor(0.75, device=CUDA)
    sumsq, sumsq_spec = torch.zeros((), device=CUDA), torch.zeros((), device=CUDA)
    for first in (True, False):
        ops.accumulate_linear([a for a, _ in operands], [b for _, b in operands], accs,
                              [first] * 3, weight, None if first else sumsq)
        reference.accumulate_linear([a for a, _ in operands], [b for _, b in operands], spec,
                                    [first] * 3, weight, None if first else sumsq_spec)
    for mine, expected in zip(accs, spec):
        assert ((mine - expected).abs().max() / expected.abs().max()).item() < 1e-5
    assert abs(sumsq.item() - sumsq_spec.item()) < 1e-4 * sumsq_spec.item()
