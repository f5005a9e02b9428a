"""k micro-batches through fused_accum equal one batch of k*b through torch.optim."""
import pytest
import torch

import fused_accum
from helpers import (assert_same_params, clone, make_batches, make_model, max_rel_error,
                     train_accumulated, train_large_batch)

CONFIGS = {
    "sgd": (torch.optim.SGD, fused_accum.SGD, dict(lr=0.1)),
    "sgd-momentum": (torch.optim.SGD, fused_accum.SGD, dict(lr=0.1, momentum=0.9)),
    "sgd-nesterov-wd": (torch.optim.SGD, fused_accum.SGD,
                        dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05)),
    "sgd-dampening-maximize": (torch.optim.SGD, fused_accum.SGD,
                               dict(lr=0.05, momentum=0.8, dampening=0.3, maximize=True)),
    "adam": (torch.optim.Adam, fused_accum.Adam, dict(lr=1e-2)),
    "adam-l2-amsgrad": (torch.optim.Adam, fused_accum.Adam,
                        dict(lr=1e-2, weight_decay=0.1, amsgrad=True, betas=(0.8, 0.99))),
    "adam-maximize": (torch.optim.Adam, fused_accum.Adam, dict(lr=1e-2, maximize=True, eps=1e-6)),
    "adamw": (torch.optim.AdamW, fused_accum.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "adamw-amsgrad-maximize": (torch.optim.AdamW, fused_accum.AdamW,
                               dict(lr=1e-2, weight_decay=0.2, amsgrad=True, maximize=True)),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
def test_accumulated_equals_large_batch(config, max_grad_norm, backend):
    torch_cls, fused_cls, kwargs = CONFIGS[config]
    k, windows = 4, [make_batches(seed, 4, 3) for seed in range(3)]
    base = make_model(seed=1)
    expected = train_large_batch(clone(base), lambda p: torch_cls(p, **kwargs), windows,
                                 max_grad_norm=max_grad_norm)
    model = clone(base)
    opt = fused_cls(model.parameters(), accumulation_steps=k, max_grad_norm=max_grad_norm,
                    backend=backend, **kwargs)
    train_accumulated(model, opt, windows)
    assert max_rel_error(base, expected) > 1e-2   # training really moved the parameters
    assert_same_params(model, expected)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_single_step_matches_torch_every_step(config, backend):
    torch_cls, fused_cls, kwargs = CONFIGS[config]
    base = make_model(seed=2)
    ours, theirs = clone(base), clone(base)
    opt = fused_cls(ours.parameters(), backend=backend, **kwargs)
    ref = torch_cls(theirs.parameters(), **kwargs)
    for window in [make_batches(seed, 1, 4) for seed in range(10, 16)]:
        train_accumulated(ours, opt, [window])
        train_large_batch(theirs, lambda p: ref, [window])
        assert_same_params(ours, theirs)


def test_tensor_lr(backend):
    windows = [make_batches(seed, 2, 3) for seed in range(2)]
    base = make_model(seed=3)
    expected = train_large_batch(clone(base), lambda p: torch.optim.AdamW(p, lr=torch.tensor(0.01)),
                                 windows)
    model = clone(base)
    opt = fused_accum.AdamW(model.parameters(), lr=torch.tensor(0.01), accumulation_steps=2,
                            backend=backend)
    train_accumulated(model, opt, windows)
    assert_same_params(model, expected)


def test_grad_norm_equals_clip_grad_norm(backend):
    window = make_batches(5, 3, 4)
    base = make_model(seed=4)
    probe = clone(base)
    from helpers import concat, lm_loss
    lm_loss(probe, *concat(window)).backward()
    expected = torch.nn.utils.clip_grad_norm_(probe.parameters(), float("inf"))
    model = clone(base)
    opt = fused_accum.SGD(model.parameters(), lr=0.1, accumulation_steps=3, backend=backend)
    assert opt.grad_norm is None
    train_accumulated(model, opt, [window])
    torch.testing.assert_close(opt.grad_norm, expected, rtol=1e-5, atol=0)
