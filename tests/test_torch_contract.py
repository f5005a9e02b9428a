"""The drop-in contract, idiom by idiom (docs/contract.md).

With ``accumulation_steps=1`` in one process a fused optimizer leaves gradients in ``.grad`` and
must be indistinguishable from the torch optimizer of the same name: every idiom below runs the
same code on a fused model and on a torch one and compares parameters and gradients after every
step.  With ``accumulation_steps=k > 1`` every idiom gives the large-batch update or raises an
error naming the call and the remedy, leaving the optimizer usable with its window intact.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import optimizer as torch_optimizer
# Imported before any fused optimizer exists, as at the top of a training script: the clipping
# guards must catch these references too, not only the module attributes.
from torch.nn.utils import clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, get_total_norm

import fused_accum
from helpers import FailsInBackward, clone, lm_loss, make_batches, make_model

OPTIMIZERS = {
    "SGD": (torch.optim.SGD, fused_accum.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    "AdamW": (torch.optim.AdamW, fused_accum.AdamW, dict(lr=1e-2, weight_decay=0.1)),
}


@pytest.fixture(params=list(OPTIMIZERS))
def kind(request):
    return request.param


def _pair(kind, backend, seed, model=None, **extra):
    """The same model twice, one under torch.optim and one under fused_accum (k = 1)."""
    torch_cls, fused_cls, kwargs = OPTIMIZERS[kind]
    model = model if model is not None else make_model(seed)
    twin = clone(model)
    return ((twin, torch_cls(twin.parameters(), **kwargs, **extra)),
            (model, fused_cls(model.parameters(), **kwargs, **extra, backend=backend)))


def _assert_same(torch_side, fused_side, rtol=1e-5):
    for (name, a), b in zip(torch_side.named_parameters(), fused_side.parameters()):
        scale = a.detach().abs().max().item()
        torch.testing.assert_close(b.detach(), a.detach(), rtol=rtol, atol=rtol * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            gscale = a.grad.abs().max().item()
            torch.testing.assert_close(b.grad, a.grad, rtol=rtol, atol=rtol * gscale)


def _assert_same_params_only(expected, actual, rtol=1e-5):
    for (name, a), b in zip(expected.named_parameters(), actual.parameters()):
        scale = a.detach().abs().max().item()
        torch.testing.assert_close(b.detach(), a.detach(), rtol=rtol, atol=rtol * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


def _run_both(idiom, kind, backend, seed, steps=3, **extra):
    (ref, ref_opt), (model, opt) = _pair(kind, backend, seed, **extra)
    batches = make_batches(seed, steps, 3)
    moved = [p.detach().clone() for p in model.parameters()]
    for step, batch in enumerate(batches):
        idiom(ref, ref_opt, batch, step)
        idiom(model, opt, batch, step)
        _assert_same(ref, model)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), moved))


# -- accumulation_steps=1: the torch.optim idioms, side by side -------------------------------

def _several_losses(model, opt, batch, step):
    loss = lm_loss(model, *batch)
    loss.backward(retain_graph=True)
    (0.5 * loss).backward()
    (model.up.weight.square().sum() * 1e-3).backward()
    opt.step()
    opt.zero_grad()


def _grad_changed_by_hand(model, opt, batch, step):
    lm_loss(model, *batch).backward()
    for p in model.parameters():
        p.grad.mul_(0.5).add_(1e-3)             # gradient noise, a hand-written rescale
    model.norm.bias.grad = torch.full_like(model.norm.bias, 0.25)   # a custom gradient
    opt.step()
    opt.zero_grad()


def _clip_imported_early(model, opt, batch, step):
    lm_loss(model, *batch).backward()
    clip_grad_norm_(model.parameters(), 0.5)
    opt.step()
    opt.zero_grad()


def _total_norm_then_clip(model, opt, batch, step):
    lm_loss(model, *batch).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    clip_grads_with_norm_(model.parameters(), 0.3, get_total_norm(grads))
    opt.step()
    opt.zero_grad()


def _clip_value(model, opt, batch, step):
    lm_loss(model, *batch).backward()
    clip_grad_value_(model.parameters(), 1e-2)
    opt.step()
    opt.zero_grad()


def _zero_grad_keeping_zeros(model, opt, batch, step):
    loss = lm_loss(model, *batch)
    if step != 1:   # the up projection gets no gradient in the second step: torch steps it
        loss = loss + model.up.weight.sum() * 0.0 + model.up.bias.square().sum()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=False)


def _no_zero_grad(model, opt, batch, step):
    lm_loss(model, *batch).backward()   # torch sums this step's gradient into the last one's
    opt.step()


def _closure(model, opt, batch, step):
    def closure():
        opt.zero_grad()
        loss = lm_loss(model, *batch)
        loss.backward()
        return loss
    loss = opt.step(closure)
    assert loss is not None


def _compiled_step(model, opt, batch, step):
    lm_loss(model, *batch).backward()
    torch.compile(opt.step, backend="eager")()
    opt.zero_grad()


def _frozen_for_a_step(model, opt, batch, step):
    model.up.requires_grad_(step != 1)
    lm_loss(model, *batch).backward()
    opt.step()
    opt.zero_grad()


def _weights_written(model, opt, batch, step):
    lm_loss(model, *batch).backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        model.down.weight.clamp_(-0.05, 0.05)
        if step == 1:
            model.norm.load_state_dict({"weight": torch.ones(model.norm.weight.shape),
                                        "bias": torch.zeros(model.norm.bias.shape)})


def _schedule_and_groups(model, opt, batch, step):
    if step == 0:
        opt.scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    lm_loss(model, *batch).backward()
    opt.step()
    opt.scheduler.step()
    opt.param_groups[0]["weight_decay"] = 0.05 * step
    opt.zero_grad()


def _own_hooks_see_gradients(model, opt, batch, step):
    if step == 0:
        model.seen = []
        model.up.weight.register_post_accumulate_grad_hook(
            lambda p: model.seen.append(p.grad.detach().clone()))
    lm_loss(model, *batch).backward()
    opt.step()
    opt.zero_grad()
    assert len(model.seen) == step + 1


@pytest.mark.parametrize("idiom", [
    _several_losses, _grad_changed_by_hand, _clip_imported_early, _total_norm_then_clip,
    _clip_value, _zero_grad_keeping_zeros, _no_zero_grad, _closure, _compiled_step,
    _frozen_for_a_step, _weights_written, _schedule_and_groups, _own_hooks_see_gradients],
    ids=lambda f: f.__name__.strip("_"))
def test_accumulation_steps_1_is_torch_optim(idiom, kind, backend):
    _run_both(idiom, kind, backend, seed=70)


def test_own_hooks_record_what_torch_records(backend):
    (ref, ref_opt), (model, opt) = _pair("AdamW", backend, 71)
    for step, batch in enumerate(make_batches(71, 2, 3)):
        _own_hooks_see_gradients(ref, ref_opt, batch, step)
        _own_hooks_see_gradients(model, opt, batch, step)
    for a, b in zip(ref.seen, model.seen):
        torch.testing.assert_close(b, a)


class _Discriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x):
        return self.net(x)


def _gan(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 6)), _Discriminator()


def _gan_round(G, D, optG, optD, real, noise, module_zero_grad):
    """The DCGAN loop: D's step, then G's, whose loss reaches D's parameters too."""
    if module_zero_grad:
        D.zero_grad()
    else:
        optD.zero_grad()
    fake = G(noise)
    loss_d = F.softplus(-D(real)).mean() + F.softplus(D(fake.detach())).mean()
    loss_d.backward()
    optD.step()
    if module_zero_grad:
        G.zero_grad()
    else:
        optG.zero_grad()
    F.softplus(-D(fake)).mean().backward()
    optG.step()


@pytest.mark.parametrize("module_zero_grad", [True, False], ids=["D.zero_grad", "optD.zero_grad"])
def test_gan_training_is_torch_optim(module_zero_grad, backend):
    """G's backward pass reaches D's parameters; zero_grad() before D's next pass discards it."""
    runs = []
    for fused in (False, True):
        G, D = _gan(72)
        if fused:
            optG = fused_accum.Adam(G.parameters(), lr=1e-2, betas=(0.5, 0.9), backend=backend)
            optD = fused_accum.Adam(D.parameters(), lr=1e-2, betas=(0.5, 0.9), backend=backend)
        else:
            optG = torch.optim.Adam(G.parameters(), lr=1e-2, betas=(0.5, 0.9))
            optD = torch.optim.Adam(D.parameters(), lr=1e-2, betas=(0.5, 0.9))
        g = torch.Generator().manual_seed(72)
        for _ in range(3):
            _gan_round(G, D, optG, optD, torch.randn(4, 6, generator=g),
                       torch.randn(4, 3, generator=g), module_zero_grad)
        runs.append((G, D))
    for a, b in zip(runs[0], runs[1]):
        _assert_same(a, b)


def test_two_optimizers_over_shared_parameters_both_step(backend):
    """torch.optim lets two optimizers step the same parameter from the same .grad."""
    sides = []
    for fused in (False, True):
        model = make_model(73)
        params = list(model.parameters())
        cls = fused_accum.SGD if fused else torch.optim.SGD
        extra = dict(backend=backend) if fused else {}
        first = cls(params, lr=0.1, **extra)
        second = cls(params[-3:], lr=0.05, **extra)
        for batch in make_batches(73, 2, 3):
            lm_loss(model, *batch).backward()
            first.step()
            second.step()
            first.zero_grad()
        sides.append(model)
    _assert_same(*sides)


def test_state_dict_between_backward_and_step(kind, backend):
    """The gradient is in .grad, not in the state dict, as with torch: a fresh optimizer that
    loads the dict steps with it."""
    (ref, ref_opt), (model, opt) = _pair(kind, backend, 74)
    torch_cls, fused_cls, kwargs = OPTIMIZERS[kind]
    for step, batch in enumerate(make_batches(74, 3, 3)):
        for m, o, cls, extra in ((ref, ref_opt, torch_cls, {}),
                                 (model, opt, fused_cls, dict(backend=backend))):
            lm_loss(m, *batch).backward()
            fresh = cls(m.parameters(), **kwargs, **extra)
            fresh.load_state_dict(copy.deepcopy(o.state_dict()))
            fresh.step()
            fresh.zero_grad()
            o.load_state_dict(fresh.state_dict())
        _assert_same(ref, model)


def test_grad_scaler_drives_it_as_it_drives_torch(backend):
    """torch.amp.GradScaler hands its scale and inf flag to step(), as to torch's fused AdamW."""
    sides = []
    for fused in (False, True):
        model = make_model(75)
        if fused:
            opt = fused_accum.AdamW(model.parameters(), lr=1e-2, backend=backend)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
        for i, batch in enumerate(make_batches(75, 4, 3)):
            loss = lm_loss(model, *batch) * (float("inf") if i == 1 else 1.0)
            scaler.scale(loss).backward()
            if i == 2:
                scaler.unscale_(opt)
                clip_grad_norm_(model.parameters(), 0.1)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        sides.append((model, scaler.get_scale()))
    assert sides[0][1] == sides[1][1]
    _assert_same(sides[0][0], sides[1][0])


def test_compiled_autograd_works_with_gradients_in_grad(backend):
    import torch._dynamo.compiled_autograd as compiled_autograd
    (ref, ref_opt), (model, opt) = _pair("AdamW", backend, 76)
    for batch in make_batches(76, 2, 3):
        lm_loss(ref, *batch).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        with compiled_autograd._enable(torch.compile(backend="eager")):
            lm_loss(model, *batch).backward()
        opt.step()
        opt.zero_grad()
    _assert_same(ref, model)


# -- accumulation_steps=k > 1: the large-batch update, or a clear error -----------------------

def _large_batch(model, batches, lr=1e-2, **kwargs):
    """torch.optim.AdamW on the mean over ``batches`` (one window)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, **kwargs)
    (sum(lm_loss(model, *b) for b in batches) / len(batches)).backward()
    opt.step()
    return model


def _window(seed, k, backend, **kwargs):
    model = make_model(seed)
    expected = _large_batch(clone(model), make_batches(seed, k, 2))
    opt = fused_accum.AdamW(model.parameters(), lr=1e-2, accumulation_steps=k, backend=backend,
                            **kwargs)
    return model, opt, make_batches(seed, k, 2), expected


def test_compiled_step_gives_the_large_batch(backend):
    model, opt, batches, expected = _window(80, 3, backend)
    step = torch.compile(opt.step, backend="eager")
    for batch in batches:
        lm_loss(model, *batch).backward()
        step()
    assert opt.stepped
    _assert_same_params_only(expected, model)


def test_grad_set_by_hand_is_refused_and_the_window_kept(backend):
    model, opt, batches, expected = _window(81, 2, backend)
    lm_loss(model, *batches[0]).backward()
    model.up.weight.grad = torch.ones_like(model.up.weight)
    with pytest.raises(RuntimeError, match=r"params'\]\[3\] has a \.grad at step\(\).*by hand"):
        opt.step()
    model.up.weight.grad = None
    opt.step()
    lm_loss(model, *batches[1]).backward()
    opt.step()
    assert opt.stepped
    _assert_same_params_only(expected, model)


@pytest.mark.parametrize("clip", ["early import", "total norm", "unfiltered total norm", "value"])
def test_clipping_by_hand_is_refused_however_imported(clip, backend):
    model, opt, batches, expected = _window(82, 2, backend)
    lm_loss(model, *batches[0]).backward()
    with pytest.raises(RuntimeError, match="max_grad_norm="):
        if clip == "early import":
            clip_grad_norm_(model.parameters(), 1.0)
        elif clip == "total norm":
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            clip_grads_with_norm_(model.parameters(), 1.0, get_total_norm(grads))
        elif clip == "unfiltered total norm":   # torch alone fails on the Nones, saying nothing
            clip_grads_with_norm_(model.parameters(), 1.0,
                                  get_total_norm([p.grad for p in model.parameters()]))
        else:
            clip_grad_value_(model.parameters(), 1.0)
    opt.step()
    lm_loss(model, *batches[1]).backward()
    opt.step()
    _assert_same_params_only(expected, model)


@pytest.mark.parametrize("module_zero_grad", [True, False], ids=["module", "optimizer"])
def test_zero_grad_discards_a_stray_first_touch_exactly(module_zero_grad, backend):
    """A gradient that reached parameters untouched so far in the window (a GAN's generator pass
    into D) is dropped by zero_grad() exactly, as torch drops .grad."""
    model, opt, batches, expected = _window(83, 2, backend)
    stray = lm_loss(model, *make_batches(99, 1, 2)[0])
    stray.backward()   # the first micro-batch's sums are still to begin: all first touches
    model.zero_grad() if module_zero_grad else opt.zero_grad()
    assert opt.micro_batches == 0
    for batch in batches:
        lm_loss(model, *batch).backward()
        opt.step()
        opt.zero_grad()
    assert opt.stepped
    _assert_same_params_only(expected, model)


def test_zero_grad_after_adding_into_earlier_sums_is_refused_and_changes_nothing(backend):
    model, opt, batches, expected = _window(84, 2, backend)
    lm_loss(model, *batches[0]).backward()
    opt.step()
    stray = lm_loss(model, *make_batches(98, 1, 2)[0])
    stray.backward()   # adds into the first micro-batch's sums
    with pytest.raises(RuntimeError, match=r"zero_grad\(\).*earlier micro-batches.*detach"):
        opt.zero_grad()
    with pytest.raises(RuntimeError, match=r"zero_grad\(\)"):
        model.zero_grad()
    # Nothing changed: the window goes on with the stray pass in its second micro-batch.
    lm_loss(model, *batches[1]).backward()
    opt.step()
    assert opt.stepped
    reference = make_model(84)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    ((lm_loss(reference, *batches[0]) + lm_loss(reference, *make_batches(98, 1, 2)[0])
      + lm_loss(reference, *batches[1])) / 2).backward()
    ref_opt.step()
    _assert_same_params_only(reference, model)


def test_zero_grad_keeping_zeros_steps_unused_parameters_as_torch_does(backend):
    """After zero_grad(set_to_none=False) torch steps every parameter that held a gradient, with
    a zero one where none came (weight decay, momentum): the large batch does the same."""
    seed, k = 85, 2
    windows = [make_batches(seed + w, k, 2) for w in range(3)]

    def loss_of(model, batch, w):
        loss = lm_loss(model, *batch)
        return loss if w == 1 else loss + model.up.bias.square().sum()   # unused in window 1

    base = make_model(seed)
    reference = clone(base)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.5)
    for w, window in enumerate(windows):
        (sum(loss_of(reference, b, w) for b in window) / k).backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=False)
    model = clone(base)
    opt = fused_accum.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5, accumulation_steps=k,
                            backend=backend)
    for w, window in enumerate(windows):
        for batch in window:
            loss_of(model, batch, w).backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
    _assert_same_params_only(reference, model)


def test_a_window_whose_only_pass_was_discarded_steps_zeroed_grads_with_num_items(backend):
    """Found by the fuzzer (seed 5792): a window of an empty micro-batch (step() with no
    backward) and a num_items pass that zero_grad(set_to_none=False) discards holds no pass and
    no items.  torch steps the zeroed .grads (weight decay, momentum); so must the window, not
    divide zero sums by zero items and skip."""
    seed, k = 87, 2
    batch = make_batches(seed, 1, 2)[0]
    stray = make_batches(seed + 1, 1, 2)[0]
    base = make_model(seed)
    reference = clone(base)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.2, momentum=0.9, nesterov=True,
                              weight_decay=0.01)
    lm_loss(reference, *batch).backward()
    ref_opt.step()
    ref_opt.zero_grad(set_to_none=False)
    ref_opt.step()   # every .grad is zero: decay and momentum move the parameters
    model = clone(base)
    opt = fused_accum.SGD(model.parameters(), lr=0.2, momentum=0.9, nesterov=True,
                          weight_decay=0.01, accumulation_steps=k, backend=backend)
    opt.backward(lm_loss(model, *batch), num_items=7)
    assert opt.flush()
    opt.step()                                   # an empty micro-batch
    opt.backward(lm_loss(model, *stray), num_items=5)
    opt.zero_grad(set_to_none=False)             # discards that pass whole
    opt.step()
    assert opt.stepped and opt.skipped_steps == 0
    _assert_same_params_only(reference, model)


def test_a_failed_num_items_pass_undone_leaves_the_window_unweighted(backend):
    """Found by the fuzzer (seeds 5052, 6579, 6672): a num_items pass that fails having made only
    first touches is undone, and with it the window's weighting by items, which it had begun.
    Kept, the window's other micro-batches (none with a pass) would weigh zero items and skip the
    step torch takes on zeroed .grads."""
    seed, k = 88, 2
    batch = make_batches(seed, 1, 2)[0]
    failed = make_batches(seed + 1, 1, 2)[0]
    base = make_model(seed)
    reference = clone(base)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.2, momentum=0.9, weight_decay=0.01)
    lm_loss(reference, *batch).backward()
    ref_opt.step()
    ref_opt.zero_grad(set_to_none=False)
    ref_opt.step()
    model = clone(base)
    opt = fused_accum.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=0.01,
                          accumulation_steps=k, backend=backend)
    opt.backward(lm_loss(model, *batch), num_items=7)
    assert opt.flush()
    opt.zero_grad(set_to_none=False)
    failing = FailsInBackward.apply(model.embed.weight).sum() * 0   # after the other gradients
    with pytest.raises(Exception, match="fails here"):
        opt.backward(lm_loss(model, *failed) + failing, num_items=5)
    opt.step()
    opt.step()
    assert opt.stepped and opt.skipped_steps == 0
    _assert_same_params_only(reference, model)
    opt.backward(lm_loss(model, *batch))   # the window holds no items: a plain pass is welcome
    opt.step()


def test_a_later_fused_optimizer_over_the_same_parameters_makes_the_earlier_one_refuse(backend):
    model = make_model(86)
    old = fused_accum.SGD(model.parameters(), lr=0.1, accumulation_steps=2, backend=backend)
    new = fused_accum.SGD(list(model.parameters())[:2], lr=0.1, accumulation_steps=2,
                          backend=backend)
    lm_loss(model, *make_batches(86, 1, 2)[0]).backward()
    with pytest.raises(RuntimeError, match="taken by a fused_accum optimizer built over them later"):
        old.step()
    new.step()
    assert new.micro_batches == 1


def test_a_failed_construction_leaves_the_first_optimizer_as_it_was(backend):
    model, opt, batches, expected = _window(87, 2, backend)
    with pytest.raises((ValueError, TypeError)):
        fused_accum.AdamW(model.parameters(), lr=1e-2, betas=(0.9,), accumulation_steps=2)
    with pytest.raises(TypeError):
        fused_accum.AdamW(model.parameters(), lr=1e-2, weight_decy=0.1)
    for batch in batches:
        lm_loss(model, *batch).backward()
        opt.step()
    assert all(p.grad is None for p in model.parameters())
    _assert_same_params_only(expected, model)


def test_a_parameter_listed_twice_is_refused():
    model = make_model(88)
    params = list(model.parameters())
    with pytest.raises(ValueError, match=r"params'\]\[8\] is .*params'\]\[1\] again"):
        fused_accum.SGD(params + [params[1]])
    fused_accum.SGD(params)   # nothing was taken by the failed one


def test_a_torch_optimizer_stepping_parameters_a_fused_one_takes_is_refused():
    model = make_model(89)
    fused = fused_accum.SGD(list(model.parameters())[:2], accumulation_steps=2)
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    lm_loss(model, *make_batches(89, 1, 2)[0]).backward()
    with pytest.raises(RuntimeError, match=r"SGD.step\(\) was called on parameter.*FusedAccumulator"):
        plain.step()
    del fused   # the parameters go back to plain autograd
    plain.step()


@pytest.mark.parametrize("pending", [True, False])
def test_a_checkpoint_between_backward_and_step_keeps_that_micro_batch(pending, backend):
    """Saved after a micro-batch's backward() and before its step(): a fresh optimizer that loads
    the dict ends that micro-batch with step() or flush(), as the saved one would have."""
    k = 3
    model, opt, batches, _ = _window(90, k, backend)
    expected = _large_batch(clone(make_model(90)), batches[:2])
    lm_loss(model, *batches[0]).backward()
    opt.step()
    lm_loss(model, *batches[1]).backward()
    state = copy.deepcopy(opt.state_dict())
    del opt
    fresh = fused_accum.AdamW(model.parameters(), lr=1e-2, accumulation_steps=k, backend=backend)
    fresh.load_state_dict(state)
    if pending:
        assert fresh.flush() and fresh.stepped
    else:
        fresh.step()
        assert not fresh.stepped and fresh.micro_batches == 2
        assert fresh.flush()
    _assert_same_params_only(expected, model)


def test_compiled_autograd_is_refused_with_the_remedy(backend, hooks):
    """On the tensor hooks of accelerators the refusal is torch's own message, from the C++
    tensor pre-hook that guards against a hand-set .grad (docs/contract.md)."""
    import torch._dynamo.compiled_autograd as compiled_autograd
    model, opt, batches, expected = _window(91, 2, backend)
    message = ("compiled_args nyi" if hooks == "collector on the tensor" else
               "compiled autograd cannot trace.*accumulation_steps=1")
    with compiled_autograd._enable(torch.compile(backend="eager")):
        with pytest.raises(RuntimeError, match=message):
            lm_loss(model, *batches[0]).backward()
    for batch in batches:   # nothing of the refused pass was kept
        lm_loss(model, *batch).backward()
        opt.step()
    _assert_same_params_only(expected, model)


def test_a_hook_registered_after_the_optimizer_is_refused(backend):
    model, opt, batches, expected = _window(92, 2, backend)
    handle = model.up.weight.register_post_accumulate_grad_hook(lambda p: None)
    lm_loss(model, *batches[0]).backward()
    opt.step()
    lm_loss(model, *batches[1]).backward()
    with pytest.raises(RuntimeError, match="post-accumulate-grad hook.*before building"):
        opt.step()
    handle.remove()
    opt.step()
    assert opt.stepped
    _assert_same_params_only(expected, model)


def test_a_dtype_change_after_construction_is_refused(backend):
    model = make_model(93)
    opt = fused_accum.AdamW(model.parameters(), accumulation_steps=2, backend=backend)
    model.to(torch.bfloat16)
    lm_loss(model, *make_batches(93, 1, 2)[0]).backward()
    with pytest.raises(RuntimeError, match="float32 on cpu when the optimizer was built and is "
                                           "torch.bfloat16 on cpu now.*Build the optimizer after"):
        opt.step()
    opt = fused_accum.AdamW(model.parameters(), backend=backend)   # k = 1: refused at step() too
    for p in model.parameters():
        p.grad = None
    model.float()
    lm_loss(model, *make_batches(93, 1, 2)[0]).backward()
    with pytest.raises(RuntimeError, match="Build the optimizer after"):
        opt.step()


def test_failed_pass_is_undone_exactly_with_loss_scaling_and_a_non_finite_gradient(backend):
    """A pass that fails having made only first touches leaves the window as it was: its folded
    squares and its non-finite flag go with it (the collector folds them from C++)."""
    results = []
    for fail in (False, True):
        model = make_model(94)
        opt = fused_accum.SGD(model.parameters(), lr=0.1, max_grad_norm=0.5, loss_scale=8.0,
                              backend=backend)
        opt.final_micro_batch = lambda: True   # one pass per window, the last: it folds its norm
        for batch in make_batches(94, 2, 2):
            if fail:
                loss = lm_loss(model, *batch) * float("nan")
                failing = FailsInBackward.apply(model.embed.weight).sum() * 0
                with pytest.raises(Exception, match="fails here"):
                    opt.backward(loss + failing)
            opt.backward(lm_loss(model, *batch))
            opt.step()
        results.append((model, opt.grad_norm.item(), opt.skipped_steps))
    assert results[0][1:] == results[1][1:] and results[1][2] == 0
    _assert_same_params_only(results[0][0], results[1][0], rtol=0)


def test_bad_input_named():
    model = make_model(95)
    with pytest.raises(TypeError, match="lr must be a number, got 'x'"):
        fused_accum.SGD(model.parameters(), lr="x")
    opt = fused_accum.SGD([{"params": []}, {"params": list(model.parameters())}], lr=0.1)
    assert len(opt.param_groups) == 2
    twin = make_model(95)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    lm_loss(twin, *make_batches(95, 1, 2)[0]).backward()
    sgd.step()
    adamw = fused_accum.AdamW(model.parameters())
    with pytest.raises(ValueError, match="AdamW needs: a state dict of another optimizer"):
        adamw.load_state_dict(sgd.state_dict())
    adamw.step()   # still usable


@pytest.mark.parametrize("k", [1, 3])
def test_step_hooks_run_at_every_step_as_torch_runs_them(k):
    """fused_accum's step() skips the profiler label's cost when no profiler runs
    (fused_accum/optim/step_hooks.py): the hooks must still run as torch's wrapper runs them."""
    def calls_of(cls, **extra):
        calls = []

        def record(kind):
            return lambda opt, args, kwargs: calls.append((kind, len(args), args[0] is opt,
                                                           dict(kwargs)))

        model = make_model(3)
        opt = cls(model.parameters(), lr=0.1, **extra)
        opt.register_step_pre_hook(record("pre"))
        opt.register_step_post_hook(record("post"))
        handles = [torch_optimizer.register_optimizer_step_pre_hook(record("global pre")),
                   torch_optimizer.register_optimizer_step_post_hook(record("global post"))]
        try:
            for batch in make_batches(5, 4, 2):
                lm_loss(model, *batch).backward()
                opt.step()
                opt.step(closure=None)
        finally:
            for h in handles:
                h.remove()
        return calls

    expected = calls_of(torch.optim.SGD)
    assert calls_of(fused_accum.SGD, accumulation_steps=k) == expected
    assert len(expected) == 4 * 2 * 4


def test_a_step_pre_hook_can_replace_the_arguments_as_in_torch():
    results = []
    for cls in (torch.optim.SGD, fused_accum.SGD):
        opt = cls(make_model(4).parameters(), lr=0.1)
        handle = opt.register_step_pre_hook(lambda o, args, kwargs: (args, {"closure": lambda: 7.0}))
        results.append(opt.step())
        handle.remove()
        opt.register_step_pre_hook(lambda o, args, kwargs: "neither")
        with pytest.raises(RuntimeError, match="must return None or a tuple"):
            opt.step()
    assert results == [7.0, 7.0]


def test_the_profiler_sees_each_step_under_torchs_label():
    model = make_model(6)
    opt = fused_accum.AdamW(model.parameters(), lr=1e-3, accumulation_steps=2)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for batch in make_batches(7, 2, 2):
            lm_loss(model, *batch).backward()
            opt.step()
    names = [e.name for e in prof.events()]
    assert names.count("Optimizer.step#AdamW.step") == 2
    assert opt.stepped
