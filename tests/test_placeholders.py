"""``.grad`` between ``backward()`` and ``step()`` while a fused optimizer holds the window: a
placeholder on each parameter the window holds, which refuses every use but its metadata (the
idioms that would otherwise see or change nothing, silently: a guarded edit, a hand clip, logging),
and leaves at the optimizer's next call or backward pass (docs/contract.md, `.grad` read)."""
import copy

import pytest
import torch
from torch import nn

import fused_accum
from fused_accum.placeholders import is_placeholder

K = 3


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 3)
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _inputs(n, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 4, generator=g) for _ in range(n)]


def _loss(model, x):
    return (model(x) ** 2).mean()


def _large_batch(xs, k=K):
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for w in range(0, len(xs), k):
        sum(_loss(model, x) for x in xs[w:w + k]).div(len(xs[w:w + k])).backward()
        opt.step()
        opt.zero_grad()
    return model


def _close(actual, expected, rtol=1e-5):
    for (name, p), q in zip(actual.named_parameters(), expected.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=rtol,
                                   msg=lambda m, name=name: f"{name}: {m}")


def _fused(model, k=K, **kwargs):
    return fused_accum.AdamW(model.parameters(), lr=1e-2, accumulation_steps=k, **kwargs)


def test_each_parameter_the_window_holds_gets_a_placeholder_until_step(hooks, backend):
    model = Net()
    opt = _fused(model, backend=backend)
    _loss(model, _inputs(1)[0]).backward()
    for name, p in model.named_parameters():
        if name.startswith("unused"):
            assert p.grad is None, name   # no gradient: None, as in torch
        else:
            assert is_placeholder(p.grad), name
            assert (p.grad.shape, p.grad.dtype, p.grad.device) == (p.shape, p.dtype, p.device)
            assert p.grad.size() == p.size() and p.grad.dim() == p.dim()
    opt.step()
    assert all(p.grad is None for p in model.parameters())


GUARDED_EDITS = {
    "noise": lambda ps: [p.grad.add_(0.01 * torch.randn_like(p)) for p in ps if p.grad is not None],
    "scale": lambda ps: [p.grad.mul_(0.5) for p in ps if p.grad is not None],
    "hand clip": lambda ps: torch.nn.utils.clip_grads_with_norm_(
        ps, 1.0, torch.sqrt(sum((p.grad ** 2).sum() for p in ps if p.grad is not None))),
    "logging": lambda ps: [p.grad.norm().item() for p in ps if p.grad is not None],
    "printing": lambda ps: [repr(p.grad) for p in ps if p.grad is not None],
    "copy": lambda ps: [p.grad.clone() for p in ps if p.grad is not None],
}


@pytest.mark.parametrize("edit", sorted(GUARDED_EDITS))
def test_a_guarded_edit_or_read_raises_naming_the_parameter_and_changes_nothing(edit, hooks):
    xs = _inputs(2 * K)
    model = Net()
    opt = _fused(model)
    for i, x in enumerate(xs):
        _loss(model, x).backward()
        if i % K == 1:   # mid-window, and at a window's end below
            with pytest.raises(RuntimeError, match=r"\.grad of parameter param_groups\[0\]\['params'\]"
                                                   r"\[\d\].*max_grad_norm=.*accumulation_steps=1"):
                GUARDED_EDITS[edit](list(model.parameters()))
        if i % K == K - 1:
            with pytest.raises(RuntimeError, match="between backward"):
                GUARDED_EDITS[edit](list(model.parameters()))
        opt.step()
        opt.zero_grad()
    _close(model, _large_batch(xs))


def test_several_backward_passes_per_micro_batch_are_summed_exactly(hooks):
    xs = _inputs(2 * K * 2, seed=5)
    model = Net()
    opt = _fused(model)
    for i in range(0, len(xs), 2):
        _loss(model, xs[i]).backward()
        assert is_placeholder(model.a.weight.grad)
        _loss(model, xs[i + 1]).backward()   # begins with placeholders in .grad
        opt.step()
        opt.zero_grad()
    expected = Net()
    ref = torch.optim.AdamW(expected.parameters(), lr=1e-2)
    for w in range(0, len(xs), 2 * K):
        sum(_loss(expected, x) for x in xs[w:w + 2 * K]).div(K).backward()
        ref.step()
        ref.zero_grad()
    _close(model, expected)


def test_grad_set_to_none_by_hand_drops_the_micro_batch_as_zero_grad_does(hooks):
    """torch: ``p.grad = None`` drops what .grad held.  A first touch is dropped exactly; a
    gradient added into earlier micro-batches' sums raises, and the window keeps it."""
    xs = _inputs(K, seed=7)
    model, expected = Net(), Net()
    opt = _fused(model)
    ref = torch.optim.AdamW(expected.parameters(), lr=1e-2)
    _loss(model, xs[0]).backward()
    for p in model.parameters():
        p.grad = None   # the micro-batch is dropped, as torch's .grad is
    for x in xs[1:]:
        _loss(model, x).backward()
        opt.step()
    opt.flush()
    sum(_loss(expected, x) for x in xs[1:]).div(K - 1).backward()
    ref.step()
    _close(model, expected)

    _loss(model, xs[0]).backward()
    opt.step()
    _loss(model, xs[1]).backward()   # added into the first micro-batch's sums
    model.a.weight.grad = None
    with pytest.raises(RuntimeError, match=r"set to None.*cannot be taken out exactly"):
        opt.step()
    opt.step()   # the refusal changed nothing: the window goes on with the gradient
    assert opt.micro_batches == 2


def test_module_conversions_carry_placeholders_and_dtype_changes_are_refused():
    model = Net()
    opt = _fused(model)
    _loss(model, _inputs(1)[0]).backward()
    model.cpu()
    model.float()
    model.to("cpu")
    assert is_placeholder(model.a.weight.grad)
    opt.step()
    _loss(model, _inputs(1)[0]).backward()
    model.double()
    assert is_placeholder(model.a.weight.grad) and model.a.weight.grad.dtype == torch.float64
    with pytest.raises(RuntimeError, match="was torch.float32 on cpu when the optimizer was built"):
        opt.step()


def test_module_zero_grad_either_way_and_a_deep_copy():
    model = Net()
    opt = _fused(model)
    xs = _inputs(3)
    _loss(model, xs[0]).backward()
    twin = copy.deepcopy(model)
    assert all(p.grad is None or not is_placeholder(p.grad) for p in twin.parameters())
    model.zero_grad(set_to_none=False)   # torch's would zero the placeholders in place
    assert not any(is_placeholder(p.grad) for p in model.parameters())
    _loss(model, xs[1]).backward()
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert opt._window.arrived is False


def test_plain_autograd_after_the_optimizer_is_gone_or_lets_go(hooks):
    model = Net()
    opt = _fused(model)
    x = _inputs(1)[0]
    _loss(model, x).backward()
    opt.remove_hooks()
    assert all(p.grad is None for p in model.parameters())
    _loss(model, x).backward()   # plain .grad again
    assert not is_placeholder(model.a.weight.grad) and model.a.weight.grad.abs().sum() > 0

    model = Net()
    opt = _fused(model)
    _loss(model, x).backward()
    del opt
    assert all(p.grad is None for p in model.parameters())
    _loss(model, x).backward()
    assert not is_placeholder(model.a.weight.grad)


def test_torch_clipping_and_total_norm_keep_their_own_messages():
    model = Net()
    opt = _fused(model)
    _loss(model, _inputs(1)[0]).backward()
    with pytest.raises(RuntimeError, match="clip_grad_norm_ was called on parameters"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    with pytest.raises(RuntimeError, match="get_total_norm got None .or a placeholder."):
        torch.nn.utils.get_total_norm(grads)
    opt.step()


def test_accumulation_steps_1_leaves_gradients_in_grad():
    model = Net()
    opt = fused_accum.AdamW(model.parameters(), lr=1e-2)
    _loss(model, _inputs(1)[0]).backward()
    assert not any(is_placeholder(p.grad) for p in model.parameters())
    model.a.weight.grad.mul_(0.5)   # as in torch
    opt.step()


def test_a_submodule_zero_grad_takes_out_only_its_own_placeholders():
    model = Net()
    opt = _fused(model)
    _loss(model, _inputs(1)[0]).backward()
    model.a.zero_grad()
    assert model.a.weight.grad is None and is_placeholder(model.b.weight.grad)
    with pytest.raises(RuntimeError, match=r"\.grad of parameter param_groups\[0\]\['params'\]\[2\]"):
        model.b.weight.grad.mul_(0.5)
    opt.zero_grad()


def test_zeroing_in_place_names_the_fused_zero_grad():
    model = Net()
    opt = _fused(model)
    _loss(model, _inputs(1)[0]).backward()
    other = torch.optim.SGD(model.b.parameters(), lr=0.1)   # e.g. a second optimizer's zero_grad
    with pytest.raises(RuntimeError, match=r"was used \(zero_\).*call the fused optimizer's zero_grad"):
        other.zero_grad(set_to_none=False)
    opt.step()


def test_a_model_compiled_mid_window_is_traced_through_the_placeholders():
    """Dynamo makes a fake tensor of each parameter's .grad when it (re)compiles: a new batch
    size in the window's second micro-batch recompiles with placeholders in .grad."""
    xs = [torch.randn(6, 4), torch.randn(7, 4), torch.randn(5, 4)]
    model = Net()
    opt = _fused(model)
    compiled = torch.compile(model, backend="eager")
    for x in xs:
        (compiled(x) ** 2).mean().backward()
        opt.step()
    _close(model, _large_batch(xs))


def test_memory_format_conversions_keep_the_placeholder():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 1))
    opt = fused_accum.SGD(model.parameters(), lr=0.1, accumulation_steps=2)
    model(torch.randn(2, 2, 6, 6)).sum().backward()
    model.to(memory_format=torch.channels_last)
    assert all(is_placeholder(p.grad) for p in model.parameters())
    assert model[0].weight.grad.element_size() == 4 and model[0].weight.grad.stride() is not None
    opt.step()
    model(torch.randn(2, 2, 6, 6)).sum().backward()
    opt.step()
    assert opt.stepped
