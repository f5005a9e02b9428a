"""fp16 loss scaling, the non-finite policy, and memory accounting."""
import contextlib
import io
import warnings

import pytest
import torch

import fused_accum
from fused_accum import DynamicLossScale
from helpers import assert_same_params, clone, lm_loss, make_batches, make_model


def _poisoned(loss, poison):
    return loss * float("inf") if poison else loss


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-fp16"])
def test_dynamic_loss_scaling_follows_grad_scaler_with_an_overflow_mid_window(backend, autocast):
    # With autocast, torch's fp16 recipe itself: fp16 forward, fp32 parameters, GradScaler.
    # k = 4: dividing the loss by k (GradScaler's side) is exact in fp16, as scaling by 2^n is.
    k, windows = 4, [make_batches(s, 4, 2) for s in range(100, 107)]
    context = (lambda: torch.autocast("cpu", dtype=torch.float16)) if autocast else contextlib.nullcontext
    poison = {(2, 1), (5, 0)}     # (window, micro-batch) whose loss is made infinite
    rule = dict(init_scale=2.0**10, growth_interval=2)
    base = make_model(seed=100)
    ref_model, model = clone(base), clone(base)
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", **rule)
    opt = fused_accum.SGD(model.parameters(), lr=0.1, momentum=0.9, accumulation_steps=k,
                          loss_scale=DynamicLossScale(**rule), backend=backend)
    scales = []
    for w, window in enumerate(windows):
        for m, batch in enumerate(window):
            with context():
                ref_loss = _poisoned(lm_loss(ref_model, *batch), (w, m) in poison)
                loss = _poisoned(lm_loss(model, *batch), (w, m) in poison)
            scaler.scale(ref_loss / k).backward()
            opt.backward(loss)
            opt.step()
        scaler.step(ref)
        scaler.update()
        ref.zero_grad()
        assert opt.loss_scale == scaler.get_scale(), f"window {w}"
        assert_same_params(model, ref_model)
        scales.append(opt.loss_scale)
    assert opt.skipped_steps == 2
    assert scales == [1024.0, 2048.0, 1024.0, 1024.0, 2048.0, 1024.0, 1024.0]   # grew, backed off


def test_fp16_parameters_get_dynamic_scaling_by_default(backend):
    model = make_model(seed=101).half()
    opt = fused_accum.AdamW(model.parameters(), lr=1e-3, accumulation_steps=2, backend=backend)
    assert opt.loss_scale == 2.0**16
    before = [p.clone() for p in model.parameters()]
    for i, batch in enumerate(make_batches(101, 2, 2)):
        opt.backward(_poisoned(lm_loss(model, *batch), i == 1))
        opt.step()
    assert opt.stepped and opt.skipped_steps == 1 and opt.loss_scale == 2.0**15
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    for batch in make_batches(102, 2, 2):
        opt.backward(lm_loss(model, *batch))
        opt.step()
    assert opt.skipped_steps == 1
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(p.dtype == torch.float16 and torch.isfinite(p).all() for p in model.parameters())
    assert fused_accum.AdamW(make_model(0).parameters()).loss_scale is None   # fp32: none


def test_fp16_small_gradients_survive_only_with_scaling(backend):
    # d(loss)/dw = x * 1e-8: below fp16's smallest subnormal (6e-8) unless the loss is scaled.
    torch.manual_seed(5)
    x = torch.randn(64, dtype=torch.float16)
    norms = {}
    for loss_scale in (DynamicLossScale(init_scale=2.0**10), None):
        weight = torch.nn.Parameter(torch.randn(64, dtype=torch.float16))
        opt = fused_accum.SGD([weight], lr=0.0, loss_scale=loss_scale, backend=backend)
        opt.backward((weight * x).sum() * 1e-8)
        opt.step()
        norms["scaled" if loss_scale else "unscaled"] = opt.grad_norm.item()
    expected = (x.double() * 1e-8).norm().item()
    assert norms["unscaled"] == 0.0
    assert abs(norms["scaled"] - expected) < 1e-2 * expected


def test_plain_backward_under_loss_scaling_warns_once_and_stays_correct(backend):
    batches = make_batches(103, 2, 2)
    base = make_model(seed=103)
    expected = clone(base)
    ref = torch.optim.SGD(expected.parameters(), lr=0.1)
    (sum(lm_loss(expected, *b) for b in batches) / 2).backward()
    ref.step()
    model = clone(base)
    opt = fused_accum.SGD(model.parameters(), lr=0.1, accumulation_steps=2, loss_scale=2.0**8,
                          backend=backend)
    with pytest.warns(RuntimeWarning, match="opt.backward"):
        lm_loss(model, *batches[0]).backward()
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.backward(lm_loss(model, *batches[1]))
        opt.step()
    assert_same_params(model, expected)


def test_nonfinite_raise_names_the_parameter_and_keeps_the_optimizer_usable(backend):
    good = make_batches(104, 2, 2)
    base = make_model(seed=104)
    expected = clone(base)
    ref = torch.optim.AdamW(expected.parameters(), lr=1e-2)
    (sum(lm_loss(expected, *b) for b in good) / 2).backward()
    ref.step()
    model = clone(base)
    opt = fused_accum.AdamW(model.named_parameters(), lr=1e-2, accumulation_steps=2,
                            nonfinite="raise", backend=backend)
    lm_loss(model, *good[0]).backward()
    opt.step()
    (model.norm.bias * float("nan")).sum().backward()
    with pytest.raises(FloatingPointError, match=r"'norm.bias'"):
        opt.step()
    assert not opt.stepped and opt.micro_batches == 0
    for batch in good:
        lm_loss(model, *batch).backward()
        opt.step()
    assert_same_params(model, expected)


def test_nonfinite_skip_counts_and_warns_once(backend):
    model = make_model(seed=105)
    opt = fused_accum.SGD(model.parameters(), lr=0.1, backend=backend)
    with pytest.warns(RuntimeWarning, match="skipped"):
        for _ in range(2):
            (lm_loss(model, *make_batches(1, 1, 2)[0]) * float("inf")).backward()
            opt.step()
    assert opt.skipped_steps == 2


def test_checkpoint_with_loss_scaling_resumes_bit_identically(backend):
    batches = make_batches(106, 7, 2)
    make_opt = lambda m: fused_accum.AdamW(m.parameters(), lr=1e-3, accumulation_steps=2,
                                           loss_scale=DynamicLossScale(init_scale=2.0**8, growth_interval=1),
                                           backend=backend)
    base = make_model(seed=106).half()
    def run(model, opt, part):
        for i, batch in part:
            opt.backward(_poisoned(lm_loss(model, *batch), i == 2))
            opt.step()
    straight = clone(base)
    opt = make_opt(straight)
    run(straight, opt, enumerate(batches))
    first = clone(base)
    opt = make_opt(first)
    run(first, opt, list(enumerate(batches))[:5])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed = make_model(seed=9).half()
    resumed.load_state_dict(checkpoint["model"])
    opt2 = make_opt(resumed)
    opt2.load_state_dict(checkpoint["opt"])
    assert opt2.loss_scale == opt.loss_scale and opt2.skipped_steps == 1
    run(resumed, opt2, list(enumerate(batches))[5:])
    for a, b in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(a, b)


def test_memory_bytes_reports_each_buffer_kind(backend):
    model = make_model(seed=107).bfloat16()
    n = sum(p.numel() for p in model.parameters())
    opt = fused_accum.AdamW(model.parameters(), backend=backend)
    held = opt.memory_bytes()
    assert held["parameters"] == 2 * n
    for kind in ("accumulators", "master_param", "exp_avg", "exp_avg_sq"):
        assert 4 * n <= held[kind] <= 4 * (n + 16 * len(list(model.parameters()))), kind
    assert "momentum_buffer" not in held


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss_scale="static"), "loss_scale"), (dict(loss_scale=-1.0), "loss_scale"),
    (dict(loss_scale=[2.0]), "loss_scale"), (dict(nonfinite="ignore"), "nonfinite")])
def test_bad_loss_scaling_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fused_accum.SGD(make_model(0).parameters(), **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(init_scale=0.0), "init_scale"), (dict(growth_factor=1.0), "growth_factor"),
    (dict(backoff_factor=1.5), "backoff_factor"), (dict(growth_interval=0), "growth_interval")])
def test_bad_dynamic_loss_scale(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynamicLossScale(**kwargs)


def test_torch_grad_scaler_is_refused_with_the_remedy(backend):
    model = make_model(seed=40)
    opt = fused_accum.AdamW(model.parameters(), accumulation_steps=2, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    batches = make_batches(40, 4, 2)
    scaler.scale(lm_loss(model, *batches[0])).backward()
    with pytest.raises(RuntimeError, match=r"GradScaler.*loss_scale='dynamic'.*opt.backward"):
        scaler.step(opt)
    assert opt.micro_batches == 0 and not hasattr(opt, "found_inf")
    for batch in batches[2:]:   # the optimizer's own recipe works afterwards
        opt.backward(lm_loss(model, *batch))
        opt.step()
    assert opt.stepped


def test_the_loss_scaler_state_survives_a_checkpoint_with_a_running_growth_tracker(backend):
    """Scale away from its initial value and a growth tracker part way to the next growth: a
    load that dropped either would resume with another scale, sooner or later."""
    model = make_model(seed=41).half()
    rule = DynamicLossScale(init_scale=2.0**10, growth_interval=3)
    opt = fused_accum.AdamW(model.parameters(), accumulation_steps=1, loss_scale=rule,
                            backend=backend)
    for i, batch in enumerate(make_batches(41, 4, 2)):   # two overflows, then 2 clean windows
        opt.backward(_poisoned(lm_loss(model, *batch), i < 2))
        opt.step()
        opt.zero_grad()   # accumulation_steps=1: gradients stay in .grad, as in torch.optim
    scaler = opt._scaler
    assert opt.loss_scale == 2.0**8 and scaler.growth_tracker.item() == 2   # 1024/4; 2 of 3
    state = io.BytesIO()
    torch.save(opt.state_dict(), state)
    state.seek(0)
    resumed = fused_accum.AdamW(model.parameters(), accumulation_steps=1, loss_scale=rule,
                                backend=backend)
    resumed.load_state_dict(torch.load(state))
    assert resumed.loss_scale == opt.loss_scale
    assert resumed._scaler.growth_tracker.item() == 2
    batch = make_batches(42, 1, 2)[0]
    resumed.backward(lm_loss(model, *batch))
    resumed.step()
    assert resumed.loss_scale == 2.0**9   # the third clean window grows the scale


def test_an_overflow_before_a_mid_window_checkpoint_still_skips_the_window(backend):
    model = make_model(seed=43)
    opt = fused_accum.SGD(model.parameters(), lr=0.1, accumulation_steps=4, backend=backend)
    batches = make_batches(43, 2, 2)
    start = [p.detach().clone() for p in model.parameters()]
    lm_loss(model, *batches[0]).backward()
    opt.step()
    (lm_loss(model, *batches[1]) * float("inf")).backward()   # the window's flag is set
    opt.step()
    state = io.BytesIO()
    torch.save(opt.state_dict(), state)
    state.seek(0)
    resumed = fused_accum.SGD(model.parameters(), lr=0.1, accumulation_steps=4, backend=backend)
    resumed.load_state_dict(torch.load(state))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert resumed.flush()
    assert resumed.skipped_steps == 1
    for a, b in zip(model.parameters(), start):
        assert torch.equal(a, b)
