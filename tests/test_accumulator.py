"""FusedAccumulator around torch optimizers: fused kernels for SGD/Adam/AdamW, the inner step
for anything else."""
import io

import torch

import fused_accum
from helpers import (assert_same_params, clone, lm_loss, make_batches, make_model,
                     train_accumulated, train_large_batch)


def test_wrapping_torch_adamw_equals_the_large_batch_with_a_scheduler_on_the_inner(backend):
    windows = [make_batches(s, 3, 2) for s in range(80, 84)]
    base = make_model(seed=80)
    kwargs = dict(lr=1e-2, weight_decay=0.1)
    ref_model = clone(base)
    ref = torch.optim.AdamW(ref_model.parameters(), **kwargs)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=1, gamma=0.5)
    model = clone(base)
    inner = torch.optim.AdamW(model.parameters(), **kwargs)
    sched = torch.optim.lr_scheduler.StepLR(inner, step_size=1, gamma=0.5)
    opt = fused_accum.FusedAccumulator(inner, accumulation_steps=3, max_grad_norm=1.0,
                                       backend=backend)
    assert opt.fused and opt.param_groups is inner.param_groups
    for window in windows:
        train_large_batch(ref_model, lambda p: ref, [window], max_grad_norm=1.0)
        ref_sched.step()
        train_accumulated(model, opt, [window])
        sched.step()
    assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"] == 1e-2 / 16
    assert_same_params(model, ref_model)


def test_wrapping_takes_over_the_inner_optimizer_state(backend):
    windows = [make_batches(s, 2, 2) for s in range(85, 89)]
    base = make_model(seed=85)
    expected = train_large_batch(clone(base), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                                 windows)
    model = clone(base)
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_large_batch(model, lambda p: inner, windows[:2])
    opt = fused_accum.FusedAccumulator(inner, accumulation_steps=2, backend=backend)
    train_accumulated(model, opt, windows[2:])
    assert_same_params(model, expected)


def test_any_other_optimizer_steps_on_the_window_mean(backend):
    windows = [make_batches(s, 4, 2) for s in range(90, 93)]
    base = make_model(seed=90)
    expected = train_large_batch(clone(base), lambda p: torch.optim.RMSprop(p, lr=1e-3),
                                 windows, max_grad_norm=0.3)
    model = clone(base)
    opt = fused_accum.FusedAccumulator(torch.optim.RMSprop(model.parameters(), lr=1e-3),
                                       accumulation_steps=4, max_grad_norm=0.3, backend=backend)
    assert not opt.fused
    train_accumulated(model, opt, windows)
    assert_same_params(model, expected)
    assert all(p.grad is None for p in model.parameters())


def test_generic_state_dict_resumes_mid_window(backend):
    batches = make_batches(95, 6, 2)
    make = lambda m: fused_accum.FusedAccumulator(torch.optim.Adagrad(m.parameters(), lr=0.1),
                                                  accumulation_steps=4, backend=backend)
    base = make_model(seed=95)
    straight = clone(base)
    opt = make(straight)
    train_accumulated(straight, opt, [batches[:4]])
    for batch in batches[4:]:
        lm_loss(straight, *batch).backward()
        opt.step()
    opt.flush()

    first = clone(base)
    opt = make(first)
    train_accumulated(first, opt, [batches[:4]])
    lm_loss(first, *batches[4]).backward()
    opt.step()
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed = clone(base)
    resumed.load_state_dict(checkpoint["model"])
    opt = make(resumed)
    opt.load_state_dict(checkpoint["opt"])
    lm_loss(resumed, *batches[5]).backward()
    opt.step()
    opt.flush()
    for a, b in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(a, b)


def test_param_groups_stay_shared_after_loading_a_state_dict(backend):
    model = make_model(seed=96)
    inner = torch.optim.Adagrad(model.parameters(), lr=0.1)
    opt = fused_accum.FusedAccumulator(inner, backend=backend)
    opt.load_state_dict(opt.state_dict())   # accelerate's prepare() does this round trip
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.25)
    assert inner.param_groups is opt.param_groups and inner.param_groups[0]["lr"] == 0.025
    before = [p.detach().clone() for p in model.parameters()]
    lm_loss(model, *make_batches(96, 1, 2)[0]).backward()
    opt.step()
    scheduler.step()
    reference = torch.optim.Adagrad([b.requires_grad_() for b in before], lr=0.025)
    clone_model = make_model(seed=96)
    lm_loss(clone_model, *make_batches(96, 1, 2)[0]).backward()
    for b, p in zip(before, clone_model.parameters()):
        b.grad = p.grad
    reference.step()
    for a, b in zip(model.parameters(), before):
        torch.testing.assert_close(a.detach(), b.detach())
