"""Edges of the drop-in contract (docs/contract.md) that an independent differential fuzzer and an
independent set of idiom checks found silently wrong (2026-12-07), each now exact or refused:
parameters unfrozen after the optimizer was built, ``.grad`` set by hand before a backward pass,
``zero_grad(set_to_none=False)`` in a first window, state dicts of other optimizers, a
hyper-parameter edited into something that is not a number, and a compiled training step."""
import copy

import pytest
import torch
from torch import nn

import fused_accum
from helpers import assert_same_params, clone, lm_loss, make_batches, make_model

K = 2


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 2)
        self.extra = nn.Parameter(torch.full((2,), 0.5))

    def forward(self, x, use_extra=True):
        return self.lin(x) + (self.extra if use_extra else 0)


def _inputs(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, generator=g) for _ in range(n)]


def _loss(model, x, use_extra=True):
    return (model(x, use_extra) ** 2).mean()


def _large_batch(model, opt, xs, use_extra=True):
    """torch.optim on each window's mean loss."""
    for w in range(0, len(xs), K):
        sum(_loss(model, x, use_extra) for x in xs[w:w + K]).div(K).backward()
        opt.step()
        opt.zero_grad()


def _close(a, b, rtol=1e-5):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=rtol,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("loss_scale", [1024.0, "dynamic"])
def test_a_parameter_unfrozen_after_building_gets_the_loss_scale_removed(loss_scale, backend):
    xs = _inputs(2 * K)
    model, expected = Tiny(), Tiny()
    model.lin.bias.requires_grad_(False)
    opt = fused_accum.SGD(model.parameters(), lr=0.1, accumulation_steps=K, loss_scale=loss_scale,
                          backend=backend)
    model.lin.bias.requires_grad_(True)
    for x in xs:
        opt.backward(_loss(model, x))
        opt.step()
    _large_batch(expected, torch.optim.SGD(expected.parameters(), lr=0.1), xs)
    _close(model, expected)


@pytest.mark.parametrize("same_process", [True, False])
def test_a_mid_window_checkpoint_keeps_an_unfrozen_parameters_gradient(same_process):
    """Its gradient went to .grad (the parameter was not hooked yet): the state dict takes it."""
    xs = _inputs(2 * K)
    model, expected = Tiny(), Tiny()
    model.lin.bias.requires_grad_(False)
    opt = fused_accum.SGD(model.parameters(), lr=0.1, accumulation_steps=K)
    model.lin.bias.requires_grad_(True)
    _loss(model, xs[0]).backward()
    saved = copy.deepcopy(opt.state_dict())
    if not same_process:
        model = copy.deepcopy(model)
        for p in model.parameters():
            p.grad = None
    del opt
    opt = fused_accum.SGD(model.parameters(), lr=0.1, accumulation_steps=K)
    opt.load_state_dict(saved)
    opt.step()
    for x in xs[1:]:
        _loss(model, x).backward()
        opt.step()
    _large_batch(expected, torch.optim.SGD(expected.parameters(), lr=0.1), xs)
    _close(model, expected)


def test_a_hand_set_grad_on_a_frozen_parameter_is_refused():
    xs = _inputs(K)
    model = Tiny()
    model.lin.bias.requires_grad_(False)
    opt = fused_accum.SGD(model.parameters(), lr=0.1, accumulation_steps=K)
    _loss(model, xs[0]).backward()
    model.lin.bias.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match=r"\.grad at step\(\) but does not require grad: it "
                                           r"was set by hand"):
        opt.step()
    model.lin.bias.grad = None
    opt.step()   # usable, nothing lost
    _loss(model, xs[1]).backward()
    opt.step()
    expected = Tiny()
    expected.lin.bias.requires_grad_(False)
    _large_batch(expected, torch.optim.SGD(expected.parameters(), lr=0.1), xs)
    _close(model, expected)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_clears_the_grad_of_a_parameter_unfrozen_after_building(set_to_none, backend):
    """Its .grad comes from plain backward passes until the optimizer hooks it: opt.zero_grad()
    clears it as torch's does, before the window could take it."""
    xs = _inputs(2 * K)
    model, expected = Tiny(), Tiny()
    model.lin.bias.requires_grad_(False)
    opt = fused_accum.SGD(model.parameters(), lr=0.1, momentum=0.5, accumulation_steps=K,
                          backend=backend)
    model.lin.bias.requires_grad_(True)
    _loss(model, xs[0]).backward()   # a stray pass: discarded by zero_grad as in torch
    opt.zero_grad(set_to_none=set_to_none)
    assert (model.lin.bias.grad is None) if set_to_none else not model.lin.bias.grad.any()
    for x in xs:
        _loss(model, x).backward()
        opt.step()
    ref = torch.optim.SGD(expected.parameters(), lr=0.1, momentum=0.5)
    _loss(expected, xs[0]).backward()
    ref.zero_grad(set_to_none=set_to_none)
    _large_batch(expected, ref, xs)
    _close(model, expected)


def test_a_parameter_frozen_again_before_step_took_its_grad_is_refused_and_recoverable(backend):
    """Unfrozen after building, reached by backward(), frozen again before step(): its .grad
    cannot be told from one set by hand, so step() raises, saying both, and changes nothing;
    with the .grad set to None the window goes on as the large batch without it."""
    xs = _inputs(K)
    model, expected = Tiny(), Tiny()
    model.lin.bias.requires_grad_(False)
    opt = fused_accum.SGD(model.parameters(), lr=0.1, accumulation_steps=K, backend=backend)
    model.lin.bias.requires_grad_(True)
    _loss(model, xs[0]).backward()
    model.lin.bias.requires_grad_(False)
    with pytest.raises(RuntimeError, match="frozen again before step"):
        opt.step()
    assert opt.micro_batches == 0
    model.lin.bias.grad = None
    opt.step()
    _loss(model, xs[1]).backward()
    opt.step()
    expected.lin.bias.requires_grad_(False)
    _large_batch(expected, torch.optim.SGD(expected.parameters(), lr=0.1), xs)
    _close(model, expected)


def test_a_hand_set_grad_before_a_backward_pass_is_refused(backend, hooks):
    """Autograd would add the pass's gradient into it and the hook take the sum."""
    xs = _inputs(K)
    model = Tiny()
    opt = fused_accum.SGD(model.parameters(), lr=0.1, accumulation_steps=K, backend=backend)
    _loss(model, xs[0]).backward()
    opt.step()
    model.lin.weight.grad = torch.ones(2, 3)   # extra's gradient opens the pass, not lin's
    with pytest.raises(RuntimeError, match=r"has a \.grad when a backward pass begins"):
        _loss(model, xs[1]).backward()
    model.lin.weight.grad = None
    _loss(model, xs[1]).backward()
    opt.step()
    expected = Tiny()
    _large_batch(expected, torch.optim.SGD(expected.parameters(), lr=0.1), xs)
    _close(model, expected)


@pytest.mark.parametrize("fused_linear", [False, True])
def test_a_hand_set_grad_on_the_parameter_that_opens_the_pass_is_refused(backend, hooks,
                                                                        fused_linear):
    """extra's gradient arrives first: its hooks' pre-hook refuses the .grad before autograd
    adds into it, which leaves the hand-set .grad as it was.  (With lin fused, its weight's
    gradient never reaches autograd's accumulation; the pass still starts at extra.)"""
    xs = _inputs(K)
    model = Tiny()
    opt = fused_accum.SGD(model if fused_linear else model.parameters(), lr=0.1,
                          accumulation_steps=K, backend=backend)
    _loss(model, xs[0]).backward()
    opt.step()
    hand_set = torch.full((2,), 3.0)
    model.extra.grad = hand_set
    label = r"param_groups\[0\]\['params'\]\[0\]"   # extra: a module's own parameters come first
    with pytest.raises(RuntimeError, match=label + r" has a \.grad when a backward pass"):
        _loss(model, xs[1]).backward()
    assert model.extra.grad is hand_set and torch.equal(hand_set, torch.full((2,), 3.0))
    assert all(p.grad is None for p in (model.lin.weight, model.lin.bias))   # nothing taken
    model.extra.grad = None
    _loss(model, xs[1]).backward()
    opt.step()
    assert opt.stepped
    expected = Tiny()
    _large_batch(expected, torch.optim.SGD(expected.parameters(), lr=0.1), xs)
    _close(model, expected)


def test_the_hand_set_check_leaves_with_the_hooks(hooks):
    """remove_hooks() takes the pre-hook off too: .grad accumulates as in plain autograd."""
    model = Tiny()
    opt = fused_accum.SGD(model.parameters(), lr=0.1, accumulation_steps=K)
    opt.remove_hooks()
    x = _inputs(1)[0]
    _loss(model, x).backward()
    _loss(model, x).backward()   # adds into .grad: nothing refuses it
    twin = Tiny()
    _loss(twin, x).mul(2).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("earlier_window", [False, True])
def test_zero_grad_keeping_zeros_steps_what_it_discarded_in_a_first_window_too(earlier_window):
    """torch's .grad after zero_grad(set_to_none=False) is zeros: AdamW decays the parameter
    in a window where it gets no gradient."""
    xs = _inputs(3 + 2 * earlier_window)
    model, expected = Tiny(), Tiny()
    opt = fused_accum.AdamW(model.parameters(), lr=0.01, weight_decay=0.1, accumulation_steps=K)
    ref = torch.optim.AdamW(expected.parameters(), lr=0.01, weight_decay=0.1)
    if earlier_window:
        for x in xs[3:]:
            _loss(model, x).backward()
            opt.step()
        _large_batch(expected, ref, xs[3:])
    _loss(model, xs[0]).backward()
    opt.zero_grad(set_to_none=False)
    _loss(expected, xs[0]).backward()
    ref.zero_grad(set_to_none=False)
    for x in xs[1:3]:
        _loss(model, x, use_extra=False).backward()
        opt.step()
    sum(_loss(expected, x, use_extra=False) for x in xs[1:3]).div(K).backward()
    ref.step()
    assert model.extra.detach().ne(0.5).all()
    _close(model, expected)


def test_a_state_dict_of_another_optimizer_without_state_is_refused():
    """A plain SGD's dict has no state to tell it apart, but its groups lack AdamW's betas."""
    model = Tiny()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = fused_accum.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    with pytest.raises(ValueError, match="has no 'betas'.*another optimizer"):
        opt.load_state_dict(sgd.state_dict())
    assert opt.param_groups[0]["lr"] == 1e-3 and "momentum" not in opt.param_groups[0]


def test_an_adam_state_dict_keeps_adamw_decoupled():
    model = Tiny()
    adam = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.1)
    for opt in (torch.optim.AdamW(model.parameters()), fused_accum.AdamW(model.parameters())):
        opt.load_state_dict(adam.state_dict())
        assert opt.param_groups[0]["decoupled_weight_decay"] is True


def test_a_hyper_parameter_that_is_no_number_is_refused_before_the_window_ends():
    xs = _inputs(2 * K)
    model, expected = Tiny(), Tiny()
    opt = fused_accum.AdamW(model.parameters(), lr=1e-2, accumulation_steps=K)
    for i, x in enumerate(xs):
        _loss(model, x).backward()
        if i == K - 1:
            opt.param_groups[0]["lr"] = "x"
            with pytest.raises(TypeError, match=r"param_groups\[0\]: lr must be a number"):
                opt.step()
            assert opt.micro_batches == K - 1   # nothing changed
            opt.param_groups[0]["lr"] = 1e-2
        opt.step()
    _large_batch(expected, torch.optim.AdamW(expected.parameters(), lr=1e-2), xs)
    _close(model, expected)


@pytest.mark.parametrize("cls, name, value", [
    (fused_accum.SGD, "lr", "x"), (fused_accum.SGD, "weight_decay", []),
    (fused_accum.AdamW, "lr", "x"), (fused_accum.AdamW, "betas", ("a", 0.9))])
def test_a_hyper_parameter_edited_into_no_number_is_named_with_gradients_in_grad(cls, name, value):
    """accumulation_steps=1: torch's own error would not say which; nothing changes."""
    model = Tiny()
    opt = cls(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    _loss(model, _inputs(1)[0]).backward()
    good = opt.param_groups[0][name]
    opt.param_groups[0][name] = value
    with pytest.raises(TypeError, match=rf"param_groups\[0\]: {name} must be"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    opt.param_groups[0][name] = good
    opt.step()
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_a_compiled_training_step():
    """torch.compile over backward(), step() and zero_grad(): the gradient engine's entry points
    run eagerly (dynamo's tracing of them broke their weak references)."""
    xs = _inputs(2 * K)
    model, expected = Tiny(), Tiny()
    opt = fused_accum.AdamW(model.parameters(), lr=1e-2, accumulation_steps=K)

    @torch.compile(backend="eager")
    def train_step(x):
        _loss(model, x).backward()
        opt.step()
        opt.zero_grad()
    for x in xs:
        train_step(x)
    _large_batch(expected, torch.optim.AdamW(expected.parameters(), lr=1e-2), xs)
    _close(model, expected)


def test_a_wrapped_optimizers_own_state_dict_loads_into_the_wrapper():
    """torch's RMSprop dict into FusedAccumulator(RMSprop): its state and groups, an empty window."""
    xs = _inputs(4)
    expected = Tiny()
    ref = torch.optim.RMSprop(expected.parameters(), lr=1e-2, momentum=0.5)
    for x in xs[:2]:
        _loss(expected, x).backward()
        ref.step()
        ref.zero_grad()
    model = copy.deepcopy(expected)
    opt = fused_accum.FusedAccumulator(torch.optim.RMSprop(model.parameters(), lr=0.5))
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))
    assert opt.param_groups[0]["lr"] == 1e-2
    for x in xs[2:]:
        for m, o in ((expected, ref), (model, opt)):
            _loss(m, x).backward()
            o.step()
            o.zero_grad()
    _close(model, expected)


def test_an_accumulate_that_raises_after_writing_discards_the_window(monkeypatch):
    """A backend call that fails partway (here at a pass's end) may have written into earlier sums: the failed pass is
    not undone as exact but discards the window (warned, skipped)."""
    from fused_accum.kernels import reference
    monkeypatch.setenv("FUSED_ACCUM_HOOKS", "python")
    base, batches = make_model(seed=30), make_batches(31, 3, 2)
    model = clone(base)
    opt = fused_accum.SGD(model.parameters(), lr=0.1, accumulation_steps=3, backend="reference")
    lm_loss(model, *batches[0]).backward()
    opt.step()
    original = reference.accumulate

    def fails_after_writing(grads, accs, first, *args, **kwargs):
        original(grads, accs, first, *args, **kwargs)
        raise RuntimeError("injected after writing")
    monkeypatch.setattr(reference, "accumulate", fails_after_writing)
    with pytest.raises(RuntimeError, match="injected"), pytest.warns(RuntimeWarning,
                                                                     match="discarded"):
        lm_loss(model, *batches[1]).backward()
    monkeypatch.setattr(reference, "accumulate", original)
    for tokens, targets in batches[1:]:
        lm_loss(model, tokens, targets).backward()
        opt.step()
    assert opt.skipped_steps == 1
    assert_same_params(model, base, rtol=0)
