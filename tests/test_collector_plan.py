"""The collector's plan: gradients of the compiled backend's buckets accumulated from C++, with no
Python per group (csrc/autograd/collector.cpp), against the Python path that takes the rest."""
import weakref

import pytest
import torch

import fused_accum
from helpers import InjectedFailure, clone, lm_loss, make_batches, make_model
from test_arrival import _failing_loss

backend = "extension"   # the only backend the collector plans for


@pytest.fixture(autouse=True, params=["collector", "collector on the tensor"])
def hooks(request, monkeypatch):
    """Both collector hooks: on the AccumulateGrad node (CPUs) and on the tensor (accelerators)."""
    from fused_accum.accumulation import Hooks
    from fused_accum.kernels import availability
    ok, why = availability("extension", torch.device("cpu"))
    if not ok:
        pytest.skip(f"the extension backend is unavailable here: {why}")
    monkeypatch.setenv("FUSED_ACCUM_HOOKS", "auto")
    if request.param == "collector on the tensor":
        monkeypatch.setattr(Hooks, "hook_on_node", staticmethod(lambda param: False))
    if fused_accum.SGD(make_model(seed=0).parameters())._buffers.collector is None:
        pytest.fail("the gradient collector did not build")
    return request.param


def _launches(opt) -> int:
    collector = opt._buffers.collector
    return 0 if collector is None else collector.launches()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
@pytest.mark.parametrize("num_items", [False, True])
def test_planned_gradients_give_what_the_python_path_gives(dtype, max_grad_norm, num_items, hooks,
                                                          monkeypatch):
    """In a window's later micro-batches (and every micro-batch of a flat bucket) the collector
    accumulates from C++; the result is the Python path's, bit for bit where no sum of squares is
    folded (its order of summation differs: the norm, and so clipping, to float rounding)."""
    monkeypatch.setenv("FUSED_ACCUM_GROUP_MB", "0.004")   # several launches per pass
    windows = [make_batches(40 + w, 3, 2) for w in range(2)]
    model = make_model(seed=40, dtype=dtype)
    twin = clone(model)
    kwargs = dict(lr=0.05, accumulation_steps=3, max_grad_norm=max_grad_norm, backend=backend)
    opt = fused_accum.AdamW(model.parameters(), **kwargs)
    monkeypatch.setenv("FUSED_ACCUM_HOOKS", "python")
    opt_twin = fused_accum.AdamW(twin.parameters(), **kwargs)
    for window in windows:
        for tokens, targets in window:
            for m, o in ((model, opt), (twin, opt_twin)):
                loss = lm_loss(m, tokens, targets)
                o.backward(loss * targets.numel(), num_items=targets.numel()) if num_items else \
                    o.backward(loss)
                o.step()
    assert opt.stepped and _launches(opt) > 0 and _launches(opt_twin) == 0
    for a, b in zip(model.parameters(), twin.parameters()):
        if max_grad_norm is None:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=0)
    if max_grad_norm is not None:
        torch.testing.assert_close(opt.grad_norm, opt_twin.grad_norm, rtol=1e-6, atol=0)


def test_planned_gradients_are_freed_before_the_next_layer_delivers(monkeypatch, hooks):
    monkeypatch.setenv("FUSED_ACCUM_GROUP_MB", "0")   # each planned gradient launched at once
    model = make_model(seed=41, dtype=torch.bfloat16)   # flat: every gradient is planned
    opt = fused_accum.SGD(model.parameters(), lr=0.1, accumulation_steps=2, backend=backend)
    arrived, alive_at_arrival = [], []

    def record(grad):
        alive_at_arrival.append(sum(r() is not None for r in arrived))
        arrived.append(weakref.ref(grad))

    for p in model.parameters():
        p.register_hook(record)
    for batch in make_batches(41, 2, 3):
        lm_loss(model, *batch).backward()
        opt.step()
    assert opt.stepped and _launches(opt) == 2 * len(list(model.parameters()))
    assert max(alive_at_arrival) == 0 and all(r() is None for r in arrived)


def test_a_failed_pass_whose_planned_gradients_were_not_launched_is_undone_exactly(hooks):
    """Planned gradients wait for their group's bound like queued ones; a pass that fails before
    its group launched is dropped whole, and the window goes on as if it had not run."""
    batches = make_batches(42, 3, 2)
    model = make_model(seed=42)
    twin = clone(model)
    opt = fused_accum.SGD(model.parameters(), lr=0.1, momentum=0.9, accumulation_steps=3,
                          backend=backend)
    opt_twin = fused_accum.SGD(twin.parameters(), lr=0.1, momentum=0.9, accumulation_steps=3,
                               backend=backend)
    for m, batch in enumerate(batches):
        if m == 1:   # the second micro-batch fails once after the head's gradients arrived
            launched = _launches(opt)
            with pytest.raises(InjectedFailure):
                lm_loss_fails = _failing_loss(model, batch)
                lm_loss_fails.backward()
            assert _launches(opt) == launched and opt._buffers.passes == {}
        lm_loss(model, *batch).backward()
        opt.step()
        lm_loss(twin, *batch).backward()
        opt_twin.step()
    assert opt.stepped and opt.skipped_steps == 0 and _launches(opt) > 0
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("loss_scale", [None, 1024.0])
def test_fp32_first_gradients_are_adopted_by_the_collector_without_a_copy(loss_scale, hooks):
    """Unweighted, an fp32 first gradient becomes its accumulator in C++ (no launch, the very
    tensor autograd made); weighted (a loss scale's 1 / scale), the collector makes the
    accumulator and writes w * g into it, one launch per group."""
    model = make_model(seed=43)
    made = {}   # what autograd put in .grad: registered first, this hook runs before the optimizer's
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: made.__setitem__(p, p.grad.data_ptr()))
    opt = fused_accum.AdamW(model.parameters(), accumulation_steps=3, loss_scale=loss_scale,
                            backend=backend)
    tokens, targets = make_batches(43, 1, 2)[0]
    loss = lm_loss(model, tokens, targets)
    opt.backward(loss)
    bucket = opt._buffers.buckets[0]
    assert all(bucket.touched) and len(made) == len(bucket.params)
    adopted = [bucket.adopted[i].data_ptr() == made[p] for i, p in enumerate(bucket.params)]
    if loss_scale:
        assert not any(adopted) and _launches(opt) > 0
    else:
        assert all(adopted) and _launches(opt) == 0
    assert opt.memory_bytes()["accumulators"] == sum(p.nbytes for p in model.parameters())


@pytest.mark.parametrize("loss_scale", [None, "dynamic"])
def test_mixed_buckets_and_groups_give_what_the_python_path_gives(loss_scale, hooks, monkeypatch):
    """fp32 and bf16 buckets of two param groups, one parameter first touched late in a window,
    tied weights and a loss scale: planned and Python paths agree bit for bit."""
    monkeypatch.setenv("FUSED_ACCUM_GROUP_MB", "0.002")
    windows = [make_batches(44 + w, 3, 2) for w in range(3)]

    def build():
        model = make_model(seed=44, tie=True)
        model.up.to(torch.bfloat16)
        late = torch.nn.Parameter(torch.randn(5))
        groups = [{"params": [p for n, p in model.named_parameters() if n.startswith("up")],
                   "lr": 3e-2},
                  {"params": [p for n, p in model.named_parameters() if not n.startswith("up")]
                   + [late]}]
        opt = fused_accum.AdamW(groups, lr=1e-2, accumulation_steps=3, loss_scale=loss_scale,
                                backend=backend)
        return model, late, opt

    def forward(model, late, tokens, targets, m):
        h = model.norm(model.embed(tokens))
        h = h + model.down(torch.nn.functional.gelu(model.up(h.bfloat16()).float()))
        loss = torch.nn.functional.cross_entropy(model.head(h).reshape(-1, model.head.out_features),
                                                 targets.reshape(-1))
        return loss + (late.square().sum() if m == 2 else 0.0)   # late: only the last micro-batch

    runs = []
    for kind in ("auto", "python"):
        monkeypatch.setenv("FUSED_ACCUM_HOOKS", kind)
        model, late, opt = build()
        for window in windows:
            for m, (tokens, targets) in enumerate(window):
                opt.backward(forward(model, late, tokens, targets, m))
                opt.step()
        runs.append(([*model.parameters(), late], _launches(opt)))
    (planned, launches), (python, none) = runs
    assert launches > 0 and none == 0
    for a, b in zip(planned, python):
        assert torch.equal(a, b)


class _OneBadAccumulator:
    """Stands in for the collector while a plan is made: gives the first slot an accumulator of
    the wrong size, which the op refuses when the group launches."""

    def __init__(self, collector):
        self.collector = collector

    def plan(self, task, entries):
        first = entries[0]
        bad = first._replace(accumulators=[torch.empty(1)] + list(first.accumulators[1:]))
        return self.collector.plan(task, [bad, *entries[1:]])


def test_a_launch_that_fails_at_the_pass_s_end_discards_its_window(hooks, monkeypatch):
    """What a failed launch wrote is unknown: the window is discarded with the warning, the plan
    is dropped, and the next window trains as if the discarded one had never run."""
    from fused_accum.accumulation import GradBuffers
    monkeypatch.setenv("FUSED_ACCUM_GROUP_MB", "1000")   # every planned launch at the pass's end
    model = make_model(seed=45, dtype=torch.bfloat16)
    twin = clone(model)   # trains on windows 0 and 2 only
    make = lambda m: fused_accum.SGD(m.parameters(), lr=0.1, momentum=0.9, accumulation_steps=2,
                                     backend=backend)
    opt, opt_twin = make(model), make(twin)
    real_plan = GradBuffers._plan

    def bad_plan(self, task):
        real, self.hooks.collector = self.hooks.collector, _OneBadAccumulator(self.hooks.collector)
        try:
            real_plan(self, task)
        finally:
            self.hooks.collector = real

    for w, window in enumerate(make_batches(45 + w, 2, 2) for w in range(3)):
        if w == 1:
            before = [p.detach().clone() for p in model.parameters()]
            lm_loss(model, *window[0]).backward()
            opt.step()
            monkeypatch.setattr(GradBuffers, "_plan", bad_plan)
            with pytest.warns(RuntimeWarning, match="window is discarded"):
                with pytest.raises(RuntimeError):
                    lm_loss(model, *window[1]).backward()
            monkeypatch.setattr(GradBuffers, "_plan", real_plan)
            opt.step()
            assert opt.stepped and opt.skipped_steps == 1 and opt._buffers.passes == {}
            for a, b in zip(model.parameters(), before):
                assert torch.equal(a, b)
            continue
        for batch in window:
            lm_loss(model, *batch).backward()
            opt.step()
            lm_loss(twin, *batch).backward()
            opt_twin.step()
    assert _launches(opt) > 0
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
