"""``opt.fuse_linear(model)``: weight gradients accumulated inside their GEMM give the update of the
hook path (fp32: to rounding; bf16: closer to fp32 than the hook path, which rounds each
micro-batch's gradient to bf16), and the large batch; every case where fusion cannot be exact
falls back to the hook path."""
import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import fused_accum
from fused_accum.accumulation import GradBuffers
from fused_accum.linear import fused_modules
from helpers import (IGNORE, assert_same_params, clone, lm_loss, make_batches, make_model,
                     max_rel_error, train_large_batch)

K = 3


def _windows(n=2, batch=2, pad_fraction=0.2):
    return [make_batches(seed, K, batch, pad_fraction=pad_fraction) for seed in range(n)]


@pytest.fixture
def taken(monkeypatch):
    """Counts the weight gradients the engine took from fused GEMMs."""
    calls = []
    original = GradBuffers.take_linear_grad

    def spy(self, param, grad_output, input):
        took = original(self, param, grad_output, input)
        calls.append(took)
        return took
    monkeypatch.setattr(GradBuffers, "take_linear_grad", spy)
    return calls


def _train(model, fuse, windows, opt_cls=fused_accum.AdamW, k=K, loss_fn=lm_loss,
           num_items=False, **kwargs):
    kwargs = dict(lr=1e-2, weight_decay=0.1) | kwargs
    opt = opt_cls(model.parameters(), accumulation_steps=k, **kwargs)
    if fuse:
        assert opt.fuse_linear(model)
    for window in windows:
        for tokens, targets in window:
            loss = loss_fn(model, tokens, targets)
            if num_items or "loss_scale" in kwargs:
                opt.backward(loss, num_items=(targets != IGNORE).sum() if num_items else None)
            else:
                loss.backward()
            opt.step()
            opt.zero_grad()
    return model, opt


def _both(base, windows, **kwargs):
    hooked, _ = _train(clone(base), False, windows, **kwargs)
    fused, opt = _train(clone(base), True, windows, **kwargs)
    assert max_rel_error(hooked, base) > 1e-3   # training really moved the parameters
    return hooked, fused, opt


@pytest.mark.parametrize("opt_cls,kwargs", [
    (fused_accum.AdamW, dict(max_grad_norm=0.3)),
    (fused_accum.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05)),
    (fused_accum.AdamW, dict(loss_scale=256.0)),
    (fused_accum.Adam, dict(amsgrad=True, weight_decay=0.05)),
])
@pytest.mark.parametrize("num_items", [False, True])
def test_fp32_fused_equals_hook_path_and_large_batch(backend, hooks, taken, opt_cls, kwargs, num_items):
    # The large batch's mean over its items is the mean of the micro-batches' means only when
    # every micro-batch has as many items: padding with num_items alone.
    base, windows = make_model(seed=3), _windows(pad_fraction=0.2 if num_items else 0.0)
    hooked, fused, _ = _both(base, windows, opt_cls=opt_cls, backend=backend, num_items=num_items,
                             **kwargs)
    assert taken and all(taken) and len(taken) == 3 * K * len(windows)   # up, down, head
    assert_same_params(fused, hooked, rtol=1e-6)
    torch_cls = {fused_accum.AdamW: torch.optim.AdamW, fused_accum.SGD: torch.optim.SGD,
                 fused_accum.Adam: torch.optim.Adam}[opt_cls]
    torch_kwargs = dict(lr=1e-2, weight_decay=0.1) | {
        k: v for k, v in kwargs.items() if k not in ("max_grad_norm", "loss_scale")}
    expected = train_large_batch(clone(base), lambda p: torch_cls(p, **torch_kwargs), windows,
                                 max_grad_norm=kwargs.get("max_grad_norm"))
    assert_same_params(fused, expected)


def test_k1_leaves_gradients_in_grad_exactly_as_torch(taken):
    base, windows = make_model(seed=4), _windows()
    expected = clone(base)
    torch_opt = torch.optim.AdamW(expected.parameters(), lr=1e-2, weight_decay=0.1)
    fused, _ = _train(clone(base), True, [[b] for w in windows for b in w], k=1)
    for tokens, targets in (b for w in windows for b in w):
        lm_loss(expected, tokens, targets).backward()
        torch_opt.step()
        torch_opt.zero_grad()
    assert not any(taken)   # k = 1: gradients stay in .grad, as torch leaves them
    assert_same_params(fused, expected)


def test_bf16_weight_gradients_are_summed_in_fp32_without_rounding_to_bf16(monkeypatch):
    """The window's sum for a bf16 weight is the fp32 sum of exact products of the bf16 operands;
    the hook path sums autograd's bf16 gradients, each rounded to bf16 first."""
    model = make_model(seed=5).to(torch.bfloat16)
    operands = []
    original = GradBuffers.take_linear_grad

    def spy(self, param, grad_output, input):
        if param is model.up.weight:
            operands.append((grad_output.clone(), input.clone()))
        return original(self, param, grad_output, input)
    monkeypatch.setattr(GradBuffers, "take_linear_grad", spy)
    opt = fused_accum.SGD(model.parameters(), lr=0.5, accumulation_steps=K)
    opt.fuse_linear(model)
    for tokens, targets in make_batches(20, K - 1, 4):
        lm_loss(model, tokens, targets).backward()
        opt.step()
    bucket, i = opt._buffers.slots[model.up.weight]
    total = bucket.acc_view(i).double()
    exact = sum(g.double().t() @ x.double() for g, x in operands)
    rounded = sum((g.t() @ x).double() for g, x in operands)   # the hook path's bf16 gradients
    scale = exact.abs().max()
    assert len(operands) == K - 1
    assert ((total - exact).abs().max() / scale).item() < 1e-6
    assert ((rounded - exact).abs().max() / scale).item() > 1e-4   # what fusion saves


def test_tied_weights_and_a_linear_called_twice(backend, hooks, taken):
    """One weight reached by a fused GEMM and by autograd's gradient (an Embedding tied to the
    head), and a Linear called twice in one forward: every contribution lands once."""
    def twice(model, tokens, targets):
        h = model.embed(tokens)
        h = h + model.down(F.gelu(model.up(model.norm(h))))
        h = h + model.down(F.gelu(model.up(model.norm(h))))
        return F.cross_entropy(model.head(h).reshape(-1, model.head.out_features),
                               targets.reshape(-1), ignore_index=IGNORE)
    base, windows = make_model(seed=6, tie=True), _windows()
    hooked, fused, _ = _both(base, windows, backend=backend, loss_fn=twice)
    assert taken and all(taken)
    assert_same_params(fused, hooked, rtol=1e-6)


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool):
        super().__init__()
        self.lm, self.reentrant = make_model(seed=7), reentrant

    def forward(self, tokens):
        lm = self.lm
        h = lm.embed(tokens)
        h = h + checkpoint(lambda x: lm.down(F.gelu(lm.up(lm.norm(x)))), h,
                           use_reentrant=self.reentrant)
        return lm.head(h)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(reentrant, taken):
    base, windows = Checkpointed(reentrant), _windows()
    hooked, fused, _ = _both(base, windows)
    assert taken and all(taken)
    assert_same_params(fused, hooked, rtol=1e-6)


class WithAttention(nn.Module):
    """MultiheadAttention reads out_proj.weight through F.linear: that weight stays hooked."""

    def __init__(self):
        super().__init__()
        self.lm = make_model(seed=8)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, tokens):
        lm = self.lm
        h = lm.embed(tokens)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return lm.head(h + lm.down(F.gelu(lm.up(lm.norm(h)))))


def test_multihead_attention_out_proj_stays_on_the_hook_path(hooks, taken):
    base, windows = WithAttention(), _windows()
    hooked, fused, _ = _both(base, windows)
    assert "attn.out_proj" in fused_modules(fused)   # fused, but MultiheadAttention never calls it
    assert len(taken) == 3 * K * len(windows)
    assert_same_params(fused, hooked, rtol=1e-6)


class LoRA(nn.Module):
    """A frozen base Linear with a trainable low-rank adapter beside it."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.a = nn.Linear(base.in_features, rank, bias=False)
        self.b = nn.Linear(rank, base.out_features, bias=False)

    def forward(self, x):
        return self.base(x) + self.b(self.a(x))


def test_frozen_weights_and_lora_adapters(taken):
    base = make_model(seed=9)
    torch.manual_seed(10)
    base.up = LoRA(base.up)
    base.down.requires_grad_(False)
    windows = _windows()
    hooked, fused, _ = _both(base, windows)
    assert all(taken) and len(taken) == 3 * K * len(windows)   # a, b, head
    assert_same_params(fused, hooked, rtol=1e-6)


def test_a_weight_replaced_after_fusing_takes_the_plain_path(taken):
    """The replacement is not the optimizer's: it gets a plain .grad, as it would unfused."""
    base = make_model(seed=11)
    model = clone(base)
    opt = fused_accum.SGD(model.parameters(), lr=0.1, accumulation_steps=2)
    opt.fuse_linear(model)
    model.up.weight = nn.Parameter(model.up.weight.detach().clone())
    for tokens, targets in make_batches(12, 2, 2):
        lm_loss(model, tokens, targets).backward()
        opt.step()
    assert model.up.weight.grad is not None and len(taken) == 2 * 2   # down, head


def test_create_graph_hands_autograd_a_differentiable_weight_gradient(taken):
    """A gradient penalty (create_graph=True) needs the weight gradient as a tensor: the fused
    Function returns it to autograd, and the optimizer's hook takes it as unfused."""
    def penalised(model, tokens, targets):
        loss = lm_loss(model, tokens, targets)
        (grad,) = torch.autograd.grad(loss, model.up.weight, create_graph=True)
        return loss + 0.1 * grad.square().sum()
    base, windows = make_model(seed=13), _windows()
    hooked, fused, _ = _both(base, windows, loss_fn=penalised)
    assert_same_params(fused, hooked, rtol=1e-6)


class FailOnce(torch.autograd.Function):
    """Identity whose backward raises the first time: a backward pass failing midway."""
    armed = False

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if FailOnce.armed:
            FailOnce.armed = False
            raise RuntimeError("injected failure")
        return grad


def _failing(model, tokens, targets):
    h = model.embed(tokens)
    h = FailOnce.apply(h + model.down(F.gelu(model.up(model.norm(h)))))
    return F.cross_entropy(model.head(h).reshape(-1, model.head.out_features),
                           targets.reshape(-1), ignore_index=IGNORE)


def _fail_then_retry(model, fuse, batches, failing_micro_batch):
    opt = fused_accum.AdamW(model.parameters(), lr=1e-2, accumulation_steps=K)
    if fuse:
        opt.fuse_linear(model)
    for i, (tokens, targets) in enumerate(batches):
        if i == failing_micro_batch:
            FailOnce.armed = True
            with pytest.raises(RuntimeError, match="injected"):
                _failing(model, tokens, targets).backward()
        _failing(model, tokens, targets).backward()
        opt.step()
    return opt


def test_a_failed_pass_that_only_began_sums_is_undone_exactly(hooks):
    """The head's fused weight gradient is the window's first touch when the pass fails."""
    base, batches = make_model(seed=14), make_batches(15, K, 2)
    hooked, fused = clone(base), clone(base)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _fail_then_retry(hooked, False, batches, 0)
        opt = _fail_then_retry(fused, True, batches, 0)
    assert opt.skipped_steps == 0 and max_rel_error(fused, base) > 1e-3
    assert_same_params(fused, hooked, rtol=1e-6)


def test_a_failed_pass_after_a_fused_add_discards_the_window(hooks):
    """A fused weight gradient is added at once (the hook path queues gradients up to a group's
    bytes first): a pass failing after it was added into the sum of an earlier micro-batch is
    not undone but discards the window, warned and counted, as the hook path does once its
    queue was accumulated."""
    base, batches = make_model(seed=14), make_batches(15, K, 2)
    fused = clone(base)
    with pytest.warns(RuntimeWarning, match="discarded"):
        opt = _fail_then_retry(fused, True, batches, 1)
    assert opt.skipped_steps == 1
    assert_same_params(fused, base, rtol=0)   # the window's step was skipped


def test_a_users_gradient_hook_on_the_weight_keeps_it_on_the_hook_path(taken):
    """register_hook on a weight (gradient noise, a per-parameter clip) must see its gradient."""
    base, windows = make_model(seed=16), _windows()
    results = []
    for fuse in (False, True):
        model = clone(base)
        model.up.weight.register_hook(lambda g: g * 0.5)
        results.append(_train(model, fuse, windows)[0])
    assert len(taken) == 2 * K * len(windows)   # down and head only
    assert_same_params(results[1], results[0], rtol=1e-6)


def test_a_mid_window_checkpoint_continues_exactly():
    base, windows = make_model(seed=17), _windows()
    hooked, _ = _train(clone(base), False, windows)
    model = clone(base)
    opt = fused_accum.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, accumulation_steps=K)
    opt.fuse_linear(model)
    batches = [b for w in windows for b in w]
    for n, (tokens, targets) in enumerate(batches):
        if n == K + 1:   # mid-window, after a fused micro-batch
            saved = copy.deepcopy(opt.state_dict())
            model = pickle.loads(pickle.dumps(model))   # a fused model pickles
            opt = fused_accum.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1,
                                    accumulation_steps=K)
            opt.load_state_dict(saved)
            assert opt.fuse_linear(model)
        lm_loss(model, tokens, targets).backward()
        opt.step()
    assert_same_params(model, hooked, rtol=1e-6)


def test_compiled_model_runs_the_hook_path(taken):
    base, windows = make_model(seed=18), _windows(n=1)
    hooked, _ = _train(clone(base), False, windows)
    model = clone(base)
    opt = fused_accum.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, accumulation_steps=K)
    opt.fuse_linear(model)
    compiled = torch.compile(model, backend="eager")
    for tokens, targets in windows[0]:
        lm_loss(compiled, tokens, targets).backward()
        opt.step()
    assert not taken
    assert_same_params(model, hooked, rtol=1e-6)


def test_unfuse_and_deepcopy():
    model = make_model(seed=19)
    opt = fused_accum.SGD(model.parameters(), lr=0.1, accumulation_steps=2)
    assert sorted(opt.fuse_linear(model)) == ["down", "head", "up"]
    twin = copy.deepcopy(model)
    assert sorted(fused_modules(twin)) == ["down", "head", "up"]
    assert twin.up.forward.args[0] is twin.up   # bound to the copy, not the original
    fused_accum.linear.unfuse_linear(model)
    assert fused_modules(model) == []
    assert "forward" not in model.up.__dict__


def test_a_held_model_pickles_and_its_copies_are_held_by_no_one():
    """torch.save(model) beside a fused optimizer; a deep copy (an EMA model) is not the
    optimizer's, so a torch optimizer may step it."""
    model = make_model(seed=20)
    opt = fused_accum.SGD(model.parameters(), lr=0.1, accumulation_steps=2)
    opt.fuse_linear(model)
    restored = pickle.loads(pickle.dumps(model))
    assert_same_params(restored, model, rtol=0)
    twin = copy.deepcopy(model)
    torch_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    tokens, targets = make_batches(21, 1, 2)[0]
    lm_loss(twin, tokens, targets).backward()
    torch_opt.step()   # a copy held by the fused optimizer would raise here
    assert max_rel_error(twin, model) > 1e-4


@pytest.mark.parametrize("opt_cls", [fused_accum.SGD, fused_accum.Adam, fused_accum.AdamW])
def test_a_model_in_place_of_its_parameters_is_fused_unless_asked_not_to(opt_cls, taken):
    model = make_model(seed=22)
    opt_cls(model, lr=0.1, accumulation_steps=2)
    assert sorted(fused_modules(model)) == ["down", "head", "up"]
    plain = make_model(seed=22)
    opt = opt_cls(plain, lr=0.1, accumulation_steps=2, fuse_linear=False)
    assert fused_modules(plain) == []
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in plain.parameters()]


def test_gradients_of_inputs_only_leave_the_window_alone(taken):
    """torch.autograd.grad and backward(inputs=) accumulate into no weight: nothing is taken."""
    model = make_model(seed=23)
    opt = fused_accum.SGD(model, lr=0.1, accumulation_steps=2)
    tokens, targets = make_batches(24, 1, 2)[0]
    h = model.embed(tokens).detach().requires_grad_()
    out = model.head(h + model.down(F.gelu(model.up(model.norm(h)))))
    (grad_h,) = torch.autograd.grad(out.square().sum(), h, retain_graph=True)
    (grad_w,) = torch.autograd.grad(out.square().sum(), model.up.weight, retain_graph=True)
    out.square().sum().backward(inputs=[h])
    assert not any(taken) and grad_w.abs().sum() > 0
    assert not opt._buffers.holds_sums()


def test_a_hook_registered_between_forward_and_backward_sees_the_gradient(taken):
    base, batches = make_model(seed=25), make_batches(26, 2, 2)
    results = []
    for fuse in (False, True):
        model = clone(base)
        opt = fused_accum.SGD(model, lr=0.1, accumulation_steps=2, fuse_linear=fuse)
        for tokens, targets in batches:
            loss = lm_loss(model, tokens, targets)
            handle = model.up.weight.register_hook(lambda g: g * 0.5)
            loss.backward()
            handle.remove()
            opt.step()
        results.append(model)
    assert len(taken) == 2 * 2   # down and head
    assert_same_params(results[1], results[0], rtol=1e-6)


def test_a_fused_gradient_opening_the_pass_leaves_the_collector_its_plan(monkeypatch):
    """The head's fused gradient comes first in backward; the others are still planned."""
    from fused_accum.accumulation import collector_bridge
    planned = []
    original = collector_bridge.plan_entries

    def spy(*args, **kwargs):
        entries = original(*args, **kwargs)
        planned.append(sum(len(e.slots) for e in entries))
        return entries
    monkeypatch.setattr(collector_bridge, "plan_entries", spy)
    monkeypatch.setenv("FUSED_ACCUM_HOOKS", "auto")
    model = make_model(seed=27)
    opt = fused_accum.SGD(model, lr=0.1, accumulation_steps=2)
    if opt._buffers.collector is None:
        pytest.skip("the C++ gradient collector does not build here")
    lm_loss(model, *make_batches(28, 1, 2)[0]).backward()
    assert planned and planned[0] == len(list(model.parameters())) - 3   # all but the fused


def test_unfused_weights_return_to_the_plan():
    model = make_model(seed=29)
    opt = fused_accum.SGD(model, lr=0.1, accumulation_steps=2)
    assert len(opt._buffers.fused_linear) == 3
    fused_accum.linear.unfuse_linear(model)
    assert not opt._buffers.fused_linear



def test_a_window_through_the_triton_gemm_is_the_large_batch(monkeypatch):
    """FUSED_ACCUM_LINEAR_GEMM=triton: the fused Linears' weight gradients go through the Triton
    GEMM (counted), and the window is torch.optim's step on the large batch."""
    from fused_accum import kernels
    if "triton" not in kernels.backend_names() or not kernels.availability(
            "triton", torch.device("cpu"))[0]:
        pytest.skip("Triton is not installed here")
    from fused_accum.kernels import triton_ops
    monkeypatch.setenv(triton_ops.LINEAR_GEMM_ENV, "triton")
    calls = []
    real = triton_ops.triton_accumulate_linear
    monkeypatch.setattr(triton_ops, "triton_accumulate_linear",
                        lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    plain = copy.deepcopy(model)
    opt = fused_accum.AdamW(model, lr=1e-2, accumulation_steps=3, backend="triton")
    torch_opt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    inputs = [torch.randn(5, 8) for _ in range(3)]
    for x in inputs:
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    for x in inputs:
        (plain(x).square().mean() / 3).backward()
    torch_opt.step()
    assert opt.stepped and len(calls) == 6   # two fused weights, three micro-batches
    for mine, expected in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(mine, expected, rtol=1e-5, atol=1e-7)
