"""Checkpoints: mid-window resume is bit-identical; torch state dicts load in and out."""
import io

import pytest
import torch

import fused_accum
from helpers import (IGNORE, assert_same_params, clone, lm_loss, make_batches, make_model,
                     train_accumulated, train_large_batch)


def _round_trip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer)   # weights_only=True, the default: checkpoints need no pickled code


def _micro_batches(model, opt, batches, num_items):
    for tokens, targets in batches:
        loss = lm_loss(model, tokens, targets)
        opt.backward(loss, num_items=(targets != IGNORE).sum() if num_items else None)
        opt.step()


@pytest.mark.parametrize("dtype,num_items,max_grad_norm", [
    (torch.float32, False, None), (torch.float32, True, 0.5), (torch.bfloat16, False, 0.5)])
def test_checkpoint_mid_window_resumes_bit_identically(dtype, num_items, max_grad_norm, backend):
    batches = make_batches(20, 10, 2, pad_fraction=0.3 if num_items else 0.0)   # windows 4+4+2
    make_opt = lambda m: fused_accum.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1,
                                           amsgrad=True, accumulation_steps=4,
                                           max_grad_norm=max_grad_norm, backend=backend)
    base = make_model(seed=21, dtype=dtype)
    straight = clone(base)
    opt = make_opt(straight)
    _micro_batches(straight, opt, batches, num_items)

    first = clone(base)
    opt = make_opt(first)
    _micro_batches(first, opt, batches[:6], num_items)   # stop after 2 of window 2's 4
    checkpoint = _round_trip({"model": first.state_dict(), "opt": opt.state_dict()})
    assert checkpoint["opt"]["fused_accum"]["micro_batches"] == 2
    resumed = make_model(seed=99, dtype=dtype)   # different weights until loaded
    resumed.load_state_dict(checkpoint["model"])
    opt = make_opt(resumed)
    opt.load_state_dict(checkpoint["opt"])
    _micro_batches(resumed, opt, batches[6:], num_items)
    for a, b in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(a, b)


def test_torch_adamw_state_loads_in_and_out(backend):
    windows = [make_batches(s, 1, 3) for s in range(30, 36)]
    base = make_model(seed=22)
    kwargs = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
    expected = train_large_batch(clone(base), lambda p: torch.optim.AdamW(p, **kwargs), windows)

    # torch for two steps, fused_accum for two, torch again for two.
    model = clone(base)
    torch_opt = torch.optim.AdamW(model.parameters(), **kwargs)
    train_large_batch(model, lambda p: torch_opt, windows[:2])
    ours = fused_accum.AdamW(model.parameters(), backend=backend, **kwargs)
    ours.load_state_dict(_round_trip(torch_opt.state_dict()))
    train_accumulated(model, ours, windows[2:4])
    state = _round_trip(ours.state_dict())
    del ours   # hands the parameters back to plain autograd
    torch_again = torch.optim.AdamW(model.parameters(), **kwargs)
    torch_again.load_state_dict(state)
    train_large_batch(model, lambda p: torch_again, windows[4:])
    assert_same_params(model, expected)


def test_torch_sgd_momentum_state_loads_in_and_out(backend):
    windows = [make_batches(s, 1, 3) for s in range(40, 46)]
    base = make_model(seed=23)
    kwargs = dict(lr=0.1, momentum=0.9, weight_decay=0.01)
    expected = train_large_batch(clone(base), lambda p: torch.optim.SGD(p, **kwargs), windows)
    model = clone(base)
    torch_opt = torch.optim.SGD(model.parameters(), **kwargs)
    train_large_batch(model, lambda p: torch_opt, windows[:2])
    ours = fused_accum.SGD(model.parameters(), backend=backend, **kwargs)
    ours.load_state_dict(torch_opt.state_dict())
    train_accumulated(model, ours, windows[2:4])
    ours.remove_hooks()
    torch_again = torch.optim.SGD(model.parameters(), **kwargs)
    torch_again.load_state_dict(ours.state_dict())
    train_large_batch(model, lambda p: torch_again, windows[4:])
    assert_same_params(model, expected)


def test_state_dict_of_a_fresh_optimizer_is_torch_shaped(backend):
    model = make_model(seed=24)
    ours = fused_accum.AdamW(model.parameters(), lr=3e-4, backend=backend)
    theirs = torch.optim.AdamW(model.parameters(), lr=3e-4)
    sd = ours.state_dict()
    assert sd["state"] == {} and sd["param_groups"] == theirs.state_dict()["param_groups"]


def test_a_bad_state_dict_changes_nothing(backend):
    model = make_model(seed=25)
    opt = fused_accum.AdamW(model.parameters(), lr=1e-2, accumulation_steps=2, backend=backend)
    train_accumulated(model, opt, [make_batches(1, 2, 2)])
    _micro_batches(model, opt, make_batches(2, 1, 2), False)   # half a window in progress
    good = _round_trip(opt.state_dict())
    bad = _round_trip(good)
    bad["state"][0]["exp_avg"] = torch.randn(3, 3)
    with pytest.raises(ValueError, match=r"exp_avg.*param_groups\[0\]\['params'\]\[0\]"):
        opt.load_state_dict(bad)
    bad = _round_trip(good)
    bad["param_groups"].append(dict(bad["param_groups"][0]))
    with pytest.raises(ValueError, match="param groups"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    for key, entry in good["state"].items():
        for name, value in entry.items():
            assert torch.equal(after["state"][key][name], value)
    for key, value in good["fused_accum"]["accumulated_grads"].items():
        assert torch.equal(after["fused_accum"]["accumulated_grads"][key], value)
