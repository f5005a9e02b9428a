"""Checkpoints: mid-window resume is bit-identical; torch state dicts load in and out."""
import io

import pytest
import torch

import fused_accum
from fused_accum.optim.window_checkpoint import TAG, resumed_position, unpack
from helpers import (IGNORE, assert_same_params, clone, lm_loss, make_batches, make_model,
                     train_accumulated, train_large_batch)


def _round_trip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer)   # weights_only=True, the default: checkpoints need no pickled code


def _packed(window):
    return TAG, window


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


@pytest.mark.parametrize("algorithm", ["AdamW", "SGD"])
def test_a_fresh_optimizer_s_state_dict_loads_into_torch_as_a_fresh_torch_optimizer(algorithm,
                                                                                    backend):
    """A fresh fused optimizer lists every parameter (step 0, zero moments: what DCP needs to load
    into); torch's optimizer given that dict trains exactly as a fresh one."""
    kwargs = dict(lr=1e-2, momentum=0.9) if algorithm == "SGD" else dict(lr=1e-2)
    windows = [make_batches(s, 1, 3) for s in range(24, 27)]
    base = make_model(seed=24)
    expected = train_large_batch(clone(base), lambda p: getattr(torch.optim, algorithm)(p, **kwargs),
                                 windows)
    model = clone(base)
    ours = getattr(fused_accum, algorithm)(model.parameters(), backend=backend, **kwargs)
    sd = _round_trip(ours.state_dict())
    theirs = getattr(torch.optim, algorithm)(model.parameters(), **kwargs)
    assert sorted(sd["state"]) == list(range(len(list(model.parameters()))))
    assert sd["param_groups"][0].pop("fused_accum_mid_window") is False   # the one key added
    assert sd["param_groups"] == theirs.state_dict()["param_groups"]
    ours.remove_hooks()
    theirs.load_state_dict(sd)
    train_large_batch(model, lambda p: theirs, windows)
    assert_same_params(model, expected, rtol=1e-6)


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
    saved, kept = (unpack(d["fused_accum"]["window"])["accumulated_grads"] for d in (good, after))
    assert saved.keys() == kept.keys() and saved
    for key, value in saved.items():
        assert torch.equal(kept[key], value)


def test_a_window_saved_on_more_ranks_resumes_at_its_share_of_the_micro_batches(backend):
    """A mid-window state dict holds the window summed over the ranks that saved it; loaded on
    fewer ranks (here one), the window resumes at the micro-batches ended over all ranks divided
    by the ranks now, so that it ends after as many; where that is past the window, or cannot be
    split evenly, it raises and nothing changes."""
    model = make_model(seed=26)
    opt = fused_accum.AdamW(model.parameters(), lr=1e-2, accumulation_steps=4, backend=backend)
    _micro_batches(model, opt, make_batches(3, 1, 2), False)   # 1 of 4 micro-batches
    good = _round_trip(opt.state_dict())
    window = unpack(good["fused_accum"]["window"])
    assert window["ranks"] == 1 and good["fused_accum"]["micro_batches"] == 1
    from_two = _round_trip(good)   # as if 2 ranks had saved it after 1 micro-batch each
    from_two["fused_accum"]["window"] = _packed(dict(window, ranks=2))
    from_four = _round_trip(good)   # 4 ranks: the 4 micro-batches of this window are done
    from_four["fused_accum"]["window"] = _packed(dict(window, ranks=4))
    with pytest.raises(ValueError, match="4 micro-batches over all ranks.*accumulation_steps=4"):
        opt.load_state_dict(from_four)
    assert opt.micro_batches == 1
    opt.load_state_dict(from_two)
    assert opt.micro_batches == 2
    _micro_batches(model, opt, make_batches(4, 2, 2), False)
    assert opt.stepped and opt.micro_batches == 0
    with pytest.raises(ValueError, match="after 1 micro-batches on each of 3 ranks .3 in all., "
                                         "which 2 ranks cannot continue evenly"):
        resumed_position(1, 3, 2, 8, "plain")
    assert resumed_position(1, 4, 2, 8, "plain") == 2 and resumed_position(3, 2, 3, 8, None) == 2
    # A window driven from outside counts no micro-batch before its step: its weight is its
    # number of ranks, so it resumes on as many only, unless items weigh it.
    with pytest.raises(ValueError, match="before any micro-batch was counted"):
        resumed_position(0, 2, 1, 1, "plain")
    assert resumed_position(0, 2, 1, 1, "items") == 0 and resumed_position(0, 2, 2, 1, None) == 0


def test_a_window_boundary_saves_no_window(backend):
    model = make_model(seed=27)
    opt = fused_accum.SGD(model.parameters(), lr=0.1, accumulation_steps=2, backend=backend)
    _micro_batches(model, opt, make_batches(5, 2, 2), False)
    assert opt.stepped and opt.state_dict()["fused_accum"]["window"] is None


def test_a_torch_optimizer_that_loaded_a_mid_window_dict_saves_dicts_that_load_back(backend):
    """torch's load_state_dict keeps every key of a saved group, the mid-window mark included;
    once the torch optimizer has stepped, its step counts no longer match the mark and its dicts
    load as torch's.  Before it steps, its dict is the mid-window one without the window:
    refused."""
    model = make_model(seed=28)
    opt = fused_accum.AdamW(model.parameters(), lr=1e-2, accumulation_steps=2, backend=backend)
    train_accumulated(model, opt, [make_batches(6, 2, 2)])
    _micro_batches(model, opt, make_batches(7, 1, 2), False)   # half a window in progress
    mid = _round_trip(opt.state_dict())
    opt.remove_hooks()
    theirs = torch.optim.AdamW(model.parameters(), lr=1e-2)
    theirs.load_state_dict(mid)
    fresh = fused_accum.AdamW(make_model(seed=29).parameters(), lr=1e-2, backend=backend)
    with pytest.raises(ValueError, match="saved mid-window, but without"):
        fresh.load_state_dict(theirs.state_dict())
    tokens, targets = make_batches(8, 1, 2)[0]
    lm_loss(model, tokens, targets).backward()
    theirs.step()
    fresh.load_state_dict(theirs.state_dict())
    assert fresh.micro_batches == 0


def test_a_window_resumed_in_items_mode_ends_as_an_items_window(backend):
    """Resumed between a num_items micro-batch's step() and the window's end, flush() takes the
    item-weighted mean: the window's mode comes back with it.  (SGD: the update scales with the
    window's weight, which Adam's would hide.)"""
    batches = make_batches(24, 2, 2, pad_fraction=0.4)
    base = make_model(seed=24)
    expected = clone(base)
    train_large_batch(expected, lambda p: torch.optim.SGD(p, lr=0.5), [batches])
    model = clone(base)
    make_opt = lambda: fused_accum.SGD(model.parameters(), lr=0.5, accumulation_steps=4,
                                       backend=backend)
    opt = make_opt()
    _micro_batches(model, opt, batches, num_items=True)
    state = _round_trip(opt.state_dict())
    del opt
    resumed = make_opt()
    resumed.load_state_dict(state)
    assert resumed.flush()
    assert_same_params(model, expected)


def test_the_saved_learning_rates_come_back(backend):
    """A scheduler's lr, and a group's own, are part of the state dict, as in torch."""
    model = make_model(seed=25)
    opt = fused_accum.SGD([{"params": list(model.parameters())[:3], "lr": 0.3},
                           {"params": list(model.parameters())[3:]}], lr=0.1, momentum=0.9,
                          backend=backend)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for batch in make_batches(25, 2, 2):
        lm_loss(model, *batch).backward()
        opt.step()
        opt.zero_grad()
        scheduler.step()
    state = _round_trip(opt.state_dict())
    fresh = fused_accum.SGD([{"params": list(model.parameters())[:3], "lr": 0.3},
                             {"params": list(model.parameters())[3:]}], lr=0.1, momentum=0.9,
                            backend=backend)
    fresh.load_state_dict(state)
    assert [g["lr"] for g in fresh.param_groups] == [0.3 * 0.25, 0.1 * 0.25]
    twin = clone(model)
    ref = torch.optim.SGD([{"params": list(twin.parameters())[:3]},
                           {"params": list(twin.parameters())[3:]}], lr=1.0, momentum=0.9)
    ref.load_state_dict(state)
    batch = make_batches(26, 1, 2)[0]
    for m, o in ((model, fresh), (twin, ref)):
        lm_loss(m, *batch).backward()
        o.step()
    assert_same_params(model, twin)
