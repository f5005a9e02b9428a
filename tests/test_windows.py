"""Window semantics: item-weighted means, short windows, parameters touched late or never,
frozen and tied parameters, param groups added mid-training, LR schedulers."""
import pytest
import torch
from torch import nn

import fused_accum
from fused_accum.placeholders import is_placeholder
from helpers import (IGNORE, assert_same_params, clone, lm_loss, make_batches, make_model,
                     max_rel_error, train_accumulated, train_large_batch)


def test_num_items_gives_the_token_mean_of_uneven_micro_batches(backend):
    # Micro-batches of 1, 5 and 2 sequences with a third of the targets padded: the per-micro-batch
    # means must be weighted by their token counts to give the large batch's token mean.
    windows = [make_batches(s, 1, 1, 0.3) + make_batches(s + 50, 1, 5, 0.3) + make_batches(s + 90, 1, 2, 0.3)
               for s in range(3)]
    base = make_model(seed=6)
    expected = train_large_batch(clone(base), lambda p: torch.optim.AdamW(p, lr=1e-2), windows)
    model = clone(base)
    opt = fused_accum.AdamW(model.parameters(), lr=1e-2, accumulation_steps=3, backend=backend)
    train_accumulated(model, opt, windows, num_items=True)
    assert_same_params(model, expected)
    # Without num_items the mean of means is a different (wrong) objective here.
    unweighted = clone(base)
    opt = fused_accum.AdamW(unweighted.parameters(), lr=1e-2, accumulation_steps=3, backend=backend)
    train_accumulated(unweighted, opt, windows)
    assert max_rel_error(unweighted, expected) > 1e-3


@pytest.mark.parametrize("num_items", [False, True])
def test_flush_uses_the_mean_over_what_was_seen(num_items, backend):
    pad = 0.2 if num_items else 0.0      # without num_items, equal micro-batches define the mean
    full = [make_batches(s, 4, 2, pad) for s in range(2)]
    short = make_batches(7, 2, 3, pad)   # the last window of an epoch: 2 of 4 micro-batches
    base = make_model(seed=7)
    kwargs = dict(lr=0.1, momentum=0.9)
    expected = train_large_batch(clone(base), lambda p: torch.optim.SGD(p, **kwargs), full + [short])
    model = clone(base)
    opt = fused_accum.SGD(model.parameters(), accumulation_steps=4, backend=backend, **kwargs)
    train_accumulated(model, opt, full, num_items=num_items)
    for tokens, targets in short:
        loss = lm_loss(model, tokens, targets)
        opt.backward(loss, num_items=(targets != IGNORE).sum() if num_items else None)
        opt.step()
    assert not opt.stepped and opt.micro_batches == 2
    assert opt.flush() and opt.micro_batches == 0
    assert_same_params(model, expected)
    assert not opt.flush()   # nothing left: no update


def test_flush_counts_a_micro_batch_whose_step_was_not_called(backend, hooks):
    # SGD: the update scales with the window's weight, which Adam's would hide
    window = make_batches(8, 3, 2)
    base = make_model(seed=8)
    expected = train_large_batch(clone(base), lambda p: torch.optim.SGD(p, lr=0.5), [window])
    model = clone(base)
    opt = fused_accum.SGD(model.parameters(), lr=0.5, accumulation_steps=8, backend=backend)
    for i, batch in enumerate(window):
        lm_loss(model, *batch).backward()
        if i < len(window) - 1:
            opt.step()
    assert opt.flush()
    assert_same_params(model, expected)


class TwoHeads(nn.Module):
    """A trunk and two heads; each micro-batch uses one head, a third head is never used."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(6, 8)
        self.heads = nn.ModuleList(nn.Linear(8, 3) for _ in range(3))

    def loss(self, x, y, head):
        return nn.functional.cross_entropy(self.heads[head](torch.tanh(self.trunk(x))), y)


def _head_batches(seed, heads):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g), h) for h in heads]


@pytest.mark.parametrize("fused_cls,torch_cls,kwargs", [
    (fused_accum.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    (fused_accum.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
])
def test_parameters_touched_late_or_never_in_a_window(fused_cls, torch_cls, kwargs, backend):
    # Window 1: head 1 first appears in the last micro-batch.  Window 2: head 1 is never used,
    # so torch (set_to_none) skips it: no weight decay, no moment update.  Head 2 never trains.
    windows = [_head_batches(0, [0, 0, 1]), _head_batches(1, [0, 0, 0]), _head_batches(2, [1, 0, 1])]
    torch.manual_seed(9)
    base = TwoHeads()
    expected = clone(base)
    ref = torch_cls(expected.parameters(), **kwargs)
    for window in windows:
        (sum(expected.loss(*b) for b in window) / len(window)).backward()
        ref.step()
        ref.zero_grad()
    model = clone(base)
    opt = fused_cls(model.parameters(), accumulation_steps=3, backend=backend, **kwargs)
    for window in windows:
        for b in window:
            model.loss(*b).backward()
            opt.step()
    assert_same_params(model, expected)
    assert torch.equal(model.heads[2].weight, base.heads[2].weight)
    assert not torch.equal(model.heads[1].weight, base.heads[1].weight)


def test_frozen_and_tied_parameters(backend):
    windows = [make_batches(s, 3, 2) for s in range(3)]
    base = make_model(seed=10, tie=True)
    base.norm.weight.requires_grad_(False)
    expected = train_large_batch(clone(base), lambda p: torch.optim.AdamW(p, lr=1e-2), windows)
    model = clone(base)
    assert model.head.weight is model.embed.weight
    opt = fused_accum.AdamW(model.parameters(), lr=1e-2, accumulation_steps=3, backend=backend)
    train_accumulated(model, opt, windows)
    assert_same_params(model, expected)
    assert torch.equal(model.norm.weight, base.norm.weight)


def test_unfreezing_a_parameter_after_construction(backend):
    windows = [make_batches(s, 2, 2) for s in range(3)]
    base = make_model(seed=11)
    base.norm.weight.requires_grad_(False)
    ref_model, model = clone(base), clone(base)
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.5)
    opt = fused_accum.SGD(model.parameters(), lr=0.1, momentum=0.5, accumulation_steps=2, backend=backend)
    for w, window in enumerate(windows):
        if w == 1:
            ref_model.norm.weight.requires_grad_(True)
            model.norm.weight.requires_grad_(True)
        train_large_batch(ref_model, lambda p: ref, [window])
        train_accumulated(model, opt, [window])
    assert_same_params(model, ref_model)
    assert not torch.equal(model.norm.weight, base.norm.weight)


def test_param_group_added_mid_training(backend):
    windows = [make_batches(s, 2, 3) for s in range(4)]
    base = make_model(seed=12)
    trunk = lambda m: [p for n, p in m.named_parameters() if not n.startswith("head")]
    ref_model, model = clone(base), clone(base)
    for m in (ref_model, model):
        m.head.weight.requires_grad_(False)
    ref = torch.optim.AdamW(trunk(ref_model), lr=1e-2)
    opt = fused_accum.AdamW(trunk(model), lr=1e-2, accumulation_steps=2, backend=backend)
    for w, window in enumerate(windows):
        if w == 2:
            for m, o in ((ref_model, ref), (model, opt)):
                m.head.weight.requires_grad_(True)
                o.add_param_group({"params": [m.head.weight], "lr": 3e-2, "weight_decay": 0.0})
        train_large_batch(ref_model, lambda p: ref, [window])
        train_accumulated(model, opt, [window])
    assert_same_params(model, ref_model)


def test_one_cycle_lr_scheduler_steps_per_window(backend):
    windows = [make_batches(s, 4, 2) for s in range(5)]
    base = make_model(seed=13)
    ref_model, model = clone(base), clone(base)
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    ref_sched = torch.optim.lr_scheduler.OneCycleLR(ref, max_lr=0.2, total_steps=len(windows))
    opt = fused_accum.SGD(model.parameters(), lr=0.1, momentum=0.9, accumulation_steps=4, backend=backend)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=len(windows))
    for window in windows:
        train_large_batch(ref_model, lambda p: ref, [window])
        ref_sched.step()
        for batch in window:
            lm_loss(model, *batch).backward()
            opt.step()
            if opt.stepped:
                sched.step()
        assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
    assert_same_params(model, ref_model)


def test_gradients_do_not_outlive_the_micro_batch(backend):
    model = make_model(seed=14)
    opt = fused_accum.AdamW(model.parameters(), accumulation_steps=4, backend=backend)
    lm_loss(model, *make_batches(1, 1, 2)[0]).backward()
    assert all(is_placeholder(p.grad) for p in model.parameters())   # no gradient kept there
    assert opt.state[model.embed.weight]["exp_avg"].dtype == torch.float32


def test_two_backward_passes_in_one_micro_batch_add_up(backend):
    # Two losses backpropagated separately within a micro-batch sum, like plain autograd.
    batches = make_batches(15, 2, 3)
    base = make_model(seed=15)
    expected = clone(base)
    ref = torch.optim.SGD(expected.parameters(), lr=0.1)
    (lm_loss(expected, *batches[0]) + lm_loss(expected, *batches[1])).backward()
    ref.step()
    model = clone(base)
    opt = fused_accum.SGD(model.parameters(), lr=0.1, max_grad_norm=1e9, backend=backend)
    lm_loss(model, *batches[0]).backward()
    lm_loss(model, *batches[1]).backward()
    opt.step()
    assert_same_params(model, expected)


@pytest.mark.parametrize("poison", ["inf", "zero-items"])
def test_a_window_without_a_finite_mean_is_skipped_and_the_next_one_applies(poison, backend):
    windows = [make_batches(s, 2, 2) for s in (16, 17)]
    base = make_model(seed=16)
    expected = train_large_batch(clone(base), lambda p: torch.optim.AdamW(p, lr=1e-2), windows[1:])
    model = clone(base)
    opt = fused_accum.AdamW(model.parameters(), lr=1e-2, accumulation_steps=2, backend=backend)
    with pytest.warns(RuntimeWarning, match="skipped") as caught:
        for i, batch in enumerate(windows[0]):
            loss = lm_loss(model, *batch)
            if poison == "inf":
                (loss * (float("inf") if i == 1 else 1.0)).backward()
            else:
                opt.backward(loss, num_items=0)
            opt.step()
    assert opt.skipped_steps == 1
    assert opt.stepped
    assert {w.filename for w in caught} == {__file__}   # the warning names the user's line
    for p, q in zip(model.parameters(), base.parameters()):
        assert torch.equal(p, q)
    assert all(s["step"].item() == 0 and not s["exp_avg"].any() for s in opt.state.values())
    train_accumulated(model, opt, windows[1:])
    assert_same_params(model, expected)


def test_step_with_a_closure(backend):
    window = make_batches(18, 3, 2)
    base = make_model(seed=18)
    expected = train_large_batch(clone(base), lambda p: torch.optim.SGD(p, lr=0.1), [window])
    model = clone(base)
    opt = fused_accum.SGD(model.parameters(), lr=0.1, accumulation_steps=3, backend=backend)
    for batch in window:
        def closure(batch=batch):
            loss = lm_loss(model, *batch)
            loss.backward()
            return loss
        assert torch.isfinite(opt.step(closure))
    assert opt.stepped
    assert_same_params(model, expected)


def test_a_scheduler_stepped_every_micro_batch_is_warned_once(backend):
    """Kept from a loop that called step() once per window, it would run k times too fast; a
    scheduler stepped when opt.stepped warns nothing."""
    import warnings
    for per_micro_batch in (False, True):
        model = make_model(seed=40)
        opt = fused_accum.SGD(model.parameters(), lr=0.1, accumulation_steps=3, backend=backend)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for batch in make_batches(40, 6, 2):
                lm_loss(model, *batch).backward()
                opt.step()
                opt.zero_grad()
                if per_micro_batch or opt.stepped:
                    scheduler.step()
        said = [w for w in caught if "learning rate changed in the middle of a window" in str(w.message)]
        assert len(said) == (1 if per_micro_batch else 0)
