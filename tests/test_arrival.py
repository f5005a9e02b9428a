"""Gradients accumulated as they arrive: during the backward pass, grouped up to a byte bound,
fp32 first gradients adopted without a copy, and backward passes that fail midway undone or their
window discarded, never left half-counted."""
import weakref

import pytest
import torch

import fused_accum
from fused_accum.placeholders import is_placeholder
from helpers import (FailsInBackward, InjectedFailure, assert_same_params, clone, concat, lm_loss,
                     make_batches, make_model)


pytestmark = pytest.mark.usefixtures("hooks")   # every test here, with each gradient hook


def test_the_collector_builds_and_is_used_unless_told_otherwise(hooks):
    opt = fused_accum.SGD(make_model(seed=0).parameters())
    assert (opt._buffers.collector is not None) == hooks.startswith("collector")


def test_groups_are_larger_where_a_bucket_is_on_a_gpu(monkeypatch):
    from fused_accum.accumulation import group_bytes
    monkeypatch.delenv("FUSED_ACCUM_GROUP_MB", raising=False)
    assert group_bytes({"cpu"}) == 2 * 2**20
    assert group_bytes({"cpu", "cuda"}) == group_bytes({"cuda"}) == 32 * 2**20
    monkeypatch.setenv("FUSED_ACCUM_GROUP_MB", "0.5")
    assert group_bytes({"cuda"}) == 2**19
    assert fused_accum.SGD(make_model(seed=0).parameters())._buffers.group_bytes == 2**19


def _gradient_accumulator(param):
    return param.view_as(param).grad_fn.next_functions[0][0]


def test_only_the_cpu_node_hook_holds_the_gradient_accumulator_node(hooks):
    """A kept AccumulateGrad node keeps the CUDA stream current when it was made, which ties
    backward passes on other streams (CUDA graph capture) to that stream: off the CPU the hooks
    must live on the tensor, and the node die with its graph as under plain autograd."""
    model = make_model(seed=0)
    opt = fused_accum.SGD(model.parameters(), lr=0.1, accumulation_steps=2)
    param = model.head.weight
    held = _gradient_accumulator(param)
    held.metadata["mark"] = True
    assert _gradient_accumulator(param).metadata.get("mark")   # the check sees a node kept alive
    del held
    kept = "mark" in _gradient_accumulator(param).metadata
    assert kept == (hooks == "collector")
    lm_loss(model, *make_batches(1, 2, 1)[0]).backward()   # and the hooks still take the gradient
    assert is_placeholder(param.grad) and opt._window.arrived


def _failing_loss(model, batch, at=None):
    """The micro-batch's loss, whose backward raises after the head's gradients (``at``: that
    module's) have arrived and before any earlier layer's (autograd runs the later-built nodes
    first)."""
    module = model.head if at is None else at
    handle = module.register_forward_pre_hook(lambda m, args: (FailsInBackward.apply(args[0]),))
    try:
        return lm_loss(model, *batch)
    finally:
        handle.remove()


class _Spy:
    """A backend that records each accumulate call, then runs the real one."""

    def __init__(self, backend):
        self.backend, self.calls, self.norms = backend, [], 0

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def accumulate(self, grads, accs, first, *args, **kwargs):
        self.calls.append(dict(task=torch._C._current_graph_task_id(), first=list(first),
                               nbytes=sum(g.nbytes for g in grads)))
        return self.backend.accumulate(grads, accs, first, *args, **kwargs)


    def norm(self, accs, sumsq):
        self.norms += 1
        return self.backend.norm(accs, sumsq)


def _spy_on(opt) -> _Spy:
    spies = {}
    for bucket in opt._buffers.buckets:
        spies.setdefault(id(bucket.backend), _Spy(bucket.backend))
        bucket.backend = spies[id(bucket.backend)]
    assert len(spies) == 1
    return next(iter(spies.values()))


def _backward(opt, loss, through_optimizer):
    if through_optimizer:
        opt.backward(loss)
    else:
        loss.backward()


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


# -- arrival -----------------------------------------------------------------------------------


def test_each_gradient_is_accumulated_and_freed_before_the_next_layer_delivers(monkeypatch, backend):
    monkeypatch.setenv("FUSED_ACCUM_GROUP_MB", "0")   # no grouping: each gradient at once
    model = make_model(seed=1, dtype=torch.bfloat16)
    opt = fused_accum.AdamW(model.parameters(), accumulation_steps=2, backend=backend)
    spy = _spy_on(opt)
    arrived = []   # weak references to the gradients delivered so far, in order
    alive_at_arrival = []

    def record(grad):
        alive_at_arrival.append(sum(r() is not None for r in arrived))
        arrived.append(weakref.ref(grad))

    for p in model.parameters():
        p.register_hook(record)
    batches = make_batches(1, 2, 3)
    for batch in batches:
        lm_loss(model, *batch).backward()
        opt.step()
    params = list(model.parameters())
    assert len(spy.calls) == 2 * len(params)
    assert all(call["task"] >= 0 for call in spy.calls)   # inside the backward pass
    assert spy.calls[0]["first"] == [True] and spy.calls[-1]["first"] == [False]
    assert max(alive_at_arrival) == 0   # every earlier gradient was freed already
    assert all(r() is None for r in arrived)


def test_small_gradients_are_grouped_up_to_the_byte_bound(monkeypatch, backend):
    model = make_model(seed=2, dtype=torch.bfloat16)
    grad_bytes = [p.numel() * 2 for p in model.parameters()]
    bound = sum(grad_bytes) // 3
    monkeypatch.setenv("FUSED_ACCUM_GROUP_MB", str(bound / 2**20))
    batches = make_batches(2, 3, 2)
    opt = fused_accum.SGD(model.parameters(), lr=0.1, momentum=0.9, accumulation_steps=3,
                          backend=backend)
    spy = _spy_on(opt)
    ungrouped = clone(model)
    monkeypatch.setenv("FUSED_ACCUM_GROUP_MB", "1000")
    opt_ungrouped = fused_accum.SGD(ungrouped.parameters(), lr=0.1, momentum=0.9,
                                    accumulation_steps=3, backend=backend)
    for batch in batches:
        lm_loss(model, *batch).backward()
        opt.step()
        lm_loss(ungrouped, *batch).backward()
        opt_ungrouped.step()
    per_pass = len(spy.calls) / len(batches)
    assert 2 <= per_pass < len(grad_bytes)   # several groups per pass, not one call per gradient
    assert all(call["nbytes"] < bound + max(grad_bytes) for call in spy.calls)
    for a, b in zip(model.parameters(), ungrouped.parameters()):
        assert torch.equal(a, b)   # grouping changes no bit


def test_an_fp32_first_gradient_is_adopted_without_a_copy(backend):
    model = make_model(seed=3)
    opt = fused_accum.AdamW(model.parameters(), accumulation_steps=3, max_grad_norm=1.0,
                            backend=backend)
    spy = _spy_on(opt)
    for i, batch in enumerate(make_batches(3, 3, 2)):
        lm_loss(model, *batch).backward()
        opt.step()
        if i == 0:   # the first micro-batch moved no gradient bytes
            assert spy.calls == []
            assert opt.memory_bytes()["accumulators"] == sum(p.nbytes for p in model.parameters())
    assert spy.calls and all(not any(call["first"]) for call in spy.calls)
    assert opt.memory_bytes()["accumulators"] == 0   # nothing held between windows


@pytest.mark.parametrize("loss_scale", [None, 1024.0])
def test_item_weighted_fp32_windows(loss_scale, backend):
    """num_items rides on the loss (first gradients still adopted); under loss scaling the weight
    carries 1/scale into the accumulate kernel, which then writes the first touches."""
    batches = make_batches(4, 3, 2, pad_fraction=0.3)
    base = make_model(seed=4)
    expected = clone(base)
    torch_opt = torch.optim.SGD(expected.parameters(), lr=0.1)
    lm_loss(expected, *concat(batches)).backward()
    torch_opt.step()
    model = clone(base)
    opt = fused_accum.SGD(model.parameters(), lr=0.1, accumulation_steps=3, loss_scale=loss_scale,
                          backend=backend)
    spy = _spy_on(opt)
    for batch in batches:
        opt.backward(lm_loss(model, *batch), num_items=(batch[1] != -100).sum())
        opt.step()
    first_touches = [f for call in spy.calls for f in call["first"] if f]
    assert len(first_touches) == (0 if loss_scale is None else len(list(model.parameters())))
    assert_same_params(model, expected)


def test_poisoned_flat_accumulators_are_overwritten_by_the_first_touch(backend):
    batches = make_batches(5, 4, 2)
    model = make_model(seed=5, dtype=torch.bfloat16)
    twin = clone(model)
    opts = [fused_accum.AdamW(m.parameters(), accumulation_steps=2, backend=backend)
            for m in (model, twin)]
    for w in range(2):
        opts[0]._buffers.buckets[0].acc.fill_(float("nan"))   # before every window
        for batch in batches[2 * w:2 * w + 2]:
            for m, opt in zip((model, twin), opts):
                lm_loss(m, *batch).backward()
                opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.isfinite(a).all() and torch.equal(a, b)


@pytest.mark.parametrize("k", [1, 2])
def test_a_non_finite_gradient_no_kernel_read_still_skips_the_window(k, backend):
    model = make_model(seed=6)
    extra = torch.nn.Parameter(torch.randn(5))
    opt = fused_accum.SGD([*model.parameters(), extra], lr=0.1, accumulation_steps=k,
                          backend=backend)
    start = _params(model)
    for i, batch in enumerate(make_batches(6, k, 2)):
        loss = lm_loss(model, *batch)
        if i == k - 1:   # extra's only gradient of the window, adopted, is infinite
            loss = loss + (extra * float("inf")).sum()
        loss.backward()
        with pytest.warns(RuntimeWarning, match="non-finite") if i == k - 1 else _no_warning():
            opt.step()
    assert opt.skipped_steps == 1
    for a, b in zip(model.parameters(), start):
        assert torch.equal(a, b)


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# -- backward passes that fail -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("through_optimizer", [False, True])
def test_a_failed_pass_that_only_touched_first_is_undone_exactly(dtype, through_optimizer,
                                                                monkeypatch, backend):
    monkeypatch.setenv("FUSED_ACCUM_GROUP_MB", "0")   # the head's gradient is accumulated at once
    batches = make_batches(7, 3, 2)
    model = make_model(seed=7, dtype=dtype)
    twin = clone(model)
    opt = fused_accum.AdamW(model.parameters(), accumulation_steps=3, max_grad_norm=1.0,
                            backend=backend)
    opt_twin = fused_accum.AdamW(twin.parameters(), accumulation_steps=3, max_grad_norm=1.0,
                                 backend=backend)
    with pytest.raises(InjectedFailure):
        _backward(opt, _failing_loss(model, batches[0]), through_optimizer)
    assert opt._buffers.passes == {}
    for batch in batches:   # the user retries the micro-batch, then goes on
        _backward(opt, lm_loss(model, *batch), through_optimizer)
        opt.step()
        _backward(opt_twin, lm_loss(twin, *batch), through_optimizer)
        opt_twin.step()
    assert opt.stepped and opt.skipped_steps == 0
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("through_optimizer", [False, True])
def test_a_failed_pass_that_added_into_the_sums_discards_its_window(dtype, through_optimizer,
                                                                    monkeypatch, backend):
    monkeypatch.setenv("FUSED_ACCUM_GROUP_MB", "0")
    windows = [make_batches(8 + w, 2, 2) for w in range(3)]
    model = make_model(seed=8, dtype=dtype)
    twin = clone(model)   # trains on windows 0 and 2 only
    opt = fused_accum.AdamW(model.parameters(), accumulation_steps=2, backend=backend)
    opt_twin = fused_accum.AdamW(twin.parameters(), accumulation_steps=2, backend=backend)
    for w, window in enumerate(windows):
        if w == 1:
            before = _params(model)
            _backward(opt, lm_loss(model, *window[0]), through_optimizer)
            opt.step()
            with pytest.warns(RuntimeWarning, match="window is discarded"):
                with pytest.raises(InjectedFailure):
                    _backward(opt, _failing_loss(model, window[1]), through_optimizer)
                opt.step()
            assert opt.stepped and opt.skipped_steps == 1
            assert torch.isnan(opt.grad_norm)   # spoilt sums have no norm
            for a, b in zip(model.parameters(), before):
                assert torch.equal(a, b)   # the window's step changed nothing
            continue
        for batch in window:
            _backward(opt, lm_loss(model, *batch), through_optimizer)
            opt.step()
            _backward(opt_twin, lm_loss(twin, *batch), through_optimizer)
            opt_twin.step()
    assert torch.isfinite(opt.grad_norm)   # the next window's own
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)   # the discarded window left no trace


def test_zero_grad_after_a_failed_pass_discarded_the_window_is_accepted(monkeypatch, backend):
    """What the failed pass added cannot be taken out, but the window's step is skipped anyway:
    zero_grad() does not refuse (found by the contract fuzzer)."""
    monkeypatch.setenv("FUSED_ACCUM_GROUP_MB", "0")
    batches = make_batches(12, 2, 2)
    model = make_model(seed=12)
    before = _params(model)
    opt = fused_accum.SGD(model.parameters(), lr=0.1, accumulation_steps=2, backend=backend)
    lm_loss(model, *batches[0]).backward()
    opt.step()
    with pytest.warns(RuntimeWarning, match="window is discarded"):
        with pytest.raises(InjectedFailure):
            _failing_loss(model, batches[1]).backward()
    opt.zero_grad()
    lm_loss(model, *batches[1]).backward()
    opt.step()
    assert opt.stepped and opt.skipped_steps == 1
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)


def _unfrozen_head(seed, backend):
    """A model whose head was frozen when the optimizer was built and is unfrozen since (its
    gradient goes to .grad until step() hooks it), the optimizer, and a twin trained as usual."""
    model = make_model(seed=seed)
    twin = clone(model)
    model.head.weight.requires_grad_(False)
    opt = fused_accum.AdamW(model.parameters(), accumulation_steps=2, backend=backend)
    opt_twin = fused_accum.AdamW(twin.parameters(), accumulation_steps=2, backend=backend)
    model.head.weight.requires_grad_(True)
    return model, opt, twin, opt_twin


def test_a_failed_pass_that_reached_an_unfrozen_parameter_discards_its_window(backend):
    """What the failed pass left in the unfrozen head's .grad cannot be told apart from what
    other passes put there: the step() that takes that .grad discards the window, with a warning
    naming the parameter (the failed pass's part used to join the window)."""
    windows = [make_batches(13 + w, 2, 2) for w in range(2)]
    model, opt, twin, opt_twin = _unfrozen_head(13, backend)   # the twin trains on window 1 only
    before = _params(model)
    with pytest.raises(InjectedFailure):
        _failing_loss(model, windows[0][0], at=model.down).backward()
    with pytest.warns(RuntimeWarning, match="unfrozen after the optimizer was built"):
        for batch in windows[0]:   # the retried micro-batch, then the next
            lm_loss(model, *batch).backward()
            opt.step()
    assert opt.stepped and opt.skipped_steps == 1
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)
    for batch in windows[1]:
        for m, o in ((model, opt), (twin, opt_twin)):
            lm_loss(m, *batch).backward()
            o.step()
    assert opt.skipped_steps == 1
    assert_same_params(model, twin)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_before_retrying_keeps_the_window_of_a_failed_pass_on_an_unfrozen_parameter(
        set_to_none, backend):
    """torch's recovery: zero_grad(), then the micro-batch again.  It clears what the failed pass
    left in the unfrozen head's .grad, and the window is the large batch's."""
    batches = make_batches(14, 2, 2)
    model, opt, twin, opt_twin = _unfrozen_head(14, backend)
    with pytest.raises(InjectedFailure):
        _failing_loss(model, batches[0], at=model.down).backward()
    opt.zero_grad(set_to_none=set_to_none)
    for batch in batches:
        for m, o in ((model, opt), (twin, opt_twin)):
            lm_loss(m, *batch).backward()
            o.step()
    assert opt.stepped and opt.skipped_steps == 0
    assert_same_params(model, twin)


def test_a_discarded_window_survives_a_mid_window_checkpoint(monkeypatch, backend):
    monkeypatch.setenv("FUSED_ACCUM_GROUP_MB", "0")
    batches = make_batches(9, 3, 2)
    model = make_model(seed=9)
    opt = fused_accum.SGD(model.parameters(), lr=0.1, accumulation_steps=3, backend=backend)
    lm_loss(model, *batches[0]).backward()
    opt.step()
    with pytest.warns(RuntimeWarning, match="discarded"), pytest.raises(InjectedFailure):
        _failing_loss(model, batches[1]).backward()
    state = opt.state_dict()
    before = _params(model)
    resumed = fused_accum.SGD(model.parameters(), lr=0.1, accumulation_steps=3, backend=backend)
    resumed.load_state_dict(state)
    for batch in batches[1:]:
        lm_loss(model, *batch).backward()
        resumed.step()
    assert resumed.stepped and resumed.skipped_steps == 1
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)


def test_many_small_tensors_match_the_large_batch(monkeypatch, backend):
    monkeypatch.setenv("FUSED_ACCUM_GROUP_MB", str(8 * 1024 / 2**20))   # a few tensors a group
    g = torch.Generator().manual_seed(10)
    params = [torch.nn.Parameter(torch.randn(int(n), generator=g))
              for n in torch.randint(3, 300, (150,), generator=g)]
    data = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(4)]
    loss = lambda ps, d: sum(((p - x) ** 2).mean() + p.sin().sum() * 1e-2 for p, x in zip(ps, d))
    expected = [p.detach().clone().requires_grad_() for p in params]
    torch_opt = torch.optim.AdamW(expected, lr=1e-2)
    (sum(loss(expected, d) for d in data) / 4).backward()
    torch.nn.utils.clip_grad_norm_(expected, 0.5)
    torch_opt.step()
    opt = fused_accum.AdamW(params, lr=1e-2, accumulation_steps=4, max_grad_norm=0.5,
                            backend=backend)
    for d in data:
        loss(params, d).backward()
        opt.step()
    for p, e in zip(params, expected):   # relative to each tensor's scale, as assert_same_params
        scale = e.detach().abs().max().item()
        torch.testing.assert_close(p.detach(), e.detach(), rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hinted", [True, False])
def test_a_window_driven_from_outside(dtype, hinted, backend):
    """One step() per window, as frameworks call it: told which pass is the window's last, the
    optimizer folds the clipping norm into it; untold, it is still exact."""
    batches = make_batches(11, 3, 2)
    base = make_model(seed=11, dtype=dtype)
    expected = clone(base)
    counted = fused_accum.SGD(expected.parameters(), lr=0.5, accumulation_steps=3,
                              max_grad_norm=0.1, backend=backend)   # SGD: no sign flips of
    model = clone(base)                                               # near-zero gradients
    opt = fused_accum.SGD(model.parameters(), lr=0.5, max_grad_norm=0.1, backend=backend)
    spy = _spy_on(opt)
    for m, batch in enumerate(batches):
        if hinted:
            opt.final_micro_batch = m == len(batches) - 1
        elif m == 0:   # driven from outside, never told which pass is the last
            opt.final_micro_batch = False
        (lm_loss(model, *batch) / len(batches)).backward()
        lm_loss(expected, *batch).backward()
        counted.step()
    opt.step()
    assert opt.stepped and opt.final_micro_batch is None
    assert spy.norms == (0 if hinted else 1)   # hinted: folded into the last pass's accumulate
    assert_same_params(model, expected, rtol=1e-5 if dtype == torch.float32 else 1e-2)
    with pytest.raises(TypeError, match="final_micro_batch"):
        opt.final_micro_batch = 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_pass_after_the_folded_one_is_not_counted_twice_in_the_norm(dtype, backend):
    """A pass told it is the window's last folds its sums of squares; another pass into the same
    window, not told so, changes those sums: the step's norm must be the final sums' norm."""
    batches = make_batches(15, 3, 2)
    model = make_model(seed=15, dtype=dtype)
    expected = clone(model)
    opt = fused_accum.SGD(model.parameters(), lr=0.5, max_grad_norm=1e-3, backend=backend)
    for m, batch in enumerate(batches):
        opt.final_micro_batch = m == 1   # the second pass is hinted last; the third is not
        lm_loss(model, *batch).backward()
        lm_loss(expected, *batch).backward()
    grads = [p.grad.double() for p in expected.parameters()]
    true_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    opt.step()
    assert opt.stepped
    torch.testing.assert_close(opt.grad_norm.double(), true_norm,
                               rtol=1e-5 if dtype == torch.float32 else 2e-2, atol=0)


def test_a_folded_norm_needs_no_norm_pass(backend):
    model = make_model(seed=12, dtype=torch.bfloat16)
    opt = fused_accum.AdamW(model.parameters(), accumulation_steps=2, max_grad_norm=1.0,
                            backend=backend)
    spy = _spy_on(opt)
    for batch in make_batches(12, 4, 2):
        lm_loss(model, *batch).backward()
        opt.step()
    assert spy.norms == 0 and opt.grad_norm is not None


def test_the_newest_optimizer_over_a_parameter_takes_its_gradients(backend):
    model = make_model(seed=13)
    batch = make_batches(13, 1, 2)[0]
    old = fused_accum.SGD(model.parameters(), accumulation_steps=2, backend=backend)
    new = fused_accum.SGD(model.parameters(), accumulation_steps=2, backend=backend)
    lm_loss(model, *batch).backward()
    assert all(is_placeholder(p.grad) for p in model.parameters())
    assert all(all(b.touched) for b in new._buffers.buckets)
    assert not any(any(b.touched) for b in old._buffers.buckets)
    del new   # back to plain autograd, not to the older optimizer
    lm_loss(model, *batch).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert not any(any(b.touched) for b in old._buffers.buckets)


def test_a_parameter_first_touched_late_in_a_window_overwrites_what_its_slice_held(backend):
    """First touch is per parameter, not per bucket: a parameter whose first gradient of the
    window comes after others of its bucket still overwrites its (here poisoned) slice."""
    def build():
        model = make_model(seed=14, dtype=torch.bfloat16)
        extra = torch.nn.Parameter(torch.randn(9).to(torch.bfloat16))
        opt = fused_accum.SGD([*model.parameters(), extra], lr=0.1, accumulation_steps=3,
                              backend=backend)
        return model, extra, opt
    runs = [build(), build()]
    windows = [make_batches(14 + w, 3, 2) for w in range(2)]
    for w, window in enumerate(windows):
        for (model, extra, opt), poison in zip(runs, (True, False)):
            if poison and w == 1:
                for bucket in opt._buffers.buckets:
                    bucket.acc.fill_(float("nan"))
            for m, batch in enumerate(window):
                loss = lm_loss(model, *batch)
                if w == 0 or m == 1:   # window 1: extra only in its second micro-batch
                    loss = loss + extra.float().square().sum()
                loss.backward()
                opt.step()
    (model, extra, opt), (twin, twin_extra, _) = runs
    assert opt.skipped_steps == 0
    for a, b in zip([*model.parameters(), extra], [*twin.parameters(), twin_extra]):
        assert torch.isfinite(a).all() and torch.equal(a, b)



def test_an_undone_pass_restores_the_non_finite_flag(backend, monkeypatch):
    """A failed first pass whose NaN gradients were accumulated (and flagged) before it failed is
    undone exactly: the window it was in still applies."""
    monkeypatch.setenv("FUSED_ACCUM_GROUP_MB", "0")   # every gradient accumulated as it arrives
    batches = make_batches(31, 2, 2)
    base = make_model(seed=31)
    expected = clone(base)
    (sum(lm_loss(expected, *b) for b in batches) / 2).backward()
    torch.optim.SGD(expected.parameters(), lr=0.1).step()
    model = clone(base)
    opt = fused_accum.SGD(model.parameters(), lr=0.1, accumulation_steps=2, loss_scale=8.0,
                          backend=backend)
    failing = FailsInBackward.apply(model.norm.bias).sum() * 0   # built first: fails last
    with pytest.raises(InjectedFailure):
        opt.backward(lm_loss(model, *batches[0]) * float("nan") + failing)
    for batch in batches:
        opt.backward(lm_loss(model, *batch))
        opt.step()
    assert opt.stepped and opt.skipped_steps == 0
    assert_same_params(model, expected)


def test_a_failed_pass_whose_group_mixed_first_touches_and_adds_discards_the_window(backend,
                                                                                   monkeypatch):
    """A pass that accumulated one group holding both a parameter's first gradient of the window
    and another's second, then failed, cannot be undone: the window is discarded, not kept with
    half a micro-batch in it."""
    model = make_model(seed=32)
    extra = torch.nn.Parameter(torch.randn(9))
    head = model.head.weight.numel() * 4
    monkeypatch.setenv("FUSED_ACCUM_GROUP_MB", str((head + 20) / 2**20))   # extra's and head's
    # Loss scaling: fp32 first gradients are copied into accumulators, not adopted whole, so
    # a group can hold a first touch beside an add.
    opt = fused_accum.SGD([*model.parameters(), extra], lr=0.1, accumulation_steps=2,
                          loss_scale=8.0, backend=backend)
    batches = make_batches(32, 3, 2)
    opt.backward(lm_loss(model, *batches[0]))   # every parameter but extra
    opt.step()
    before = [p.detach().clone() for p in [*model.parameters(), extra]]
    tokens, targets = batches[1]
    h = model.embed(tokens)
    h = h + model.down(torch.nn.functional.gelu(model.up(model.norm(h))))
    logits = model.head(FailsInBackward.apply(h))   # fails once the head's gradient is out
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             targets.reshape(-1)) + extra.square().sum()
    with pytest.warns(RuntimeWarning, match="window is discarded"):
        with pytest.raises(InjectedFailure):
            opt.backward(loss)   # one group, [extra (first), head (added)], then the failure
        opt.step()
    assert opt.stepped and opt.skipped_steps == 1
    assert all(torch.equal(p, q) for p, q in zip([*model.parameters(), extra], before))
